//! A sink that keeps what it is given in memory, for tests of the driver and the run:
//! no store, no I/O, and named fail points that make its next calls fail as a real
//! store's would.
//!
//! Invariants (the [`Sink`] contract, kept exactly):
//! - `flush` makes durable every batch accepted before it, in order, and returns the
//!   end LSN of the last one; a flush that fails keeps every batch buffered.
//! - A fail point fires once, on the call it names, in the order the points were
//!   armed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Sink, SinkError};
use crate::change::Lsn;
use crate::pipeline::batch::Batch;

/// How the next call of one kind fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPoint {
    /// The next flush fails in a way worth retrying (a store that is down).
    FlushTransient,
    /// The next flush fails for good (a store that refuses the data).
    FlushDefinite,
    /// The next flush panics (a bug in the sink).
    FlushPanic,
    /// The next accept fails for good.
    AcceptDefinite,
}

impl FailPoint {
    fn on_flush(self) -> bool {
        !matches!(self, FailPoint::AcceptDefinite)
    }
}

/// What the test keeps of a [`MemorySink`] once the sink has moved into its driver.
#[derive(Clone, Default)]
pub struct MemoryHandle {
    durable: Arc<Mutex<Vec<Arc<Batch>>>>,
    armed: Arc<Mutex<VecDeque<FailPoint>>>,
    flushes: Arc<Mutex<u32>>,
}

impl MemoryHandle {
    /// Makes the next call that `point` names fail as it says.
    pub fn arm(&self, point: FailPoint) {
        lock(&self.armed).push_back(point);
    }

    /// The batches made durable, in order.
    pub fn durable(&self) -> Vec<Arc<Batch>> {
        lock(&self.durable).clone()
    }

    /// How many flushes were tried, failed ones included.
    pub fn flushes(&self) -> u32 {
        *lock(&self.flushes)
    }

    /// Takes the next armed point if it is one of `on_flush`'s kind.
    fn fire(&self, on_flush: bool) -> Option<FailPoint> {
        let mut armed = lock(&self.armed);
        let point = armed.iter().position(|p| p.on_flush() == on_flush)?;
        armed.remove(point)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A sink that holds batches in memory until a flush makes them "durable".
pub struct MemorySink {
    name: String,
    flush_interval: Duration,
    buffered: Vec<Arc<Batch>>,
    handle: MemoryHandle,
}

impl MemorySink {
    /// A sink named `name` that flushes every `flush_interval`; the handle sees what
    /// it made durable and arms its fail points.
    pub fn new(name: &str, flush_interval: Duration) -> (MemorySink, MemoryHandle) {
        let handle = MemoryHandle::default();
        let sink = MemorySink {
            name: name.to_owned(),
            flush_interval,
            buffered: Vec::new(),
            handle: handle.clone(),
        };
        (sink, handle)
    }

    fn error(&self, transient: bool, message: &str) -> SinkError {
        let (sink, message) = (self.name.clone(), message.to_owned());
        if transient {
            SinkError::Transient { sink, message }
        } else {
            SinkError::Definite { sink, message }
        }
    }
}

impl Sink for MemorySink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn accept(&mut self, batch: Arc<Batch>) -> Result<bool, SinkError> {
        if let Some(FailPoint::AcceptDefinite) = self.handle.fire(false) {
            return Err(self.error(false, "fail point: accept refused"));
        }
        let kept = !batch.rows.is_empty();
        self.buffered.push(batch);
        Ok(kept)
    }

    fn due(&self) -> bool {
        false
    }

    async fn flush(&mut self) -> Result<Option<Lsn>, SinkError> {
        *lock(&self.handle.flushes) += 1;
        match self.handle.fire(true) {
            Some(FailPoint::FlushTransient) => {
                return Err(self.error(true, "fail point: store unreachable"));
            }
            Some(FailPoint::FlushDefinite) => {
                return Err(self.error(false, "fail point: store refused the data"));
            }
            Some(FailPoint::FlushPanic) => panic!("fail point: the sink panicked in flush"),
            Some(FailPoint::AcceptDefinite) | None => {}
        }
        let end = self.buffered.iter().filter_map(|b| b.end_lsn()).max();
        lock(&self.handle.durable).append(&mut self.buffered);
        Ok(end)
    }

    fn flush_interval(&self) -> Duration {
        self.flush_interval
    }

    /// Holds rows of a transaction whose last part has not come, as a lake stages them.
    fn holds_open(&self) -> bool {
        self.buffered.last().is_some_and(|b| b.ends_open())
    }
}
