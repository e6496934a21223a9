//! The delivery check: which of its room's messages each socket open to the end was owed and
//! which it got, and what every socket's and sender's outcome adds up to (`ChurnMessages`).

use std::collections::BTreeMap;

use crate::cli::ChurnArgs;
use crate::histogram::Histogram;
use crate::report::acks_by_code;
use crate::socket::{Outcome, ReceivedTotals};

use super::result::ChurnMessages;

/// A message is owed to a socket only if its send was scheduled at least this long after the
/// socket's `auth` answer was read; the margin absorbs rounding in the pacing arithmetic.
const OWED_MARGIN_NS: u64 = 1_000_000;

/// The first sequence number owed to a socket whose `auth` answer was read at `auth_ns`: the
/// sender schedules message `seq` at `start_ns + seq / rate` seconds and never writes it before
/// (it starts pacing at or after `start_ns`), so every message from this one on was written
/// after the socket was authenticated.
fn first_owed_seq(start_ns: u64, rate: f64, auth_ns: u64) -> u64 {
    let after = (auth_ns + OWED_MARGIN_NS).saturating_sub(start_ns);
    (after as f64 * rate / 1e9).ceil() as u64
}

/// The check of one socket: which of its room's messages it was owed and which it got.
#[derive(Debug, Default, PartialEq, Eq)]
struct Check {
    expected: u64,
    delivered: u64,
    lost: u64,
    unchecked: u64,
    unexpected: u64,
}

/// Compares `got` (bit `seq` = delivered) against `ok` (bit `seq` = acked with code 0); only
/// sequence numbers from `first` on are owed.
fn check(ok: &[u64], got: &[u64], first: u64) -> Check {
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

/// What every socket's outcome adds up to.
#[derive(Default)]
pub(super) struct Tally {
    /// Sockets by end reason.
    pub(super) ends: BTreeMap<String, u64>,
    received: ReceivedTotals,
}

impl Tally {
    pub(super) fn add(&mut self, outcome: &Outcome) {
        *self
            .ends
            .entry(crate::scenario::end_key(outcome.end))
            .or_insert(0) += 1;
        self.received.add(&outcome.received);
    }
}

/// Adds up the senders' outcomes and checks every survivor against its room's code-0 acks.
#[allow(clippy::too_many_arguments)]
pub(super) fn account_messages(
    args: &ChurnArgs,
    rooms: u64,
    per_room: u64,
    start_ns: u64,
    senders: &[Outcome],
    survivors: &[(u32, u64, Vec<u64>)],
    tally: &Tally,
    churn_secs: f64,
) -> ChurnMessages {
    let mut m = ChurnMessages {
        msg_rate: args.msg_rate,
        per_room,
        ..ChurnMessages::default()
    };
    let mut codes = [0u64; 8];
    let mut ack = Histogram::default();
    let mut ok: Vec<&[u64]> = vec![&[][..]; rooms as usize];
    for outcome in senders {
        let Some(sent) = &outcome.sent else { continue };
        m.sent += sent.sent;
        m.acked += sent.acked;
        m.unacked += sent.unacked + (per_room - sent.sent);
        m.senders_timed_out += u64::from(sent.timed_out);
        m.malformed_or_other += sent.bad_acks + sent.duplicate_acks;
        for (all, code) in codes.iter_mut().zip(sent.codes) {
            *all += code;
        }
        ack.merge(&sent.ack);
        ok[outcome.role.room_index as usize] = &sent.ok;
    }
    // Senders whose socket never opened sent nothing.
    m.unacked += (rooms - senders.len() as u64) * per_room;
    m.acks_by_code = acks_by_code(&codes);
    m.ack_latency = ack.summary();
    for (room, auth_ns, got) in survivors {
        let first = first_owed_seq(start_ns, args.msg_rate, *auth_ns);
        let c = check(ok[*room as usize], got, first);
        m.checked_sockets += 1;
        m.expected += c.expected;
        m.delivered += c.delivered;
        m.lost += c.lost;
        m.unchecked += c.unchecked;
        m.unexpected += c.unexpected;
    }
    let received = &tally.received;
    m.recv_frames = received.frames;
    m.recv_per_sec = received.frames as f64 / churn_secs.max(1e-9);
    m.delivery_latency = received.e2e.summary();
    m.duplicates = received.duplicates;
    m.foreign = received.foreign;
    m.echoed_to_sender = received.own;
    m.out_of_sender_order = received.out_of_sender_order;
    m.malformed_or_other += received.malformed_or_other;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owed_messages_start_after_the_auth() {
        // 10 msg/s from t = 1 s: seq n is scheduled at 1 s + n x 100 ms.
        let start = 1_000_000_000;
        assert_eq!(first_owed_seq(start, 10.0, 0), 0);
        assert_eq!(first_owed_seq(start, 10.0, start - OWED_MARGIN_NS), 0);
        assert_eq!(first_owed_seq(start, 10.0, start), 1);
        // Authenticated at 1.25 s: seq 3 (1.3 s) is the first owed.
        assert_eq!(first_owed_seq(start, 10.0, start + 250_000_000), 3);
        // Authenticated just before seq 3's slot, within the margin: not owed.
        assert_eq!(first_owed_seq(start, 10.0, start + 299_500_000), 4);
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
