//! `airlock guest new`: a guest folder that builds and tests with two commands.
//!
//! ```text
//! NAME/
//!   wit/transform.wit        the contract this airlock speaks
//!   <source>                 a working guest (redacts `columns`), on the bulk calls
//!   build.sh                 -> NAME.wasm, installing the language's tool if missing
//!   test/input.jsonl         changes for `airlock guest test`
//!   test/expected.jsonl      what the guest makes of them
//!   README.md
//! ```
//!
//! Every language's template does the same thing, so one expected output serves all.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The languages `guest new` writes.
pub const LANGUAGES: &str = "rust, python, js, c";

const WIT: &str = include_str!("../../../wit/transform.wit");
const INPUT: &str = include_str!("../../templates/guest/input.jsonl");
const EXPECTED: &str = include_str!("../../templates/guest/expected.jsonl");
const README: &str = include_str!("../../templates/guest/README.md");

/// `(path in the folder, contents, executable)` for `lang`.
fn files(lang: &str) -> anyhow::Result<Vec<(&'static str, &'static str, bool)>> {
    Ok(match lang {
        "rust" => vec![
            (
                "Cargo.toml",
                include_str!("../../templates/guest/rust/Cargo.toml"),
                false,
            ),
            (
                "src/lib.rs",
                include_str!("../../templates/guest/rust/lib.rs"),
                false,
            ),
            (
                "build.sh",
                include_str!("../../templates/guest/rust/build.sh"),
                true,
            ),
        ],
        "python" => vec![
            (
                "guest.py",
                include_str!("../../templates/guest/python/guest.py"),
                false,
            ),
            (
                "airlock_guest.py",
                include_str!("../../../guests/python/airlock_guest.py"),
                false,
            ),
            (
                "build.sh",
                include_str!("../../templates/guest/python/build.sh"),
                true,
            ),
        ],
        "js" => vec![
            (
                "guest.js",
                include_str!("../../templates/guest/js/guest.js"),
                false,
            ),
            (
                "airlock_guest.js",
                include_str!("../../../guests/js/airlock_guest.js"),
                false,
            ),
            (
                "build.sh",
                include_str!("../../templates/guest/js/build.sh"),
                true,
            ),
        ],
        "c" => vec![
            (
                "guest.c",
                include_str!("../../templates/guest/c/guest.c"),
                false,
            ),
            (
                "airlock_guest.c",
                include_str!("../../../guests/c/airlock_guest.c"),
                false,
            ),
            (
                "airlock_guest.h",
                include_str!("../../../guests/c/airlock_guest.h"),
                false,
            ),
            (
                "build.sh",
                include_str!("../../templates/guest/c/build.sh"),
                true,
            ),
        ],
        other => {
            bail!("--lang {other}: not a language `guest new` writes; expected one of {LANGUAGES}")
        }
    })
}

/// A guest name: what the file stem in the plugin folder and the crate will be.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        bail!(
            "`{name}` is not a guest name: use lowercase letters, digits, `-` and `_`, starting with a letter (e.g. `redact-email`)"
        );
    }
    Ok(())
}

/// Writes the folder `dir/NAME` for a guest in `lang`; refuses to touch an existing one.
pub fn new_guest(lang: &str, name: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    let files = files(lang)?;
    let root = dir.join(name);
    if root.exists() {
        bail!(
            "{} already exists: choose another name, or remove it first",
            root.display()
        );
    }
    let language = match lang {
        "rust" => "Rust",
        "python" => "Python",
        "js" => "JavaScript",
        _ => "C",
    };
    let fill = |text: &str| {
        text.replace("__NAME__", name)
            .replace("__CRATE__", &name.replace('-', "_"))
            .replace("__LANG__", language)
    };
    let mut all: Vec<(&str, String, bool)> = vec![
        ("wit/transform.wit", WIT.to_owned(), false),
        ("test/input.jsonl", INPUT.to_owned(), false),
        ("test/expected.jsonl", EXPECTED.to_owned(), false),
        ("README.md", fill(README), false),
    ];
    all.extend(files.into_iter().map(|(p, t, x)| (p, fill(t), x)));
    for (path, text, executable) in all {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        if executable {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(root)
}

/// Compares `airlock guest test` output with an expected output, line by line, leaving
/// out `pipeline` (it names the build). The first difference, else `None`.
pub fn first_difference(expected: &str, actual: &str) -> Option<String> {
    let parse = |text: &str| -> Vec<Result<serde_json::Value, String>> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut v: serde_json::Value =
                    serde_json::from_str(l).map_err(|e| format!("{l}: not JSON ({e})"))?;
                if let Some(o) = v.as_object_mut() {
                    o.remove("pipeline");
                }
                Ok(v)
            })
            .collect()
    };
    let (want, got) = (parse(expected), parse(actual));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        match (w, g) {
            (Ok(w), Ok(g)) if w == g => {}
            (Err(e), _) => return Some(format!("expected line {}: {e}", i + 1)),
            (_, Err(e)) => return Some(format!("output line {}: {e}", i + 1)),
            (Ok(w), Ok(g)) => {
                return Some(format!(
                    "line {} differs:\n  expected {w}\n  got      {g}",
                    i + 1
                ));
            }
        }
    }
    (want.len() != got.len())
        .then(|| format!("expected {} rows, the guest gave {}", want.len(), got.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_writes_a_folder_with_its_build_script_and_test() {
        let dir = std::env::temp_dir().join(format!("airlock-scaffold-{}", std::process::id()));
        for lang in ["rust", "python", "js", "c"] {
            let root = new_guest(lang, &format!("redact-{lang}"), &dir).unwrap();
            for f in [
                "wit/transform.wit",
                "test/input.jsonl",
                "test/expected.jsonl",
                "README.md",
                "build.sh",
            ] {
                assert!(root.join(f).is_file(), "{lang}: {f}");
            }
            let build = std::fs::read_to_string(root.join("build.sh")).unwrap();
            assert!(build.contains(&format!("redact-{lang}.wasm")), "{build}");
            assert!(!build.contains("__NAME__"));
        }
        let again = new_guest("rust", "redact-rust", &dir)
            .unwrap_err()
            .to_string();
        assert!(again.contains("already exists"), "{again}");
        let lang = new_guest("go", "x", &dir).unwrap_err().to_string();
        assert!(lang.contains("rust, python, js, c"), "{lang}");
        let name = new_guest("rust", "Bad Name", &dir).unwrap_err().to_string();
        assert!(name.contains("not a guest name"), "{name}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn outputs_are_compared_without_the_pipeline_field() {
        let a = "{\"op\":\"insert\",\"pipeline\":\"aaaa\"}\n";
        let b = "{\"pipeline\":\"bbbb\",\"op\":\"insert\"}\n";
        assert_eq!(first_difference(a, b), None);
        let c = "{\"op\":\"update\",\"pipeline\":\"aaaa\"}\n";
        let d = first_difference(a, c).unwrap();
        assert!(d.contains("line 1 differs"), "{d}");
        let e = first_difference(a, "").unwrap();
        assert!(e.contains("expected 1 rows, the guest gave 0"), "{e}");
    }
}
