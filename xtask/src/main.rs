//! Project tasks, so that a fresh clone needs only cargo:
//!
//! - `cargo xtask demo [ARGS]`  set up, build the guests, run `airlock demo ARGS`
//! - `cargo xtask test [--pg 15|16|17|18] [ARGS]`  set up, build the guests, run the
//!   whole test suite: on PostgreSQL 15 (the system's), then the integration suite
//!   again on 18; with `--pg N` on that version only (fetched and cached)
//! - `cargo xtask guests [--lang python|js|c|rust|all]`  build the guests into
//!   guests/dist (default: all languages), installing each language's toolchain
//! - `cargo xtask setup`        install what the tests need (wasm target, PostgreSQL, Python readers)
//! - `cargo xtask bench [--pg N] [ARGS]` build everything, run the end-to-end benchmark
//!   (`bench_e2e ARGS`), on PostgreSQL `N` when named

mod bench;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod langs;
mod postgres;

/// Python packages the tests read the lake with.
const PYTHON_PACKAGES: &[&str] = &[
    "duckdb==1.5.5",
    "duckdb-extension-delta==1.5.5",
    "deltalake",
    "pytz",
    "audit-stream==0.1.0",
    "moto[server]",
];

/// The workspace `cargo xtask` was run in. `cargo run` names it at run time; the path
/// compiled in is only a fallback, since clones sharing one `CARGO_TARGET_DIR` may
/// run a binary another clone built.
fn root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Removes what `cargo run` put in our environment for this xtask binary. Passed on,
/// those variables dirty the fingerprints of build scripts that track them (ring,
/// aws-lc-sys), and every build from here would recompile them against builds made
/// from a plain shell.
fn scrub(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let injected = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*key,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "LD_LIBRARY_PATH"
                    | "RUST_RECURSION_COUNT"
                    | "RUSTUP_TOOLCHAIN_SOURCE"
            );
        if injected {
            cmd.env_remove(&*key);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("$ {shown}");
    scrub(cmd);
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed with {status}"))
    }
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn ensure_wasm_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-wasip2"))
        .unwrap_or(false);
    if installed {
        Ok(())
    } else {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))
    }
}

fn postgres_present() -> bool {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            Path::new(String::from_utf8_lossy(&o.stdout).trim())
                .join("initdb")
                .exists()
        })
        .unwrap_or(false);
    from_pg_config
        || std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.path().join("bin/initdb").exists())
            })
            .unwrap_or(false)
}

fn ensure_postgres() -> Result<(), String> {
    if postgres_present() {
        return Ok(());
    }
    if !is_root() {
        return Err("PostgreSQL server binaries are missing: install them (e.g. `sudo apt-get install postgresql`)".into());
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "postgresql", "postgresql-contrib"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_python_packages() -> Result<(), String> {
    let check = "import duckdb, deltalake, pytz, audit_stream, moto, flask, importlib.metadata as m; m.version('duckdb-extension-delta')";
    if succeeds(Command::new("python3").args(["-c", check])) {
        return Ok(());
    }
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PYTHON_PACKAGES))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the guests of the languages named by `--lang` (default `all`).
fn guests_for(args: &[String]) -> Result<(), String> {
    let langs = match args {
        [] => langs::Lang::ALL.to_vec(),
        [flag, value] if flag == "--lang" => langs::parse_langs(value)?,
        _ => {
            return Err(format!(
                "unexpected arguments {args:?}: usage `cargo xtask guests [--lang python|js|c|rust|all]`"
            ));
        }
    };
    for lang in langs {
        langs::build(lang, guests)?;
    }
    Ok(())
}

/// Builds every guest in guests/rust for wasm32-wasip2 and copies the components to guests/dist.
fn guests() -> Result<(), String> {
    ensure_wasm_target()?;
    let root = root();
    let manifest = root.join("guests/rust/Cargo.toml");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| PathBuf::from(d).join("guests"))
        .unwrap_or_else(|| root.join("guests/rust/target"));
    run(cargo()
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir))?;
    let built = target_dir.join("wasm32-wasip2/release");
    let dist = root.join("guests/dist");
    std::fs::create_dir_all(&dist).map_err(|e| format!("cannot create {}: {e}", dist.display()))?;
    let mut count = 0;
    for entry in
        std::fs::read_dir(&built).map_err(|e| format!("cannot read {}: {e}", built.display()))?
    {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|x| x == "wasm") {
            let name = path.file_name().expect("a file");
            std::fs::copy(&path, dist.join(name))
                .map_err(|e| format!("cannot copy {}: {e}", path.display()))?;
            count += 1;
        }
    }
    eprintln!("{count} guests in {}", dist.display());
    Ok(())
}

/// Builds the workspace's binaries and returns the path of `airlock`. Built with
/// `--workspace`, like the tests, so both share one set of compiled dependencies
/// (building one package alone resolves features differently and rebuilds them).
fn build_host() -> Result<PathBuf, String> {
    run(cargo().current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "--workspace",
        "--bins",
    ]))?;
    Ok(target_dir().join("release/airlock"))
}

/// The workspace's cargo target directory: `CARGO_TARGET_DIR` (relative to the
/// workspace when relative), or `target`.
fn target_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    if target.is_absolute() {
        target
    } else {
        root().join(target)
    }
}

fn setup() -> Result<(), String> {
    ensure_wasm_target()?;
    ensure_postgres()?;
    ensure_python_packages()
}

/// `cargo xtask test [--pg N] [ARGS]`: the whole suite on PostgreSQL 15, then the
/// integration suite (everything that starts a cluster) on 18; with `--pg N`, the
/// whole suite on `N` only. A version's binaries' folder goes to the tests as
/// `AIRLOCK_PG_BINDIR`.
fn test(args: &[String]) -> Result<(), String> {
    let (versions, rest): (Vec<&str>, _) = match args {
        [flag, major, rest @ ..] if flag == "--pg" => (vec![major.as_str()], rest),
        rest => (vec!["15", "18"], rest),
    };
    // Fetch first: a version that cannot be had fails before the long build.
    let bindirs = versions
        .iter()
        .map(|major| postgres::bindir(major))
        .collect::<Result<Vec<_>, _>>()?;
    setup()?;
    guests_for(&[])?;
    build_host()?;
    for (i, (major, bindir)) in versions.iter().zip(bindirs).enumerate() {
        let mut command = cargo();
        command.current_dir(root());
        if i == 0 {
            command.args(["test", "--release", "--workspace", "--locked"]);
        } else {
            // The unit tests start no cluster: once is enough.
            command.args([
                "test",
                "--release",
                "--locked",
                "-p",
                "airlock-tests",
                "--test",
                "suite",
            ]);
        }
        command.args(rest);
        match bindir {
            Some(bindir) => {
                eprintln!("== PostgreSQL {major} from {}", bindir.display());
                command.env("AIRLOCK_PG_BINDIR", bindir);
            }
            None => {
                eprintln!("== PostgreSQL {major} (the system's)");
                command.env_remove("AIRLOCK_PG_BINDIR");
            }
        }
        run(&mut command)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map(|(t, r)| (t.as_str(), r.to_vec()))
        .unwrap_or(("help", Vec::new()));
    let result = match task {
        "guests" => guests_for(&rest),
        "setup" => setup(),
        "bench" => bench::bench(&rest),
        "test" => test(&rest),
        "demo" => ensure_postgres()
            .and_then(|()| guests())
            .and_then(|()| build_host())
            .and_then(|airlock| {
                run(Command::new(airlock)
                    .current_dir(root())
                    .arg("demo")
                    .args(&rest))
            }),
        _ => {
            eprintln!("usage: cargo xtask <demo|test [--pg N]|bench [--pg N]|guests|setup> [ARGS]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::FAILURE
        }
    }
}
