//! Files that may hold row data, created private to the user airlock runs as.
//!
//! Invariants:
//! - Every directory airlock creates for row data is `0700` and every such file
//!   `0600`, whatever the umask: dead-letter files hold rows as PostgreSQL sent them,
//!   unmasked. The binary also sets its umask to `077` at start, which covers the
//!   files that libraries write for it (the lake's Parquet files and Delta log on a
//!   local disk).
//! - A directory that already exists keeps its mode (the operator chose it); the files
//!   airlock puts in it are still `0600`.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::path::Path;

/// The mode of the directories airlock creates for data.
pub const DIR_MODE: u32 = 0o700;
/// The mode of the files airlock writes data into.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents with mode `0700`.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut builder = DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    builder.create(dir)
}

/// Creates (or truncates) `path` for writing, with mode `0600` (an existing file is
/// set to it too).
pub fn create(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
    let file = options.open(path)?;
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Creates `path`, which must not exist, for writing and reading back, with mode
/// `0600`.
pub fn create_scratch(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
    options.open(path)
}

/// Opens `path` for appending, creating it with mode `0600` when it is absent.
pub fn append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
    options.open(path)
}

/// Makes every file the process creates from now on private to its user (umask
/// `077`), so that files written by libraries (the lake's Parquet files on a local
/// disk) are `0600` and their directories `0700`. Call it first in `main`, before any
/// thread exists.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn restrict_umask() {
    // SAFETY: `umask` only sets the process's file-creation mask; it cannot fail and
    // touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}

/// Elsewhere there is no umask to set.
#[cfg(not(unix))]
pub fn restrict_umask() {}

/// A test's temporary directory, removed with its contents when dropped.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TestDir(std::path::PathBuf);

#[cfg(test)]
impl TestDir {
    /// A fresh, empty `$TMPDIR/airlock-{name}-{pid}`.
    pub(crate) fn new(name: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!("airlock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a test directory");
        TestDir(dir)
    }
}

#[cfg(test)]
impl std::ops::Deref for TestDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
