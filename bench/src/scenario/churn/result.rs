//! What `churn` reports: the results of the run (`ChurnResult`, with `ChurnMessages` for the
//! background messages), their human summary, and the problems they show.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::histogram::Summary;
use crate::procfs::Settled;
use crate::progress::human_rate;
use crate::report::bytes;
use crate::scenario::accounting::Accounting;

/// The `churn` results.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ChurnResult {
    /// Population sockets asked for.
    pub(crate) sockets: u64,
    /// Users the sockets shared.
    pub(crate) users: u64,
    /// Rooms with a sender (0 = no messages).
    pub(crate) rooms: u64,
    /// Population sockets open when the churn started.
    pub(crate) open_at_start: u64,
    /// Population sockets open at the end (after the drain).
    pub(crate) open_at_end: u64,
    /// Reconnects per second asked for (--rate).
    pub(crate) asked_per_sec: f64,
    /// Reconnects due over the churn: --rate x its length.
    pub(crate) asked: u64,
    /// Reconnects started: the old socket closed, a new one dialled.
    pub(crate) started: u64,
    /// Reconnects that were due while --connect-concurrency were in flight (or every socket
    /// was already being replaced), so not started.
    pub(crate) skipped: u64,
    /// Reconnects whose new socket authenticated.
    pub(crate) connected: u64,
    /// Reconnects whose new socket failed (one attempt each; see `failures`).
    pub(crate) failed: u64,
    /// Seconds the churn lasted (reconnects were started during it).
    pub(crate) churn_secs: f64,
    /// `connected` / `churn_secs`.
    pub(crate) connects_per_sec: f64,
    /// From starting the TCP connect to reading `auth` code 0, over successful reconnects.
    pub(crate) connect_latency: Summary,
    /// Failed reconnects by cause (`tcp_connect`, `handshake_http_503`, `auth_close_1008`, ...).
    pub(crate) failures: BTreeMap<String, u64>,
    /// The first failure in full, for the reader.
    pub(crate) first_failure: Option<String>,
    /// Whether --duration stopped the run early.
    pub(crate) stopped_by_duration: bool,
    /// Server RSS once settled with the population open, before the churn (with --pid).
    pub(crate) rss_start: Option<Settled>,
    /// Server RSS once settled with the population open, after the churn (with --pid).
    pub(crate) rss_end: Option<Settled>,
    /// `rss_end - rss_start` in bytes.
    pub(crate) rss_growth: Option<i64>,
    /// `rss_growth / connected`.
    pub(crate) rss_growth_per_reconnect: Option<f64>,
    /// Whether the growth exceeds 2 MiB + 5% of `rss_start` (reported, not a problem).
    pub(crate) rss_growth_beyond_tolerance: bool,
    /// The background messages, with --rooms.
    pub(crate) messages: Option<ChurnMessages>,
}

/// What the rooms' senders sent and what the sockets received.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ChurnMessages {
    /// Messages per second per room (--msg-rate).
    pub(crate) msg_rate: f64,
    /// Messages each room's sender was to send: --msg-rate x --seconds.
    pub(crate) per_room: u64,
    /// Sent, acked, received and checked. Deliveries are owed only to the checked sockets (see
    /// `checked_sockets`), each every code-0 message of its room scheduled after its `auth`
    /// answer; `recv_frames`, the delivery latency, duplicates and foreign deliveries count
    /// every socket, churned ones included.
    #[serde(flatten)]
    pub(crate) accounting: Accounting,
    /// `recv_frames` / the churn's length.
    pub(crate) recv_per_sec: f64,
    /// Sockets open from their `auth` to the end, whose deliveries were checked.
    pub(crate) checked_sockets: u64,
    /// Deliveries of code-0 messages scheduled before the socket's `auth` (allowed, not owed).
    pub(crate) unchecked: u64,
}

impl ChurnResult {
    /// Appends the human summary lines.
    pub(crate) fn summary(&self, out: &mut String) {
        let ms = |us: f64| us / 1000.0;
        let _ = writeln!(
            out,
            "population     {} sockets of {} users, {} rooms; {} open at the start, {} at the end",
            self.sockets, self.users, self.rooms, self.open_at_start, self.open_at_end
        );
        let _ = writeln!(
            out,
            "churn          asked {}/s for {:.1} s = {}; started {}, skipped {}, authenticated {} ({:.1}/s), failed {}",
            self.asked_per_sec,
            self.churn_secs,
            self.asked,
            self.started,
            self.skipped,
            self.connected,
            self.connects_per_sec,
            self.failed
        );
        let _ = writeln!(
            out,
            "reconnect      {}  (TCP connect to auth ok)",
            self.connect_latency
        );
        if !self.failures.is_empty() {
            let causes: Vec<String> = self.failures.iter().map(|(c, n)| format!("{c} {n}")).collect();
            let _ = writeln!(out, "failures       {}", causes.join(", "));
        }
        if let Some(m) = &self.messages {
            let a = &m.accounting;
            let _ = writeln!(
                out,
                "messages       {}/s per room: {}, ack p99 {:.3} ms",
                m.msg_rate,
                a.sends_text(),
                ms(a.ack_latency.p99_us)
            );
            let _ = writeln!(
                out,
                "delivery       {}; {} recv ({} recv/s)",
                a.delivery_latency,
                a.recv_frames,
                human_rate(m.recv_per_sec)
            );
            let _ = writeln!(
                out,
                "check          {} sockets open to the end: owed {}, delivered {}, lost {}, unexpected {} (+{} unowed)",
                m.checked_sockets, a.expected, a.delivered, a.lost, a.unexpected, m.unchecked
            );
            let _ = writeln!(
                out,
                "all sockets    duplicates {}, foreign {}, echoed {}, out of sender order {}",
                a.duplicates, a.foreign, a.echoed_to_sender, a.out_of_sender_order
            );
        }
        if let (Some(start), Some(end), Some(growth)) = (&self.rss_start, &self.rss_end, self.rss_growth) {
            let stable = |s: &Settled| if s.stable { "" } else { " (NOT stable)" };
            let _ = writeln!(
                out,
                "server rss     start {}{}, end {}{}: {}{} ({:.0} B per reconnect){}",
                bytes(start.rss_bytes as f64),
                stable(start),
                bytes(end.rss_bytes as f64),
                stable(end),
                if growth >= 0 { "+" } else { "" },
                bytes(growth as f64),
                self.rss_growth_per_reconnect.unwrap_or(0.0),
                if self.rss_growth_beyond_tolerance {
                    "; NOTE: beyond the 2 MiB + 5% tolerance, churn may leak (run longer to tell)"
                } else {
                    ""
                }
            );
        }
    }
}

/// Adds the problems `result` shows (failed reconnects, lost or wrong deliveries, ...).
pub(super) fn note_problems(result: &ChurnResult, problems: &mut Vec<String>) {
    if result.failed > 0 {
        let causes: Vec<String> = result.failures.iter().map(|(c, n)| format!("{c} {n}")).collect();
        problems.push(format!(
            "{} of {} reconnects failed ({}; first: {})",
            result.failed,
            result.started,
            causes.join(", "),
            result.first_failure.as_deref().unwrap_or("?")
        ));
    }
    if result.stopped_by_duration {
        problems.push("--duration ran out before the run finished".to_owned());
    }
    if let Some(m) = &result.messages {
        m.accounting.note_problems(problems);
    }
}
