//! Sinks: where processed batches go, and how their durability flows back.
//!
//! ```text
//!                 ┌──▶ mpsc(Arc<Batch>) ──▶ drive(lake)  ──durable LSN──┐
//! pipeline ──fan──┤                                                     ├──▶ checkpoint::Tracker ──▶ source
//!                 └──▶ mpsc(Arc<Batch>) ──▶ drive(spine) ──durable LSN──┘
//! ```
//!
//! Invariants:
//! - Every sink receives every batch, in commit order, even when none of its rows are
//!   routed to it: an empty batch still advances its durable LSN.
//! - A sink reports an LSN as durable only once every row of every transaction up to
//!   it is durable in the sink's store. Reported LSNs never move backward.
//! - A transient error keeps the data buffered and is retried with backoff by
//!   [`drive`]; a definite error stops the pipeline (nothing past it is acknowledged).

pub mod lake;
pub mod memory;
pub mod spine;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::change::Lsn;
use crate::pipeline::batch::Batch;
use crate::status::{self, Status};

/// Why a sink could not accept or persist data.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying: the store is unreachable, busy, or answered with a server error.
    #[error("{sink}: {message}")]
    Transient { sink: String, message: String },
    /// Retrying will not help: bad configuration, a rejected request, corrupt state.
    #[error("{sink}: {message}")]
    Definite { sink: String, message: String },
}

impl SinkError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Transient { .. })
    }
}

/// A destination for processed batches.
///
/// Contract:
/// - `accept` receives batches in commit order, each holding whole transactions but
///   for a last entry that may be a part of a large transaction (see
///   [`Part`](crate::change::Part)). It may buffer them; it must not make a
///   transaction visible to readers in part. It returns whether it kept any row (a
///   batch with no row routed to the sink keeps none).
/// - `flush` makes every transaction accepted whole so far durable and visible,
///   atomically per table, and returns the end LSN of the last one it covers (`None`
///   when it had nothing to flush). After `Ok` that data survives a crash. Rows of a
///   transaction whose last part has not arrived are staged (written where readers
///   do not see them, or delivered where a replay is idempotent) so that memory stays
///   bounded; `holds_open` then says the sink holds some.
/// - `due` says whether the sink wants a flush now (size bounds reached).
/// - On a transient error from `flush` the caller retries `flush` later; the buffered
///   data stays. A definite error is final.
/// - `flush_interval` is how long accepted data may wait before a flush.
pub trait Sink: Send + 'static {
    fn name(&self) -> &str;
    fn accept(&mut self, batch: Arc<Batch>)
    -> impl Future<Output = Result<bool, SinkError>> + Send;
    fn due(&self) -> bool;
    fn flush(&mut self) -> impl Future<Output = Result<Option<Lsn>, SinkError>> + Send;
    fn flush_interval(&self) -> Duration;
    /// Whether the sink holds staged rows of a transaction not yet flushed whole: its
    /// end must wait for a flush even when the batch that completes it keeps no row.
    fn holds_open(&self) -> bool {
        false
    }
}

/// Runs a sink: accepts batches from `rx`, flushes when due or when the interval
/// passes, retries transient flush errors with backoff, and publishes the durable LSN
/// on `durable`. Returns when `rx` is closed and everything accepted is flushed.
pub async fn drive<S: Sink>(
    sink: S,
    rx: mpsc::Receiver<Arc<Batch>>,
    durable: watch::Sender<Lsn>,
) -> Result<(), SinkError> {
    drive_observed(sink, rx, durable, None, None).await
}

/// Waits until `through` is set anew; `None` when there is none (or no more).
async fn asked(through: &mut Option<watch::Receiver<Lsn>>) -> Option<()> {
    match through {
        Some(through) => through.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// [`drive`], also reporting to `status`: flush latency, retries, the last error while
/// retrying, and the batches queued in front of the sink (its backlog). `through`:
/// an LSN the source waits to see durable (the end of a snapshot): the sink flushes
/// as soon as it holds it, rather than at the end of its interval.
pub async fn drive_observed<S: Sink>(
    mut sink: S,
    mut rx: mpsc::Receiver<Arc<Batch>>,
    durable: watch::Sender<Lsn>,
    status: Option<Arc<Status>>,
    mut through: Option<watch::Receiver<Lsn>>,
) -> Result<(), SinkError> {
    let status = status.as_deref();
    let interval = sink.flush_interval();
    // The end LSN that the next flush makes durable.
    let mut pending: Option<Lsn> = None;
    // Whether the sink holds rows no flush covered yet.
    let mut holding = false;
    let mut deadline = tokio::time::Instant::now() + interval;
    // The last `through` flushed for.
    let mut answered = Lsn::ZERO;
    let wanted = |through: &Option<watch::Receiver<Lsn>>, answered: Lsn, pending: Option<Lsn>| {
        let target = through.as_ref().map_or(Lsn::ZERO, |t| *t.borrow());
        (target > answered && pending.is_some_and(|p| p >= target)).then_some(target)
    };
    loop {
        let received = if pending.is_some() {
            tokio::select! {
                biased;
                batch = rx.recv() => Some(batch),
                _ = tokio::time::sleep_until(deadline) => None,
                Some(()) = asked(&mut through) => {
                    if let Some(target) = wanted(&through, answered, pending) {
                        answered = target;
                        flush_with_retry(&mut sink, &rx, &durable, &mut pending, status).await?;
                        holding = sink.holds_open();
                    }
                    continue;
                }
            }
        } else {
            Some(rx.recv().await)
        };
        match received {
            Some(Some(batch)) => {
                let end = batch.end_lsn();
                // A transaction staged in parts: most of it is written already.
                let staged = sink.holds_open();
                let kept = sink.accept(batch).await?;
                if kept && pending.is_none() {
                    deadline = tokio::time::Instant::now() + interval;
                }
                holding |= kept;
                match end {
                    // Nothing held and nothing new: durable at once.
                    Some(end) if !holding => publish(&durable, end),
                    Some(end) => pending = Some(end),
                    None => {}
                }
                if let Some(status) = status {
                    let queued = rx.len();
                    status.update_sink(sink.name(), |v| v.queued_batches = queued);
                }
                // Due also inside a large transaction: the flush stages its rows. And
                // the last part of a staged transaction makes it visible at once:
                // waiting the interval would only delay what is written already.
                let asked_for = wanted(&through, answered, pending);
                if holding && (sink.due() || (staged && end.is_some()) || asked_for.is_some()) {
                    answered = asked_for.unwrap_or(answered);
                    flush_with_retry(&mut sink, &rx, &durable, &mut pending, status).await?;
                    holding = sink.holds_open();
                }
            }
            Some(None) => {
                if holding || pending.is_some() {
                    flush_with_retry(&mut sink, &rx, &durable, &mut pending, status).await?;
                }
                return Ok(());
            }
            None => {
                flush_with_retry(&mut sink, &rx, &durable, &mut pending, status).await?;
                holding = sink.holds_open();
            }
        }
    }
}

/// The first wait before a failed flush is tried again, doubling up to [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between two flushes of a sink that keeps failing.
const LAST_RETRY: Duration = Duration::from_secs(30);

/// Flushes `sink` until it succeeds or fails definitely. While it retries, the
/// batches waiting on `rx` are the sink's backlog in `/status`.
async fn flush_with_retry<S: Sink>(
    sink: &mut S,
    rx: &mpsc::Receiver<Arc<Batch>>,
    durable: &watch::Sender<Lsn>,
    pending: &mut Option<Lsn>,
    status: Option<&Status>,
) -> Result<(), SinkError> {
    let mut backoff = Backoff::new(FIRST_RETRY, LAST_RETRY);
    loop {
        let started = std::time::Instant::now();
        match sink.flush().await {
            Ok(flushed) => {
                if let Some(status) = status {
                    let name = sink.name().to_owned();
                    status.metrics.observe(
                        status::SINK_FLUSH_SECONDS,
                        &[("sink", &name)],
                        started.elapsed().as_secs_f64(),
                    );
                    let queued = rx.len();
                    status.update_sink(&name, |v| {
                        v.last_error = None;
                        v.retrying = false;
                        v.queued_batches = queued;
                    });
                }
                if let Some(lsn) = flushed.or(*pending) {
                    publish(durable, lsn);
                }
                *pending = None;
                return Ok(());
            }
            Err(error) if error.is_transient() => {
                let retry_in = backoff.next_delay();
                tracing::warn!(sink = sink.name(), error = %error, ?retry_in, "sink flush failed, retrying");
                if let Some(status) = status {
                    let name = sink.name().to_owned();
                    status
                        .metrics
                        .add(status::SINK_RETRIES, &[("sink", &name)], 1.0);
                    let queued = rx.len();
                    status.update_sink(&name, |v| {
                        v.last_error = Some(error.to_string());
                        v.retrying = true;
                        v.queued_batches = queued;
                    });
                }
                // Wait, keeping the backlog in `/status` current meanwhile.
                let until = tokio::time::Instant::now() + retry_in;
                while tokio::time::Instant::now() < until {
                    tokio::time::sleep_until(
                        until.min(tokio::time::Instant::now() + Duration::from_secs(1)),
                    )
                    .await;
                    if let Some(status) = status {
                        let queued = rx.len();
                        status.update_sink(sink.name(), |v| v.queued_batches = queued);
                    }
                }
            }
            Err(error) => return Err(error),
        }
    }
}

fn publish(durable: &watch::Sender<Lsn>, lsn: Lsn) {
    durable.send_if_modified(|current| {
        if lsn > *current {
            *current = lsn;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::memory::{FailPoint, MemorySink};
    use super::*;
    use crate::change::{Change, Op, Part, Relation, ReplicaIdentity, Transaction, TxnMeta};

    /// A batch of one transaction with one row, ending at `end`.
    fn batch(end: u64) -> Arc<Batch> {
        let relation = Arc::new(Relation {
            comment_classes: Default::default(),
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: Vec::new(),
        });
        let txn = Transaction {
            meta: TxnMeta {
                xid: end as u32,
                commit_lsn: Lsn(end - 1),
                end_lsn: Lsn(end),
                commit_ts: 0,
                part: Part::WHOLE,
                copied: None,
            },
            changes: vec![Change {
                identity: None,
                relation,
                op: Op::Insert,
                lsn: Lsn(end - 1),
                new: Some(Vec::new()),
                old: None,
            }],
        };
        Arc::new(Batch::from_transactions([txn]))
    }

    /// A transaction in two parts, ending at `end`.
    fn parts(end: u64) -> [Arc<Batch>; 2] {
        let mut first = (*batch(end)).clone();
        first.txns[0].part = Part {
            offset: 0,
            last: false,
        };
        first.txns[0].end_lsn = Lsn::ZERO;
        let mut last = (*batch(end)).clone();
        last.txns[0].part = Part {
            offset: 1,
            last: true,
        };
        [Arc::new(first), Arc::new(last)]
    }

    #[tokio::test]
    async fn what_the_source_waits_for_is_flushed_at_once_and_only_once() {
        let (sink, handle) = MemorySink::new("memory", Duration::from_secs(3600));
        let (tx, rx) = mpsc::channel(8);
        let (durable, mut seen) = watch::channel(Lsn::ZERO);
        let (through, through_rx) = watch::channel(Lsn::ZERO);
        let driver = tokio::spawn(drive_observed(sink, rx, durable, None, Some(through_rx)));
        // Asked for before it arrives: flushed when it does.
        through.send(Lsn(20)).unwrap();
        tx.send(batch(10)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(handle.flushes(), 0, "not there yet: it waits");
        tx.send(batch(20)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), seen.wait_for(|l| *l == Lsn(20)))
            .await
            .expect("flushed once it held what was asked")
            .unwrap();
        // Later batches wait for the interval again.
        tx.send(batch(30)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*seen.borrow(), Lsn(20));
        // Asked for after it arrived: flushed at the asking.
        through.send(Lsn(30)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), seen.wait_for(|l| *l == Lsn(30)))
            .await
            .expect("flushed when asked")
            .unwrap();
        drop(tx);
        driver.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_last_part_of_a_staged_transaction_is_flushed_at_once() {
        // An interval far longer than the test: only the rule can flush.
        let (sink, handle) = MemorySink::new("memory", Duration::from_secs(3600));
        let (tx, rx) = mpsc::channel(8);
        let (durable, mut seen) = watch::channel(Lsn::ZERO);
        let driver = tokio::spawn(drive(sink, rx, durable));
        let [first, last] = parts(40);
        tx.send(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(handle.flushes(), 0, "a part alone waits");
        tx.send(last).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), seen.wait_for(|l| *l == Lsn(40)))
            .await
            .expect("the completed transaction was made durable at once")
            .unwrap();
        // A small whole transaction still waits for the interval.
        tx.send(batch(50)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*seen.borrow(), Lsn(40));
        drop(tx);
        driver.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_flush_that_fails_transiently_is_retried_and_nothing_is_lost_or_repeated() {
        let (sink, handle) = MemorySink::new("memory", Duration::from_millis(10));
        handle.arm(FailPoint::FlushTransient);
        handle.arm(FailPoint::FlushTransient);
        let (tx, rx) = mpsc::channel(8);
        let (durable, mut seen) = watch::channel(Lsn::ZERO);
        let driver = tokio::spawn(drive(sink, rx, durable));
        for end in [10, 20, 30] {
            tx.send(batch(end)).await.unwrap();
        }
        drop(tx);
        driver.await.unwrap().unwrap();
        let ends: Vec<Option<Lsn>> = handle.durable().iter().map(|b| b.end_lsn()).collect();
        assert_eq!(ends, [Some(Lsn(10)), Some(Lsn(20)), Some(Lsn(30))]);
        assert!(
            handle.flushes() >= 3,
            "two failed flushes, then one that took it all"
        );
        assert_eq!(*seen.borrow_and_update(), Lsn(30));
    }

    #[tokio::test]
    async fn a_definite_failure_ends_the_driver_and_nothing_is_reported_durable() {
        let (sink, handle) = MemorySink::new("memory", Duration::from_millis(10));
        handle.arm(FailPoint::FlushDefinite);
        let (tx, rx) = mpsc::channel(8);
        let (durable, seen) = watch::channel(Lsn::ZERO);
        let driver = tokio::spawn(drive(sink, rx, durable));
        tx.send(batch(10)).await.unwrap();
        let error = driver.await.unwrap().unwrap_err();
        assert!(!error.is_transient(), "{error}");
        assert!(handle.durable().is_empty());
        assert_eq!(*seen.borrow(), Lsn::ZERO);
        // The driver is gone: the pipeline's next send fails and it stops too.
        assert!(tx.send(batch(20)).await.is_err());
    }
}
