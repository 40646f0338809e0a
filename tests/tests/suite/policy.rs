//! The policy gate against a real cluster, a real lake, a real spine and the real
//! binary's log: deny by default while the schema changes, keyed tokens that join
//! across tables, comments that tighten, and `airlock check` as the proof.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use airlock_tests::*;
use serde_json::Value as Json;

const SCHEMA: &str = "
CREATE TABLE customers (id bigint PRIMARY KEY, email text, phone text);
CREATE TABLE orders (id bigint PRIMARY KEY, customer_email text, note text, amount numeric(10,2));
COMMENT ON COLUMN orders.note IS 'Free text from the customer. airlock: pii';
CREATE PUBLICATION airlock FOR TABLE customers, orders;
";

/// Values that must never leave airlock in any form but a token or a mask.
const SECRETS: &[&str] = &[
    "078-05-1120",
    "219-09-9999",
    "call me at 555-0199",
    "ada@example.com",
    "Ada@Example.com",
    "grace@example.com",
    "7946 0958",
];

const POLICY: &str = r#"[policy]
default = "deny"
key_file = "policy.key"
key_id = "k1"

[policy.classes]
public = { action = "keep" }
pii = { action = "hmac", normalize = ["trim", "lower"] }
contact = { action = "keep-last", n = 4 }

[policy.columns]
"public.customers.id" = "public"
"public.customers.email" = "pii"
"public.customers.phone" = "contact"
"public.orders.*" = "public"
"public.orders.customer_email" = "pii"
"#;

fn config(url: &str, dir: &Path, spine_port: u16, admin: &str, policy: &str) -> String {
    format!(
        "[source]\nurl = \"{url}\"\nslot = \"policy\"\nstatus_interval = \"1s\"\n\
         [plugins]\ndir = \"plugins\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{lake}\"\nroutes = [\"default\", \"restricted\"]\nflush_interval = \"200ms\"\n\
         [sinks.spine]\ntype = \"http\"\nurl = \"http://127.0.0.1:{spine_port}/events\"\nroutes = [\"spine\"]\nflush_interval = \"200ms\"\n\
         [admin]\nlisten = \"{admin}\"\n\n{policy}",
        lake = dir.join("lake").display(),
    )
}

/// A cluster with [`SCHEMA`], a folder with the plugin `stages`, a built-in spine
/// (its files in `spine/`), the port the host's admin API will take, and where the
/// configuration goes.
struct Setup {
    dir: TempDir,
    pg: airlock::demo::Cluster,
    db: tokio_postgres::Client,
    admin: String,
    spine_port: u16,
    path: std::path::PathBuf,
}

impl Setup {
    async fn new(name: &str, stages: &[(&str, &str, &str)]) -> anyhow::Result<Setup> {
        let dir = temp_dir(name);
        let pg = cluster();
        let db = pg.connect("postgres").await?;
        db.batch_execute(SCHEMA).await?;
        plugin_dir(&dir, stages);
        let path = dir.join("airlock.toml");
        // Every run records the policy in its spine: one is always there.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let spine_port = listener.local_addr()?.port();
        let spine_dir = dir.join("spine");
        tokio::spawn(async move {
            airlock::spine::server::serve(&spine_dir, listener, None, std::future::pending::<()>())
                .await
        });
        Ok(Setup {
            dir,
            pg,
            db,
            admin: format!("127.0.0.1:{}", airlock::demo::cluster::free_port()),
            spine_port,
            path,
        })
    }
}

fn write_key(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("policy.key");
    std::fs::write(
        &path,
        "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\n",
    )
    .expect("key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn check(config: &Path) -> (bool, String) {
    let out = Command::new(airlock_bin())
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("airlock check");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every raw secret absent from every byte of `files`, and from `text`.
fn assert_absent(what: &str, files: &[std::path::PathBuf], text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} holds `{secret}`:\n{text}");
        for file in files {
            let bytes = std::fs::read(file).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds `{secret}`",
                file.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_default_keeps_a_new_column_out_and_tokens_join_across_tables() -> anyhow::Result<()>
{
    let Setup {
        dir,
        pg,
        db,
        admin,
        spine_port,
        path: config_path,
    } = Setup::new(
        "policy",
        &[(
            "40-route",
            "route",
            "spine_tables = [\"public.customers\"]\n",
        )],
    )
    .await?;
    write_key(&dir);
    std::fs::write(
        &config_path,
        config(&pg.url("postgres"), &dir, spine_port, &admin, POLICY),
    )?;

    // The proof before the run: every published column with its class and action.
    let (passed, shown) = check(&config_path);
    assert!(passed, "{shown}");
    for line in [
        "public.customers.email",
        "pii (by [policy.columns] \"public.customers.email\"): hmac (trim, lower) -> lake, spine",
        "public.customers.phone",
        "contact (by [policy.columns] \"public.customers.phone\"): keep-last:4",
        "public.orders.note",
        "pii (by its comment): hmac (trim, lower)",
        "public.orders.amount",
    ] {
        assert!(shown.contains(line), "`{line}` missing from:\n{shown}");
    }

    let spine_dir = dir.join("spine");
    let log = dir.join("airlock.log");
    let mut host = spawn_host(&config_path, &log);
    wait_slot_active(&db, "policy").await?;

    db.batch_execute(
        "INSERT INTO customers VALUES (1, ' Ada@Example.com ', '+44 7946 0958');
         INSERT INTO orders VALUES (1, 'ada@example.com', 'call me at 555-0199', 12.50);
         ALTER TABLE customers ADD COLUMN ssn text;
         INSERT INTO customers VALUES (2, 'grace@example.com', '555-0100', '078-05-1120');
         UPDATE customers SET ssn = '219-09-9999' WHERE id = 1;
         DELETE FROM orders WHERE id = 1;",
    )
    .await?;

    let lake = dir.join("lake");
    let customers = wait_for_lake(
        &lake.join("public.customers"),
        Duration::from_secs(60),
        |r| r.len() >= 3,
    )
    .await?;
    let orders = wait_for_lake(&lake.join("public.orders"), Duration::from_secs(60), |r| {
        r.len() >= 2
    })
    .await?;
    let status = wait_status(&admin, Duration::from_secs(10), "the denied column", |s| {
        s["policy"]["denied"]
            .as_array()
            .is_some_and(|d| d.iter().any(|c| c == "public.customers.ssn"))
    })
    .await?;
    assert_eq!(status["policy"]["default"], "deny");
    assert_eq!(status["policy"]["key_id"], "k1");
    // Lineage: every row and every event names the policy it passed.
    let version = status["policy"]["version"]
        .as_str()
        .expect("a version")
        .to_owned();
    assert_eq!(version.len(), 12);
    for row in customers.iter().chain(&orders) {
        assert_eq!(row["_policy"], version.as_str(), "{row}");
    }

    // The same e-mail, spelled differently in two tables: one token, keyed, not its
    // plain digest.
    let token = customers[0]["email"].as_str().expect("a token").to_owned();
    assert!(token.starts_with("k1:") && token.len() == 35, "{token}");
    assert_eq!(orders[0]["customer_email"], token.as_str());
    assert!(!token.contains(&sha256_hex("ada@example.com")));
    assert!(!token.contains(&sha256_hex(" Ada@Example.com ")));
    assert_ne!(customers[1]["email"], token.as_str());
    assert_eq!(customers[0]["phone"], "*********0958");
    // Classified by its comment: a token from the first row on.
    let note = orders[0]["note"].as_str().expect("a token");
    assert!(note.starts_with("k1:"), "{note}");
    assert_eq!(orders[0]["amount"], "12.50");
    // The delete's key is kept; its e-mail is the token, in the old image too.
    assert_eq!(orders[1]["_op"], "d");
    assert_eq!(orders[1]["id"], 1);
    // The column added under the running pipeline never reached the lake.
    for row in &customers {
        assert!(row.get("ssn").is_none(), "{row}");
    }

    // Nothing raw anywhere: the lake's files, the spine's log, airlock's log, and
    // what the lake and the spine give back decoded.
    let events: Json = reqwest::get(format!("http://127.0.0.1:{spine_port}/events?limit=100"))
        .await?
        .json()
        .await?;
    let events = events.as_array().cloned().unwrap_or_default();
    assert!(events.len() >= 3, "{events:#?}");
    for event in &events {
        assert_eq!(event["payload"]["policy"], version.as_str(), "{event}");
        let new = &event["payload"]["new"];
        if new.is_object() {
            assert!(new.get("ssn").is_none(), "{event}");
            assert!(
                new["email"].as_str().is_some_and(|e| e.starts_with("k1:")),
                "{event}"
            );
        }
    }
    // The spine holds the policy in force and one denial for the new column.
    let of_kind = |events: &[Json], kind: &str| -> Vec<Json> {
        events
            .iter()
            .filter(|e| e["kind"] == kind)
            .cloned()
            .collect()
    };
    let bundles = of_kind(&events, "policy_bundle_registered");
    assert_eq!(bundles.len(), 1, "{events:#?}");
    assert_eq!(bundles[0]["source"], "airlock.policy");
    assert_eq!(
        bundles[0]["payload"]["bundle"]["classes"]["pii"],
        "hmac (trim, lower)"
    );
    let denied = of_kind(&events, "request_denied");
    assert_eq!(denied.len(), 1, "{events:#?}");
    assert_eq!(denied[0]["payload"]["table"], "public.customers");
    assert_eq!(denied[0]["payload"]["column"], "ssn");
    assert_eq!(denied[0]["payload"]["reason"], "unclassified column");
    host.stop(Duration::from_secs(30))?;
    // A restart sees the column again and the policy again: neither is recorded twice.
    let mut host = spawn_host(&config_path, &dir.join("airlock-2.log"));
    wait_slot_active(&db, "policy").await?;
    db.batch_execute(
        "INSERT INTO customers VALUES (3, 'alan@example.com', '555-0101', '219-09-9999')",
    )
    .await?;
    wait_for_lake(
        &lake.join("public.customers"),
        Duration::from_secs(60),
        |r| r.len() >= 4,
    )
    .await?;
    host.stop(Duration::from_secs(30))?;
    let after: Json = reqwest::get(format!(
        "http://127.0.0.1:{spine_port}/events?source=airlock.policy&limit=100"
    ))
    .await?
    .json()
    .await?;
    let after = after.as_array().cloned().unwrap_or_default();
    assert_eq!(after.len(), 2, "{after:#?}");
    // The lake's commits record the effective policy: its version, classes and key id.
    let log_dir = lake.join("public.customers/_delta_log");
    let commits: Vec<String> = files_under(&log_dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    let info = commits
        .iter()
        .flat_map(|c| c.lines())
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .find_map(|l| {
            l.get("commitInfo")
                .filter(|i| i.get("airlock.policy").is_some())
                .cloned()
        })
        .expect("a commit with the policy");
    assert_eq!(info["airlock.policy"], version.as_str());
    assert_eq!(
        info["airlock.policy_bundle"]["classes"]["pii"],
        "hmac (trim, lower)"
    );
    assert_eq!(info["airlock.policy_bundle"]["key_id"], "k1");
    assert_eq!(info["airlock.policy_bundle"]["default"], "deny");
    let logged = std::fs::read_to_string(&log)?;
    assert!(
        logged.contains("ssn") && logged.contains("denied by the policy's default"),
        "{logged}"
    );
    let decoded = format!("{customers:?}{orders:?}{events:?}");
    let mut files = files_under(&lake);
    files.extend(files_under(&spine_dir));
    assert_absent(
        "the lake, the spine and the log",
        &files,
        &format!("{decoded}{logged}"),
    );

    // What the lake holds now binds the policy: a class whose action would change a
    // column's type, or drop a column the lake holds, is refused before a run.
    let changed = POLICY
        .replace(
            "\"public.customers.id\" = \"public\"",
            "\"public.customers.id\" = \"pii\"",
        )
        .replace("\"public.customers.phone\" = \"contact\"\n", "");
    std::fs::write(
        &config_path,
        config(&pg.url("postgres"), &dir, spine_port, &admin, &changed),
    )?;
    let (passed, shown) = check(&config_path);
    assert!(!passed, "{shown}");
    assert!(
        shown.contains("public.customers.id") && shown.contains("is `long` in the lake table public.customers of sink lake, and `hmac (trim, lower)` would write `string`"),
        "{shown}"
    );
    assert!(
        shown.contains(
            "the default (deny) drops it, but the lake table public.customers of sink lake holds it"
        ),
        "{shown}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_run_refuse_what_the_policy_cannot_cover() -> anyhow::Result<()> {
    let Setup {
        dir,
        pg,
        db,
        admin,
        spine_port,
        path,
    } = Setup::new("policy_refused", &[]).await?;

    // A class that hashes, and its key file is not there.
    std::fs::write(
        &path,
        config(&pg.url("postgres"), &dir, spine_port, &admin, POLICY),
    )?;
    let (passed, shown) = check(&path);
    assert!(!passed, "{shown}");
    assert!(
        shown.contains("policy.key_file") && shown.contains("policy.key"),
        "{shown}"
    );

    // An action that cannot take the column's type.
    write_key(&dir);
    let numeric_masked = POLICY.replace(
        "\"public.orders.*\" = \"public\"",
        "\"public.orders.*\" = \"public\"\n\"public.orders.amount\" = \"contact\"",
    );
    std::fs::write(
        &path,
        config(
            &pg.url("postgres"),
            &dir,
            spine_port,
            &admin,
            &numeric_masked,
        ),
    )?;
    let (passed, shown) = check(&path);
    assert!(!passed, "{shown}");
    assert!(
        shown.contains("public.orders.amount (numeric) is class `contact`")
            && shown.contains("`keep-last:4` takes only text columns"),
        "{shown}"
    );
    // `run` stops on it before anything of the table leaves.
    let log = dir.join("airlock.log");
    let mut host = spawn_host(&path, &log);
    wait_slot_active(&db, "policy").await?;
    db.batch_execute("INSERT INTO orders VALUES (1, 'ada@example.com', 'x', 1)")
        .await?;
    let logged = failed(
        &mut host,
        &log,
        "airlock kept running with an uncoverable column",
    )?;
    assert!(
        logged.contains("public.orders.amount (numeric) is class `contact`"),
        "{logged}"
    );
    assert!(
        !dir.join("lake/public.orders/_delta_log").exists()
            || read_lake("duckdb", &dir.join("lake/public.orders"))?.is_empty()
    );

    // No [policy] at all: refused, with the lines to add.
    std::fs::write(
        &path,
        config(&pg.url("postgres"), &dir, spine_port, &admin, ""),
    )?;
    let (passed, shown) = check(&path);
    assert!(!passed, "{shown}");
    assert!(
        shown.contains("policy: missing") && shown.contains("default = \"deny\""),
        "{shown}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_made_while_running_tightens_from_the_next_change_once_installed()
-> anyhow::Result<()> {
    let Setup {
        dir,
        pg,
        db,
        admin,
        spine_port,
        path,
    } = Setup::new("policy_comment", &[]).await?;
    write_key(&dir);
    std::fs::write(
        &path,
        config(&pg.url("postgres"), &dir, spine_port, &admin, POLICY),
    )?;
    let policy = |args: &[&str]| {
        let out = Command::new(airlock_bin())
            .arg("policy")
            .args(args)
            .output()
            .expect("airlock policy");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let sql = policy(&["install", "--print"]);
    assert!(
        sql.contains("CREATE EVENT TRIGGER airlock_policy_comments"),
        "{sql}"
    );
    let config_arg = path.display().to_string();
    // Twice: installing again is the same as once.
    policy(&["install", "--config", &config_arg]);
    policy(&["install", "--config", &config_arg]);

    let log = dir.join("airlock.log");
    let mut host = spawn_host(&path, &log);
    wait_slot_active(&db, "policy").await?;
    db.batch_execute("INSERT INTO customers VALUES (1, 'ada@example.com', '+44 7946 0958')")
        .await?;
    let table = dir.join("lake/public.customers");
    wait_for_lake(&table, Duration::from_secs(60), |r| !r.is_empty()).await?;
    // The configuration masks the phone; a comment now makes it a token, from the
    // very next change, though PostgreSQL sends no new description of the table.
    db.batch_execute(
        "COMMENT ON COLUMN customers.phone IS 'airlock: pii';
         INSERT INTO customers VALUES (2, 'grace@example.com', '+1 555 0100');",
    )
    .await?;
    // A column added under the running pipeline and classified by its comment leaves
    // as a token from its first row; one commented into a class that would let part
    // of it out stays denied.
    db.batch_execute(
        "ALTER TABLE customers ADD COLUMN ssn text, ADD COLUMN pin text;
         COMMENT ON COLUMN customers.ssn IS 'airlock: pii';
         COMMENT ON COLUMN customers.pin IS 'airlock: contact';
         INSERT INTO customers VALUES (3, 'alan@example.com', NULL, '078-05-1120', '4711');",
    )
    .await?;
    let rows = wait_for_lake(&table, Duration::from_secs(60), |r| r.len() >= 3).await?;
    host.stop(Duration::from_secs(30))?;
    assert_eq!(rows[0]["phone"], "*********0958");
    let phone = rows[1]["phone"].as_str().expect("a token");
    assert!(phone.starts_with("k1:") && phone.len() == 35, "{phone}");
    let ssn = rows[2]["ssn"].as_str().expect("a token");
    assert!(ssn.starts_with("k1:") && ssn.len() == 35, "{ssn}");
    assert!(rows[2].get("pin").is_none(), "{}", rows[2]);
    let files = files_under(&dir.join("lake"));
    assert_absent("the lake", &files, &format!("{rows:?}"));

    // Uninstalled: the trigger is gone.
    policy(&["uninstall", "--config", &config_arg]);
    let gone: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_event_trigger WHERE evtname = 'airlock_policy_comments'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(gone, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_snapshot_passes_the_gate_too() -> anyhow::Result<()> {
    let Setup {
        dir,
        pg,
        db,
        admin,
        spine_port,
        path,
    } = Setup::new("policy_snapshot", &[]).await?;
    // Rows that exist before airlock starts, with a column nothing classifies.
    db.batch_execute(
        "ALTER TABLE customers ADD COLUMN ssn text;
         INSERT INTO customers VALUES (1, 'ada@example.com', '+44 7946 0958', '078-05-1120');
         INSERT INTO orders VALUES (1, 'Ada@Example.com', 'call me at 555-0199', 3.00);",
    )
    .await?;
    write_key(&dir);
    let text = config(&pg.url("postgres"), &dir, spine_port, &admin, POLICY).replace(
        "status_interval = \"1s\"\n",
        "status_interval = \"1s\"\nsnapshot = \"initial\"\n",
    );
    std::fs::write(&path, text)?;
    let log = dir.join("airlock.log");
    let mut host = spawn_host(&path, &log);
    let lake = dir.join("lake");
    let customers = wait_for_lake(
        &lake.join("public.customers"),
        Duration::from_secs(60),
        |r| !r.is_empty(),
    )
    .await?;
    let orders = wait_for_lake(&lake.join("public.orders"), Duration::from_secs(60), |r| {
        !r.is_empty()
    })
    .await?;
    host.stop(Duration::from_secs(30))?;
    assert_eq!(customers[0]["_op"], "r");
    assert!(customers[0].get("ssn").is_none(), "{}", customers[0]);
    assert_eq!(customers[0]["phone"], "*********0958");
    let token = customers[0]["email"].as_str().expect("a token");
    assert!(token.starts_with("k1:"), "{token}");
    assert_eq!(orders[0]["customer_email"], token);
    assert!(
        orders[0]["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("k1:"))
    );
    let logged = std::fs::read_to_string(&log)?;
    assert_absent(
        "the lake and the log",
        &files_under(&lake),
        &format!("{customers:?}{orders:?}{logged}"),
    );
    Ok(())
}

/// A class whose action is `guest:10-mask`: the e-mail reaches that stage raw and no
/// other, and the host holds the stage to writing every value of it.
const CUSTODY: &str = r#"[policy]
default = "deny"

[policy.classes]
public = { action = "keep" }
secret = { action = "guest:10-mask" }

[policy.columns]
"public.customers.id" = "public"
"public.customers.email" = "secret"
"public.customers.phone" = "public"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responsible_stage_that_leaves_a_value_unwritten_stops_the_run_and_the_spine_records_it()
-> anyhow::Result<()> {
    let Setup {
        dir,
        pg,
        db,
        admin,
        spine_port,
        path,
    } = Setup::new(
        "policy_custody",
        &[(
            "10-mask",
            "mask",
            "columns = [\"public.customers.email\"]\nsalt = \"s1\"\n",
        )],
    )
    .await?;
    let plugins = dir.join("plugins");
    let wasm = std::fs::read(plugins.join("10-mask.wasm"))?;
    let pin = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&wasm))
    };
    let write = |require: &str| {
        let with_require = config(&pg.url("postgres"), &dir, spine_port, &admin, CUSTODY)
            .replace("[plugins]\n", &format!("[plugins]\n{require}"));
        std::fs::write(&path, with_require).expect("config");
    };

    // The stage must be pinned, and must run first.
    write("");
    let (passed, shown) = check(&path);
    assert!(!passed, "{shown}");
    assert!(
        shown.contains("stage `10-mask` as responsible") && shown.contains("add `10-mask@sha256:`"),
        "{shown}"
    );
    let pinned = format!("require = [\"10-mask@sha256:{pin}\"]\n");
    write(&pinned);
    std::fs::copy(guest("tag"), plugins.join("05-tag.wasm"))?;
    let (passed, shown) = check(&path);
    assert!(!passed, "{shown}");
    assert!(
        shown.contains("stage `05-tag` would run before `10-mask`"),
        "{shown}"
    );
    std::fs::remove_file(plugins.join("05-tag.wasm"))?;
    let (passed, shown) = check(&path);
    assert!(passed, "{shown}");
    assert!(
        shown.contains("secret (by [policy.columns] \"public.customers.email\"): guest:10-mask"),
        "{shown}"
    );

    let spine_dir = dir.join("spine");
    let log = dir.join("airlock.log");
    let mut host = spawn_host(&path, &log);
    wait_slot_active(&db, "policy").await?;
    db.batch_execute("INSERT INTO customers VALUES (1, 'ada@example.com', '555-0100')")
        .await?;
    let table = dir.join("lake/public.customers");
    let rows = wait_for_lake(&table, Duration::from_secs(60), |r| !r.is_empty()).await?;
    assert_eq!(rows[0]["email"], sha256_hex("s1ada@example.com").as_str());
    host.stop(Duration::from_secs(30))?;

    // The pinned stage, with settings that no longer mask the e-mail: its .wasm is the
    // pinned one, so only the check on every batch can catch it.
    std::fs::write(
        plugins.join("10-mask.toml"),
        "columns = [\"public.customers.phone\"]\n",
    )?;
    let mut host = spawn_host(&path, &log);
    wait_slot_active(&db, "policy").await?;
    db.batch_execute(
        "INSERT INTO customers VALUES (2, 'grace@example.com', '555-0101');
         UPDATE customers SET phone = '555-0102' WHERE id = 1;",
    )
    .await?;
    let logged = failed(
        &mut host,
        &log,
        "airlock kept running past a stage that left the e-mail unwritten",
    )?;
    assert!(
        logged.contains(
            "public.customers.email is class `secret`, which [policy] gives to stage `10-mask`"
        ),
        "{logged}"
    );
    // Nothing of the transaction reached the lake.
    let rows = read_lake("duckdb", &table)?;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    // The spine recorded the denial, and the policy in force before it.
    let events: Json = reqwest::get(format!(
        "http://127.0.0.1:{spine_port}/events?source=airlock.policy&limit=100"
    ))
    .await?
    .json()
    .await?;
    let events = events.as_array().cloned().unwrap_or_default();
    let denied: Vec<&Json> = events
        .iter()
        .filter(|e| e["kind"] == "request_denied")
        .collect();
    assert_eq!(denied.len(), 1, "{events:#?}");
    let payload = &denied[0]["payload"];
    assert_eq!(payload["table"], "public.customers");
    assert_eq!(payload["column"], "email");
    assert_eq!(payload["stage"], "10-mask");
    assert_eq!(payload["class"], "secret");
    // The insert's e-mail and the update's new image: both left raw.
    assert_eq!(payload["unwritten"], 2);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["kind"] == "policy_bundle_registered")
            .count(),
        1,
        "one registration for one policy, across two runs: {events:#?}"
    );
    // The raw e-mail is nowhere.
    let mut files = files_under(&dir.join("lake"));
    files.extend(files_under(&spine_dir));
    for secret in ["grace@example.com", "ada@example.com"] {
        assert!(!logged.contains(secret), "the log holds {secret}");
        assert!(!format!("{events:?}").contains(secret));
        for file in &files {
            let bytes = std::fs::read(file).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds {secret}",
                file.display()
            );
        }
    }
    Ok(())
}
