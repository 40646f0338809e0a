//! Runs the pgoutput decoder's fuzz target (`fuzz_pgoutput`, the real binary) for a
//! bounded time: `AIRLOCK_FUZZ_SECS` seconds (default 10), from the golden fixtures.
//! Every input must decode or give an error naming the message and an offset inside
//! it; a panic or a misnamed error fails the test and leaves the input in a file.

use std::process::Command;

use airlock_tests::*;

#[test]
fn the_pgoutput_decoder_survives_fuzzing_from_the_golden_fixtures() {
    let bin = airlock_bin().with_file_name("fuzz_pgoutput");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build --release --workspace --bins` (the README's test command does)",
        bin.display()
    );
    let secs = std::env::var("AIRLOCK_FUZZ_SECS").unwrap_or_else(|_| "10".into());
    let findings = temp_dir("fuzz-findings");
    let out = Command::new(&bin)
        .args(["--secs", &secs, "--findings"])
        .arg(&findings)
        .output()
        .expect("run fuzz_pgoutput");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the fuzzer found problems:\n{stdout}{stderr}"
    );
    // The run really exercised both answers, many times.
    let counts: std::collections::HashMap<&str, u64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("counts "))
        .unwrap_or_else(|| panic!("no counts in: {stdout}"))
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, v.parse().expect("a count")))
        .collect();
    let count = |k: &str| counts[k];
    let inputs = count("inputs");
    let decoded = count("decoded");
    let refused = count("refused");
    assert!(inputs >= 10_000, "only {inputs} inputs: {stdout}");
    assert!(decoded >= 100, "few mutants decoded ({decoded}): {stdout}");
    assert!(
        refused >= 1_000,
        "few mutants refused ({refused}): {stdout}"
    );
}

/// The checker itself flags what it must: a panic-free decoder is not proved by a
/// checker that accepts everything.
#[test]
fn the_fuzz_checker_accepts_good_answers_and_flags_bad_ones() {
    use airlock_tests::pgoutput_fuzz::check;
    let seeds = pgoutput_fuzz::corpus(&root().join("tests/golden/pgoutput")).unwrap();
    assert!(seeds.len() >= 20, "golden fixtures missing");
    let (_, insert) = seeds.iter().find(|(n, _)| n == "insert").unwrap();
    assert_eq!(check(insert), Ok(true));
    assert_eq!(check(&insert[..insert.len() - 1]), Ok(false));
    assert_eq!(check(b""), Ok(false));
    assert_eq!(check(b"Z"), Ok(false));

    use airlock::source::pgoutput::DecodeError;
    use airlock_tests::pgoutput_fuzz::check_error;
    let truncated = |message, offset| DecodeError::Truncated {
        message,
        offset,
        expected: "a 32-bit integer",
    };
    assert!(check_error(insert, &truncated("Insert", 3)).is_ok());
    assert!(
        check_error(insert, &truncated("Insert", insert.len() + 1)).is_err(),
        "offset past the end"
    );
    assert!(
        check_error(insert, &truncated("Insert", 0)).is_err(),
        "offset on the type byte"
    );
    assert!(
        check_error(insert, &truncated("Update", 3)).is_err(),
        "wrong message name"
    );
    assert!(check_error(insert, &DecodeError::Empty).is_err());
    assert!(check_error(b"Z", &DecodeError::UnknownType { byte: b'Y' }).is_err());
}
