//! The message accounting `fanout` and `churn` share: what the senders sent and had acked,
//! what the sockets received, the check of the deliveries owed against those that arrived, and
//! the problems all that shows.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::histogram::Summary;
use crate::report::{acks_by_code, note_counts, refused_acks};
use crate::socket::{ReceivedTotals, SentTotals};

/// What a run's senders sent and its sockets received, and how the owed deliveries went. Which
/// deliveries are owed is the scenario's to say: `fanout` owes every code-0 message to every
/// other member of its room, `churn` only those scheduled after a surviving socket's `auth`.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Accounting {
    /// `msg` frames written.
    pub(crate) sent: u64,
    /// Acks received (any code).
    pub(crate) acked: u64,
    /// Acks by `send` code.
    pub(crate) acks_by_code: BTreeMap<String, u64>,
    /// Messages never acknowledged (or never sent).
    pub(crate) unacked: u64,
    /// Senders that gave up waiting for an ack (--ack-timeout).
    pub(crate) senders_timed_out: u64,
    /// Deliveries owed (see the type's documentation).
    pub(crate) expected: u64,
    /// Owed deliveries that arrived (first copies).
    pub(crate) delivered: u64,
    /// Owed deliveries that never arrived.
    pub(crate) lost: u64,
    /// Deliveries of messages whose ack was not code 0 (or never came), to the checked sockets.
    pub(crate) unexpected: u64,
    /// Deliveries of a message the socket already had (every socket).
    pub(crate) duplicates: u64,
    /// Deliveries of messages this run did not send to that room (every socket).
    pub(crate) foreign: u64,
    /// Deliveries back to the very socket that sent the message.
    pub(crate) echoed_to_sender: u64,
    /// Deliveries that came after a later message of the same sender.
    pub(crate) out_of_sender_order: u64,
    /// Deliveries whose `sent` was earlier than the previous delivery's on that socket.
    pub(crate) sent_regressions: u64,
    /// Frames the bench could not read, plus unexpected `send`/`auth`/`error` frames.
    pub(crate) malformed_or_other: u64,
    /// `recv` frames received by every socket.
    pub(crate) recv_frames: u64,
    /// From writing a `msg` frame to reading its code-0 `send` frame.
    pub(crate) ack_latency: Summary,
    /// From writing a `msg` frame to reading its `recv` on another socket (first copies).
    pub(crate) delivery_latency: Summary,
}

impl Accounting {
    /// What `senders` (of `planned`) sent and the sockets `received`; the owed deliveries are
    /// added socket by socket with [`Accounting::add_check`].
    pub(crate) fn new(senders: &SentTotals, planned: u64, received: &ReceivedTotals) -> Accounting {
        Accounting {
            sent: senders.sent,
            acked: senders.acked,
            acks_by_code: acks_by_code(&senders.codes),
            unacked: senders.unacked_of(planned),
            senders_timed_out: senders.timed_out,
            duplicates: received.duplicates,
            foreign: received.foreign,
            echoed_to_sender: received.own,
            out_of_sender_order: received.out_of_sender_order,
            sent_regressions: received.sent_regressions,
            malformed_or_other: senders.bad_acks + received.malformed_or_other,
            recv_frames: received.frames,
            ack_latency: senders.ack.summary(),
            delivery_latency: received.e2e.summary(),
            ..Accounting::default()
        }
    }

    /// What was sent and acked, for the reader: `sent 150, acked 150 (0: 150), unacked 0`.
    pub(crate) fn sends_text(&self) -> String {
        let codes: Vec<String> = self
            .acks_by_code
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        format!(
            "sent {}, acked {} ({}), unacked {}",
            self.sent,
            self.acked,
            codes.join(", "),
            self.unacked
        )
    }

    /// Adds the check of one socket's deliveries from one sender.
    pub(crate) fn add_check(&mut self, check: &Check) {
        self.expected += check.expected;
        self.delivered += check.delivered;
        self.lost += check.lost;
        self.unexpected += check.unexpected;
    }

    /// Adds `sockets` that never opened, each owed `owed` deliveries: all of them lost.
    pub(crate) fn add_unopened(&mut self, sockets: u64, owed: u64) {
        self.expected += sockets * owed;
        self.lost += sockets * owed;
    }

    /// Adds the problems the accounting shows: lost, duplicated, unexpected, foreign, echoed and
    /// reordered deliveries, unacked or refused messages, senders that gave up, bad frames. A
    /// delivery out of its sender's order breaks the per-room order the server keeps (a room's
    /// messages are published in the order they arrive), so it is a problem in every scenario;
    /// `sent_regressions` is only reported.
    pub(crate) fn note_problems(&self, problems: &mut Vec<String>) {
        note_counts(
            problems,
            &[
                (self.lost, "owed deliveries lost"),
                (self.duplicates, "duplicate deliveries"),
                (self.unexpected, "deliveries of messages not acked with code 0"),
                (
                    self.foreign,
                    "deliveries of messages not sent to that room by this run",
                ),
                (
                    self.echoed_to_sender,
                    "messages delivered back to their sending socket",
                ),
                (self.out_of_sender_order, "deliveries out of sender order"),
                (self.unacked, "messages never acked"),
                (self.senders_timed_out, "senders gave up waiting for an ack"),
                (self.malformed_or_other, "unreadable or unexpected frames"),
                (refused_acks(&self.acks_by_code), "acks with a non-zero code"),
            ],
        );
    }
}

/// The check of one socket: which of its room's messages it was owed and which it got.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Check {
    /// Messages owed: acked with code 0, from the first owed sequence number on.
    pub(crate) expected: u64,
    /// Owed messages that arrived.
    pub(crate) delivered: u64,
    /// Owed messages that never arrived.
    pub(crate) lost: u64,
    /// Messages acked with code 0 but sent before the first owed one, that arrived anyway.
    pub(crate) unchecked: u64,
    /// Messages that arrived without a code-0 ack.
    pub(crate) unexpected: u64,
}

/// Compares `got` (bit `seq` = delivered) against `ok` (bit `seq` = acked with code 0); only
/// sequence numbers from `first` on are owed.
pub(crate) fn check(ok: &[u64], got: &[u64], first: u64) -> Check {
    let mut result = Check::default();
    for (i, &got_word) in got.iter().enumerate() {
        let ok_word = ok.get(i).copied().unwrap_or(0);
        let base = i as u64 * 64;
        let owed_mask = if first <= base {
            u64::MAX
        } else if first >= base + 64 {
            0
        } else {
            u64::MAX << (first - base)
        };
        let owed = ok_word & owed_mask;
        result.expected += u64::from(owed.count_ones());
        result.delivered += u64::from((owed & got_word).count_ones());
        result.lost += u64::from((owed & !got_word).count_ones());
        result.unchecked += u64::from((ok_word & !owed_mask & got_word).count_ones());
        result.unexpected += u64::from((got_word & !ok_word).count_ones());
    }
    // Words past `got` (a socket that tracks nothing) are all lost.
    for (i, &ok_word) in ok.iter().enumerate().skip(got.len()) {
        let base = i as u64 * 64;
        let owed = if first <= base {
            ok_word
        } else if first >= base + 64 {
            0
        } else {
            ok_word & (u64::MAX << (first - base))
        };
        result.expected += u64::from(owed.count_ones());
        result.lost += u64::from(owed.count_ones());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::churn::ChurnResult;
    use crate::scenario::fanout::FanoutResult;

    #[test]
    fn a_delivery_out_of_sender_order_is_a_problem() {
        let accounting = Accounting {
            out_of_sender_order: 2,
            sent_regressions: 3,
            ..Accounting::default()
        };
        let mut problems = Vec::new();
        accounting.note_problems(&mut problems);
        assert_eq!(problems, ["2 deliveries out of sender order"]);
    }

    #[test]
    fn the_reports_keep_the_keys_the_scripts_read() {
        // `fanout`'s accounting sits at the top of its part, `churn`'s in its `messages`.
        let fanout = serde_json::to_value(FanoutResult::default()).expect("serializes");
        let churn = serde_json::to_value(ChurnResult {
            messages: Some(Default::default()),
            ..ChurnResult::default()
        })
        .expect("serializes");
        let keys = [
            "sent",
            "acks_by_code",
            "lost",
            "out_of_sender_order",
            "recv_frames",
            "delivery_latency",
        ];
        for (part, json) in [("fanout", &fanout), ("churn.messages", &churn["messages"])] {
            for key in keys.iter().chain(&["recv_per_sec"]) {
                assert!(json.get(key).is_some(), "no {key} in {part}: {json}");
            }
            assert!(json.get("accounting").is_none(), "{part} nests the accounting");
        }
        assert!(churn["messages"].get("checked_sockets").is_some());
    }

    #[test]
    fn checks_owed_deliveries_only() {
        // Acked with code 0: seqs 0..70 except 5; got: 0..70 except 66, plus 5.
        let mut ok = vec![0u64; 2];
        let mut got = vec![0u64; 2];
        for seq in 0..70u64 {
            let (w, b) = ((seq / 64) as usize, seq % 64);
            if seq != 5 {
                ok[w] |= 1 << b;
            }
            if seq != 66 {
                got[w] |= 1 << b;
            }
        }
        let c = check(&ok, &got, 10);
        assert_eq!(
            c,
            Check {
                expected: 60,
                delivered: 59,
                lost: 1,
                unchecked: 9,
                unexpected: 1,
            }
        );
        assert_eq!(check(&ok, &got, 0).expected, 69);
        assert_eq!(check(&ok, &got, 200).expected, 0);
        // A socket that got nothing lost everything owed.
        assert_eq!(check(&ok, &[], 64).lost, 6);
    }
}
