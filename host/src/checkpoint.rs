//! Checkpoint tracking: the slot's flush LSN is the minimum of what every sink has
//! made durable.
//!
//! ```text
//! sink A ──watch<Lsn>──┐
//! sink B ──watch<Lsn>──┼──▶ Tracker (min, never backward) ──watch<Lsn>──▶ source (standby status)
//! sink C ──watch<Lsn>──┘
//! ```
//!
//! Invariants:
//! - The published LSN is the minimum over sinks, so it only covers transactions that
//!   every sink has made durable.
//! - It never moves backward, even if a sink restarts and reports less.

use tokio::sync::watch;

use crate::change::Lsn;

/// Combines the durable LSNs of all sinks into the one the slot may be acknowledged to.
pub struct Tracker {
    sinks: Vec<watch::Receiver<Lsn>>,
    out: watch::Sender<Lsn>,
}

impl Tracker {
    /// A tracker publishing on a new channel; returns it and the receiver for the source.
    pub fn new() -> (Tracker, watch::Receiver<Lsn>) {
        let (out, rx) = watch::channel(Lsn::ZERO);
        (
            Tracker {
                sinks: Vec::new(),
                out,
            },
            rx,
        )
    }

    /// Registers a sink; returns the sender the sink publishes its durable LSN on.
    pub fn register(&mut self) -> watch::Sender<Lsn> {
        let (tx, rx) = watch::channel(Lsn::ZERO);
        self.sinks.push(rx);
        tx
    }

    /// Publishes the minimum whenever a sink advances; returns when every sink is gone.
    /// A sink that finished keeps its last value in the minimum.
    pub async fn run(mut self) {
        let mut finished: Option<Lsn> = None;
        loop {
            let live = self.sinks.iter().map(|rx| *rx.borrow());
            let min = live.chain(finished).min().unwrap_or(Lsn::ZERO);
            self.out.send_if_modified(|cur| {
                if min > *cur {
                    *cur = min;
                    true
                } else {
                    false
                }
            });
            if self.sinks.is_empty() {
                return;
            }
            let (result, index, _) =
                futures::future::select_all(self.sinks.iter_mut().map(|rx| Box::pin(rx.changed())))
                    .await;
            if result.is_err() {
                let last = *self.sinks.swap_remove(index).borrow();
                finished = Some(finished.map_or(last, |f| f.min(last)));
            }
        }
    }
}
