//! The once-a-second progress line on stderr: elapsed time, phase, open sockets, messages sent
//! and acknowledged, and the delivery rate over the last second.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::socket::RunContext;

/// The phase shown on the progress line.
#[derive(Debug, Clone, Default)]
pub(crate) struct Phase(Arc<Mutex<&'static str>>);

impl Phase {
    /// Shows `name` from now on.
    pub(crate) fn set(&self, name: &'static str) {
        if let Ok(mut phase) = self.0.lock() {
            *phase = name;
        }
    }

    fn get(&self) -> &'static str {
        self.0.lock().map_or("?", |phase| *phase)
    }
}

/// Prints the progress line every second until `done` is cancelled (nothing if `quiet`).
pub(crate) fn spawn(ctx: Arc<RunContext>, phase: Phase, done: CancellationToken, quiet: bool) {
    if quiet {
        return;
    }
    tokio::spawn(async move {
        let started = Instant::now();
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let mut last_recv = 0;
        let mut last_at = Instant::now();
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tick.tick() => {}
            }
            let counters = &ctx.counters;
            let recv = counters.recv.load(Ordering::Relaxed);
            let now = Instant::now();
            let rate = (recv - last_recv) as f64 / now.duration_since(last_at).as_secs_f64().max(1e-3);
            (last_recv, last_at) = (recv, now);
            eprintln!(
                "[{:>7.1}s] {:<8} sockets {:>6}  sent {:>9}  acked {:>9}  recv/s {:>10}",
                started.elapsed().as_secs_f64(),
                phase.get(),
                counters.open.load(Ordering::Relaxed),
                counters.sent.load(Ordering::Relaxed),
                counters.acked.load(Ordering::Relaxed),
                human_rate(rate),
            );
        }
    });
}

/// `1234567.0` → `1.23M`.
pub(crate) fn human_rate(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2}M", rate / 1e6)
    } else if rate >= 1e3 {
        format!("{:.1}k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_well() {
        assert_eq!(human_rate(1_234_567.0), "1.23M");
        assert_eq!(human_rate(12_345.0), "12.3k");
        assert_eq!(human_rate(12.0), "12");
    }
}
