//! Who changed a row: the identity PostgreSQL records for each statement, carried by
//! the stream beside the changes it made.
//!
//! ```text
//! session (role, claims) ── statement on a published table
//!      BEFORE … FOR EACH STATEMENT trigger ─▶ airlock.identity_stamp()  (SECURITY DEFINER,
//!                                             owned by the role airlock_identity)
//!          └─ first statement of the transaction, or the identity changed:
//!             pg_logical_emit_message(true, 'airlock.identity', {…})
//! WAL: … M(airlock.identity) I I U … M(airlock.identity) D …          (one transaction)
//! source: each change takes the last identity message before it in its transaction
//! ```
//!
//! Invariants:
//! - Only messages under [`MESSAGE_PREFIX`] that are transactional are identities, and
//!   they are never passed on as data. They are trusted only when [`TRUST_QUERY`]
//!   finds that nobody but the function, airlock's role and superusers can emit one
//!   (see [`Trust`]); `airlock run` checks it at start and refuses otherwise.
//! - Verified fields ([`Identity::session_user`], [`Identity::role`],
//!   [`Identity::client_addr`], [`Identity::pid`]) come from PostgreSQL itself; the
//!   asserted ones ([`Identity::application_name`], [`Identity::actor`]) are what the
//!   client says, and are never presented as verified.
//! - With identity [`Mode::Required`], a change without an identity before it in its
//!   transaction stops the source, naming the table; [`Mode::Record`] writes it with
//!   no identity and counts it.

pub mod install;

pub use crate::change::identity::{ActorClaim, Identity, IdentityError};

pub use crate::change::identity::MESSAGE_PREFIX;

/// The role that owns the function emitting identity messages: no login, no members.
pub const OWNER_ROLE: &str = "airlock_identity";

/// The trigger (on every published table) and the function it calls.
pub const TRIGGER_NAME: &str = "airlock_identity";
pub const FUNCTION: &str = "airlock.identity_stamp()";

/// What airlock does with identities (`[source] identity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// [`Mode::Required`] when `airlock identity install` has been run in the
    /// database (the function exists), else [`Mode::Off`]; decided at every start.
    #[default]
    Auto,
    /// Identity messages are ignored; rows carry no identity.
    Off,
    /// Every change must follow an identity in its transaction: one that does not
    /// stops the run, naming its table.
    Required,
    /// Changes without an identity are written with none, counted and logged.
    Record,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "auto" => Some(Mode::Auto),
            "off" => Some(Mode::Off),
            "required" => Some(Mode::Required),
            "record" => Some(Mode::Record),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Off => "off",
            Mode::Required => "required",
            Mode::Record => "record",
        }
    }

    /// Whether changes must or may carry identities (`required`, `record`).
    pub fn enabled(self) -> bool {
        matches!(self, Mode::Required | Mode::Record)
    }

    /// Whether identities may be on: anything but `off`.
    pub fn may_be_on(self) -> bool {
        self != Mode::Off
    }

    /// The mode in force, given whether the identity function is installed.
    pub fn resolve(self, installed: bool) -> Mode {
        match self {
            Mode::Auto if installed => Mode::Required,
            Mode::Auto => Mode::Off,
            explicit => explicit,
        }
    }
}

/// What [`TRUST_QUERY`] found: whether identity messages can be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trust {
    /// The `pg_logical_emit_message` overloads `PUBLIC` may execute.
    pub public_emit: Vec<String>,
    /// Roles other than superusers, [`OWNER_ROLE`] and airlock's own that hold
    /// `EXECUTE` on an overload.
    pub other_emitters: Vec<String>,
    /// The function's owner; `None` when the function is missing.
    pub owner: Option<String>,
    /// Whether the function is `SECURITY DEFINER`.
    pub security_definer: bool,
    /// Whether [`OWNER_ROLE`] can log in, and the roles that are members of it.
    pub owner_can_login: bool,
    pub owner_members: Vec<String>,
}

/// Reads [`Trust`] (one row, columns in its fields' order); `$1` is airlock's role.
pub const TRUST_QUERY: &str = r#"
WITH emit AS (
    SELECT p.oid, p.oid::regprocedure::text AS signature, p.proacl
    FROM pg_catalog.pg_proc p
    WHERE p.proname = 'pg_logical_emit_message'
      AND p.pronamespace = 'pg_catalog'::regnamespace
), owner AS (
    SELECT r.oid, r.rolname, r.rolcanlogin FROM pg_catalog.pg_roles r WHERE r.rolname = 'airlock_identity'
)
SELECT
    coalesce((SELECT array_agg(signature ORDER BY signature) FROM emit
              WHERE has_function_privilege('public', emit.oid, 'EXECUTE')), '{}'),
    coalesce((SELECT array_agg(DISTINCT r.rolname::text ORDER BY r.rolname::text)
              FROM emit, aclexplode(coalesce(emit.proacl, acldefault('f', 10))) a
              JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
              WHERE a.privilege_type = 'EXECUTE' AND NOT r.rolsuper
                AND r.rolname NOT IN ('airlock_identity', $1)), '{}'),
    (SELECT r.rolname::text FROM pg_catalog.pg_proc f JOIN pg_catalog.pg_roles r ON r.oid = f.proowner
      WHERE f.oid = to_regprocedure('airlock.identity_stamp()')),
    coalesce((SELECT f.prosecdef FROM pg_catalog.pg_proc f
      WHERE f.oid = to_regprocedure('airlock.identity_stamp()')), false),
    coalesce((SELECT rolcanlogin FROM owner), false),
    coalesce((SELECT array_agg(m.rolname::text ORDER BY m.rolname::text)
              FROM owner JOIN pg_catalog.pg_auth_members am ON am.roleid = owner.oid
              JOIN pg_catalog.pg_roles m ON m.oid = am.member), '{}')
"#;

impl Trust {
    /// What is wrong, each with its fix; empty when identity messages can be trusted.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match &self.owner {
            None => problems.push(format!(
                "the function {FUNCTION} is missing: run `airlock identity install --config FILE` (or apply `airlock identity install --print` as a superuser)"
            )),
            Some(owner) if owner != OWNER_ROLE => problems.push(format!(
                "the function {FUNCTION} is owned by `{owner}`, not by the dedicated role `{OWNER_ROLE}`: run `airlock identity install` again"
            )),
            Some(_) => {}
        }
        if self.owner.is_some() && !self.security_definer {
            problems.push(format!(
                "the function {FUNCTION} is not SECURITY DEFINER: run `airlock identity install` again"
            ));
        }
        if !self.public_emit.is_empty() {
            problems.push(format!(
                "PUBLIC may execute {}, so any role can forge an identity message: run `airlock identity install` again, or `REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC`",
                self.public_emit.join(", "),
                self.public_emit.join(", ")
            ));
        }
        if !self.other_emitters.is_empty() {
            problems.push(format!(
                "the role(s) {} may execute pg_logical_emit_message and so forge an identity message: revoke it from them",
                self.other_emitters.join(", ")
            ));
        }
        if self.owner_can_login {
            problems.push(format!(
                "the role `{OWNER_ROLE}` can log in: `ALTER ROLE {OWNER_ROLE} NOLOGIN`"
            ));
        }
        if !self.owner_members.is_empty() {
            problems.push(format!(
                "the role(s) {} are members of `{OWNER_ROLE}` and may act as it: `REVOKE {OWNER_ROLE} FROM {}`",
                self.owner_members.join(", "),
                self.owner_members.join(", ")
            ));
        }
        problems
    }
}

/// Published tables (and their partitions) without an enabled identity trigger,
/// as `schema.table`; `$1` is the publication.
pub const UNCOVERED_QUERY: &str = r#"
WITH named AS (
    SELECT c.oid
    FROM pg_catalog.pg_publication_tables pt
    JOIN pg_catalog.pg_class c ON c.relname = pt.tablename
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace AND n.nspname = pt.schemaname
    WHERE pt.pubname = $1
), published AS (
    SELECT oid AS relid FROM named
    UNION
    SELECT t.relid FROM named, pg_catalog.pg_partition_tree(named.oid) t
    UNION
    SELECT a.relid FROM named, pg_catalog.pg_partition_ancestors(named.oid) a
)
SELECT format('%s.%s', n.nspname, c.relname)
FROM published p
JOIN pg_catalog.pg_class c ON c.oid = p.relid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND NOT EXISTS (
    SELECT FROM pg_catalog.pg_trigger g
    WHERE g.tgrelid = c.oid AND g.tgname = 'airlock_identity'
      AND g.tgfoid = to_regprocedure('airlock.identity_stamp()') AND g.tgenabled IN ('O', 'A'))
ORDER BY 1
"#;

/// Reads [`Trust`] for airlock's role `role`.
pub async fn trust(
    client: &tokio_postgres::Client,
    role: &str,
) -> Result<Trust, tokio_postgres::Error> {
    let row = client.query_one(TRUST_QUERY, &[&role]).await?;
    Ok(Trust {
        public_emit: row.try_get(0)?,
        other_emitters: row.try_get(1)?,
        owner: row.try_get(2)?,
        security_definer: row.try_get(3)?,
        owner_can_login: row.try_get(4)?,
        owner_members: row.try_get(5)?,
    })
}

/// The tables of `publication` (with their partitions) that lack an enabled
/// identity trigger.
pub async fn uncovered(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client.query(UNCOVERED_QUERY, &[&publication]).await?;
    rows.iter().map(|row| row.try_get(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_names_every_problem_with_its_fix() {
        let good = Trust {
            public_emit: Vec::new(),
            other_emitters: Vec::new(),
            owner: Some(OWNER_ROLE.into()),
            security_definer: true,
            owner_can_login: false,
            owner_members: Vec::new(),
        };
        assert!(good.problems().is_empty());
        let bad = Trust {
            public_emit: vec!["pg_logical_emit_message(boolean,text,text)".into()],
            other_emitters: vec!["mallory".into()],
            owner: Some("postgres".into()),
            security_definer: false,
            owner_can_login: true,
            owner_members: vec!["eve".into()],
        };
        let problems = bad.problems().join("\n");
        for expected in [
            "owned by `postgres`",
            "not SECURITY DEFINER",
            "PUBLIC may execute pg_logical_emit_message(boolean,text,text)",
            "mallory",
            "NOLOGIN",
            "REVOKE airlock_identity FROM eve",
        ] {
            assert!(problems.contains(expected), "{expected}: {problems}");
        }
        let missing = Trust {
            owner: None,
            ..good
        };
        assert!(missing.problems()[0].contains("airlock identity install"));
    }
}
