//! `airlock guest test`: the guest author's harness, through the real binary, on the
//! documented example input (`examples/changes.jsonl`).

use std::path::Path;

use airlock_tests::*;
use serde_json::{Value as Json, json};

fn guest_test(plugin: &Path, settings: &[&str], input: &[u8]) -> (bool, Vec<Json>, String) {
    let out = airlock_tests::guest_test(plugin, settings, input);
    (out.ok, out.lines, out.stderr)
}

#[test]
fn guest_test_masks_the_example_changes_and_prints_routes_tags_and_annotations() {
    let input =
        std::fs::read(root().join("examples/changes.jsonl")).expect("examples/changes.jsonl");
    let (ok, lines, stderr) = guest_test(
        &guest("mask"),
        &["columns=email", "columns=phone", "mode.phone=keep-last-4"],
        &input,
    );
    assert!(ok, "{stderr}");
    assert_eq!(lines.len(), 4, "one line per input change");
    let insert = &lines[0];
    assert_eq!(insert["table"], "public.customers");
    assert_eq!(insert["op"], "insert");
    assert_eq!(insert["new"]["email"], json!(sha256_hex("ada@example.com")));
    assert_eq!(insert["new"]["phone"], "***********4477");
    assert_eq!(insert["new"]["balance"], "1234.50", "numeric stays exact");
    assert_eq!(insert["new"]["signed_up"], "2024-02-29T12:00:00Z");
    assert_eq!(insert["column_tags"]["email"], json!(["pii"]));
    assert_eq!(insert["routes"], json!(["default"]));
    // The update's phone was an unchanged TOAST value: it stays unchanged, not data.
    assert_eq!(lines[1]["new"]["phone"], json!({"$unchanged": true}));
    assert_eq!(
        lines[1]["new"]["email"],
        json!(sha256_hex("ada@newmail.example.org"))
    );
    // A table without the masked columns passes through untouched.
    assert_eq!(lines[3]["table"], "public.orders");
    assert_eq!(lines[3]["new"]["total"], json!(12.5));
}

#[test]
fn guest_test_runs_a_folder_of_stages_in_order() {
    let dir = temp_dir("guest-cli-folder");
    let plugins = plugin_dir(
        &dir,
        &[
            ("10-mask", "mask", ""),
            (
                "20-route",
                "route",
                "spine_tables = [\"public.customers\"]\n",
            ),
        ],
    );
    let input =
        std::fs::read(root().join("examples/changes.jsonl")).expect("examples/changes.jsonl");
    let (ok, lines, stderr) = guest_test(&plugins, &[], &input);
    assert!(ok, "{stderr}");
    // mask tags `email` as pii, so route sends customers rows to `restricted` and `spine`.
    assert_eq!(lines[0]["routes"], json!(["restricted", "spine"]));
    assert_eq!(lines[0]["annotations"]["spine.kind"], "other");
    assert_eq!(lines[3]["routes"], json!(["default"]));
    assert_eq!(lines[0]["pipeline"].as_str().unwrap().len(), 12);
}

#[test]
fn guest_test_names_the_bad_input_line_and_the_fix() {
    let input = b"{\"table\":\"public.t\",\"op\":\"insert\",\"new\":{\"id\":1}}\n{\"table\":\"t\",\"op\":\"upsert\"}\n";
    let (ok, _, stderr) = guest_test(&guest("mask"), &[], input);
    assert!(!ok);
    assert!(stderr.contains("input line 2"), "{stderr}");
    assert!(stderr.contains("unknown op `upsert`"), "{stderr}");
    let (ok, _, stderr) = guest_test(&guest("mask"), &["mode.email=scramble"], b"");
    assert!(!ok);
    assert!(
        stderr.contains("scramble") && stderr.contains("allowed modes"),
        "the guest's refusal is shown verbatim: {stderr}"
    );
}

/// `airlock guest new` in each language: the folder builds with its own script, and
/// the built guest gives exactly the expected output on the test input
/// (`--expect`), without a line of the guest written by hand. A changed expectation
/// fails, naming the line.
#[test]
fn guest_new_scaffolds_a_guest_that_builds_and_passes_its_own_test_in_every_language() {
    let dir = temp_dir("guest-new");
    for lang in ["rust", "python", "js", "c"] {
        let name = format!("redact-{lang}");
        let out = std::process::Command::new(airlock_bin())
            .args(["guest", "new", "--lang", lang, &name, "--dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let root = dir.join(&name);
        // Rust builds share one target folder across runs (the scaffold's own would
        // compile wit-bindgen each time); the other languages' tools are where
        // `cargo xtask guests` installed them.
        let target = std::env::var_os("HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(".cache/airlock/scaffold-target");
        let build = std::process::Command::new("bash")
            .arg(root.join("build.sh"))
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            build.status.success(),
            "{lang}: build.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&build.stdout),
            String::from_utf8_lossy(&build.stderr)
        );
        let wasm = root.join(format!("{name}.wasm"));
        let input = std::fs::read(root.join("test/input.jsonl")).unwrap();
        let run = |expected: &Path| {
            let mut child = std::process::Command::new(airlock_bin())
                .args(["guest", "test"])
                .arg(&wasm)
                .arg("--expect")
                .arg(expected)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(&input).unwrap();
            child.wait_with_output().unwrap()
        };
        let expected = root.join("test/expected.jsonl");
        let passed = run(&expected);
        let stderr = String::from_utf8_lossy(&passed.stderr);
        assert!(passed.status.success(), "{lang}: {stderr}");
        assert!(stderr.contains("ok: 4 rows"), "{lang}: {stderr}");
        // The expectation is real: the redacted e-mail, changed, fails the test.
        let text = std::fs::read_to_string(&expected).unwrap();
        assert!(
            text.contains("[redacted]") && !text.contains("ada@example.com"),
            "{text}"
        );
        let wrong = root.join("test/wrong.jsonl");
        std::fs::write(&wrong, text.replacen("[redacted]", "ada@example.com", 1)).unwrap();
        let failed = run(&wrong);
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(
            !failed.status.success(),
            "{lang}: a wrong expectation must fail"
        );
        assert!(stderr.contains("line 1 differs"), "{lang}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
