//! Configuration files, golden: every example in `examples/` is valid, and every
//! invalid file in `tests/golden/config/` gives exactly the messages in its
//! `.expected` file (the path of each field, what was found, what is expected).
//! Set `AIRLOCK_BLESS=1` to rewrite the `.expected` files after a deliberate change.

use std::path::Path;

use airlock::config::Config;
use airlock_tests::root;

/// Secrets for the examples: every `*_env` variable they name resolves.
fn example_env(var: &str) -> Option<String> {
    var.starts_with("AIRLOCK_")
        .then(|| "secret-of-the-example-0123456789abcdef".to_owned())
}

#[test]
fn every_example_config_is_valid() {
    let dir = root().join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            let name = path.display().to_string();
            if let Err(e) = Config::from_toml_with_env(&name, &text, &dir, &example_env) {
                panic!("{e}");
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "expected the example configs in {}",
        dir.display()
    );
}

#[test]
fn invalid_configs_give_their_golden_messages() {
    let dir = root().join("tests/golden/config");
    let bless = std::env::var_os("AIRLOCK_BLESS").is_some();
    let mut cases = 0;
    let mut mismatches = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("golden dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        cases += 1;
        let text = std::fs::read_to_string(&path).expect("read");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let actual =
            match Config::from_toml_with_env(&name, &text, Path::new("/etc/airlock"), &|_| None) {
                Ok(_) => format!("{name} is valid\n"),
                Err(e) => e.to_string(),
            };
        let expected_path = path.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &actual).expect("bless");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!(
                "{} is missing: run with AIRLOCK_BLESS=1 and review it",
                expected_path.display()
            )
        });
        if expected != actual {
            mismatches.push(format!(
                "--- {}\n{expected}+++ actual\n{actual}",
                expected_path.display()
            ));
        }
    }
    assert!(cases >= 7, "golden cases missing in {}", dir.display());
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
