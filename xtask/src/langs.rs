//! Guests in other languages: `cargo xtask guests --lang python|js|c|rust|all`.
//!
//! Each language builds its `mask` and `route` guests into `guests/dist` as
//! `<guest>-<language>.wasm` (`mask-python.wasm`, `route-js.wasm`, `mask-c.wasm`),
//! installing its own toolchain first when it is missing. Tools live under
//! `~/.cache/airlock/tools`, one folder per pinned version, so a second run finds
//! them and only rebuilds guests whose inputs changed.
//!
//! | language | toolchain (pinned) | from |
//! | --- | --- | --- |
//! | python | componentize-py | PyPI, in a virtual environment |
//! | js | @bytecodealliance/componentize-js | npm, `guests/js/package-lock.json` |
//! | c | clang, lld, wasi-libc; wit-bindgen-cli, wasm-tools; the WASI preview1 adapter | Debian packages; crates.io |

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::{root, run, target_dir};

/// componentize-py from PyPI.
const COMPONENTIZE_PY: &str = "0.25.1";
/// wasm-tools from crates.io, only the subcommands the C build uses.
const WASM_TOOLS: &str = "1.258.3";
const WASM_TOOLS_FEATURES: &str = "component,validate,print,parse";
/// wit-bindgen-cli from crates.io, the C generator only (the Rust guests use the
/// wit-bindgen 0.61.1 crate).
const WIT_BINDGEN: &str = "0.61.1";
/// The WASI preview1 adapter comes from the `wasi-preview1-component-adapter-provider`
/// crate pinned in xtask/Cargo.toml, at the host's wasmtime version.
const ADAPTER_VERSION: &str = "48.0.8";
/// Debian packages for C: the compiler, the linker, the C library for WASI and
/// the compiler runtime for wasm32.
const C_PACKAGES: &[&str] = &["clang", "lld", "wasi-libc", "libclang-rt-dev-wasm32"];
/// WASI features the JavaScript runtime would import by default that the host does
/// not offer (guests have no network).
const JS_DISABLED_FEATURES: &[&str] = &["http", "fetch-event"];

/// The guests built in every language.
pub const GUESTS: &[&str] = &["mask", "route"];

/// A guest language.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lang {
    Rust,
    Python,
    Js,
    C,
}

impl Lang {
    pub const ALL: [Lang; 4] = [Lang::Rust, Lang::Python, Lang::Js, Lang::C];

    pub fn name(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
            Lang::C => "c",
        }
    }
}

/// The languages named by a `--lang` value: one language or `all`.
pub fn parse_langs(value: &str) -> Result<Vec<Lang>, String> {
    if value == "all" {
        return Ok(Lang::ALL.to_vec());
    }
    Lang::ALL
        .into_iter()
        .find(|l| l.name() == value)
        .map(|l| vec![l])
        .ok_or_else(|| {
            format!("unknown language `{value}` for --lang: expected python, js, c, rust or all")
        })
}

/// Where installed tools live: `~/.cache/airlock/tools`.
fn tools_dir() -> Result<PathBuf, String> {
    let home =
        std::env::var_os("HOME").ok_or("HOME is not set: cannot place ~/.cache/airlock/tools")?;
    Ok(PathBuf::from(home).join(".cache/airlock/tools"))
}

fn dist_dir() -> Result<PathBuf, String> {
    let dist = root().join("guests/dist");
    std::fs::create_dir_all(&dist).map_err(|e| format!("cannot create {}: {e}", dist.display()))?;
    Ok(dist)
}

/// A scratch folder for generated bindings and core modules, in the cargo target
/// directory.
fn build_dir(lang: Lang) -> Result<PathBuf, String> {
    let dir = target_dir().join("guests-langs").join(lang.name());
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Standard output of a command that succeeded, trimmed.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Builds `out` with `build` unless it exists and was built from the same inputs.
/// The inputs' hash is kept in `out` + `.inputs` beside it.
fn build_if_changed(
    out: &Path,
    inputs: &[PathBuf],
    tool: &str,
    build: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    let mut hasher = DefaultHasher::new();
    hasher.write(tool.as_bytes());
    for input in inputs {
        hasher.write(input.to_string_lossy().as_bytes());
        hasher.write(&read(input)?);
    }
    let stamp = format!("{:016x}\n", hasher.finish());
    let stamp_path = PathBuf::from(format!("{}.inputs", out.display()));
    if out.is_file() && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(&stamp) {
        eprintln!("{} is up to date", out.display());
        return Ok(());
    }
    let _ = std::fs::remove_file(&stamp_path);
    let start = Instant::now();
    build()?;
    if !out.is_file() {
        return Err(format!("the build did not write {}", out.display()));
    }
    std::fs::write(&stamp_path, stamp)
        .map_err(|e| format!("cannot write {}: {e}", stamp_path.display()))?;
    eprintln!(
        "built {} in {:.1} s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every file of the WIT contract.
fn wit_files() -> Result<Vec<PathBuf>, String> {
    let wit = root().join("wit");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&wit)
        .map_err(|e| format!("cannot read {}: {e}", wit.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wit"))
        .collect();
    files.sort();
    Ok(files)
}

fn timed<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let start = Instant::now();
    let value = f()?;
    eprintln!("{what}: {:.1} s", start.elapsed().as_secs_f64());
    Ok(value)
}

fn is_root() -> bool {
    crate::is_root()
}

/// Installs Debian packages as root, or says which command to run.
fn apt_install(packages: &[&str], why: &str) -> Result<(), String> {
    let command = format!("apt-get install -y {}", packages.join(" "));
    if !is_root() {
        return Err(format!(
            "{why} is missing: install it with `sudo {command}` and run this again"
        ));
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

// Python ----------------------------------------------------------------------------

/// componentize-py in its own virtual environment; returns the executable.
fn ensure_componentize_py() -> Result<PathBuf, String> {
    let venv = tools_dir()?.join(format!("componentize-py-{COMPONENTIZE_PY}"));
    let exe = venv.join("bin/componentize-py");
    let wanted = format!("componentize-py {COMPONENTIZE_PY}");
    if output(Command::new(&exe).arg("--version")).as_deref() == Some(wanted.as_str()) {
        return Ok(exe);
    }
    timed(
        &format!("installing componentize-py {COMPONENTIZE_PY}"),
        || {
            if Command::new("python3").arg("--version").output().is_err() {
                apt_install(&["python3", "python3-venv"], "python3")?;
            }
            let _ = std::fs::remove_dir_all(&venv);
            if run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).is_err() {
                apt_install(&["python3-venv"], "Python's venv module")?;
                run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
            }
            run(Command::new(venv.join("bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg(format!("componentize-py=={COMPONENTIZE_PY}")))
        },
    )?;
    match output(Command::new(&exe).arg("--version")) {
        Some(v) if v == wanted => Ok(exe),
        other => Err(format!(
            "{} reports {other:?} after installing, expected {wanted:?}",
            exe.display()
        )),
    }
}

fn build_python() -> Result<(), String> {
    let exe = ensure_componentize_py()?;
    let src = root().join("guests/python");
    let dist = dist_dir()?;
    for guest in GUESTS {
        let out = dist.join(format!("{guest}-python.wasm"));
        let mut inputs = wit_files()?;
        inputs.push(src.join(format!("{guest}.py")));
        inputs.push(src.join("airlock_guest.py"));
        build_if_changed(&out, &inputs, COMPONENTIZE_PY, || {
            run(Command::new(&exe)
                .arg("--quiet")
                .arg("-d")
                .arg(root().join("wit"))
                .args(["-w", "transform", "componentize", guest, "-p"])
                .arg(&src)
                .arg("-o")
                .arg(&out)
                .env("PYTHONDONTWRITEBYTECODE", "1"))
        })?;
    }
    Ok(())
}

// JavaScript ------------------------------------------------------------------------

/// The npm packages of `guests/js/package-lock.json`, installed in a tools folder
/// named after the lock file's hash; returns componentize-js's command-line script.
/// (`package.json` names `@bytecodealliance/preview2-shim` too: componentize-js
/// 0.23.0 imports it without declaring it.)
fn ensure_componentize_js() -> Result<PathBuf, String> {
    let src = root().join("guests/js");
    let manifest = read(&src.join("package.json"))?;
    let lock = read(&src.join("package-lock.json"))?;
    let mut hasher = DefaultHasher::new();
    hasher.write(&manifest);
    hasher.write(&lock);
    let dir = tools_dir()?.join(format!("componentize-js-{:016x}", hasher.finish()));
    let cli = dir.join("node_modules/@bytecodealliance/componentize-js/src/cli.js");
    let done = dir.join(".installed");
    if cli.is_file() && done.is_file() {
        return Ok(cli);
    }
    if output(Command::new("npm").arg("--version")).is_none()
        || output(Command::new("node").arg("--version")).is_none()
    {
        apt_install(&["nodejs", "npm"], "Node.js (node and npm)")?;
    }
    timed(
        "installing componentize-js (npm install from the lock file)",
        || {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            for file in ["package.json", "package-lock.json"] {
                std::fs::copy(src.join(file), dir.join(file))
                    .map_err(|e| format!("cannot copy {file} to {}: {e}", dir.display()))?;
            }
            // `npm install`, not `npm ci`: the lock file pins every package, but npm
            // records only this platform's optional native packages, and `npm ci` then
            // refuses the lock file as out of sync.
            run(Command::new("npm").current_dir(&dir).args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ]))?;
            std::fs::write(&done, b"").map_err(|e| format!("cannot write {}: {e}", done.display()))
        },
    )?;
    if !cli.is_file() {
        return Err(format!(
            "npm install did not install {}: check guests/js/package.json",
            cli.display()
        ));
    }
    Ok(cli)
}

fn build_js() -> Result<(), String> {
    let cli = ensure_componentize_js()?;
    let src = root().join("guests/js");
    let dist = dist_dir()?;
    let tool = String::from_utf8_lossy(&read(&src.join("package-lock.json"))?).into_owned();
    for guest in GUESTS {
        let out = dist.join(format!("{guest}-js.wasm"));
        let mut inputs = wit_files()?;
        inputs.push(src.join(format!("{guest}.js")));
        inputs.push(src.join("airlock_guest.js"));
        build_if_changed(&out, &inputs, &tool, || {
            let mut cmd = Command::new("node");
            cmd.arg(&cli)
                .arg(src.join(format!("{guest}.js")))
                .arg("--wit")
                .arg(root().join("wit"))
                .args(["--world-name", "transform"]);
            for feature in JS_DISABLED_FEATURES {
                cmd.args(["--disable", feature]);
            }
            run(cmd.arg("-o").arg(&out))
        })?;
    }
    Ok(())
}

// C ---------------------------------------------------------------------------------

/// The wasi-libc sysroot of Debian's `wasi-libc` package.
const WASI_SYSROOT_LIBC: &str = "/usr/lib/wasm32-wasi/libc.a";

fn c_toolchain_present() -> bool {
    let clang_targets_wasi = Command::new("clang")
        .args(["--target=wasm32-wasi", "-print-libgcc-file-name"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| Path::new(String::from_utf8_lossy(&o.stdout).trim()).is_file())
        .unwrap_or(false);
    clang_targets_wasi
        && Path::new(WASI_SYSROOT_LIBC).is_file()
        && output(Command::new("wasm-ld").arg("--version")).is_some()
}

/// A crates.io tool installed with `cargo install --locked` into the tools folder.
fn ensure_cargo_tool(
    krate: &str,
    version: &str,
    bin: &str,
    features: &str,
    reports: &str,
) -> Result<PathBuf, String> {
    let root_dir = tools_dir()?.join(format!("{krate}-{version}"));
    let exe = root_dir.join("bin").join(bin);
    let wanted = |v: &Option<String>| v.as_deref().is_some_and(|v| v.starts_with(reports));
    if wanted(&output(Command::new(&exe).arg("--version"))) {
        return Ok(exe);
    }
    timed(
        &format!("installing {krate} {version} (cargo install)"),
        || {
            run(crate::cargo()
                .args(["install", "--locked", "--quiet", "--force", "--root"])
                .arg(&root_dir)
                .arg("--version")
                .arg(format!("={version}"))
                .args(["--no-default-features", "--features", features, krate]))
        },
    )?;
    let got = output(Command::new(&exe).arg("--version"));
    if wanted(&got) {
        Ok(exe)
    } else {
        Err(format!(
            "{} reports {got:?} after installing, expected {reports:?}",
            exe.display()
        ))
    }
}

/// The WASI preview1 adapter (reactor flavour), written from the crate's bytes.
fn ensure_adapter() -> Result<PathBuf, String> {
    let dir = tools_dir()?.join(format!("wasi-preview1-adapter-{ADAPTER_VERSION}"));
    let path = dir.join("wasi_snapshot_preview1.reactor.wasm");
    let bytes = wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;
    if std::fs::read(&path).ok().as_deref() == Some(bytes) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::write(&path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

fn build_c() -> Result<(), String> {
    if !c_toolchain_present() {
        timed("installing clang, lld and wasi-libc (apt)", || {
            apt_install(
                C_PACKAGES,
                "the C toolchain for WebAssembly (clang, wasm-ld, wasi-libc)",
            )
        })?;
        if !c_toolchain_present() {
            return Err(format!(
                "clang cannot build for wasm32-wasi after installing {}: check `clang --target=wasm32-wasi -print-libgcc-file-name` and {WASI_SYSROOT_LIBC}",
                C_PACKAGES.join(" ")
            ));
        }
    }
    let wit_bindgen = ensure_cargo_tool(
        "wit-bindgen-cli",
        WIT_BINDGEN,
        "wit-bindgen",
        "c",
        &format!("wit-bindgen-cli {WIT_BINDGEN}"),
    )?;
    let wasm_tools = ensure_cargo_tool(
        "wasm-tools",
        WASM_TOOLS,
        "wasm-tools",
        WASM_TOOLS_FEATURES,
        &format!("wasm-tools {WASM_TOOLS}"),
    )?;
    let adapter = ensure_adapter()?;
    let src = root().join("guests/c");
    let build = build_dir(Lang::C)?;
    let bindings = build.join("bindings");
    let dist = dist_dir()?;
    let clang = output(Command::new("clang").arg("--version")).unwrap_or_default();
    let tool = format!(
        "{clang} wit-bindgen {WIT_BINDGEN} wasm-tools {WASM_TOOLS} adapter {ADAPTER_VERSION}"
    );
    for guest in GUESTS {
        let out = dist.join(format!("{guest}-c.wasm"));
        let mut inputs = wit_files()?;
        inputs.push(src.join(format!("{guest}.c")));
        inputs.push(src.join("airlock_guest.c"));
        inputs.push(src.join("airlock_guest.h"));
        build_if_changed(&out, &inputs, &tool, || {
            let _ = std::fs::remove_dir_all(&bindings);
            run(Command::new(&wit_bindgen)
                .arg("c")
                .arg(root().join("wit"))
                .args(["--world", "transform", "--out-dir"])
                .arg(&bindings))?;
            let core = build.join(format!("{guest}.core.wasm"));
            run(Command::new("clang")
                .args([
                    "--target=wasm32-wasi",
                    "-mexec-model=reactor",
                    "-O2",
                    "-std=c11",
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    "-Wno-unused-parameter",
                    "-I",
                ])
                .arg(&bindings)
                .arg("-I")
                .arg(&src)
                .arg(src.join(format!("{guest}.c")))
                .arg(src.join("airlock_guest.c"))
                .arg(bindings.join("transform.c"))
                .arg(bindings.join("transform_component_type.o"))
                .arg("-o")
                .arg(&core))?;
            run(Command::new(&wasm_tools)
                .args(["component", "new"])
                .arg(&core)
                .arg("--adapt")
                .arg(format!("wasi_snapshot_preview1={}", adapter.display()))
                .arg("-o")
                .arg(&out))?;
            run(Command::new(&wasm_tools).arg("validate").arg(&out))
        })?;
    }
    Ok(())
}

/// Builds the guests of `lang` into guests/dist (Rust through `rust`, which builds
/// every Rust guest).
pub fn build(lang: Lang, rust: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let start = Instant::now();
    eprintln!("== {} guests", lang.name());
    match lang {
        Lang::Rust => rust(),
        Lang::Python => build_python(),
        Lang::Js => build_js(),
        Lang::C => build_c(),
    }
    .map_err(|e| {
        format!(
            "{} guests: {e}\n(build them alone with `cargo xtask guests --lang {}`)",
            lang.name(),
            lang.name()
        )
    })?;
    eprintln!(
        "== {} guests done in {:.1} s",
        lang.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
