//! Who changed each row, against a real cluster with login roles, the real binary,
//! a real lake and a built-in spine: identities PostgreSQL verifies, claims clients
//! assert, an actor that switches half-way through a transaction, a savepoint rolled
//! back, a transaction streamed while it runs, a forged identity denied, and a table
//! left uncovered that stops the run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use airlock_tests::*;
use serde_json::Value as Json;

const SCHEMA: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, balance integer);
CREATE TABLE notes (id bigint PRIMARY KEY, body text);
CREATE PUBLICATION airlock FOR TABLE accounts, notes;
CREATE ROLE alice LOGIN;
CREATE ROLE bob LOGIN;
CREATE ROLE web LOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN;
GRANT authenticated TO web;
GRANT ALL ON accounts, notes TO alice, bob, authenticated;
";

/// The configuration; `identity` is `[source] identity`, left to its default (`auto`)
/// when empty.
fn config(url: &str, dir: &Path, spine_port: u16, admin: &str, identity: &str) -> String {
    let identity = if identity.is_empty() {
        String::new()
    } else {
        format!("identity = \"{identity}\"\n")
    };
    format!(
        "[source]\nurl = \"{url}\"\nslot = \"identity\"\nstatus_interval = \"1s\"\n{identity}\
         [plugins]\ndir = \"plugins\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{lake}\"\nflush_interval = \"200ms\"\n\
         [sinks.spine]\ntype = \"http\"\nurl = \"http://127.0.0.1:{spine_port}/events\"\nroutes = [\"default\"]\nflush_interval = \"200ms\"\n\
         [admin]\nlisten = \"{admin}\"\n[policy]\ndefault = \"allow\"\n",
        lake = dir.join("lake").display(),
    )
}

/// `airlock ARGS --config CONFIG`: whether it succeeded, and what it printed.
fn airlock(args: &[&str], config: &Path) -> (bool, String) {
    let out = Command::new(airlock_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("airlock");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Connects as `role`.
async fn connect_as(
    pg: &airlock::demo::Cluster,
    role: &str,
    application_name: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = pg.pg_config("postgres");
    config.user(role).application_name(application_name);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The identity columns of a lake row: session user, role, actor, application name.
fn who(row: &Json) -> (String, String, Option<String>, Option<String>) {
    let text = |k: &str| row[k].as_str().map(str::to_owned);
    (
        text("_session_user").unwrap_or_default(),
        text("_role").unwrap_or_default(),
        text("_actor"),
        text("_application_name"),
    )
}

fn person(
    session: &str,
    role: &str,
    actor: Option<&str>,
    app: &str,
) -> (String, String, Option<String>, Option<String>) {
    (
        session.to_owned(),
        role.to_owned(),
        actor.map(str::to_owned),
        Some(app.to_owned()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_names_who_changed_it_and_no_role_can_forge_it() -> anyhow::Result<()> {
    let dir = temp_dir("identity");
    // Small enough that the bulk transaction below is streamed while it runs.
    let pg = airlock::demo::Cluster::start("logical_decoding_work_mem = 64kB")
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    let db = pg.connect("postgres").await?;
    db.batch_execute(SCHEMA).await?;
    plugin_dir(&dir, &[]);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let spine_port = listener.local_addr()?.port();
    let spine_dir = dir.join("spine");
    tokio::spawn(async move {
        airlock::spine::server::serve(&spine_dir, listener, None, std::future::pending::<()>())
            .await
    });
    let admin = format!("127.0.0.1:{}", airlock::demo::cluster::free_port());
    let config_path = dir.join("airlock.toml");
    std::fs::write(
        &config_path,
        config(&pg.url("postgres"), &dir, spine_port, &admin, "required"),
    )?;

    // Before the install any role may emit under the prefix: airlock refuses to run.
    let alice = connect_as(&pg, "alice", "ledger").await?;
    alice
        .batch_execute("SELECT pg_logical_emit_message(true, 'airlock.identity', '{}')")
        .await
        .expect("PostgreSQL's default: PUBLIC may emit");
    let (passed, shown) = airlock(&["check"], &config_path);
    assert!(!passed, "{shown}");
    assert!(shown.contains("airlock identity install"), "{shown}");
    let log = dir.join("refused.log");
    let mut host = spawn_host(&config_path, &log);
    let refused = failed(&mut host, &log, "airlock ran with untrusted identities")?;
    assert!(
        refused.contains("cannot be trusted") && refused.contains("airlock identity install"),
        "{refused}"
    );

    let (installed, shown) = airlock(&["identity", "install"], &config_path);
    assert!(installed, "{shown}");
    // Twice is the same as once.
    let (installed, shown) = airlock(&["identity", "install"], &config_path);
    assert!(installed, "{shown}");
    let (passed, shown) = airlock(&["check"], &config_path);
    assert!(passed, "{shown}");
    assert!(
        shown.contains("every published table has the identity trigger"),
        "{shown}"
    );

    // The forgery: an ordinary role emitting an identity of someone else's.
    let forged = alice
        .batch_execute(
            "SELECT pg_logical_emit_message(true, 'airlock.identity', '{\"session_user\": \"bob\"}')",
        )
        .await
        .expect_err("an ordinary role must not emit identity messages");
    let forged = format!("{forged:?}");
    assert!(forged.contains("permission denied"), "{forged}");

    // The default, `auto`, is `required` once the function is installed.
    std::fs::write(
        &config_path,
        config(&pg.url("postgres"), &dir, spine_port, &admin, ""),
    )?;
    let log = dir.join("airlock.log");
    let mut host = spawn_host(&config_path, &log);
    wait_slot_active(&db, "identity").await?;

    let bob = connect_as(&pg, "bob", "batch").await?;
    let web = connect_as(&pg, "web", "postgrest").await?;
    alice
        .batch_execute("INSERT INTO accounts VALUES (1, 10)")
        .await?;
    bob.batch_execute(
        "BEGIN;
         SET LOCAL airlock.actor = 'ticket-42';
         UPDATE accounts SET balance = 20 WHERE id = 1;
         INSERT INTO notes VALUES (1, 'by bob');
         COMMIT;",
    )
    .await?;
    // As PostgREST does: switch to the request's role, set its claims.
    web.batch_execute(
        "BEGIN;
         SET LOCAL ROLE authenticated;
         SELECT set_config('request.jwt.claims', '{\"sub\": \"user-17\", \"role\": \"authenticated\"}', true);
         INSERT INTO notes VALUES (2, 'through the api');
         COMMIT;",
    )
    .await?;
    // One transaction whose actor changes half-way.
    alice
        .batch_execute(
            "BEGIN;
             SET LOCAL airlock.actor = 'first';
             INSERT INTO notes VALUES (3, 'x');
             SET LOCAL airlock.actor = 'second';
             INSERT INTO notes VALUES (4, 'y');
             UPDATE notes SET body = 'z' WHERE id = 3;
             COMMIT;",
        )
        .await?;
    // A savepoint rolled back with the identity it emitted: the next statement emits
    // again.
    alice
        .batch_execute(
            "BEGIN;
             SAVEPOINT s;
             SET LOCAL airlock.actor = 'rolled back';
             INSERT INTO notes VALUES (5, 'gone');
             ROLLBACK TO SAVEPOINT s;
             INSERT INTO notes VALUES (6, 'kept');
             COMMIT;",
        )
        .await?;
    // Streamed while it runs (64kB of decoding memory), one identity for all of it.
    bob.batch_execute(
        "BEGIN;
         SET LOCAL airlock.actor = 'bulk';
         INSERT INTO notes SELECT g, repeat('b', 40) FROM generate_series(100, 3099) g;
         COMMIT;",
    )
    .await?;

    let lake = dir.join("lake");
    let accounts = wait_for_lake(
        &lake.join("public.accounts"),
        Duration::from_secs(60),
        |r| r.len() >= 2,
    )
    .await?;
    let notes = wait_for_lake(&lake.join("public.notes"), Duration::from_secs(90), |r| {
        r.len() >= 3006
    })
    .await?;
    assert_eq!(who(&accounts[0]), person("alice", "alice", None, "ledger"));
    assert_eq!(
        who(&accounts[1]),
        person("bob", "bob", Some("ticket-42"), "batch")
    );
    assert_eq!(accounts[0]["_client_addr"], "127.0.0.1");
    let by_id = |id: i64, op: &str| -> &Json {
        notes
            .iter()
            .find(|r| r["id"] == id && r["_op"] == op)
            .unwrap_or_else(|| panic!("note {id} ({op}) missing: {notes:#?}"))
    };
    assert_eq!(
        who(by_id(1, "c")),
        person("bob", "bob", Some("ticket-42"), "batch")
    );
    assert_eq!(
        who(by_id(2, "c")),
        person("web", "authenticated", Some("user-17"), "postgrest")
    );
    assert_eq!(
        who(by_id(3, "c")),
        person("alice", "alice", Some("first"), "ledger")
    );
    assert_eq!(
        who(by_id(4, "c")),
        person("alice", "alice", Some("second"), "ledger")
    );
    assert_eq!(
        who(by_id(3, "u")),
        person("alice", "alice", Some("second"), "ledger")
    );
    assert!(notes.iter().all(|r| r["id"] != 5), "{notes:#?}");
    assert_eq!(who(by_id(6, "c")), person("alice", "alice", None, "ledger"));
    let bulk: Vec<&Json> = notes
        .iter()
        .filter(|r| r["id"].as_i64() >= Some(100))
        .collect();
    assert_eq!(bulk.len(), 3000);
    for row in bulk {
        assert_eq!(
            who(row),
            person("bob", "bob", Some("bulk"), "batch"),
            "{row}"
        );
    }
    // The primary streamed it: the test exercised the streamed path.
    let streamed: i64 = db
        .query_one(
            "SELECT coalesce(stream_bytes, 0) FROM pg_stat_replication_slots WHERE slot_name = 'identity'",
            &[],
        )
        .await?
        .get(0);
    assert!(streamed > 0, "the bulk transaction was not streamed");

    // The spine: verified and asserted apart.
    let started = Instant::now();
    let api = loop {
        let events: Json =
            reqwest::get(format!("http://127.0.0.1:{spine_port}/events?limit=10000"))
                .await?
                .json()
                .await?;
        let found =
            events.as_array().into_iter().flatten().find(|e| {
                e["payload"]["table"] == "public.notes" && e["payload"]["new"]["id"] == 2
            });
        if let Some(event) = found {
            break event.clone();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "no spine event for note 2"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let actor = &api["payload"]["actor"];
    assert_eq!(actor["verified"]["session_user"], "web", "{actor}");
    assert_eq!(actor["verified"]["role"], "authenticated", "{actor}");
    assert_eq!(actor["asserted"]["actor"], "user-17", "{actor}");
    assert_eq!(
        actor["asserted"]["actor_from"], "request.jwt.claims.sub",
        "{actor}"
    );

    // A table published later is covered by the event trigger.
    db.batch_execute(
        "CREATE TABLE later (id bigint PRIMARY KEY);
         GRANT ALL ON later TO alice;
         ALTER PUBLICATION airlock ADD TABLE later;",
    )
    .await?;
    alice.batch_execute("INSERT INTO later VALUES (1)").await?;
    let later = wait_for_lake(&lake.join("public.later"), Duration::from_secs(60), |r| {
        !r.is_empty()
    })
    .await?;
    assert_eq!(who(&later[0]), person("alice", "alice", None, "ledger"));

    // A table whose trigger is disabled: its change stops the run, naming it, and
    // nothing of that transaction reaches the lake.
    db.batch_execute("ALTER TABLE notes DISABLE TRIGGER airlock_identity")
        .await?;
    let (passed, shown) = airlock(&["check"], &config_path);
    assert!(!passed && shown.contains("public.notes"), "{shown}");
    alice
        .batch_execute("INSERT INTO notes VALUES (7, 'unattributed')")
        .await?;
    let stopped = failed(
        &mut host,
        &log,
        "a change without identity did not stop the run",
    )?;
    assert!(
        stopped.contains("public.notes") && stopped.contains("carries no identity"),
        "{stopped}"
    );
    let notes = read_lake("duckdb", &lake.join("public.notes"))?;
    assert!(notes.iter().all(|r| r["id"] != 7));

    // `record` writes it with no identity, and counts it.
    std::fs::write(
        &config_path,
        config(&pg.url("postgres"), &dir, spine_port, &admin, "record"),
    )?;
    let mut host = spawn_host(&config_path, &dir.join("airlock-record.log"));
    let notes = wait_for_lake(&lake.join("public.notes"), Duration::from_secs(60), |r| {
        r.iter().any(|r| r["id"] == 7)
    })
    .await?;
    let seven = notes.iter().find(|r| r["id"] == 7).expect("note 7");
    assert!(
        seven["_session_user"].is_null() && seven["_actor"].is_null(),
        "{seven}"
    );
    let started = Instant::now();
    loop {
        let events: Json = reqwest::get(format!("http://127.0.0.1:{spine_port}/events?limit=20"))
            .await?
            .json()
            .await?;
        let seven =
            events.as_array().into_iter().flatten().find(|e| {
                e["payload"]["table"] == "public.notes" && e["payload"]["new"]["id"] == 7
            });
        if let Some(event) = seven {
            assert!(event["payload"]["actor"].is_null(), "{event}");
            assert_eq!(event["payload"]["unattributed"], true, "{event}");
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "no spine event for note 7"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("airlock_source_unattributed_changes_total{table=\"public.notes\"} 1"),
        "{metrics}"
    );
    host.stop(Duration::from_secs(30))?;

    // Uninstalled: PUBLIC may emit again, and airlock with identity on refuses.
    let (removed, shown) = airlock(&["identity", "uninstall"], &config_path);
    assert!(removed, "{shown}");
    alice
        .batch_execute("SELECT pg_logical_emit_message(true, 'airlock-test', 'x')")
        .await?;
    let triggers: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'airlock_identity'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(triggers, 0);
    drop_slot(&db, "identity").await?;
    Ok(())
}
