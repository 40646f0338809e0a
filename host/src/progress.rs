//! Progress of long operations (the initial snapshot, compaction): a bar with rate
//! and ETA when stderr is a terminal and logs are text, periodic log lines otherwise.
//!
//! ```text
//! main: stderr is a terminal && --log-format text ──▶ enable_bars()
//!                                                         │
//! snapshot / compaction ──▶ Progress ──┬─ bars enabled: a bar (rate, ETA) on stderr;
//!                                      │   log lines go above it (LogWriter)
//!                                      └─ otherwise: `log_due()` every 2 s, the caller
//!                                          logs a line with its rate and ETA
//! ```
//!
//! Invariants:
//! - Without [`enable_bars`] (tests, JSON logs, stderr to a file or a pipe) nothing
//!   but tracing output is written: no escape codes, no carriage returns.
//! - With bars, every log line is written through [`LogWriter`], which clears the
//!   bars, writes the line and redraws them, so the two never garble each other.

use std::io::{self, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a periodic progress line is logged when there is no bar.
pub const LOG_INTERVAL: Duration = Duration::from_secs(2);

static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Shows progress as bars on stderr from now on. Call once, from `main`, only when
/// stderr is a terminal and logs are text, and write logs through [`LogWriter`].
pub fn enable_bars() {
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
}

/// Whether progress is shown as bars.
pub fn bars_enabled() -> bool {
    BARS.get().is_some()
}

/// A tracing writer for stderr that writes each line above the progress bars.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match BARS.get() {
            Some(bars) => bars.suspend(|| io::stderr().write_all(buf))?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// What is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Rows,
    Bytes,
}

/// The progress of one operation toward an (estimated) total.
#[derive(Debug)]
pub struct Progress {
    unit: Unit,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Option<Instant>,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Starts counting toward `total` (0: unknown); `label` leads the bar.
    pub fn start(label: &str, unit: Unit, total: u64) -> Progress {
        let bar = BARS.get().map(|bars| {
            let bar = bars.add(ProgressBar::new(total));
            bar.set_style(style(unit, total));
            bar.set_prefix(label.to_owned());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            unit,
            total,
            done: 0,
            started: Instant::now(),
            last_log: None,
            bar,
        }
    }

    /// Whether a bar shows this progress (so periodic info lines are not needed).
    pub fn has_bar(&self) -> bool {
        self.bar.is_some()
    }

    pub fn set_done(&mut self, done: u64) {
        self.done = done;
        if let Some(bar) = &self.bar {
            if done > self.total && self.total > 0 {
                // The estimate was low: the bar stays full, the ETA near zero.
                bar.set_length(done);
            }
            bar.set_position(done);
        }
    }

    pub fn add(&mut self, n: u64) {
        self.set_done(self.done + n);
    }

    /// The text after the bar, e.g. the table being copied.
    pub fn set_message(&self, message: impl Into<String>) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.into());
        }
    }

    pub fn done(&self) -> u64 {
        self.done
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Units per second since the start.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(0.001)
    }

    /// Seconds left at the current rate; `None` while the rate or the total is unknown.
    pub fn eta_seconds(&self) -> Option<u64> {
        let rate = self.rate();
        if self.total == 0 || self.done == 0 || rate <= 0.0 {
            return None;
        }
        Some((self.total.saturating_sub(self.done) as f64 / rate).ceil() as u64)
    }

    /// Whether the caller should log a progress line now: the first call and then
    /// every [`LOG_INTERVAL`], or always with `force`.
    pub fn log_due(&mut self, force: bool) -> bool {
        let due = force || self.last_log.is_none_or(|t| t.elapsed() >= LOG_INTERVAL);
        if due {
            self.last_log = Some(Instant::now());
        }
        due
    }

    /// Removes the bar (if any), leaving the log to say how it ended.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    pub fn unit(&self) -> Unit {
        self.unit
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

fn style(unit: Unit, total: u64) -> ProgressStyle {
    let template = match (unit, total) {
        (Unit::Rows, 0) => "{spinner} {prefix} {human_pos} rows, {per_sec:0} {msg}",
        (Unit::Rows, _) => {
            "{spinner} {prefix} [{bar:30}] {percent:>3}% {human_pos}/~{human_len} rows, {per_sec:0}, ETA {eta} {msg}"
        }
        (Unit::Bytes, 0) => "{spinner} {prefix} {binary_bytes}, {binary_bytes_per_sec} {msg}",
        (Unit::Bytes, _) => {
            "{spinner} {prefix} [{bar:30}] {percent:>3}% {binary_bytes}/{binary_total_bytes}, {binary_bytes_per_sec}, ETA {eta} {msg}"
        }
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_bars_lines_are_due_first_then_every_interval() {
        let mut p = Progress::start("test", Unit::Rows, 1000);
        assert!(!p.has_bar(), "no bars unless main enables them");
        assert!(p.log_due(false), "the first line is due at once");
        assert!(!p.log_due(false), "then not before the interval");
        assert!(p.log_due(true), "forced lines always are");
        p.last_log = Some(Instant::now() - LOG_INTERVAL);
        assert!(p.log_due(false));
    }

    #[test]
    fn rate_and_eta_follow_the_count() {
        let mut p = Progress::start("test", Unit::Bytes, 1000);
        assert_eq!(p.eta_seconds(), None, "unknown before anything is done");
        p.started = Instant::now() - Duration::from_secs(10);
        p.set_done(250);
        let rate = p.rate();
        assert!((24.0..=25.1).contains(&rate), "{rate}");
        let eta = p.eta_seconds().unwrap();
        assert!((29..=31).contains(&eta), "{eta}");
        p.set_done(1200);
        assert_eq!(p.eta_seconds(), Some(0), "past a low estimate");
        let unknown = Progress::start("test", Unit::Rows, 0);
        assert_eq!(unknown.eta_seconds(), None);
    }
}
