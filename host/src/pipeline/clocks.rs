//! The clocks a guest sees: time that never blocks.
//!
//! ```text
//! wasi:clocks/wall-clock      ─▶ FrozenClock: the Unix epoch, always
//! wasi:clocks/monotonic-clock ─▶ StepClock: +1 µs per reading
//!   subscribe-duration(d)     ─▶ the clock jumps d ahead ─▶ a pollable that is ready now
//!   subscribe-instant(t)      ─▶ the clock jumps to t     ─▶ a pollable that is ready now
//! ```
//!
//! Invariants:
//! - No clock import waits. The epoch deadline interrupts guest code, never a host
//!   call, so an import that slept (WASI's own `subscribe-duration` is a real timer
//!   that `poll` waits on) would let a guest hold a batch past its deadline. Here a
//!   sleep returns at once and the guest's clock moves by the time it asked to wait:
//!   a guest that sleeps in a loop spins guest code, which the deadline stops.
//! - Every other pollable a guest can get (its stdout and stderr, an empty stdin) is
//!   ready at once, so `wasi:io/poll` never waits either; sockets, name lookups and
//!   files are refused before a pollable exists.
//! - Guests get no real time: rows carry their commit time instead, which keeps
//!   transforms deterministic.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::{DynPollable, Pollable};

/// A wall clock stuck at the Unix epoch.
pub struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// A monotonic clock that advances one microsecond per reading, and jumps ahead by
/// whatever a guest waits for: enough for language runtimes that measure elapsed
/// time, deterministic for a given guest.
#[derive(Debug, Default)]
pub struct StepClock(AtomicU64);

/// Nanoseconds the clock advances per reading.
const STEP_NANOS: u64 = 1_000;

impl StepClock {
    fn now(&self) -> u64 {
        self.0.fetch_add(STEP_NANOS, Ordering::Relaxed)
    }

    /// Moves the clock `nanos` ahead (saturating: a guest may ask for `u64::MAX`).
    fn advance(&self, nanos: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                Some(now.saturating_add(nanos))
            });
    }

    /// Moves the clock to `when` if that is ahead of it.
    fn advance_to(&self, when: u64) {
        self.0.fetch_max(when, Ordering::Relaxed);
    }
}

/// The [`StepClock`] shared between WASI's context and the clock interface below.
#[derive(Clone, Debug, Default)]
pub struct SharedClock(pub Arc<StepClock>);

impl wasmtime_wasi::HostMonotonicClock for SharedClock {
    fn resolution(&self) -> u64 {
        STEP_NANOS
    }
    fn now(&self) -> u64 {
        self.0.now()
    }
}

/// A pollable that is ready at once: the end of a wait that already happened.
struct Elapsed;

impl Pollable for Elapsed {
    fn ready<'a, 'b>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
    {
        Box::pin(async {})
    }
}

/// What the clock interface works on: the guest's clock and its resource table.
pub struct ClockView<'a> {
    clock: &'a StepClock,
    table: &'a mut ResourceTable,
}

impl<'a> ClockView<'a> {
    /// The view of a store whose clock is `clock` and whose WASI table is `table`.
    pub fn new(clock: &'a SharedClock, table: &'a mut ResourceTable) -> ClockView<'a> {
        ClockView {
            clock: &clock.0,
            table,
        }
    }
}

impl ClockView<'_> {
    fn elapsed(&mut self) -> wasmtime::Result<Resource<DynPollable>> {
        let pollable = self.table.push(Elapsed)?;
        wasmtime_wasi::p2::subscribe(self.table, pollable)
    }
}

impl monotonic_clock::Host for ClockView<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(self.clock.now())
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(STEP_NANOS)
    }

    fn subscribe_instant(
        &mut self,
        when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.clock.advance_to(when);
        self.elapsed()
    }

    fn subscribe_duration(
        &mut self,
        duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.clock.advance(duration);
        self.elapsed()
    }
}

struct NonBlockingClock;

impl HasData for NonBlockingClock {
    type Data<'a> = ClockView<'a>;
}

/// Replaces WASI's monotonic clock in `linker` (which already holds WASI) with the
/// one above, whose waits never block; `view` finds a store's clock and table.
pub fn replace_monotonic_clock<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> ClockView<'_>,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let added = monotonic_clock::add_to_linker::<T, NonBlockingClock>(linker, view);
    linker.allow_shadowing(false);
    added
}
