//! `airlock check`: everything that can be verified before streaming, each problem
//! reported with what to do, all at once.
//!
//! ```text
//! config (already validated) ─▶ connect ─▶ wal_level ─▶ role ─▶ publication ─▶ slot
//!                              plugins: compile + init every stage, require ─▶ sinks
//! ```

use std::fmt;
use std::net::IpAddr;

use crate::config::{Config, SinkKind};
use crate::pipeline::registry;
use crate::pipeline::runtime::Runtime;
use crate::source::catalog::{self, WalLevel};
use crate::source::protocol::{ConnectConfig, SslMode};

/// The outcome of one check.
#[derive(Clone, Debug)]
pub struct Finding {
    pub what: String,
    /// False for a problem that stops airlock.
    pub ok: bool,
    /// A risk that does not stop airlock (`ok` stays true).
    pub warn: bool,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match (self.ok, self.warn) {
            (false, _) => "FAIL",
            (true, true) => "WARN",
            (true, false) => "ok  ",
        };
        write!(f, "{mark} {:<22} {}", self.what, self.detail)
    }
}

fn ok(what: &str, detail: impl Into<String>) -> Finding {
    Finding {
        what: what.into(),
        ok: true,
        warn: false,
        detail: detail.into(),
    }
}

fn warn(what: &str, detail: impl Into<String>) -> Finding {
    Finding {
        what: what.into(),
        ok: true,
        warn: true,
        detail: detail.into(),
    }
}

fn fail(what: &str, detail: impl Into<String>) -> Finding {
    Finding {
        what: what.into(),
        ok: false,
        warn: false,
        detail: detail.into(),
    }
}

/// The risk of the connection's TLS settings when the server is not on this
/// machine: rows and credentials cross a network.
fn transport_risk(connect: &ConnectConfig) -> Option<String> {
    let host = connect.host.as_str();
    let loopback = host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return None;
    }
    let risk = match connect.sslmode {
        SslMode::Disable => {
            "is not encrypted: anyone on the network path reads every row and the password"
        }
        SslMode::Prefer => {
            "may fall back to plain text and does not verify the server: anyone on the network path can strip TLS and read every row"
        }
        SslMode::Require => {
            "is encrypted but does not verify the server: anyone on the network path can pose as PostgreSQL and read every row"
        }
        SslMode::VerifyCa | SslMode::VerifyFull => return None,
    };
    Some(format!(
        "the connection to `{host}` (sslmode={}) {risk}; set sslmode = \"verify-full\" and sslrootcert to the CA that signed the server's certificate",
        connect.sslmode.as_str()
    ))
}

async fn database_checks(config: &Config, out: &mut Vec<Finding>) {
    let connect = match config.source.connect_config() {
        Ok(c) => c,
        Err(e) => return out.push(fail("source.url", e.to_string())),
    };
    let target = connect.redacted_url();
    if let Err(e) = connect
        .check_tls()
        .and_then(|()| crate::source::tls::client_config(&connect))
    {
        return out.push(fail("source.tls", e.to_string()));
    }
    if let Some(risk) = transport_risk(&connect) {
        out.push(warn("source.sslmode", risk));
    }
    let client = match connect.connect_sql().await {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let tls = match client
                .query_opt(
                    "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
                    &[],
                )
                .await
            {
                Ok(Some(row)) => format!("TLS {}", row.get::<_, String>(0)),
                Ok(None) => "not encrypted".to_owned(),
                Err(_) => "encryption unknown".to_owned(),
            };
            out.push(ok(
                "connection",
                format!(
                    "connected to {target} ({tls}, sslmode={})",
                    connect.sslmode.as_str()
                ),
            ));
            client
        }
        Err(e) => {
            return out.push(fail("connection", format!("cannot connect to {target}: {e} (check source.url, the password and pg_hba.conf)")));
        }
    };

    match catalog::wal_level(&client).await {
        Ok(WalLevel::Logical) => out.push(ok("wal_level", "logical")),
        Ok(level) => out.push(fail(
            "wal_level",
            format!("is `{level}`: set wal_level = logical in postgresql.conf (or ALTER SYSTEM) and restart PostgreSQL"),
        )),
        Err(e) => out.push(fail("wal_level", e.to_string())),
    }

    match catalog::current_role(&client).await {
        Ok(role) if role.may_replicate => out.push(ok(
            "privileges",
            format!("role {} may replicate", role.name),
        )),
        Ok(role) => out.push(fail(
            "privileges",
            format!(
                "role {0} lacks REPLICATION: ALTER ROLE {0} WITH REPLICATION",
                role.name
            ),
        )),
        Err(e) => out.push(fail("privileges", e.to_string())),
    }

    let publication = &config.source.publication;
    match catalog::publication(&client, publication).await {
        Ok(Some(found)) => {
            if found.tables.is_empty() {
                out.push(fail("publication", format!("`{publication}` publishes no table: ALTER PUBLICATION {publication} ADD TABLE ...")));
            } else {
                let tables: Vec<String> = found.tables.iter().map(|t| format!("{}.{}", t.schema, t.name)).collect();
                out.push(ok("publication", format!("`{publication}`: {}", tables.join(", "))));
            }
            // The identity mode in force, as `airlock run` will resolve it.
            let installed = client
                .query_one(
                    "SELECT to_regprocedure('airlock.identity_stamp()') IS NOT NULL",
                    &[],
                )
                .await
                .is_ok_and(|row| row.get::<_, bool>(0));
            let identity = config.source.identity.resolve(installed);
            policy_checks(config, &client, publication, identity, out).await;
            identity_checks(config, &client, publication, identity, out).await;
            let unreadable = catalog::unreadable_tables(&client, publication).await.unwrap_or_default();
            if !unreadable.is_empty() {
                out.push(fail(
                    "table privileges",
                    format!("no SELECT on {} (needed for the initial snapshot): GRANT SELECT ON ... TO the airlock role", unreadable.join(", ")),
                ));
            }
            if config.source.snapshot == crate::config::Snapshot::Initial {
                snapshot_checks(&client, publication, out).await;
            }
        }
        Ok(None) if !config.source.tables.is_empty() => out.push(ok(
            "publication",
            format!("`{publication}` does not exist yet; it will be created for {}", config.source.tables.join(", ")),
        )),
        Ok(None) => out.push(fail(
            "publication",
            format!("`{publication}` does not exist: CREATE PUBLICATION {publication} FOR TABLE ..., or list the tables in [source] tables"),
        )),
        Err(e) => out.push(fail("publication", e.to_string())),
    }

    let slot = &config.source.slot;
    match catalog::slot(&client, slot).await {
        Ok(Some(found)) => {
            if !found.is_pgoutput() {
                out.push(fail("slot", format!("`{slot}` uses plugin {:?}, not pgoutput: drop it or choose another [source] slot", found.plugin)));
            } else if found.is_lost() {
                out.push(fail("slot", format!("`{slot}` is invalidated ({}): the changes it held are gone; drop it and start again with snapshot = \"initial\"", found.lost_reason())));
            } else if found.active {
                out.push(fail("slot", format!("`{slot}` is in use by another consumer (pid {}): stop it, or choose another slot", found.active_pid.unwrap_or(0))));
            } else {
                let confirmed = found
                    .confirmed_flush
                    .map_or_else(|| "-".into(), |l| l.to_string());
                out.push(ok("slot", format!("`{slot}` (pgoutput) at {confirmed}")));
            }
        }
        Ok(None) if config.source.create_slot => out.push(ok(
            "slot",
            format!("`{slot}` does not exist yet; it will be created"),
        )),
        Ok(None) => out.push(fail(
            "slot",
            format!("`{slot}` does not exist and create_slot = false"),
        )),
        Err(e) => out.push(fail("slot", e.to_string())),
    }
}

/// Incremental snapshots: their watermarks need `pg_logical_emit_message`, and a
/// table is copied while it changes only when its rows have a key.
async fn snapshot_checks(
    client: &tokio_postgres::Client,
    publication: &str,
    out: &mut Vec<Finding>,
) {
    let may_emit = client
        .query_one(
            "SELECT has_function_privilege('pg_logical_emit_message(boolean, text, text)', 'EXECUTE')",
            &[],
        )
        .await
        .map(|row| row.get::<_, bool>(0));
    match may_emit {
        Ok(true) => out.push(ok(
            "snapshots",
            "may write watermarks (pg_logical_emit_message): tables added to the publication or rewritten are copied while the stream runs",
        )),
        Ok(false) => out.push(fail(
            "snapshots",
            "no EXECUTE on pg_logical_emit_message, which writes the watermarks of incremental snapshots: GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO the airlock role (`airlock identity install` does)",
        )),
        Err(e) => out.push(fail("snapshots", e.to_string())),
    }
    let keyless = client
        .query(
            "SELECT format('%I.%I', p.schemaname, p.tablename) FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS \
               (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) ORDER BY 1",
            &[&publication],
        )
        .await;
    match keyless {
        Ok(rows) if !rows.is_empty() => {
            let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            out.push(warn(
                "snapshots",
                format!("{} have no key (no primary key, replica identity nothing or default): if added later or rewritten they cannot be copied while they change; add a primary key or REPLICA IDENTITY USING INDEX", names.join(", ")),
            ));
        }
        Ok(_) => {}
        Err(e) => out.push(fail("snapshots", e.to_string())),
    }
}

/// Identity: whether its messages can be trusted, and which published tables lack
/// the trigger. Reported whenever the function is installed or identity is on; a
/// problem fails the check only when identity is on.
async fn identity_checks(
    config: &Config,
    client: &tokio_postgres::Client,
    publication: &str,
    mode: crate::identity::Mode,
    out: &mut Vec<Finding>,
) {
    let role = match catalog::current_role(client).await {
        Ok(role) => role.name,
        Err(e) => return out.push(fail("identity", e.to_string())),
    };
    let trust = match crate::identity::trust(client, &role).await {
        Ok(trust) => trust,
        Err(e) => return out.push(fail("identity", e.to_string())),
    };
    if !mode.enabled() && trust.owner.is_none() {
        return;
    }
    let report = |detail: String| {
        if mode.enabled() {
            fail("identity", detail)
        } else {
            warn("identity", detail)
        }
    };
    let problems = trust.problems();
    if problems.is_empty() {
        out.push(ok(
            "identity",
            format!(
                "identity = \"{}\" ({}): messages can be trusted (only {} and airlock's role may emit them)",
                config.source.identity.name(),
                mode.name(),
                crate::identity::OWNER_ROLE
            ),
        ));
    } else {
        for problem in problems {
            out.push(report(problem));
        }
    }
    match crate::identity::uncovered(client, publication).await {
        Ok(tables) if tables.is_empty() => out.push(ok(
            "identity triggers",
            "every published table has the identity trigger",
        )),
        Ok(tables) => out.push(report(format!(
            "published tables without an enabled identity trigger: {} (their changes carry no identity): run `airlock identity install` again, or ALTER TABLE ... ENABLE TRIGGER airlock_identity",
            tables.join(", ")
        ))),
        Err(e) => out.push(fail("identity triggers", e.to_string())),
    }
}

/// The proof: for every published column, its class, its action and the sinks it
/// reaches, from the very plans the gate will run; a column the gate would stop on
/// fails the check.
async fn policy_checks(
    config: &Config,
    client: &tokio_postgres::Client,
    publication: &str,
    identity: crate::identity::Mode,
    out: &mut Vec<Finding>,
) {
    let policy = &config.policy;
    out.push(ok(
        "policy",
        format!(
            "version {}, unclassified columns {}, {}",
            policy.version,
            match policy.default {
                crate::policy::Unclassified::Deny => "denied",
                crate::policy::Unclassified::Allow => "allowed as they are",
            },
            match &policy.key {
                Some(key) => format!("hmac key `{}`", key.id),
                None => "no hmac key".to_owned(),
            }
        ),
    ));
    let version = match catalog::server_version(client).await {
        Ok(v) => v,
        Err(e) => return out.push(fail("policy", e.to_string())),
    };
    let tables = match catalog::published_tables(client, publication, version).await {
        Ok(t) => t,
        Err(e) => return out.push(fail("policy", e.to_string())),
    };
    let sinks: Vec<&str> = config.sinks.iter().map(|s| s.name.as_str()).collect();
    let sinks = sinks.join(", ");
    // What the lakes hold already: a column must keep its type, and one they hold
    // cannot be dropped without saying what happens to what was written.
    let lakes = match crate::sink::lake::catalog(config.lakes()).await {
        Ok(catalog) => catalog.sinks,
        Err(e) => {
            out.push(warn(
                "policy",
                format!("cannot read the lake to compare column types: {e}"),
            ));
            Vec::new()
        }
    };
    for table in &tables {
        let described = catalog::describe(client, table, version).await;
        let relation = match described {
            Ok((relation, _)) => std::sync::Arc::new(relation),
            Err(e) => {
                out.push(fail(
                    "policy",
                    format!("{}.{}: {e}", table.schema, table.name),
                ));
                continue;
            }
        };
        match crate::policy::Plan::new(policy, &relation, identity.enabled()) {
            Err(e) => out.push(fail("policy", e.to_string())),
            Ok(plan) => {
                let held = crate::sink::lake::lake_table_name(&relation.schema, &relation.name);
                for sink in &lakes {
                    let Some(table) = sink.tables.iter().find(|t| t.name == held) else {
                        continue;
                    };
                    for (column, r) in &plan.resolved {
                        let what = format!("{}.{}.{}", relation.schema, relation.name, column.name);
                        let Some(existing) = table.columns.iter().find(|c| c.name == column.name)
                        else {
                            continue;
                        };
                        match r.action.output_type(column.type_oid, column.type_modifier) {
                            None => out.push(fail(&what, format!(
                                "{} drops it, but the lake table {} of sink {} holds it with the values written so far: they would stay there and new rows would hold null; to keep the column with nothing new in it, give it a class with `null`; to remove what was written, recreate the table",
                                r.class.as_deref().map_or("the default (deny)".to_owned(), |c| format!("class `{c}`")),
                                table.name,
                                sink.name
                            ))),
                            Some((oid, typmod)) => {
                                let now = crate::sink::lake::lake_type(oid, typmod);
                                if now != existing.data_type {
                                    out.push(fail(&what, format!(
                                        "is `{}` in the lake table {} of sink {}, and `{}` would write `{now}`: choose an action that keeps its type (`keep`, `null`, `generalize`), or recreate the table",
                                        existing.data_type, table.name, sink.name, r.action
                                    )));
                                }
                            }
                        }
                    }
                }
                for (column, r) in plan.resolved.iter().chain(&plan.resolved_identity) {
                    let what = format!("{}.{}.{}", relation.schema, relation.name, column.name);
                    let class = r.class.as_deref().unwrap_or("unclassified");
                    let by = match &r.by {
                        crate::policy::By::Default => String::new(),
                        by => format!(" (by {by})"),
                    };
                    if r.action == crate::policy::Action::Drop {
                        let detail = format!("{class}{by}: dropped, it reaches no sink");
                        if column.key {
                            out.push(warn(&what, format!("{detail}; it is part of the replica identity, so deletes and key updates carry no value for it: classify it to let a token of it out")));
                        } else if r.by == crate::policy::By::Default {
                            out.push(warn(
                                &what,
                                format!("{detail}; classify it in [policy.columns] to let it out"),
                            ));
                        } else {
                            out.push(ok(&what, detail));
                        }
                    } else {
                        out.push(ok(&what, format!("{class}{by}: {} -> {sinks}", r.action)));
                    }
                }
            }
        }
    }
}

fn plugin_checks(config: &Config, out: &mut Vec<Finding>) {
    let runtime = match Runtime::new(
        config.plugins.limits.clone(),
        config.plugins.cache_dir.clone(),
    ) {
        Ok(r) => r,
        Err(e) => return out.push(fail("plugins", e.to_string())),
    };
    let files = match crate::pipeline::scan(&config.plugins.dir) {
        Ok(files) => files,
        Err(e) => return out.push(fail("plugins", e.to_string())),
    };
    if let Err(e) = registry::check_required(&files, &config.plugins.require) {
        out.push(fail("plugins.require", e));
    }
    // Every plugin is compiled and initialised, whatever the require check said.
    match crate::pipeline::Pipeline::load(&runtime, &files, &[]) {
        Err(errors) => {
            for error in errors {
                out.push(fail("plugin", error.to_string()));
            }
        }
        Ok(pipeline) => {
            for stage in &pipeline.stages {
                out.push(ok(
                    &format!("stage {}", stage.name),
                    format!(
                        "{} {}: {} ({}built against {}; sha256 {}; pin it with `{}{}{}` in [plugins] require)",
                        stage.info.name,
                        stage.info.version,
                        stage.info.description,
                        stage
                            .when
                            .as_ref()
                            .map(|w| format!("only for {}; ", w.describe()))
                            .unwrap_or_default(),
                        contract_text(stage.contract.as_deref()),
                        stage.content_hash,
                        stage.name,
                        crate::config::RequiredStage::PIN,
                        stage.content_hash
                    ),
                ));
            }
            if let Err(e) = registry::check_pins(&pipeline, &config.plugins.require) {
                out.push(fail("plugins.require", e));
            }
            out.push(ok(
                "pipeline",
                format!(
                    "version {} from {}",
                    pipeline.version,
                    config.plugins.dir.display()
                ),
            ));
        }
    }
}

fn sink_checks(config: &Config, out: &mut Vec<Finding>) {
    for sink in &config.sinks {
        let what = format!("sink {}", sink.name);
        match (sink.kind(), sink.url().strip_prefix("file://")) {
            (SinkKind::Delta, Some(path)) => {
                let dir = std::path::Path::new(path);
                let probe = dir.join(format!(".airlock-check-{}", std::process::id()));
                let writable = std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(&probe, b""))
                    .and_then(|()| std::fs::remove_file(&probe));
                match writable {
                    Ok(()) => out.push(ok(&what, format!("{} is writable", sink.url()))),
                    Err(e) => out.push(fail(&what, format!("cannot write in {path}: {e}"))),
                }
            }
            _ => out.push(ok(&what, format!("{} (not probed)", sink.url()))),
        }
    }
}

/// Runs every check; the caller prints them and fails if any failed.
pub async fn check(config: &Config) -> Vec<Finding> {
    let mut out = vec![ok("configuration", "valid")];
    database_checks(config, &mut out).await;
    let for_plugins = config.clone();
    let plugins = tokio::task::spawn_blocking(move || {
        let mut found = Vec::new();
        plugin_checks(&for_plugins, &mut found);
        found
    })
    .await
    .unwrap_or_else(|e| vec![fail("plugins", format!("the plugin check panicked: {e}"))]);
    out.extend(plugins);
    sink_checks(config, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(host: &str, mode: SslMode) -> ConnectConfig {
        let mut c = ConnectConfig::new(host, 5432, "airlock", None, "app");
        c.sslmode = mode;
        c
    }

    #[test]
    fn remote_connections_without_verification_are_warned_about() {
        for (mode, words) in [
            (SslMode::Disable, "is not encrypted"),
            (SslMode::Prefer, "may fall back to plain text"),
            (SslMode::Require, "does not verify the server"),
        ] {
            for host in ["db.internal", "10.0.0.5", "2001:db8::1"] {
                let risk = transport_risk(&connect(host, mode)).expect("a warning");
                assert!(
                    risk.contains(words) && risk.contains(host) && risk.contains("verify-full"),
                    "{risk}"
                );
            }
        }
        for host in ["db.internal", "10.0.0.5"] {
            assert_eq!(transport_risk(&connect(host, SslMode::VerifyFull)), None);
            assert_eq!(transport_risk(&connect(host, SslMode::VerifyCa)), None);
        }
        for host in ["localhost", "127.0.0.1", "::1", "/var/run/postgresql"] {
            assert_eq!(
                transport_risk(&connect(host, SslMode::Disable)),
                None,
                "{host}"
            );
        }
        let warning = warn("source.sslmode", "x").to_string();
        assert!(warning.starts_with("WARN"), "{warning}");
    }
}

/// The contract a stage was built against, as `check` and `status` show it.
pub fn contract_text(version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{}@{v}", crate::pipeline::guest::CONTRACT_PACKAGE),
        None => "no version of the contract (it calls nothing of the batch)".to_owned(),
    }
}
