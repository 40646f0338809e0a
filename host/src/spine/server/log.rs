//! The spine's append-only log file: framing, appending with fsync, and recovery.
//!
//! ```text
//! events.log = "ASPINE01" frame*
//! frame      = "EVT1" len:u32le sum:[8] body[len]
//! body       = hash:[32] canonical-json            (hash = SHA-256(canonical-json))
//! sum        = SHA-256(len:u32le ‖ body)[0..8]
//! ```
//!
//! Invariants:
//! - Frames are only ever appended. An append is one `write` of whole frames followed
//!   by `fdatasync`; the writer reports success only after both, and a failed write is
//!   cut off again (`set_len`) before anything else is appended. A failed fsync
//!   poisons the writer: the file's state is unknown, so nothing more is appended.
//! - A frame that fails its checks at the end of the file, with no valid frame after
//!   it, is a *torn tail* when it is incomplete or its last bytes are zeros (a write
//!   cut short by a crash; it was never acknowledged). Recovery copies it to
//!   `torn-OFFSET.bin` beside the log and truncates it.
//! - Files the spine creates hold row data and are its owner's only (0600, in a 0700
//!   directory when the spine made it; see [`crate::private_files`]).
//! - Any other bad frame — one followed by a valid frame, or a complete frame at the
//!   end whose bytes are not zeros — is *corruption*: recovery refuses the log and
//!   names the record, rather than silently dropping what may be acknowledged data.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The log's file name inside the spine directory.
pub const LOG_FILE: &str = "events.log";
/// The first bytes of every log file.
pub const FILE_HEADER: &[u8; 8] = b"ASPINE01";
/// The first bytes of every frame.
pub const FRAME_MAGIC: &[u8; 4] = b"EVT1";
/// Bytes before a frame's body: magic, length, checksum.
pub const FRAME_HEADER: u64 = 16;
/// Bytes of the stored event hash at the start of a body.
pub const HASH_LEN: usize = 32;

/// The frame checksum: the first 8 bytes of SHA-256 over the length and the body.
fn frame_sum(len: u32, body: &[u8]) -> [u8; 8] {
    let mut hasher = Sha256::new();
    hasher.update(len.to_le_bytes());
    hasher.update(body);
    let digest = hasher.finalize();
    let mut sum = [0; 8];
    sum.copy_from_slice(&digest[..8]);
    sum
}

/// Appends one frame holding `hash ‖ canonical` to `out`.
pub fn encode_frame(hash: &[u8; 32], canonical: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(HASH_LEN + canonical.len()).expect("an event is smaller than 4 GiB");
    let mut hasher = Sha256::new();
    hasher.update(len.to_le_bytes());
    hasher.update(hash);
    hasher.update(canonical);
    let digest = hasher.finalize();
    out.extend_from_slice(FRAME_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&digest[..8]);
    out.extend_from_slice(hash);
    out.extend_from_slice(canonical);
}

/// One intact frame read back.
#[derive(Debug)]
pub struct Frame {
    /// Byte offset of the frame's start in the file.
    pub offset: u64,
    /// `hash ‖ canonical`.
    pub body: Vec<u8>,
}

impl Frame {
    /// Byte offset of the body in the file.
    pub fn body_offset(&self) -> u64 {
        self.offset + FRAME_HEADER
    }

    /// The stored SHA-256 of the canonical event.
    pub fn hash(&self) -> [u8; 32] {
        let mut hash = [0; 32];
        hash.copy_from_slice(&self.body[..HASH_LEN]);
        hash
    }

    /// The canonical JSON of the event (without `hash`).
    pub fn canonical(&self) -> &[u8] {
        &self.body[HASH_LEN..]
    }
}

/// How reading the log ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Every byte belongs to an intact frame.
    Clean,
    /// An unacknowledged write cut short by a crash: `bytes` from `offset` to the end.
    Torn { offset: u64, bytes: u64 },
    /// A damaged frame that is not a torn tail: record number `record` at `offset`.
    Corrupt {
        record: u64,
        offset: u64,
        reason: String,
    },
}

/// What [`Reader::read_next`] found.
#[derive(Debug)]
pub enum Step {
    Frame(Frame),
    End(End),
}

/// Reads the frames of a log from the start.
pub struct Reader {
    file: File,
    reader: BufReader<File>,
    pos: u64,
    len: u64,
    records: u64,
}

impl Reader {
    /// Opens `path` for reading up to `len` bytes (the whole file when `None`).
    /// Returns `Ok(None)` when the file is shorter than its header (never written).
    pub fn open(path: &Path, len: Option<u64>) -> Result<Option<Reader>, LogError> {
        let io = |action, source| LogError::Io {
            path: path.to_path_buf(),
            action,
            source,
        };
        let file = File::open(path).map_err(|e| io("open", e))?;
        let file_len = file.metadata().map_err(|e| io("stat", e))?.len();
        let len = len.map_or(file_len, |l| l.min(file_len));
        let mut header = [0u8; 8];
        let got = file.read_at(&mut header, 0).map_err(|e| io("read", e))?;
        if (got as u64) < FILE_HEADER.len() as u64 || len < FILE_HEADER.len() as u64 {
            if header[..got] == FILE_HEADER[..got] {
                return Ok(None);
            }
            return Err(LogError::NotALog {
                path: path.to_path_buf(),
            });
        }
        if &header != FILE_HEADER {
            return Err(LogError::NotALog {
                path: path.to_path_buf(),
            });
        }
        let mut reader =
            BufReader::with_capacity(1 << 20, file.try_clone().map_err(|e| io("open", e))?);
        reader
            .seek(SeekFrom::Start(FILE_HEADER.len() as u64))
            .map_err(|e| io("seek", e))?;
        Ok(Some(Reader {
            file,
            reader,
            pos: FILE_HEADER.len() as u64,
            len,
            records: 0,
        }))
    }

    /// Frames read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The next intact frame, or how the log ends.
    pub fn read_next(&mut self) -> io::Result<Step> {
        let remaining = self.len - self.pos;
        if remaining == 0 {
            return Ok(Step::End(End::Clean));
        }
        if remaining < FRAME_HEADER {
            return self.bad(false, "incomplete frame header");
        }
        let mut header = [0u8; FRAME_HEADER as usize];
        self.reader.read_exact(&mut header)?;
        if &header[..4] != FRAME_MAGIC {
            return self.bad(false, "no frame marker");
        }
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if u64::from(len) > remaining - FRAME_HEADER {
            return self.bad(false, "frame runs past the end of the file");
        }
        let mut body = vec![0u8; len as usize];
        self.reader.read_exact(&mut body)?;
        if frame_sum(len, &body) != header[8..16] {
            let zero_tail = body.len() >= 8
                && body[body.len().saturating_sub(4096)..]
                    .iter()
                    .all(|&b| b == 0);
            return self.bad(
                zero_tail,
                "frame checksum mismatch: the record was edited or damaged",
            );
        }
        if body.len() < HASH_LEN + 2 {
            return self.bad(false, "frame too short to hold an event");
        }
        let frame = Frame {
            offset: self.pos,
            body,
        };
        self.pos += FRAME_HEADER + u64::from(len);
        self.records += 1;
        Ok(Step::Frame(frame))
    }

    /// Classifies a bad frame at `self.pos`: torn tail or corruption.
    fn bad(&mut self, zero_tail: bool, reason: &str) -> io::Result<Step> {
        let offset = self.pos;
        let record = self.records + 1;
        let corrupt = || End::Corrupt {
            record,
            offset,
            reason: reason.to_owned(),
        };
        if let Some(next) = self.find_frame_after(offset + 1)? {
            let reason = format!("{reason}; an intact record follows at byte {next}");
            return Ok(Step::End(End::Corrupt {
                record,
                offset,
                reason,
            }));
        }
        let rest = self.len - offset;
        let incomplete = reason.starts_with("incomplete") || reason.starts_with("frame runs past");
        let all_zero = self.all_zero(offset, rest)?;
        let torn = incomplete || zero_tail || all_zero;
        Ok(Step::End(if torn {
            End::Torn {
                offset,
                bytes: rest,
            }
        } else {
            corrupt()
        }))
    }

    fn all_zero(&self, from: u64, bytes: u64) -> io::Result<bool> {
        let mut buf = vec![0u8; 1 << 16];
        let mut at = from;
        while at < from + bytes {
            let n = ((from + bytes - at) as usize).min(buf.len());
            self.file.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        Ok(true)
    }

    /// The offset of the first intact frame starting at or after `from`.
    fn find_frame_after(&self, from: u64) -> io::Result<Option<u64>> {
        const CHUNK: usize = 1 << 20;
        let mut buf = vec![0u8; CHUNK + 3];
        let mut at = from;
        while at + FRAME_HEADER <= self.len {
            let n = ((self.len - at) as usize).min(buf.len());
            self.file.read_exact_at(&mut buf[..n], at)?;
            for i in 0..n.saturating_sub(3) {
                if &buf[i..i + 4] == FRAME_MAGIC && self.intact_at(at + i as u64)? {
                    return Ok(Some(at + i as u64));
                }
            }
            if n < buf.len() {
                break;
            }
            at += CHUNK as u64;
        }
        Ok(None)
    }

    fn intact_at(&self, offset: u64) -> io::Result<bool> {
        if offset + FRAME_HEADER > self.len {
            return Ok(false);
        }
        let mut header = [0u8; FRAME_HEADER as usize];
        self.file.read_exact_at(&mut header, offset)?;
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if offset + FRAME_HEADER + u64::from(len) > self.len {
            return Ok(false);
        }
        let mut body = vec![0u8; len as usize];
        self.file.read_exact_at(&mut body, offset + FRAME_HEADER)?;
        Ok(frame_sum(len, &body) == header[8..16])
    }
}

/// Errors of the log layer.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a spine log (it does not start with `ASPINE01`)")]
    NotALog { path: PathBuf },
    #[error("{path} is in use by another spine process")]
    Locked { path: PathBuf },
}

/// The appending side of the log. One per directory (an exclusive file lock).
pub struct Writer {
    path: PathBuf,
    file: File,
    len: u64,
    poisoned: Option<String>,
}

impl Writer {
    /// Opens the log in `dir` for appending, creating it (with its header) when it
    /// does not exist or a crash cut its creation short, and locks it exclusively.
    /// Run recovery ([`Reader`], [`cut_torn_tail`]) after this and before appending.
    pub fn open(dir: &Path) -> Result<Writer, LogError> {
        let path = dir.join(LOG_FILE);
        let io = |action, source| LogError::Io {
            path: path.clone(),
            action,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::private_files::FILE_MODE)
            .open(&path)
            .map_err(|e| io("open", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(LogError::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", e)),
        }
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        if len < FILE_HEADER.len() as u64 {
            let mut start = vec![0u8; len as usize];
            file.read_exact_at(&mut start, 0)
                .map_err(|e| io("read", e))?;
            if start[..] != FILE_HEADER[..start.len()] {
                return Err(LogError::NotALog { path });
            }
            file.write_all_at(FILE_HEADER, 0)
                .map_err(|e| io("write", e))?;
            file.sync_all().map_err(|e| io("fsync", e))?;
            sync_dir(dir).map_err(|e| io("fsync directory", e))?;
        }
        let len = len.max(FILE_HEADER.len() as u64);
        Ok(Writer {
            path,
            file,
            len,
            poisoned: None,
        })
    }

    /// Sets where the next frame goes, after recovery cut a torn tail off.
    pub fn recovered(&mut self, len: u64) {
        self.len = len;
    }

    /// Bytes in the log.
    pub fn size(&self) -> u64 {
        self.len
    }

    /// Appends whole frames and makes them durable. On error nothing of `frames` is
    /// part of the log (or, after a failed fsync, the writer refuses further appends).
    pub fn append(&mut self, frames: &[u8]) -> Result<(), String> {
        if let Some(why) = &self.poisoned {
            return Err(why.clone());
        }
        if let Err(e) = self.file.write_all_at(frames, self.len) {
            let message = format!("{}: write failed: {e}", self.path.display());
            if let Err(cut) = self.file.set_len(self.len) {
                self.poisoned = Some(format!("{message}; cutting it off failed too: {cut}"));
            }
            return Err(message);
        }
        if let Err(e) = self.file.sync_data() {
            let message = format!(
                "{}: fsync failed: {e}; restart the spine",
                self.path.display()
            );
            self.poisoned = Some(message.clone());
            return Err(message);
        }
        self.len += frames.len() as u64;
        Ok(())
    }
}

/// Makes a directory entry durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Saves a torn tail beside the log and truncates it, durably.
pub fn cut_torn_tail(dir: &Path, offset: u64, bytes: u64) -> Result<PathBuf, LogError> {
    let path = dir.join(LOG_FILE);
    let aside = dir.join(format!("torn-{offset}.bin"));
    let io = |action, source| LogError::Io {
        path: path.clone(),
        action,
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io("open", e))?;
    let mut tail = vec![0u8; bytes as usize];
    file.read_exact_at(&mut tail, offset)
        .map_err(|e| io("read", e))?;
    let mut out = crate::private_files::create(&aside).map_err(|e| io("save torn tail", e))?;
    out.write_all(&tail)
        .and_then(|()| out.sync_all())
        .map_err(|e| io("save torn tail", e))?;
    file.set_len(offset).map_err(|e| io("truncate", e))?;
    file.sync_all().map_err(|e| io("fsync", e))?;
    sync_dir(dir).map_err(|e| io("fsync directory", e))?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test, removed when the test ends.
    fn dir(name: &str) -> crate::private_files::TestDir {
        crate::private_files::TestDir::new(&format!("spine-log-{name}"))
    }

    fn write(dir: &Path, events: &[&str]) -> Vec<u64> {
        let mut w = Writer::open(dir).unwrap();
        let mut offsets = Vec::new();
        for e in events {
            offsets.push(w.size());
            let mut frame = Vec::new();
            encode_frame(&[7; 32], e.as_bytes(), &mut frame);
            w.append(&frame).unwrap();
        }
        offsets
    }

    fn read_all(dir: &Path) -> (Vec<String>, End) {
        let mut r = Reader::open(&dir.join(LOG_FILE), None).unwrap().unwrap();
        let mut out = Vec::new();
        loop {
            match r.read_next().unwrap() {
                Step::Frame(f) => out.push(String::from_utf8(f.canonical().to_vec()).unwrap()),
                Step::End(end) => return (out, end),
            }
        }
    }

    #[test]
    fn frames_read_back_in_order() {
        let d = dir("order");
        write(&d, &["{\"a\":1}", "{\"b\":2}"]);
        assert_eq!(
            read_all(&d),
            (
                vec!["{\"a\":1}".to_owned(), "{\"b\":2}".to_owned()],
                End::Clean
            )
        );
    }

    #[test]
    fn a_cut_short_write_is_a_torn_tail_and_is_cut_off() {
        let d = dir("torn");
        write(&d, &["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
        let path = d.join(LOG_FILE);
        let original = std::fs::read(&path).unwrap();
        let full = original.len() as u64;
        for cut in [1, 5, 20, 30] {
            std::fs::write(&path, &original[..(full - cut) as usize]).unwrap();
            let (events, end) = read_all(&d);
            assert_eq!(events.len(), 2, "cut {cut}");
            assert!(
                matches!(end, End::Torn { bytes, .. } if bytes == 16 + 32 + 7 - cut),
                "cut {cut}: {end:?}"
            );
        }
        std::fs::write(&path, &original).unwrap();
        // A zero-filled extent (the size grew, the data never landed) is torn too.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full + 100).unwrap();
        let (events, end) = read_all(&d);
        assert_eq!(events.len(), 3);
        let End::Torn { offset, bytes } = end else {
            panic!("{end:?}")
        };
        assert_eq!((offset, bytes), (full, 100));
        let aside = cut_torn_tail(&d, offset, bytes).unwrap();
        assert_eq!(std::fs::read(aside).unwrap(), vec![0u8; 100]);
        assert_eq!(read_all(&d).1, End::Clean);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), full);
    }

    #[test]
    fn a_damaged_middle_record_is_corruption_not_a_tail() {
        let d = dir("middle");
        let offsets = write(&d, &["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
        let path = d.join(LOG_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip a byte in the length of record 2: it now runs past the end of the file.
        bytes[offsets[1] as usize + 7] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let (events, end) = read_all(&d);
        assert_eq!(events.len(), 1);
        assert!(matches!(end, End::Corrupt { record: 2, .. }), "{end:?}");
    }

    #[test]
    fn an_edited_last_record_is_corruption() {
        let d = dir("last");
        let offsets = write(&d, &["{\"a\":1}", "{\"b\":2}"]);
        let path = d.join(LOG_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = offsets[1] as usize + 16 + 32 + 2;
        bytes[at] = b'x';
        std::fs::write(&path, &bytes).unwrap();
        let (events, end) = read_all(&d);
        assert_eq!(events.len(), 1);
        assert!(
            matches!(&end, End::Corrupt { record: 2, reason, .. } if reason.contains("checksum")),
            "{end:?}"
        );
    }

    #[test]
    fn a_second_writer_is_refused() {
        let d = dir("lock");
        let _w = Writer::open(&d).unwrap();
        assert!(matches!(Writer::open(&d), Err(LogError::Locked { .. })));
    }
}
