//! Guests in every language: the Python, JavaScript and C builds of `mask` and
//! `route` (`guests/python`, `guests/js`, `guests/c`, built by `cargo xtask guests`)
//! give exactly the output of the Rust guests on the same changes, refuse bad
//! settings with the same messages, and run in a live pipeline.
//!
//! Parity runs through the real `airlock guest test` binary: every mask mode on
//! every value type, qualified and bare column rules, row and column tags, spine
//! tables, and every settings error. Outputs are compared line by line, exactly,
//! except for `pipeline` (a hash of the stages' bytes, which differ by language).

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_tests::*;
use serde_json::{Value as Json, json};

/// The languages besides Rust, as named in `guests/dist/<guest>-<language>.wasm`.
const LANGUAGES: &[&str] = &["python", "js", "c"];

/// A language's build of `guest`; Rust's is `guests/dist/<guest>.wasm`.
fn built(guest_name: &str, language: &str) -> PathBuf {
    let name = if language == "rust" {
        guest_name.to_owned()
    } else {
        format!("{guest_name}-{language}")
    };
    let path = root().join("guests/dist").join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is not built: run `cargo xtask guests --lang {language}` (it installs the {language} toolchain; `cargo xtask test` does it too)",
        path.display()
    );
    path
}

/// A folder holding `stages` (`(file stem, guest, language)`), so that stage names,
/// and with them every message, are the same in every language.
fn stage_dir(dir: &Path, language: &str, stages: &[(&str, &str, &str)]) -> PathBuf {
    let folder = dir.join(language);
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder).expect("create stage dir");
    for (stem, guest_name, lang) in stages {
        let lang = if *lang == "*" { language } else { lang };
        std::fs::copy(built(guest_name, lang), folder.join(format!("{stem}.wasm")))
            .expect("copy guest");
    }
    folder
}

struct Outcome {
    ok: bool,
    lines: Vec<Json>,
    error: String,
}

/// `airlock guest test`, with each line's `pipeline` checked (a 12-hex version) and
/// removed, and only the error line of stderr kept.
fn guest_test(plugin: &Path, settings: &[&str], input: &str) -> Outcome {
    let out = airlock_tests::guest_test(plugin, settings, input.as_bytes());
    let lines = out
        .lines
        .into_iter()
        .map(|mut line| {
            let pipeline = line
                .as_object_mut()
                .and_then(|o| o.remove("pipeline"))
                .unwrap_or_else(|| panic!("no `pipeline` in {line}"));
            assert_eq!(pipeline.as_str().map(str::len), Some(12), "{line}");
            line
        })
        .collect();
    // The error is the last line; guest log lines come before it.
    let error = out
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("")
        .to_owned();
    Outcome {
        ok: out.ok,
        lines,
        error,
    }
}

const CUSTOMER_COLUMNS: &str = r#"[{"name":"id","type":"int8","key":true},{"name":"name","type":"text"},{"name":"email","type":"text"},{"name":"phone","type":"text"},{"name":"card","type":"varchar(20)"},{"name":"notes","type":"text"},{"name":"balance","type":"numeric(12,2)"},{"name":"active","type":"bool"},{"name":"visits","type":"int4"},{"name":"score","type":"float8"},{"name":"born","type":"date"},{"name":"wakes","type":"time"},{"name":"seen","type":"timestamp"},{"name":"signed_up","type":"timestamptz"},{"name":"uid","type":"uuid"},{"name":"prefs","type":"jsonb"},{"name":"avatar","type":"bytea"},{"name":"labels","type":"text[]"},{"name":"span","type":"interval"}]"#;

/// Changes covering every value type, null, unchanged TOAST, non-ASCII text, short
/// values, both images, every op and four tables (for rules and spine globs).
fn input() -> String {
    let customer = |id: i64, email: Json, phone: Json, notes: Json| {
        json!({
            "id": id, "name": format!("Customer {id}"), "email": email, "phone": phone,
            "card": "4111 1111 1111 1111", "notes": notes, "balance": "1234.50",
            "active": id % 2 == 0, "visits": id * 7, "score": 0.1 * id as f64,
            "born": "1815-12-10", "wakes": "06:30:00.25", "seen": "2024-02-29T23:59:59.123456",
            "signed_up": "1970-01-01T00:00:00Z", "uid": "01234567-89ab-cdef-fedc-ba9876543210",
            "prefs": {"lang": "en", "n": [1, 2]}, "avatar": "\\xdeadbeef",
            "labels": "{a,b}", "span": "1 day 02:00:00"
        })
    };
    let line = |table: &str, op: &str, columns: Option<&str>, new: Json, old: Json| {
        let mut change = json!({"table": table, "op": op});
        if let Some(columns) = columns {
            change["columns"] = serde_json::from_str(columns).expect("columns");
        }
        if !new.is_null() {
            change["new"] = new;
        }
        if !old.is_null() {
            change["old"] = old;
        }
        change.to_string()
    };
    let c = Some(CUSTOMER_COLUMNS);
    let mut lines = vec![
        line(
            "public.customers",
            "insert",
            c,
            customer(
                1,
                json!("ada@example.com"),
                json!("+1-555-010-4477"),
                json!("héllo wörld 🎉 ünïcödé"),
            ),
            Json::Null,
        ),
        line(
            "public.customers",
            "insert",
            c,
            customer(2, json!(""), json!("12"), json!("\u{feff}bom and  spaces ")),
            Json::Null,
        ),
        line(
            "public.customers",
            "insert",
            c,
            customer(3, Json::Null, Json::Null, Json::Null),
            Json::Null,
        ),
        // An update with an unchanged TOAST value and the whole old row
        // (REPLICA IDENTITY FULL): the old image must be masked too.
        line(
            "public.customers",
            "update",
            c,
            customer(
                1,
                json!("ada@newmail.example.org"),
                json!({"$unchanged": true}),
                json!({"$unchanged": true}),
            ),
            customer(
                1,
                json!("ada@example.com"),
                json!("+1-555-010-4477"),
                json!("old notes"),
            ),
        ),
        line(
            "public.customers",
            "delete",
            c,
            Json::Null,
            json!({"id": 2, "email": "key@example.com"}),
        ),
        line(
            "public.customers",
            "snapshot",
            c,
            customer(
                4,
                json!("snap@example.com"),
                json!("+44 20 7946 0958"),
                json!("x"),
            ),
            Json::Null,
        ),
        line("public.customers", "truncate", c, Json::Null, Json::Null),
    ];
    // Other tables: a qualified-rule target, a spine glob target, one without PII.
    lines.push(
        json!({"table":"auth.users","op":"insert","columns":[{"name":"id","type":"int4","key":true},{"name":"email","type":"text","key":true},{"name":"phone","type":"text"}],"new":{"id":7,"email":"root@example.com","phone":"+1 (555) 010-9999"}})
            .to_string(),
    );
    lines.push(
        json!({"table":"auth.users","op":"delete","columns":[{"name":"id","type":"int4","key":true},{"name":"email","type":"text","key":true},{"name":"phone","type":"text"}],"old":{"id":7,"email":"root@example.com"}})
            .to_string(),
    );
    lines.push(
        json!({"table":"audit.log_2024","op":"insert","new":{"id":1,"event":"login","who":"grace@example.com"}})
            .to_string(),
    );
    lines.push(
        json!({"table":"public.orders","op":"insert","new":{"id":10,"customer_id":1,"total":12.5,"items":["book","pen"],"note":"leave at the door"}})
            .to_string(),
    );
    lines.push(
        json!({"table":"public.orders","op":"update","new":{"id":10,"customer_id":1,"total":13.0,"items":["book"],"note":null},"old":{"id":10}})
            .to_string(),
    );
    lines.join("\n") + "\n"
}

const TYPED: &[&str] = &[
    "name",
    "email",
    "phone",
    "card",
    "notes",
    "balance",
    "active",
    "visits",
    "score",
    "born",
    "wakes",
    "seen",
    "signed_up",
    "uid",
    "prefs",
    "avatar",
    "labels",
    "span",
];

/// `columns=...` for every typed column of `customers` plus the other tables' text.
fn every_column() -> Vec<String> {
    let mut settings: Vec<String> = TYPED.iter().map(|c| format!("columns={c}")).collect();
    settings.extend([
        "columns=who".into(),
        "columns=note".into(),
        "columns=event".into(),
    ]);
    settings
}

/// Settings for `mask` that succeed: every mode on every type, rules, salt, tags.
fn mask_cases() -> Vec<(&'static str, Vec<String>)> {
    let with = |base: Vec<String>, extra: &[&str]| -> Vec<String> {
        base.into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    vec![
        ("defaults (hash email)", vec![]),
        (
            "hash every type, salted",
            with(every_column(), &["salt=s3cret"]),
        ),
        (
            "redact every type",
            with(every_column(), &["default_mode=redact"]),
        ),
        (
            "null every type",
            with(every_column(), &["default_mode=null", "tag="]),
        ),
        (
            "keep-last-3 every type",
            with(every_column(), &["default_mode=keep-last-3"]),
        ),
        (
            "keep-last-0 every type",
            with(every_column(), &["default_mode= keep-last-0 "]),
        ),
        (
            "per-column modes, large and signed N",
            vec![
                "columns=email".into(),
                "columns=phone".into(),
                "columns=notes".into(),
                "columns=card".into(),
                "columns= name ".into(),
                "mode.phone=keep-last-4".into(),
                "mode.notes=keep-last-+5".into(),
                "mode.card=keep-last-4294967295".into(),
                "mode.name=redact".into(),
                "salt=pepper ü".into(),
                "tag= masked ".into(),
            ],
        ),
        (
            "qualified rules win over bare names; globs",
            vec![
                "columns=phone".into(),
                "columns=public.customers.phone".into(),
                "columns=auth.*.email".into(),
                "columns=email".into(),
                "columns=us?rs.phone".into(),
                "columns=log_????.who".into(),
                "mode.phone=null".into(),
                "mode.public.customers.phone=keep-last-2".into(),
                "mode.auth.*.email=redact".into(),
                "mode.log_????.who=keep-last-11".into(),
            ],
        ),
    ]
}

/// Settings for `mask` that must be refused, with the same message in every language.
fn mask_refusals() -> Vec<Vec<&'static str>> {
    vec![
        vec!["mode.email=scramble"],
        vec!["columns=email", "mode.email=keep-last-"],
        vec!["columns=email", "mode.email=keep-last--1"],
        vec!["columns=email", "mode.email=keep-last-4294967296"],
        vec!["columns=email", "mode.email=keep-last- 4"],
        vec!["columns=email", "mode.email=a\"b\\c\td"],
        vec!["default_mode=bogus"],
        vec!["default_mode=Hash"],
        vec!["mode.phone=hash"],
        vec!["columns=email", "columns=phone", "mode.card=redact"],
        vec!["columns=email", "columns= "],
        vec!["colums=email"],
        vec!["colums=email", "sallt=x", "colums=phone", "mode.=x"],
    ]
}

/// A stage of a folder: `(file stem, guest, language)`; language `*` is the one
/// under test.
type Stage = (&'static str, &'static str, &'static str);

/// Folders and settings for `route`: alone, and after Rust stages that tag rows and
/// columns (so row tags, sub-tags and column tags all reach it).
fn route_cases() -> Vec<(&'static str, Vec<Stage>, Vec<&'static str>)> {
    let alone = vec![("90-route", "route", "*")];
    let tagged = vec![("10-tag", "tag", "rust"), ("90-route", "route", "*")];
    let masked = vec![("20-mask", "mask", "rust"), ("90-route", "route", "*")];
    vec![
        ("defaults, no tags", alone.clone(), vec![]),
        (
            "spine globs and annotations",
            alone.clone(),
            vec![
                "spine_tables=public.customers",
                "spine_tables= auth.* ",
                "spine_tables=log_????",
                "spine_kind=request_allowed",
                "spine_source=db-main",
                "spine_route=audit",
            ],
        ),
        (
            "row and column tags from tag",
            tagged.clone(),
            vec!["spine_tables=orders"],
        ),
        (
            "row tags only, a sub-tag as the restricted tag",
            tagged.clone(),
            vec!["by_column_tags=Off", "tag=pii:email"],
        ),
        (
            "a tag that only prefixes other tags",
            tagged.clone(),
            vec!["tag=pi", "by_column_tags=no"],
        ),
        (
            "renamed routes",
            tagged,
            vec![
                "restricted_route=vault",
                "default_route= lake ",
                "by_column_tags=1",
            ],
        ),
        ("column tags from mask", masked.clone(), vec![]),
        (
            "column tags ignored",
            masked,
            vec!["by_column_tags=false", "spine_tables=*"],
        ),
    ]
}

fn route_refusals() -> Vec<Vec<&'static str>> {
    vec![
        vec!["by_column_tags=maybe"],
        vec!["by_column_tags= YES please"],
        vec!["tag= "],
        vec!["restricted_route="],
        vec!["spine_source=\t"],
        vec!["spine_tables=a", "spine_table=b"],
        vec!["routes=x", "tags=y"],
    ]
}

/// `key=value` settings as a NAME.toml: a key given more than once is an array.
fn settings_toml(settings: &[&str]) -> String {
    let mut keys: Vec<(&str, Vec<&str>)> = Vec::new();
    for s in settings {
        let (k, v) = s.split_once('=').expect("key=value");
        match keys.iter_mut().find(|(key, _)| *key == k) {
            Some((_, values)) => values.push(v),
            None => keys.push((k, vec![v])),
        }
    }
    keys.iter()
        .map(|(k, values)| {
            let quoted: Vec<Json> = values.iter().map(|v| json!(v)).collect();
            let value = if quoted.len() == 1 {
                quoted[0].to_string()
            } else {
                Json::from(quoted).to_string()
            };
            format!("\"{k}\" = {value}\n")
        })
        .collect()
}

/// Runs one case in Rust and in every language and compares the outcomes exactly.
fn assert_parity(
    dir: &Path,
    case: &str,
    stages: &[(&str, &str, &str)],
    settings: &[&str],
    input: &str,
) -> Vec<Json> {
    // One stage takes `--setting`s; in a folder they go to the last stage's
    // NAME.toml (`--setting` would reach every stage).
    let plugin = |language: &str| -> PathBuf {
        let folder = stage_dir(dir, language, stages);
        match stages {
            [(stem, _, _)] => folder.join(format!("{stem}.wasm")),
            [.., (stem, _, _)] => {
                std::fs::write(folder.join(format!("{stem}.toml")), settings_toml(settings))
                    .expect("write settings");
                folder
            }
            [] => unreachable!("a case has stages"),
        }
    };
    let cli: &[&str] = if stages.len() == 1 { settings } else { &[] };
    let reference = guest_test(&plugin("rust"), cli, input);
    for language in LANGUAGES {
        let got = guest_test(&plugin(language), cli, input);
        assert_eq!(
            (got.ok, &got.error),
            (reference.ok, &reference.error),
            "{case}: {language} and rust differ in outcome (settings {settings:?})"
        );
        assert_eq!(
            got.lines.len(),
            reference.lines.len(),
            "{case}: {language} printed another number of rows (settings {settings:?})"
        );
        for (i, (g, r)) in got.lines.iter().zip(&reference.lines).enumerate() {
            assert_eq!(
                g, r,
                "{case}: row {i} differs between {language} (left) and rust (right) (settings {settings:?})"
            );
        }
    }
    assert!(reference.ok || !reference.error.is_empty());
    reference.lines
}

#[test]
fn mask_gives_the_same_output_in_every_language() {
    let dir = temp_dir("languages-mask");
    let input = input();
    let rows = input.lines().count();
    for (case, settings) in mask_cases() {
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        let lines = assert_parity(&dir, case, &[("mask", "mask", "*")], &settings, &input);
        assert_eq!(lines.len(), rows, "{case}: one line per change");
    }
    // The reference itself does what the cases claim (so equal outputs are not
    // equally wrong): a salted hash, keep-last on text, unchanged TOAST kept.
    let salted = assert_parity(
        &dir,
        "check",
        &[("mask", "mask", "*")],
        &[
            "columns=email",
            "columns=phone",
            "mode.phone=keep-last-4",
            "salt=s",
        ],
        &input,
    );
    assert_eq!(
        salted[0]["new"]["email"],
        json!(sha256_hex("sada@example.com"))
    );
    assert_eq!(salted[0]["new"]["phone"], json!("***********4477"));
    assert_eq!(salted[3]["new"]["phone"], json!({"$unchanged": true}));
    assert_eq!(
        salted[3]["old"]["email"],
        json!(sha256_hex("sada@example.com"))
    );
    assert_eq!(salted[0]["column_tags"]["email"], json!(["pii"]));
}

#[test]
fn mask_refuses_bad_settings_with_the_same_message_in_every_language() {
    let dir = temp_dir("languages-mask-refusals");
    for settings in mask_refusals() {
        let lines = assert_parity(&dir, "refusal", &[("mask", "mask", "*")], &settings, "");
        assert!(lines.is_empty());
        let reference = guest_test(
            &stage_dir(&dir, "rust", &[("mask", "mask", "rust")]).join("mask.wasm"),
            &settings,
            "",
        );
        assert!(!reference.ok, "{settings:?} must be refused");
        assert!(
            reference.error.contains("refused its settings"),
            "{settings:?}: {}",
            reference.error
        );
    }
}

#[test]
fn route_gives_the_same_output_in_every_language() {
    let dir = temp_dir("languages-route");
    let input = input();
    let mut restricted_seen = false;
    let mut spine_seen = false;
    for (case, stages, settings) in route_cases() {
        let lines = assert_parity(&dir, case, &stages, &settings, &input);
        assert_eq!(lines.len(), input.lines().count(), "{case}");
        for line in &lines {
            let routes = line["routes"].as_array().expect("routes");
            restricted_seen |= routes.iter().any(|r| r == "restricted" || r == "vault");
            spine_seen |= line["annotations"]["spine.kind"].is_string();
        }
    }
    assert!(
        restricted_seen && spine_seen,
        "the cases exercise restricted and spine routes"
    );
}

#[test]
fn route_refuses_bad_settings_with_the_same_message_in_every_language() {
    let dir = temp_dir("languages-route-refusals");
    for settings in route_refusals() {
        assert_parity(&dir, "refusal", &[("route", "route", "*")], &settings, "");
        let reference = guest_test(
            &stage_dir(&dir, "rust", &[("route", "route", "rust")]).join("route.wasm"),
            &settings,
            "",
        );
        assert!(!reference.ok, "{settings:?} must be refused");
    }
}

// Live pipelines ---------------------------------------------------------------------

const SCHEMA: &str = "
CREATE TABLE customers (
    id     bigint PRIMARY KEY,
    name   text NOT NULL,
    email  text,
    phone  text
);
CREATE TABLE orders (
    id     bigint PRIMARY KEY,
    total  numeric(10,2),
    note   text
);
CREATE PUBLICATION airlock FOR TABLE customers, orders;
";

/// PostgreSQL → `mask` and `route` in `language` → two lakes: `restricted` rows
/// (tables with a masked column) in one, the others in the other.
async fn live_pipeline(language: &str) -> anyhow::Result<()> {
    let dir = temp_dir(&format!("languages-live-{language}"));
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(SCHEMA).await?;
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(built("mask", language), plugins.join("20-mask.wasm"))?;
    std::fs::write(
        plugins.join("20-mask.toml"),
        "columns = [\"email\", \"phone\"]\nsalt = \"s\"\n[mode]\nphone = \"keep-last-4\"\n",
    )?;
    std::fs::copy(built("route", language), plugins.join("90-route.wasm"))?;
    let lake = dir.join("lake");
    let vault = dir.join("vault");
    let config = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{url}\"\nslot = \"lang_{language}\"\nstatus_interval = \"1s\"\n\
         [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{plugins}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{lake}\"\nroutes = [\"default\"]\nflush_interval = \"200ms\"\n\
         [sinks.vault]\ntype = \"delta\"\nurl = \"file://{vault}\"\nroutes = [\"restricted\"]\nflush_interval = \"200ms\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        url = pg.url("postgres"),
        plugins = plugins.display(),
        lake = lake.display(),
        vault = vault.display(),
    );
    let host = Host::start(&config, &dir);
    let mut slot = false;
    for _ in 0..1200 {
        if db
            .query_opt(
                &format!("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'lang_{language}'"),
                &[],
            )
            .await?
            .is_some()
        {
            slot = true;
            break;
        }
        assert!(
            !host.is_finished(),
            "the host stopped before creating its slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slot, "the host did not create its slot within 120 s");
    db.batch_execute(
        "INSERT INTO customers VALUES (1, 'Ada Lovelace', 'ada@example.com', '+1-555-010-4477');
         INSERT INTO orders VALUES (10, 12.50, 'leave at the door');
         UPDATE customers SET email = 'ada@newmail.example.org' WHERE id = 1;
         INSERT INTO customers VALUES (2, 'Alan Turing', NULL, '12');",
    )
    .await?;
    let customers = wait_for_lake(
        &vault.join("public.customers"),
        Duration::from_secs(120),
        |rows| rows.len() >= 3,
    )
    .await?;
    let orders = wait_for_lake(
        &lake.join("public.orders"),
        Duration::from_secs(60),
        |rows| !rows.is_empty(),
    )
    .await?;
    host.stop().await?;

    assert_eq!(customers.len(), 3, "{customers:#?}");
    assert_eq!(customers[0]["email"], json!(sha256_hex("sada@example.com")));
    assert_eq!(customers[0]["phone"], json!("***********4477"));
    assert_eq!(customers[0]["name"], json!("Ada Lovelace"));
    assert_eq!(
        customers[1]["email"],
        json!(sha256_hex("sada@newmail.example.org"))
    );
    assert_eq!(customers[2]["email"], Json::Null, "NULL stays NULL");
    assert_eq!(
        customers[2]["phone"],
        json!("12"),
        "short values stay as they are"
    );
    assert_eq!(orders.len(), 1, "{orders:#?}");
    assert_eq!(orders[0]["note"], json!("leave at the door"));
    assert!(
        !lake.join("public.customers").exists(),
        "restricted rows reached the default lake"
    );
    assert!(
        !vault.join("public.orders").exists(),
        "unrestricted rows reached the restricted lake"
    );
    for file in files_under(&dir.join("vault")) {
        let bytes = std::fs::read(&file)?;
        for raw in ["ada@example.com", "newmail", "555-010"] {
            assert!(
                !bytes.windows(raw.len()).any(|w| w == raw.as_bytes()),
                "{} contains the raw value {raw}",
                file.display()
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_guests_run_in_a_live_pipeline() -> anyhow::Result<()> {
    live_pipeline("python").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_guests_run_in_a_live_pipeline() -> anyhow::Result<()> {
    live_pipeline("js").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_guests_run_in_a_live_pipeline() -> anyhow::Result<()> {
    live_pipeline("c").await
}
