//! `airlock policy install`: an event trigger that tells airlock, in stream order,
//! that a column comment changed.
//!
//! `COMMENT ON COLUMN` changes no relation, so PostgreSQL sends airlock no new
//! description of the table; without this trigger a comment that tightens a class
//! applies only from the table's next `ALTER TABLE` or airlock's next start. With it,
//! every `COMMENT` on a table or its columns emits a transactional logical message
//! (prefix [`super::COMMENT_MESSAGE_PREFIX`], content `{"oid", "comments"}`: the
//! table's OID and every column comment as the commenting transaction sees them) that
//! reaches airlock before any change the same or a later transaction makes. airlock
//! takes the comments from the message, not the catalog: a catalog read right after a
//! commit is decoded may not see it yet.
//!
//! Invariants:
//! - The function is `SECURITY DEFINER` with a fixed `search_path`, so it emits even
//!   where `EXECUTE` on `pg_logical_emit_message` is revoked from the commenter.
//! - Anyone able to emit such a message can only make airlock read the comments
//!   again: a forged one changes nothing that the catalog does not say.
//! - Installing twice is the same as once; uninstalling leaves the `airlock` schema.

/// The SQL that installs the trigger (creating an event trigger needs a superuser).
pub const INSTALL: &str = r#"CREATE SCHEMA IF NOT EXISTS airlock;
CREATE OR REPLACE FUNCTION airlock.policy_comment_changed() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $airlock$
DECLARE
    command record;
BEGIN
    FOR command IN SELECT classid, objid FROM pg_event_trigger_ddl_commands() LOOP
        IF command.classid = 'pg_class'::regclass THEN
            PERFORM pg_logical_emit_message(true, 'airlock.policy', json_build_object(
                'oid', command.objid,
                'comments', (
                    SELECT coalesce(json_object_agg(a.attname, d.description), '{}'::json)
                    FROM pg_description d
                    JOIN pg_attribute a ON a.attrelid = d.objoid AND a.attnum = d.objsubid
                    WHERE d.classoid = 'pg_class'::regclass AND d.objoid = command.objid
                    AND d.objsubid > 0 AND NOT a.attisdropped))::text);
        END IF;
    END LOOP;
END
$airlock$;
REVOKE ALL ON FUNCTION airlock.policy_comment_changed() FROM PUBLIC;
DROP EVENT TRIGGER IF EXISTS airlock_policy_comments;
CREATE EVENT TRIGGER airlock_policy_comments ON ddl_command_end
    WHEN TAG IN ('COMMENT') EXECUTE FUNCTION airlock.policy_comment_changed();
"#;

/// The SQL that removes it.
pub const UNINSTALL: &str = r#"DROP EVENT TRIGGER IF EXISTS airlock_policy_comments;
DROP FUNCTION IF EXISTS airlock.policy_comment_changed();
"#;
