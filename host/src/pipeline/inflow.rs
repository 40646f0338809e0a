//! The queue between the source and the pipeline thread, bounded by the bytes it
//! holds rather than by a count of transactions.
//!
//! ```text
//! source ──send (waits for room)──▶ [ transactions, ≤ max bytes ] ──recv (frees room)──▶ worker
//! ```
//!
//! A count bound fits no workload: 64 one-row transactions starve the worker's batches,
//! while 64 parts of a large transaction hold 65,536 rows. Bytes bound what waits
//! for the guests whatever the transactions look like.
//!
//! Invariants:
//! - A transaction's room is taken before it is queued and given back when the worker
//!   takes it; a transaction larger than the whole bound still passes, alone.
//! - Order is kept: one sender, one FIFO channel.
//! - Once the receiver is gone, `send` fails at once, also while it waits for room.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use crate::change::Transaction;

/// Room is counted in units of this many bytes (a semaphore holds at most `u32` per
/// acquire).
const UNIT: usize = 1024;

/// Count bound of the underlying channel; the byte bound is normally reached first.
const MAX_ITEMS: usize = 4096;

/// A queue of transactions holding at most about `max_bytes` (see the module docs).
pub fn channel(max_bytes: usize) -> (InflowSender, InflowReceiver) {
    let units = (max_bytes / UNIT).clamp(1, u32::MAX as usize) as u32;
    let room = Arc::new(Semaphore::new(units as usize));
    let (tx, rx) = mpsc::channel(MAX_ITEMS);
    (
        InflowSender {
            tx,
            room: room.clone(),
            units,
        },
        InflowReceiver { rx, room },
    )
}

/// The source's end of the queue.
#[derive(Debug)]
pub struct InflowSender {
    tx: mpsc::Sender<(Transaction, u32)>,
    room: Arc<Semaphore>,
    units: u32,
}

impl InflowSender {
    /// Waits for room, then queues `txn`; gives it back if the worker has gone.
    pub async fn send(&self, txn: Transaction) -> Result<(), Transaction> {
        let cost = (txn.approx_bytes().div_ceil(UNIT) as u64).clamp(1, self.units as u64) as u32;
        match self.room.acquire_many(cost).await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(txn),
        }
        self.tx.send((txn, cost)).await.map_err(|e| {
            self.room.add_permits(cost as usize);
            e.0.0
        })
    }
}

/// The pipeline's end of the queue.
#[derive(Debug)]
pub struct InflowReceiver {
    rx: mpsc::Receiver<(Transaction, u32)>,
    room: Arc<Semaphore>,
}

impl Drop for InflowReceiver {
    /// A sender waiting for room gets its transaction back instead of waiting forever.
    fn drop(&mut self) {
        self.room.close();
    }
}

impl InflowReceiver {
    fn take(&self, (txn, cost): (Transaction, u32)) -> Transaction {
        self.room.add_permits(cost as usize);
        txn
    }

    /// The next transaction; `None` once the sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Transaction> {
        let item = self.rx.recv().await?;
        Some(self.take(item))
    }

    /// [`recv`](Self::recv) for a thread outside the runtime.
    pub fn blocking_recv(&mut self) -> Option<Transaction> {
        let item = self.rx.blocking_recv()?;
        Some(self.take(item))
    }

    /// The next transaction if one is queued now.
    pub fn try_recv(&mut self) -> Option<Transaction> {
        let item = self.rx.try_recv().ok()?;
        Some(self.take(item))
    }

    /// Whether the sender is gone (queued transactions may remain).
    pub fn is_closed(&self) -> bool {
        self.rx.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Lsn, Op, Part, Relation, ReplicaIdentity, TxnMeta, Value};

    fn txn(xid: u32, rows: usize, text: usize) -> Transaction {
        let relation = Arc::new(Relation {
            comment_classes: Default::default(),
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: Vec::new(),
        });
        Transaction {
            meta: TxnMeta {
                xid,
                commit_lsn: Lsn(xid as u64),
                end_lsn: Lsn(xid as u64 + 1),
                commit_ts: 0,
                part: Part::WHOLE,
                copied: None,
            },
            changes: (0..rows)
                .map(|i| Change {
                    identity: None,
                    relation: relation.clone(),
                    op: Op::Insert,
                    lsn: Lsn(i as u64),
                    new: Some(vec![Value::Text("x".repeat(text))]),
                    old: None,
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn the_sender_waits_for_room_and_the_receiver_gives_it_back() {
        // Room for about 64 KiB; each transaction holds about 10 KiB.
        let (tx, mut rx) = channel(64 << 10);
        let one = txn(0, 10, 1000).approx_bytes();
        assert!((10_000..20_000).contains(&one), "{one}");
        let mut sent = 0u32;
        loop {
            let next = txn(sent, 10, 1000);
            match tokio::time::timeout(std::time::Duration::from_millis(50), tx.send(next)).await {
                Ok(result) => {
                    result.unwrap();
                    sent += 1;
                }
                Err(_) => break,
            }
            assert!(sent < 100, "the queue never filled");
        }
        // Full at the byte bound, not the count bound.
        assert_eq!(sent as usize, 64 / one.div_ceil(UNIT));
        // Taking one makes room for one more; order is kept.
        assert_eq!(rx.recv().await.unwrap().meta.xid, 0);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tx.send(txn(sent, 10, 1000)),
        )
        .await
        .expect("room after a receive")
        .unwrap();
        for xid in 1..=sent {
            assert_eq!(rx.try_recv().unwrap().meta.xid, xid);
        }
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_sender_waiting_for_room_fails_when_the_receiver_goes() {
        let (tx, rx) = channel(4 << 10);
        tx.send(txn(1, 100, 1000)).await.unwrap();
        let waiting = tokio::spawn(async move { tx.send(txn(2, 1, 1)).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the queue is full: the send waits");
        drop(rx);
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the send returns once the receiver is gone")
            .unwrap();
        assert_eq!(result.unwrap_err().meta.xid, 2);
    }

    #[tokio::test]
    async fn a_transaction_larger_than_the_bound_passes_alone() {
        let (tx, mut rx) = channel(4 << 10);
        tx.send(txn(7, 100, 1000)).await.unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), tx.send(txn(8, 1, 1)))
                .await
                .is_err(),
            "a second transaction must wait while the large one is queued"
        );
        assert_eq!(rx.recv().await.unwrap().meta.xid, 7);
        tx.send(txn(8, 1, 1)).await.unwrap();
        drop(tx);
        assert_eq!(rx.recv().await.unwrap().meta.xid, 8);
        assert!(rx.recv().await.is_none());
        assert!(rx.is_closed());
    }
}
