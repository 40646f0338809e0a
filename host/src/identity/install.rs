//! `airlock identity install`: the function, the triggers and the privileges that make
//! PostgreSQL tell airlock, in stream order, who made each change.
//!
//! What it sets up, in the database of the configuration:
//! - the role [`super::OWNER_ROLE`] (no login, no members), which alone (with
//!   superusers and airlock's own role) may execute `pg_logical_emit_message`: every
//!   overload is revoked from `PUBLIC`, so an ordinary role cannot forge an identity;
//! - `airlock.identity_stamp()`, a `SECURITY DEFINER` trigger function owned by that
//!   role, every name in it schema-qualified, which emits a transactional message under [`super::MESSAGE_PREFIX`] at the
//!   first statement of a transaction and again only when the identity changes; the
//!   last identity it emitted is kept in `airlock.identity_emitted`, an unlogged table
//!   only the role may read or write (a setting would not do: the session could set it
//!   beforehand and suppress the next message);
//! - a `BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE … FOR EACH STATEMENT` trigger
//!   `airlock_identity` on every published table, its partitions and its partitioned
//!   ancestors, and an event trigger that adds it to tables created or published later.
//!
//! Running it again is the same as running it once; `airlock identity uninstall` removes
//! all of it and gives `PUBLIC` back its default `EXECUTE`.

/// The SQL that installs identity; `airlock_role` (the role airlock connects as) keeps
/// `EXECUTE` on `pg_logical_emit_message` (its snapshot emits a message).
pub fn install_sql(airlock_role: Option<&str>) -> String {
    let grant_airlock = match airlock_role {
        Some(role) => format!(
            "\n        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, {});",
            literal(role)
        ),
        None => String::new(),
    };
    INSTALL.replace("{grant_airlock}", &grant_airlock)
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

const INSTALL: &str = r#"CREATE SCHEMA IF NOT EXISTS airlock;
DO $airlock$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'airlock_identity') THEN
        CREATE ROLE airlock_identity NOLOGIN;
    END IF;
END
$airlock$;
ALTER ROLE airlock_identity NOLOGIN;
GRANT USAGE ON SCHEMA airlock TO airlock_identity;

-- Only the role may emit: every overload of pg_logical_emit_message (PostgreSQL 17
-- added two) is revoked from PUBLIC.
DO $airlock$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.proname = 'pg_logical_emit_message'
               AND p.pronamespace = 'pg_catalog'::regnamespace LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO airlock_identity', f);{grant_airlock}
    END LOOP;
END
$airlock$;

-- The identity each backend last emitted, and in which transaction.
CREATE UNLOGGED TABLE IF NOT EXISTS airlock.identity_emitted (
    pid integer PRIMARY KEY,
    xid xid8 NOT NULL,
    identity text NOT NULL
);
ALTER TABLE airlock.identity_emitted OWNER TO airlock_identity;
REVOKE ALL ON airlock.identity_emitted FROM PUBLIC;

CREATE OR REPLACE FUNCTION airlock.identity_stamp() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $airlock$
-- Every name is schema-qualified (functions, operators, types, the table): the
-- function runs as its owner under the caller's search_path, so nothing may resolve
-- through it. (A SET search_path clause would do the same at a cost per call higher
-- than the rest of the function.)
DECLARE
    stamp pg_catalog.text := pg_catalog.json_build_object(
        'session_user', session_user,
        'role', pg_catalog.current_setting('role'),
        'client_addr', pg_catalog.inet_client_addr(),
        'pid', pg_catalog.pg_backend_pid(),
        'application_name', pg_catalog.current_setting('application_name'),
        'actor', pg_catalog.current_setting('airlock.actor', true),
        'jwt', pg_catalog.current_setting('request.jwt.claims', true),
        'hasura', pg_catalog.current_setting('hasura.user', true))::pg_catalog.text;
BEGIN
    PERFORM 1 FROM airlock.identity_emitted e
        WHERE e.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
          AND e.xid OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id()
          AND e.identity OPERATOR(pg_catalog.=) stamp;
    IF NOT FOUND THEN
        PERFORM pg_catalog.pg_logical_emit_message(true, 'airlock.identity', stamp);
        INSERT INTO airlock.identity_emitted (pid, xid, identity)
            VALUES (pg_catalog.pg_backend_pid(), pg_catalog.pg_current_xact_id(), stamp)
            ON CONFLICT (pid) DO UPDATE SET xid = excluded.xid, identity = excluded.identity;
    END IF;
    RETURN NULL;
END
$airlock$;
ALTER FUNCTION airlock.identity_stamp() OWNER TO airlock_identity;
REVOKE ALL ON FUNCTION airlock.identity_stamp() FROM PUBLIC;

-- The trigger on every published table, its partitions and its partitioned ancestors.
CREATE OR REPLACE FUNCTION airlock.identity_cover() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $airlock$
DECLARE
    t regclass;
    added integer := 0;
BEGIN
    FOR t IN
        WITH published AS (
            SELECT c.oid
            FROM pg_catalog.pg_publication_tables pt
            JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname
            JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
        ), related AS (
            SELECT p.oid AS relid FROM published p
            UNION
            SELECT tree.relid FROM published p, pg_catalog.pg_partition_tree(p.oid) tree
            UNION
            SELECT up.relid FROM published p, pg_catalog.pg_partition_ancestors(p.oid) up
        )
        SELECT r.relid::regclass FROM related r
        JOIN pg_catalog.pg_class c ON c.oid = r.relid
        WHERE c.relkind IN ('r', 'p')
          AND NOT EXISTS (SELECT FROM pg_catalog.pg_trigger g
                          WHERE g.tgrelid = r.relid AND g.tgname = 'airlock_identity')
    LOOP
        EXECUTE format('CREATE TRIGGER airlock_identity BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION airlock.identity_stamp()', t);
        added := added + 1;
    END LOOP;
    RETURN added;
END
$airlock$;
REVOKE ALL ON FUNCTION airlock.identity_cover() FROM PUBLIC;

CREATE OR REPLACE FUNCTION airlock.identity_cover_new() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $airlock$
BEGIN
    PERFORM airlock.identity_cover();
END
$airlock$;
REVOKE ALL ON FUNCTION airlock.identity_cover_new() FROM PUBLIC;
DROP EVENT TRIGGER IF EXISTS airlock_identity_cover;
CREATE EVENT TRIGGER airlock_identity_cover ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE',
                 'CREATE PUBLICATION', 'ALTER PUBLICATION')
    EXECUTE FUNCTION airlock.identity_cover_new();

SELECT airlock.identity_cover();
"#;

/// The SQL that removes identity and gives `PUBLIC` back its default `EXECUTE` on
/// `pg_logical_emit_message`.
pub const UNINSTALL: &str = r#"DROP EVENT TRIGGER IF EXISTS airlock_identity_cover;
DO $airlock$
DECLARE
    t record;
    f regprocedure;
BEGIN
    IF to_regprocedure('airlock.identity_stamp()') IS NOT NULL THEN
        FOR t IN SELECT g.tgrelid::regclass AS rel FROM pg_catalog.pg_trigger g
                 WHERE g.tgname = 'airlock_identity'
                   AND g.tgfoid = to_regprocedure('airlock.identity_stamp()') LOOP
            EXECUTE format('DROP TRIGGER airlock_identity ON %s', t.rel);
        END LOOP;
    END IF;
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.proname = 'pg_logical_emit_message'
               AND p.pronamespace = 'pg_catalog'::regnamespace LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', f);
        IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'airlock_identity') THEN
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM airlock_identity', f);
        END IF;
    END LOOP;
END
$airlock$;
DROP FUNCTION IF EXISTS airlock.identity_cover_new();
DROP FUNCTION IF EXISTS airlock.identity_cover();
DROP FUNCTION IF EXISTS airlock.identity_stamp();
DROP TABLE IF EXISTS airlock.identity_emitted;
DO $airlock$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'airlock_identity') THEN
        REVOKE USAGE ON SCHEMA airlock FROM airlock_identity;
        BEGIN
            DROP ROLE airlock_identity;
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'the role airlock_identity is kept: another database still uses it';
        END;
    END IF;
END
$airlock$;
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn airlock_s_role_keeps_execute_quoted_as_a_literal() {
        let sql = install_sql(Some("air'lock"));
        assert!(sql.contains("TO %I', f, 'air''lock');"), "{sql}");
        assert!(!install_sql(None).contains("{grant_airlock}"));
    }
}
