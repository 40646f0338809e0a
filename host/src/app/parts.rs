//! The run's tasks, in one [`JoinSet`] under one stop.
//!
//! ```text
//! outside stop (signal, caller) ─┐
//!                                ├─▶ stop ─▶ source stops reading ─▶ pipeline drains ─▶ sinks flush
//! a part fails or panics ────────┘            └─ and the checkpoint freezes
//! ```
//!
//! A part is either on the *flow* (the source, the tap, the pipeline, each sink: what
//! carries changes) or in the *background* (the checkpoint tracker, slot health,
//! reloads, the admin API: what serves the flow). The run ends when every flow part
//! has ended; the background parts are then stopped.
//!
//! Invariants:
//! - A flow part that fails, or any part that panics, trips the stop at once and
//!   freezes the checkpoint: from then on the slot is acknowledged to no position past
//!   what every sink had made durable before, and the source does not wait for the
//!   sinks to catch up. The other parts drain and end as in a clean shutdown.
//! - The run's error is the root cause: a panic before a sink's error, before the
//!   pipeline's, before the source's (a source or pipeline that stops because a part
//!   after it did is an effect). Among equals, the first to end.
//! - Nothing is left running when [`Parts::wait`] returns.

use std::collections::HashMap;
use std::future::Future;

use tokio::sync::watch;
use tokio::task::{AbortHandle, Id, JoinSet};

use super::error::RunError;

/// What a part does, in the order its errors take precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Role {
    Sink,
    Pipeline,
    Source,
    Background,
}

/// The run's tasks and its one stop.
pub(super) struct Parts {
    set: JoinSet<Result<(), RunError>>,
    named: HashMap<Id, (String, Role)>,
    stop: watch::Sender<bool>,
    checkpoint: Option<AbortHandle>,
}

impl Parts {
    /// Parts whose stop trips when `outside` turns true or its sender is gone (as the
    /// source took its stop before).
    pub(super) fn new(mut outside: watch::Receiver<bool>) -> Parts {
        let (stop, _) = watch::channel(false);
        let mut parts = Parts {
            set: JoinSet::new(),
            named: HashMap::new(),
            stop,
            checkpoint: None,
        };
        let stop = parts.stop.clone();
        parts.spawn("shutdown signal", Role::Background, async move {
            let _ = outside.wait_for(|stop| *stop).await;
            tracing::debug!("run: stop asked from outside");
            stop.send_replace(true);
            Ok(())
        });
        parts
    }

    /// The stop every part watches: true once the run is to wind down.
    pub(super) fn stop(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Runs `task` as part `name`.
    pub(super) fn spawn<F>(&mut self, name: impl Into<String>, role: Role, task: F)
    where
        F: Future<Output = Result<(), RunError>> + Send + 'static,
    {
        let handle = self.set.spawn(task);
        self.named.insert(handle.id(), (name.into(), role));
    }

    /// Runs the checkpoint tracker, which a failure freezes (see the module's doc).
    pub(super) fn spawn_checkpoint<F>(&mut self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.set.spawn(async move {
            task.await;
            Ok(())
        });
        self.named
            .insert(handle.id(), ("checkpoint".into(), Role::Background));
        self.checkpoint = Some(handle);
    }

    /// Waits until every flow part has ended, then stops the background; returns the
    /// root cause of a failure, if any.
    pub(super) async fn wait(mut self) -> Result<(), RunError> {
        let mut flow = self
            .named
            .values()
            .filter(|(_, role)| *role != Role::Background)
            .count();
        let mut failures: Vec<(Role, bool, RunError)> = Vec::new();
        while flow > 0 {
            let Some(joined) = self.set.join_next_with_id().await else {
                break;
            };
            let (name, role, failure) = self.ended(joined);
            if role != Role::Background {
                flow -= 1;
            }
            if let Some((panicked, error)) = failure {
                // A background part that ends with an error is only reported, unless
                // it panicked: it serves the flow and the flow goes on without it.
                if panicked || role != Role::Background {
                    tracing::error!(part = %name, %error, "stopping the run");
                    self.fail();
                    failures.push((role, panicked, error));
                } else {
                    tracing::warn!(part = %name, %error, "stopped");
                }
            } else {
                tracing::debug!(part = %name, "ended");
            }
        }
        self.set.abort_all();
        while let Some(joined) = self.set.join_next_with_id().await {
            let (name, role, failure) = self.ended(joined);
            if let Some((true, error)) = failure {
                tracing::error!(part = %name, %error, "panicked while stopping");
                failures.push((role, true, error));
            }
        }
        tracing::debug!("run: every part stopped");
        // Panics first, then by role; `sort_by_key` keeps the order of arrival.
        failures.sort_by_key(|(role, panicked, _)| (!panicked, *role));
        match failures.into_iter().next() {
            Some((_, _, error)) => Err(error),
            None => Ok(()),
        }
    }

    /// Trips the stop and freezes the checkpoint.
    fn fail(&mut self) {
        self.stop.send_replace(true);
        if let Some(checkpoint) = self.checkpoint.take() {
            checkpoint.abort();
        }
    }

    /// Names what ended and how: `(name, role, Some((panicked, error)))` on failure.
    /// A part aborted by [`Parts::wait`] ended cleanly.
    #[allow(clippy::type_complexity)]
    fn ended(
        &mut self,
        joined: Result<(Id, Result<(), RunError>), tokio::task::JoinError>,
    ) -> (String, Role, Option<(bool, RunError)>) {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(join) => join.id(),
        };
        let (name, role) = self
            .named
            .remove(&id)
            .unwrap_or_else(|| ("a task".into(), Role::Background));
        let failure = match joined {
            Ok((_, Ok(()))) => None,
            Ok((_, Err(error))) => Some((false, error)),
            Err(join) if join.is_cancelled() => None,
            Err(join) => Some((
                true,
                RunError::Panicked {
                    part: name.clone(),
                    message: join.to_string(),
                },
            )),
        };
        (name, role, failure)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::checkpoint::Tracker;
    use crate::sink::SinkError;

    fn outside() -> (watch::Sender<bool>, watch::Receiver<bool>) {
        watch::channel(false)
    }

    /// A source-like part: streams until the stop, then ends with `result`.
    fn until_stop(
        parts: &Parts,
        result: Result<(), RunError>,
    ) -> impl Future<Output = Result<(), RunError>> + use<> {
        let mut stop = parts.stop();
        async move {
            let _ = stop.wait_for(|s| *s).await;
            result
        }
    }

    #[tokio::test]
    async fn a_stop_from_outside_ends_the_run_cleanly() {
        let (tx, rx) = outside();
        let mut parts = Parts::new(rx);
        let source = until_stop(&parts, Ok(()));
        parts.spawn("the source", Role::Source, source);
        parts.spawn("slot health", Role::Background, std::future::pending());
        tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), parts.wait())
            .await
            .expect("the run ends once the flow has")
            .unwrap();
    }

    #[tokio::test]
    async fn a_failed_sink_stops_the_run_at_once_freezes_the_checkpoint_and_is_the_error() {
        let (_tx, rx) = outside();
        let mut parts = Parts::new(rx);
        let (mut tracker, mut durable) = Tracker::new();
        let _healthy_sink = tracker.register();
        parts.spawn_checkpoint(tracker.run());
        // The source: once stopped, the checkpoint it acknowledges from must be gone
        // (frozen), and it ends with an error that follows from the sink's.
        let mut stop = parts.stop();
        parts.spawn("the source", Role::Source, async move {
            let _ = stop.wait_for(|s| *s).await;
            let frozen = tokio::time::timeout(Duration::from_secs(5), durable.changed()).await;
            assert!(
                matches!(frozen, Ok(Err(_))),
                "the checkpoint still moves after a failure"
            );
            Err(RunError::Internal("the pipeline closed".into()))
        });
        parts.spawn("sink `lake`", Role::Sink, async {
            Err(RunError::Sink(SinkError::Definite {
                sink: "lake".into(),
                message: "refused".into(),
            }))
        });
        let error = tokio::time::timeout(Duration::from_secs(10), parts.wait())
            .await
            .expect("a failure ends the run without a stop from outside")
            .unwrap_err();
        assert!(
            matches!(error, RunError::Sink(_)),
            "the root cause: {error}"
        );
    }

    #[tokio::test]
    async fn a_panic_in_any_part_stops_the_run_and_names_the_part() {
        let (_tx, rx) = outside();
        let mut parts = Parts::new(rx);
        let source = until_stop(&parts, Ok(()));
        parts.spawn("the source", Role::Source, source);
        parts.spawn("reloads", Role::Background, async {
            panic!("a bug");
        });
        let error = tokio::time::timeout(Duration::from_secs(10), parts.wait())
            .await
            .expect("a panic ends the run")
            .unwrap_err();
        match error {
            RunError::Panicked { part, message } => {
                assert_eq!(part, "reloads");
                assert!(message.contains("a bug"), "{message}");
            }
            other => panic!("expected the panic, got {other}"),
        }
    }

    #[tokio::test]
    async fn a_panic_comes_before_the_errors_it_causes() {
        let (_tx, rx) = outside();
        let mut parts = Parts::new(rx);
        parts.spawn("sink `spine`", Role::Sink, async {
            panic!("flush bug");
        });
        let source = until_stop(&parts, Err(RunError::Internal("closed".into())));
        parts.spawn("the source", Role::Source, source);
        let error = parts.wait().await.unwrap_err();
        assert!(
            matches!(&error, RunError::Panicked { part, .. } if part == "sink `spine`"),
            "{error}"
        );
    }
}
