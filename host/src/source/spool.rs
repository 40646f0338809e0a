//! Streamed transactions held until they end: PostgreSQL streams a transaction larger
//! than `logical_decoding_work_mem` while it runs, in blocks that may interleave with
//! other transactions, and says only at the end whether it committed or rolled back.
//!
//! ```text
//!  Stream Start xid ─▶ append(lsn, xid', message) … ─▶ Stream Stop      (repeated, interleaved)
//!  Stream Abort xid, sub ─▶ abort(): the whole spool dropped, or `sub` marked rolled back
//!  Stream Commit xid ─▶ take() ─▶ Replay: the messages in order, without rolled-back ones
//! ```
//!
//! Invariants:
//! - Memory is bounded: a spool keeps its messages in memory only while it is under
//!   [`STREAM_MEMORY`] and all spools together under [`TOTAL_MEMORY`]; past that it
//!   moves to a file of its own in the spool folder and keeps only a write buffer.
//! - A spool file is created `0600` and unlinked at once: it takes the disk the
//!   transaction needs while it is open and nothing once it is dropped, also when
//!   airlock is killed.
//! - A message is replayed exactly as it came, without the xid the stream block added,
//!   so it decodes as the same message outside a stream.
//! - A message of a subtransaction that rolled back is never replayed; neither is one
//!   of a transaction that rolled back (its spool is dropped).
//! - Nothing here outlives a session: after a reconnect PostgreSQL streams every
//!   transaction still open from its first block again.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::SourceError;
use crate::change::Lsn;
use crate::private_files;

/// A spool moves to its own file when it would grow past this many bytes in memory...
pub const STREAM_MEMORY: usize = 1 << 20;
/// ... or when all spools together would hold more than this in memory.
pub const TOTAL_MEMORY: usize = 8 << 20;
/// The write and read buffers of a spool file.
const FILE_BUFFER: usize = 256 << 10;
/// A record's header: LSN, xid, length of the message.
const HEADER: usize = 8 + 4 + 4;

/// The spools of the transactions being streamed, by top-level xid.
#[derive(Debug)]
pub(super) struct Spooler {
    dir: PathBuf,
    streams: HashMap<u32, Spool>,
    /// Bytes all spools hold in memory.
    memory: usize,
}

/// The messages of one streamed transaction so far.
#[derive(Debug)]
pub(super) struct Spool {
    xid: u32,
    /// Records in memory, until the spool moves to a file.
    memory: Vec<u8>,
    file: Option<BufWriter<File>>,
    /// Subtransactions that rolled back.
    aborted: HashSet<u32>,
    /// Records appended, and their bytes.
    records: u64,
    bytes: u64,
}

impl Spooler {
    pub(super) fn new(dir: PathBuf) -> Self {
        Spooler {
            dir,
            streams: HashMap::new(),
            memory: 0,
        }
    }

    /// A stream block of `xid` begins: a first block opens its spool; a later block
    /// must find the spool open. `Err` holds what is out of order.
    pub(super) fn start(&mut self, xid: u32, first_segment: bool) -> Result<(), String> {
        match (first_segment, self.streams.contains_key(&xid)) {
            (true, false) => {
                self.streams.insert(
                    xid,
                    Spool {
                        xid,
                        memory: Vec::new(),
                        file: None,
                        aborted: HashSet::new(),
                        records: 0,
                        bytes: 0,
                    },
                );
                Ok(())
            }
            (false, true) => Ok(()),
            (true, true) => Err(format!(
                "first block of streamed transaction {xid}, which is streaming already"
            )),
            (false, false) => Err(format!(
                "a later block of streamed transaction {xid}, whose first block never came"
            )),
        }
    }

    /// Appends a message of subtransaction (or transaction) `xid` to `top`'s spool:
    /// `tag` and `body` are the message without the xid the stream block added.
    pub(super) fn append(
        &mut self,
        top: u32,
        lsn: Lsn,
        xid: u32,
        tag: u8,
        body: &[u8],
    ) -> Result<(), SourceError> {
        self.write(top, lsn, xid, tag, body)
            .map_err(|source| self.failed(top, source))
    }

    fn write(&mut self, top: u32, lsn: Lsn, xid: u32, tag: u8, body: &[u8]) -> io::Result<()> {
        let spool = self
            .streams
            .get_mut(&top)
            .expect("a stream block is open for `top`: checked by the caller");
        let len = HEADER + 1 + body.len();
        if spool.file.is_none()
            && (spool.memory.len() + len > STREAM_MEMORY || self.memory + len > TOTAL_MEMORY)
        {
            self.memory -= spool.memory.len();
            spool.move_to_file(&self.dir)?;
        }
        let mut header = [0u8; HEADER + 1];
        header[..8].copy_from_slice(&lsn.0.to_le_bytes());
        header[8..12].copy_from_slice(&xid.to_le_bytes());
        header[12..16].copy_from_slice(&((1 + body.len()) as u32).to_le_bytes());
        header[16] = tag;
        match &mut spool.file {
            Some(file) => {
                file.write_all(&header)?;
                file.write_all(body)?;
            }
            None => {
                spool.memory.extend_from_slice(&header);
                spool.memory.extend_from_slice(body);
                self.memory += len;
            }
        }
        spool.records += 1;
        spool.bytes += len as u64;
        Ok(())
    }

    /// A rollback of `subxid` in transaction `xid` (of the whole of it when they are
    /// equal). Returns false when no transaction `xid` is streaming: nothing of it
    /// was kept, so nothing is to drop.
    pub(super) fn abort(&mut self, xid: u32, subxid: u32) -> bool {
        if xid == subxid {
            self.take(xid).is_some()
        } else {
            match self.streams.get_mut(&xid) {
                Some(spool) => {
                    spool.aborted.insert(subxid);
                    true
                }
                None => false,
            }
        }
    }

    /// The spool of `xid`, which committed.
    pub(super) fn take(&mut self, xid: u32) -> Option<Spool> {
        let spool = self.streams.remove(&xid)?;
        if spool.file.is_none() {
            self.memory -= spool.memory.len();
        }
        Some(spool)
    }

    #[cfg(test)]
    pub(super) fn is_streaming(&self, xid: u32) -> bool {
        self.streams.contains_key(&xid)
    }

    /// Bytes all spools hold in memory.
    #[cfg(test)]
    pub(super) fn memory(&self) -> usize {
        self.memory
    }

    /// A spool of transaction `xid` that could not be written or read back, naming
    /// the folder.
    pub(super) fn failed(&self, xid: u32, source: io::Error) -> SourceError {
        SourceError::Spool {
            xid,
            dir: self.dir.clone(),
            source,
        }
    }
}

/// Names spool files apart within the process.
static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

impl Spool {
    /// Moves the records to a new file in `dir`, private and already unlinked.
    fn move_to_file(&mut self, dir: &Path) -> io::Result<()> {
        private_files::create_dir_all(dir)?;
        let path = dir.join(format!(
            "airlock-stream-{}-{}-{}",
            std::process::id(),
            self.xid,
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        let file = private_files::create_scratch(&path)?;
        std::fs::remove_file(&path)?;
        let mut file = BufWriter::with_capacity(FILE_BUFFER, file);
        file.write_all(&self.memory)?;
        self.memory = Vec::new();
        self.file = Some(file);
        Ok(())
    }

    /// Whether the spool moved to a file.
    pub(super) fn on_disk(&self) -> bool {
        self.file.is_some()
    }

    pub(super) fn records(&self) -> u64 {
        self.records
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The messages, in the order they came, without those of rolled-back
    /// subtransactions.
    pub(super) fn replay(self) -> io::Result<Replay> {
        let source = match self.file {
            None => Source::Memory(io::Cursor::new(self.memory)),
            Some(file) => {
                let mut file = file.into_inner().map_err(|e| e.into_error())?;
                file.rewind()?;
                Source::File(BufReader::with_capacity(FILE_BUFFER, file))
            }
        };
        Ok(Replay {
            source,
            aborted: self.aborted,
            message: Vec::new(),
        })
    }
}

enum Source {
    Memory(io::Cursor<Vec<u8>>),
    File(BufReader<File>),
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Memory(cursor) => cursor.read(buf),
            Source::File(file) => file.read(buf),
        }
    }
}

/// The messages of a committed streamed transaction, read back one at a time.
pub(super) struct Replay {
    source: Source,
    aborted: HashSet<u32>,
    message: Vec<u8>,
}

impl Replay {
    /// The next message and its LSN, or `None` at the end.
    pub(super) fn next(&mut self) -> io::Result<Option<(Lsn, &[u8])>> {
        loop {
            let mut header = [0u8; HEADER];
            match self.source.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
            let lsn = Lsn(u64::from_le_bytes(header[..8].try_into().expect("8 bytes")));
            let xid = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
            self.message.resize(len, 0);
            self.source.read_exact(&mut self.message)?;
            if !self.aborted.contains(&xid) {
                return Ok(Some((lsn, &self.message)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spooler() -> (Spooler, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "airlock-spool-test-{}-{}",
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        (Spooler::new(dir.clone()), dir)
    }

    fn drain(spool: Spool) -> Vec<(u64, Vec<u8>)> {
        let mut replay = spool.replay().unwrap();
        let mut out = Vec::new();
        while let Some((lsn, message)) = replay.next().unwrap() {
            out.push((lsn.0, message.to_vec()));
        }
        out
    }

    #[test]
    fn replays_in_order_without_rolled_back_subtransactions() {
        let (mut s, _dir) = spooler();
        s.start(7, true).unwrap();
        s.start(8, true).unwrap();
        s.append(7, Lsn(1), 7, b'I', b"top").unwrap();
        s.append(8, Lsn(2), 8, b'I', b"other").unwrap();
        s.append(7, Lsn(3), 70, b'I', b"sub kept").unwrap();
        s.append(7, Lsn(4), 71, b'I', b"sub rolled back").unwrap();
        s.append(7, Lsn(5), 71, b'M', b"its message").unwrap();
        s.append(7, Lsn(6), 7, b'R', b"relation").unwrap();
        assert!(s.abort(7, 71));
        // An abort for a transaction not streaming keeps nothing, drops nothing.
        assert!(!s.abort(99, 99));
        assert!(!s.abort(99, 100));
        let spool = s.take(7).unwrap();
        assert_eq!(spool.records(), 5);
        assert!(!spool.on_disk());
        let out = drain(spool);
        assert_eq!(
            out,
            vec![
                (1, b"Itop".to_vec()),
                (3, b"Isub kept".to_vec()),
                (6, b"Rrelation".to_vec())
            ]
        );
        assert!(s.abort(8, 8));
        assert!(!s.is_streaming(8));
        assert_eq!(s.memory(), 0);
    }

    #[test]
    fn blocks_out_of_order_are_refused() {
        let (mut s, _dir) = spooler();
        assert!(s.start(5, false).unwrap_err().contains("never came"));
        s.start(5, true).unwrap();
        s.start(5, false).unwrap();
        assert!(s.start(5, true).unwrap_err().contains("streaming already"));
    }

    #[test]
    fn a_large_spool_moves_to_a_private_unlinked_file_and_memory_stays_bounded() {
        let (mut s, dir) = spooler();
        s.start(1, true).unwrap();
        s.start(2, true).unwrap();
        let body = vec![b'x'; 1000];
        let rows = 3 * STREAM_MEMORY / body.len();
        for i in 0..rows {
            s.append(1, Lsn(i as u64), 1, b'I', &body).unwrap();
            s.append(2, Lsn(i as u64), 2, b'I', b"small").unwrap();
            assert!(s.memory() <= TOTAL_MEMORY);
        }
        // The file is unlinked: the folder holds nothing.
        let listed: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(listed.is_empty(), "{listed:?}");
        let big = s.take(1).unwrap();
        assert!(big.on_disk());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = big.file.as_ref().unwrap().get_ref().metadata().unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
        assert!(s.memory() < STREAM_MEMORY);
        let out = drain(big);
        assert_eq!(out.len(), rows);
        assert!(
            out.iter()
                .enumerate()
                .all(|(i, (lsn, m))| *lsn == i as u64 && m.len() == 1001 && m[0] == b'I')
        );
        let small = s.take(2).unwrap();
        assert!(!small.on_disk());
        assert_eq!(drain(small).len(), rows);
        assert_eq!(s.memory(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn many_small_spools_together_stay_under_the_total() {
        let (mut s, dir) = spooler();
        let body = vec![0u8; 4096];
        for xid in 0..64 {
            s.start(xid, true).unwrap();
            for i in 0..(STREAM_MEMORY / 4096 - 2) {
                s.append(xid, Lsn(i as u64), xid, b'I', &body).unwrap();
            }
        }
        assert!(s.memory() <= TOTAL_MEMORY, "{}", s.memory());
        for xid in 0..64 {
            assert_eq!(drain(s.take(xid).unwrap()).len(), STREAM_MEMORY / 4096 - 2);
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[cfg(unix)]
    #[test]
    fn an_unwritable_folder_is_named_in_the_error() {
        let mut s = Spooler::new(PathBuf::from("/proc/airlock-no-such-folder"));
        s.start(1, true).unwrap();
        let body = vec![0u8; STREAM_MEMORY];
        let err = s.append(1, Lsn(1), 1, b'I', &body).unwrap_err();
        assert!(
            err.to_string().contains("`/proc/airlock-no-such-folder`"),
            "{err}"
        );
    }
}
