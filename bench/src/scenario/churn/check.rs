//! The delivery check: which of its room's messages each socket open to the end was owed (the
//! check itself is the shared `scenario::accounting`), and what every socket's and sender's
//! outcome adds up to (`ChurnMessages`).

use std::collections::BTreeMap;

use crate::cli::ChurnArgs;
use crate::scenario::accounting::{check, Accounting};
use crate::socket::{Outcome, ReceivedTotals, SentTotals};

use super::population::Survivor;
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
    survivors: &[Survivor],
    tally: &Tally,
    churn_secs: f64,
) -> ChurnMessages {
    let mut totals = SentTotals::new(per_room);
    let mut ok: Vec<&[u64]> = vec![&[][..]; rooms as usize];
    for outcome in senders {
        let Some(sent) = &outcome.sent else { continue };
        totals.add(sent);
        ok[outcome.role.room_index as usize] = &sent.ok;
    }
    let mut m = ChurnMessages {
        msg_rate: args.msg_rate,
        per_room,
        accounting: Accounting::new(&totals, rooms, &tally.received),
        recv_per_sec: tally.received.frames as f64 / churn_secs.max(1e-9),
        ..ChurnMessages::default()
    };
    for (room, auth_ns, got) in survivors {
        let first = first_owed_seq(start_ns, args.msg_rate, *auth_ns);
        let c = check(ok[*room as usize], got, first);
        m.checked_sockets += 1;
        m.unchecked += c.unchecked;
        m.accounting.add_check(&c);
    }
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
}
