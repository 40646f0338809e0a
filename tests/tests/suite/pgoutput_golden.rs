//! pgoutput, golden: real bytes from a real PostgreSQL, one fixture per message type
//! and variant in `tests/golden/pgoutput/NAME.hex`, each with the decoder's exact
//! answer in `NAME.expected`. The streaming messages of protocol version 2 are kept
//! too, and messages from inside a stream block (`streamed_*`), which carry their
//! transaction's xid after the type byte.
//!
//! `real_postgresql_sends_every_fixture_kind_and_each_decodes` captures the messages
//! afresh from a throwaway cluster on every run and checks that each decodes as its
//! fixture's kind; with `AIRLOCK_BLESS=1` it rewrites the fixtures (review the diff).

use std::collections::BTreeMap;
use std::path::PathBuf;

use airlock::source::pgoutput::{Message, OldKind, Streamed, TupleValue, decode, streamed_xid};
use airlock_tests::*;
use anyhow::{Context, Result};

/// Every fixture the golden directory must hold.
const KINDS: &[&str] = &[
    "begin",
    "commit",
    "origin",
    "relation",
    "relation_full",
    "type",
    "insert",
    "insert_unicode",
    "update_new",
    "update_key",
    "update_old",
    "update_unchanged_toast",
    "delete_key",
    "delete_old",
    "truncate",
    "message_transactional",
    "message_plain",
    "stream_start",
    "stream_stop",
    "stream_commit",
    "stream_abort",
    "streamed_relation",
    "streamed_insert",
    "streamed_message",
];

fn golden_dir() -> PathBuf {
    root().join("tests/golden/pgoutput")
}

/// Parses a fixture: hex digits, whitespace and `#` comments.
pub fn parse_hex(text: &str) -> Result<Vec<u8>> {
    let digits: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    hex::decode(&digits).context("a fixture holds hex digits")
}

fn to_hex(bytes: &[u8], comment: &str) -> String {
    let mut out = format!("# {comment}\n");
    for chunk in bytes.chunks(32) {
        out.push_str(&hex::encode(chunk));
        out.push('\n');
    }
    out
}

/// The decoder's answer, as the `.expected` files hold it: the message with every
/// tuple's values spelled out, or the error text. A `streamed_*` kind comes from
/// inside a stream block: its xid first, then the message without it.
fn describe(kind: &str, bytes: &[u8]) -> String {
    if kind.starts_with("streamed_") {
        return match streamed_xid(bytes) {
            Ok(Some(Streamed { xid, tag, body })) => {
                let mut plain = vec![tag];
                plain.extend_from_slice(body);
                format!("xid {xid}\n{}", describe("", &plain))
            }
            Ok(None) => "error: no xid\n".to_owned(),
            Err(e) => format!("error: {e}\n"),
        };
    }
    match decode(bytes) {
        Err(e) => format!("error: {e}\n"),
        Ok(message) => {
            let mut out = match &message {
                Message::Insert(i) => format!("Insert {{ relation_oid: {} }}\n", i.relation_oid),
                Message::Update(u) => format!(
                    "Update {{ relation_oid: {}, old: {:?} }}\n",
                    u.relation_oid,
                    u.old.map(|(kind, _)| kind)
                ),
                Message::Delete(d) => format!(
                    "Delete {{ relation_oid: {}, old_kind: {:?} }}\n",
                    d.relation_oid, d.old_kind
                ),
                other => format!("{other:#?}\n"),
            };
            let tuples = match &message {
                Message::Insert(i) => vec![("new", i.new)],
                Message::Update(u) => u
                    .old
                    .iter()
                    .map(|(_, t)| ("old", *t))
                    .chain([("new", u.new)])
                    .collect(),
                Message::Delete(d) => vec![("old", d.old)],
                _ => vec![],
            };
            for (name, tuple) in tuples {
                out.push_str(&format!("{name}:\n"));
                for value in tuple {
                    let line = match value {
                        TupleValue::Null => "  null".to_owned(),
                        TupleValue::UnchangedToast => "  unchanged toast".to_owned(),
                        TupleValue::Text(t) if t.len() > 64 => format!(
                            "  text ({} bytes) {:?}...",
                            t.len(),
                            String::from_utf8_lossy(&t[..32])
                        ),
                        TupleValue::Text(t) => format!("  text {:?}", String::from_utf8_lossy(t)),
                        TupleValue::Binary(b) => format!("  binary {}", hex::encode(b)),
                    };
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            out
        }
    }
}

#[test]
fn every_golden_fixture_decodes_to_its_expected_form() {
    let bless = std::env::var_os("AIRLOCK_BLESS").is_some();
    let mut mismatches = Vec::new();
    for kind in KINDS {
        let hex_path = golden_dir().join(format!("{kind}.hex"));
        let text = std::fs::read_to_string(&hex_path).unwrap_or_else(|_| {
            panic!(
                "{} is missing: run `AIRLOCK_BLESS=1 cargo test --release -p airlock-tests --test suite -- pgoutput_golden` and review it",
                hex_path.display()
            )
        });
        let bytes = parse_hex(&text).unwrap_or_else(|e| panic!("{}: {e}", hex_path.display()));
        let actual = describe(kind, &bytes);
        let expected_path = hex_path.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &actual).expect("bless");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} is missing", expected_path.display()));
        if expected != actual {
            mismatches.push(format!(
                "--- {}\n{expected}+++ actual\n{actual}",
                expected_path.display()
            ));
        }
        assert!(!actual.starts_with("error"), "{kind}: {actual}");
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn every_truncation_of_every_golden_fixture_is_an_error_naming_its_offset() {
    for kind in KINDS.iter().filter(|k| !k.starts_with("streamed_")) {
        let text = std::fs::read_to_string(golden_dir().join(format!("{kind}.hex")))
            .expect("fixture (see every_golden_fixture_decodes_to_its_expected_form)");
        let bytes = parse_hex(&text).unwrap();
        for len in 1..bytes.len() {
            let error = decode(&bytes[..len])
                .err()
                .unwrap_or_else(|| panic!("{kind} cut to {len} bytes decoded"))
                .to_string();
            let offset: usize = error
                .split("at offset ")
                .nth(1)
                .and_then(|rest| rest.split(':').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{kind} cut to {len}: no offset in `{error}`"));
            assert!(
                offset <= len,
                "{kind} cut to {len}: offset past the end: {error}"
            );
        }
    }
}

/// The kind of a decoded real message, as the fixtures name it.
fn kind_of(message: &Message<'_>) -> &'static str {
    match message {
        Message::Begin(_) => "begin",
        Message::Commit(_) => "commit",
        Message::Origin(_) => "origin",
        Message::Relation(r) if r.name == "full_t" => "relation_full",
        Message::Relation(_) => "relation",
        Message::Type(_) => "type",
        Message::Insert(i) => {
            if i.new
                .iter()
                .any(|v| matches!(v, TupleValue::Text(t) if !t.is_ascii()))
            {
                "insert_unicode"
            } else {
                "insert"
            }
        }
        Message::Update(u) => match u.old {
            None if u.new.iter().any(|v| v == TupleValue::UnchangedToast) => {
                "update_unchanged_toast"
            }
            None => "update_new",
            Some((OldKind::Key, _)) => "update_key",
            Some((OldKind::Full, _)) => "update_old",
        },
        Message::Delete(d) => match d.old_kind {
            OldKind::Key => "delete_key",
            OldKind::Full => "delete_old",
        },
        Message::Truncate(_) => "truncate",
        Message::Message(m) if m.transactional => "message_transactional",
        Message::Message(_) => "message_plain",
        Message::StreamStart(_) => "stream_start",
        Message::StreamStop => "stream_stop",
        Message::StreamCommit(_) => "stream_commit",
        Message::StreamAbort(_) => "stream_abort",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_postgresql_sends_every_fixture_kind_and_each_decodes() -> Result<()> {
    // A small decoding memory makes PostgreSQL stream the large transactions below.
    let pg = Cluster::start("logical_decoding_work_mem = 64kB")
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TYPE mood AS ENUM ('calm', 'tense');
         CREATE TABLE users (id integer PRIMARY KEY, email varchar(255), mood mood, born date, bio text);
         ALTER TABLE users ALTER COLUMN bio SET STORAGE EXTERNAL;
         CREATE TABLE full_t (id integer, note text);
         ALTER TABLE full_t REPLICA IDENTITY FULL;
         CREATE PUBLICATION golden FOR TABLE users, full_t;",
    )
    .await?;
    // Each in its own transaction: a slot cannot be created in one that wrote.
    for statement in [
        "SELECT pg_create_logical_replication_slot('golden_v1', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('golden_v2', 'pgoutput')",
        "SELECT pg_replication_origin_create('node_a')",
    ] {
        db.batch_execute(statement).await?;
    }
    db.batch_execute(
        "INSERT INTO users VALUES (1, 'a@example.com', 'calm', '1990-05-01', NULL);
         INSERT INTO users VALUES (2, 'zoë@例え.jp', 'tense', NULL, NULL);
         UPDATE users SET email = 'b@example.com' WHERE id = 1;
         UPDATE users SET id = 3 WHERE id = 2;
         INSERT INTO users VALUES (4, 'c@example.com', NULL, NULL, repeat('toast', 2000));
         UPDATE users SET email = 'd@example.com' WHERE id = 4;
         INSERT INTO full_t VALUES (1, 'one');
         UPDATE full_t SET note = 'uno' WHERE id = 1;
         DELETE FROM full_t WHERE id = 1;
         DELETE FROM users WHERE id = 3;
         BEGIN; SELECT pg_logical_emit_message(true, 'airlock', 'in a transaction'); INSERT INTO full_t VALUES (2, 'two'); COMMIT;
         SELECT pg_logical_emit_message(false, 'airlock', 'outside');
         TRUNCATE users, full_t RESTART IDENTITY CASCADE;",
    )
    .await?;
    // A transaction from another node, through a replication origin.
    db.batch_execute(
        "SELECT pg_replication_origin_session_setup('node_a');
         BEGIN; SELECT pg_replication_origin_xact_setup('0/2A', now()); INSERT INTO full_t VALUES (3, 'from node_a'); COMMIT;
         SELECT pg_replication_origin_session_reset();",
    )
    .await?;
    // Large transactions, one committed, one rolled back: streamed under version 2.
    db.batch_execute(
        "INSERT INTO full_t SELECT g, repeat('s', 100) FROM generate_series(10, 3000) g",
    )
    .await?;
    // A savepoint rolled back inside a streamed transaction is a Stream Abort too.
    db.batch_execute(
        "BEGIN;
         INSERT INTO full_t SELECT g, repeat('p', 100) FROM generate_series(10, 3000) g;
         SAVEPOINT s;
         INSERT INTO full_t SELECT g, repeat('q', 100) FROM generate_series(10, 3000) g;
         SELECT pg_logical_emit_message(true, 'airlock', 'inside a stream');
         ROLLBACK TO SAVEPOINT s;
         SELECT pg_logical_emit_message(true, 'airlock', 'inside a stream');
         INSERT INTO full_t SELECT g, repeat('o', 100) FROM generate_series(10, 3000) g;
         COMMIT;",
    )
    .await?;
    db.batch_execute(
        "BEGIN; INSERT INTO full_t SELECT g, repeat('r', 100) FROM generate_series(10, 6000) g; ROLLBACK;",
    )
    .await?;

    let mut found: BTreeMap<&'static str, Vec<u8>> = BTreeMap::new();
    let v1 = db
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('golden_v1', NULL, NULL,
               'proto_version', '1', 'publication_names', 'golden', 'messages', 'true')",
            &[],
        )
        .await?;
    for row in &v1 {
        let bytes: Vec<u8> = row.get(0);
        let message = decode(&bytes).unwrap_or_else(|e| {
            panic!(
                "a real message did not decode: {e}\n{}",
                hex::encode(&bytes)
            )
        });
        let kind = kind_of(&message);
        found.entry(kind).or_insert_with(|| bytes.clone());
    }
    let v2 = db
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('golden_v2', NULL, NULL,
               'proto_version', '2', 'streaming', 'on', 'messages', 'true',
               'publication_names', 'golden')",
            &[],
        )
        .await?;
    let mut in_block = false;
    for row in &v2 {
        let bytes: Vec<u8> = row.get(0);
        let kind = if in_block && let Some(Streamed { tag, body, .. }) = streamed_xid(&bytes)? {
            let mut plain = vec![tag];
            plain.extend_from_slice(body);
            match kind_of(&decode(&plain)?) {
                "relation" | "relation_full" => "streamed_relation",
                "insert" => "streamed_insert",
                "message_transactional" => "streamed_message",
                _ => continue,
            }
        } else {
            let message = decode(&bytes).unwrap_or_else(|e| {
                panic!(
                    "a real message did not decode: {e}\n{}",
                    hex::encode(&bytes)
                )
            });
            match message {
                Message::StreamStart(_) => in_block = true,
                Message::StreamStop => in_block = false,
                _ => {}
            }
            let kind = kind_of(&message);
            if !kind.starts_with("stream_") {
                continue;
            }
            kind
        };
        found.entry(kind).or_insert_with(|| bytes.clone());
    }
    let missing: Vec<&&str> = KINDS.iter().filter(|k| !found.contains_key(**k)).collect();
    assert!(missing.is_empty(), "PostgreSQL sent no {missing:?}");

    if std::env::var_os("AIRLOCK_BLESS").is_some() {
        std::fs::create_dir_all(golden_dir())?;
        for (kind, bytes) in &found {
            std::fs::write(
                golden_dir().join(format!("{kind}.hex")),
                to_hex(bytes, &format!("pgoutput {kind}, captured from PostgreSQL")),
            )?;
        }
    } else {
        // Each fixture's decoded shape matches what this server sends for the same kind.
        for (kind, bytes) in &found {
            let fixture = golden_dir().join(format!("{kind}.hex"));
            let golden = parse_hex(&std::fs::read_to_string(&fixture)?)?;
            assert_eq!(
                golden.first(),
                bytes.first(),
                "{kind}: the fixture and the server disagree on the message type"
            );
            if !kind.starts_with("streamed_") {
                assert_eq!(
                    kind_of(&decode(&golden).unwrap()),
                    *kind,
                    "{}",
                    fixture.display()
                );
            }
        }
    }
    Ok(())
}
