//! Secrets: the keys airlock keeps on disk, the message authentication codes it makes
//! with them, and how credentials are kept out of what it shows.
//!
//! Invariants:
//! - A URL is shown (logs, `/status`, errors) only through [`redact_url`]: its
//!   `user:password@` never appears.
//! - A key file holds exactly [`KEY_LEN`] random bytes, is mode `0600` and belongs to
//!   the user airlock runs as; anything else is refused with a message naming the file
//!   and the fix, never repaired silently (a key others could read or replace proves
//!   nothing).
//! - A missing key is created atomically: written to a private temporary file, then
//!   linked into place only if no other process created it first, so processes that
//!   start together end up with the same key.
//! - MACs are HMAC-SHA256 and compared in constant time.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bytes in a key.
pub const KEY_LEN: usize = 32;

/// A secret key read from (or created in) a key file.
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(***)")
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {message}")]
    Unsafe { path: PathBuf, message: String },
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Key {
    /// A key with these bytes, for tests that need one per name without a file.
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// Reads the key in `path`, creating it (and its directory, `0700`) when absent.
    pub fn load_or_create(path: &Path) -> Result<Key, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        match Key::load(path) {
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        if let Some(dir) = path.parent() {
            crate::private_files::create_dir_all(dir).map_err(io)?;
        }
        let mut bytes = [0u8; KEY_LEN];
        random_bytes(&mut bytes).map_err(io)?;
        // A name of its own per call: threads of one process may create the same key.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{call}", std::process::id()));
        let written = crate::private_files::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()));
        // Link, never rename: a key another process created meanwhile is kept.
        let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Key(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Key::load(path),
            Err(e) => Err(io(e)),
        }
    }

    /// Reads the key in `path`, refusing a file others may read or write, another
    /// user's file, or one of the wrong length.
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let unsafe_key = |message: String| KeyError::Unsafe {
            path: path.to_owned(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        check_private(&meta, 0o077).map_err(|problem| {
            unsafe_key(format!(
                "{problem}: a key others can read or replace proves nothing; \
                 remove the file to have a new one made, or `chmod 600` it if it is yours"
            ))
        })?;
        let mut bytes = Vec::with_capacity(KEY_LEN + 1);
        std::io::Read::by_ref(&mut file)
            .take(KEY_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            unsafe_key(format!(
                "holds {} bytes, expected {KEY_LEN}: remove it to have a new one made",
                bytes.len()
            ))
        })?;
        Ok(Key(key))
    }

    /// HMAC-SHA256 over the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        Hmac::new(&self.0).mac(parts)
    }

    /// Whether `tag` is the MAC of `parts` (or its first `tag.len()` bytes, at least
    /// 16), compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mac = self.mac(parts);
        tag.len() >= 16 && tag.len() <= mac.len() && constant_time_eq(&mac[..tag.len()], tag)
    }
}

/// HMAC-SHA256 (RFC 2104) with the key's inner and outer hash states computed once:
/// each MAC then costs the message's blocks and one more, no key schedule.
#[derive(Clone)]
pub struct Hmac {
    inner: Sha256,
    outer: Sha256,
}

impl std::fmt::Debug for Hmac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hmac(***)")
    }
}

impl Hmac {
    /// The states for `key` (hashed first when longer than a block).
    pub fn new(key: &[u8]) -> Hmac {
        const BLOCK: usize = 64;
        let mut padded = [0u8; BLOCK];
        if key.len() > BLOCK {
            padded[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            padded[..key.len()].copy_from_slice(key);
        }
        let mut inner_pad = [0x36u8; BLOCK];
        let mut outer_pad = [0x5cu8; BLOCK];
        for (i, b) in padded.iter().enumerate() {
            inner_pad[i] ^= b;
            outer_pad[i] ^= b;
        }
        let mut inner = Sha256::new();
        inner.update(inner_pad);
        let mut outer = Sha256::new();
        outer.update(outer_pad);
        Hmac { inner, outer }
    }

    /// The MAC of the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        for part in parts {
            inner.update(part);
        }
        let mut outer = self.outer.clone();
        outer.update(inner.finalize());
        outer.finalize().into()
    }
}

/// `text` with the user information of every URL in it (`scheme://user:password@`)
/// shown as `***`, so that it may be logged or shown.
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the first `/`, `?`, `#` or whitespace; user
        // information ends at its last `@`.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(userinfo_end) => {
                out.push_str("***");
                out.push_str(&tail[userinfo_end..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Compares two byte strings in time that depends only on their length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fills `out` with random bytes from the operating system.
pub fn random_bytes(out: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(out)
}

/// Checks that `meta` belongs to the user airlock runs as and grants nothing in
/// `forbidden` (e.g. `0o077`: nothing to group or others); says what is wrong.
#[cfg(unix)]
pub fn check_private(meta: &std::fs::Metadata, forbidden: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let mode = meta.mode() & 0o7777;
    let owner = meta.uid();
    let me = effective_uid();
    if owner != me {
        return Err(format!(
            "owned by uid {owner}, not by uid {me} that airlock runs as"
        ));
    }
    if mode & forbidden != 0 {
        return Err(format!(
            "mode {mode:04o} lets other users in (expected no bits of {forbidden:04o})"
        ));
    }
    Ok(())
}

/// Elsewhere ownership and modes are not checked.
#[cfg(not(unix))]
pub fn check_private(_meta: &std::fs::Metadata, _forbidden: u32) -> Result<(), String> {
    Ok(())
}

/// The effective user id of this process.
#[cfg(unix)]
fn effective_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    // The owner of a directory this process just created is its effective uid; /proc
    // gives it without one.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_information_in_urls_is_never_shown() {
        assert_eq!(
            redact_url("http://ops:s3cret@spine.internal:8093/events"),
            "http://***@spine.internal:8093/events"
        );
        assert_eq!(
            redact_url("spine at https://u:p@h/events unreachable; lake s3://b/p; x://a@b@c?d"),
            "spine at https://***@h/events unreachable; lake s3://b/p; x://***@c?d"
        );
        assert_eq!(redact_url("file:///tmp/lake"), "file:///tmp/lake");
        assert_eq!(redact_url("no url"), "no url");
    }

    /// Regression: the temporary file was named per process, so two threads creating
    /// one key file raced on it ("No such file or directory").
    #[test]
    fn threads_creating_one_key_at_once_all_get_it() {
        let dir = std::env::temp_dir().join(format!("airlock-keys-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("shared.key");
        let keys: Vec<Key> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| Key::load_or_create(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| k.0 == keys[0].0), "one key for all");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231_case_2_shape() {
        // RFC 4231 test case 2 uses a 4-byte key; ours are 32 bytes, zero-padded the
        // same way HMAC pads any short key, so "Jefe" padded with zeros is that key.
        let mut key = [0u8; KEY_LEN];
        key[..4].copy_from_slice(b"Jefe");
        let mac = Key(key).mac(&[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_key_is_created_private_reused_and_refused_when_others_can_read_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("airlock-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state").join("test.key");
        let first = Key::load_or_create(&path).unwrap();
        let again = Key::load_or_create(&path).unwrap();
        assert_eq!(first.0, again.0, "the same key on the next start");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert!(first.verify(&[b"x"], &first.mac(&[b"x"])[..16]));
        assert!(!first.verify(&[b"y"], &first.mac(&[b"x"])[..16]));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = Key::load_or_create(&path).unwrap_err().to_string();
        assert!(
            error.contains("mode 0644") && error.contains("test.key"),
            "{error}"
        );

        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let error = Key::load(&path).unwrap_err().to_string();
        assert!(error.contains("holds 5 bytes"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
