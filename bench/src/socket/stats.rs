//! What sockets count: the frames received (which messages, from whom, how late), the
//! messages sent and acknowledged, and the outcome handed back when a socket's task ends.

use super::*;

/// What one socket received.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// `recv` frames, all of them.
    pub(crate) frames: u64,
    /// Per sender of the room (by member index), `words_per_sender(messages)` words whose bit
    /// `seq` is set once that message arrived (fan-out only).
    pub(crate) got: Vec<u64>,
    /// Deliveries of a message already received.
    pub(crate) duplicates: u64,
    /// Deliveries of messages this run did not send to this socket's room.
    pub(crate) foreign: u64,
    /// Deliveries of this very socket's own messages (the server must exclude the sender).
    pub(crate) own: u64,
    /// A message arrived after a later one of the same sender.
    pub(crate) out_of_sender_order: u64,
    /// A message's `sent` was earlier than the previous delivery's.
    pub(crate) sent_regressions: u64,
    /// Frames the bench could not read (`recv` without uuid, text prefix or `sent`, ...).
    pub(crate) malformed: u64,
    /// `auth`, `error` and other frames after auth.
    pub(crate) other: u64,
    /// `send` frames on a socket that sent nothing.
    pub(crate) stray_acks: u64,
    /// End-to-end latency of first deliveries.
    pub(crate) e2e: Histogram,
    /// When the last `recv` arrived (ns since the epoch); 0 if none did.
    pub(crate) last_ns: u64,
    last_seq: Vec<u64>,
    last_sent: Vec<u8>,
}

/// What many sockets received, added up (see [`Received`]).
#[derive(Debug, Default)]
pub(crate) struct ReceivedTotals {
    /// `recv` frames.
    pub(crate) frames: u64,
    /// Deliveries of a message already received.
    pub(crate) duplicates: u64,
    /// Deliveries of messages this run did not send to the socket's room.
    pub(crate) foreign: u64,
    /// Deliveries back to the sending socket.
    pub(crate) own: u64,
    /// Deliveries after a later message of the same sender.
    pub(crate) out_of_sender_order: u64,
    /// Deliveries whose `sent` was earlier than the previous delivery's.
    pub(crate) sent_regressions: u64,
    /// Unreadable frames, other frames after auth and stray acks.
    pub(crate) malformed_or_other: u64,
    /// End-to-end latency of first deliveries.
    pub(crate) e2e: Histogram,
    /// When the last `recv` arrived (ns since the epoch); 0 if none did.
    pub(crate) last_ns: u64,
}

impl ReceivedTotals {
    /// Adds one socket's.
    pub(crate) fn add(&mut self, received: &Received) {
        self.frames += received.frames;
        self.duplicates += received.duplicates;
        self.foreign += received.foreign;
        self.own += received.own;
        self.out_of_sender_order += received.out_of_sender_order;
        self.sent_regressions += received.sent_regressions;
        self.malformed_or_other += received.malformed + received.other + received.stray_acks;
        self.e2e.merge(&received.e2e);
        self.last_ns = self.last_ns.max(received.last_ns);
    }
}

/// What one sender sent.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    /// `msg` frames written.
    pub(crate) sent: u64,
    /// Acks received (any code).
    pub(crate) acked: u64,
    /// Acks by code (7 = 7 or above).
    pub(crate) codes: [u64; 8],
    /// Bit `seq` is set once `seq` was acked with code 0.
    pub(crate) ok: Vec<u64>,
    /// Latency of code-0 acks.
    pub(crate) ack: Histogram,
    /// Messages still unacknowledged when the sender finished or was stopped.
    pub(crate) unacked: u64,
    /// Whether the sender gave up waiting for acks (--ack-timeout).
    pub(crate) timed_out: bool,
    /// Acks for a message already acked.
    pub(crate) duplicate_acks: u64,
    /// Acks naming a uuid this sender did not send.
    pub(crate) bad_acks: u64,
    /// When the last ack arrived (ns since the epoch).
    pub(crate) last_ack_ns: u64,
}

/// What many senders sent, added up (see [`Sent`]).
#[derive(Debug, Default)]
pub(crate) struct SentTotals {
    /// Messages each sender was to send: those it never wrote count as unacked.
    messages: u64,
    /// Senders added.
    pub(crate) senders: u64,
    /// `msg` frames written.
    pub(crate) sent: u64,
    /// Acks received (any code).
    pub(crate) acked: u64,
    /// Acks by code (7 = 7 or above).
    pub(crate) codes: [u64; 8],
    /// Messages unacknowledged when their sender finished, or never written.
    pub(crate) unacked: u64,
    /// Senders that gave up waiting for acks (--ack-timeout).
    pub(crate) timed_out: u64,
    /// Acks naming a uuid their sender did not send, or a message already acked.
    pub(crate) bad_acks: u64,
    /// Latency of code-0 acks.
    pub(crate) ack: Histogram,
    /// When the last ack arrived (ns since the epoch); 0 if none did.
    pub(crate) last_ack_ns: u64,
}

impl SentTotals {
    /// No sender yet; each is to send `messages`.
    pub(crate) fn new(messages: u64) -> SentTotals {
        SentTotals {
            messages,
            ..SentTotals::default()
        }
    }

    /// Adds one sender's.
    pub(crate) fn add(&mut self, sent: &Sent) {
        self.senders += 1;
        self.sent += sent.sent;
        self.acked += sent.acked;
        for (all, code) in self.codes.iter_mut().zip(sent.codes) {
            *all += code;
        }
        self.unacked += sent.unacked + self.messages.saturating_sub(sent.sent);
        self.timed_out += u64::from(sent.timed_out);
        self.bad_acks += sent.bad_acks + sent.duplicate_acks;
        self.ack.merge(&sent.ack);
        self.last_ack_ns = self.last_ack_ns.max(sent.last_ack_ns);
    }

    /// Messages of `planned` senders never acknowledged: the added senders' unacked ones and
    /// every message of the senders that never reported (their socket never opened).
    pub(crate) fn unacked_of(&self, planned: u64) -> u64 {
        self.unacked + planned.saturating_sub(self.senders) * self.messages
    }
}

/// A finished socket task's report.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Who it was.
    pub(crate) role: Role,
    /// Why it ended.
    pub(crate) end: End,
    /// What it received.
    pub(crate) received: Received,
    /// What it sent, for senders.
    pub(crate) sent: Option<Sent>,
}

/// Words of a per-sender bitmap of `messages` bits.
pub(crate) fn words_per_sender(messages: u64) -> u64 {
    messages.div_ceil(64)
}

#[inline]
pub(super) fn bit_test_and_set(bits: &mut [u64], index: u64) -> Option<bool> {
    let word = bits.get_mut((index / 64) as usize)?;
    let mask = 1u64 << (index % 64);
    let was = *word & mask != 0;
    *word |= mask;
    Some(was)
}

impl Received {
    pub(super) fn new(ctx: &RunContext) -> Received {
        let mut received = Received::default();
        if ctx.track {
            received.got = vec![0; (ctx.senders * words_per_sender(ctx.messages)) as usize];
            received.last_seq = vec![u64::MAX; ctx.senders as usize];
        }
        received
    }

    /// Counts one `recv`; returns whether it was a first delivery of a message of the room.
    #[inline]
    pub(super) fn on_recv(
        &mut self,
        ctx: &RunContext,
        me: &Role,
        uuid: &[u8],
        text: &[u8],
        sent: &[u8],
        now_ns: u64,
    ) -> bool {
        self.frames += 1;
        self.last_ns = now_ns;
        if !ctx.track {
            return false;
        }
        let Some(id) = MsgId::read(uuid).filter(|id| id.run == ctx.run) else {
            self.foreign += 1;
            return false;
        };
        let socket = u64::from(id.socket);
        let (room_index, member) = (socket / ctx.members, socket % ctx.members);
        if room_index != u64::from(me.room_index) || member >= ctx.senders || id.seq >= ctx.messages {
            self.foreign += 1;
            return false;
        }
        if id.socket == me.global {
            self.own += 1;
        }
        match bit_test_and_set(
            &mut self.got,
            member * words_per_sender(ctx.messages) * 64 + id.seq,
        ) {
            Some(false) => {}
            Some(true) => {
                self.duplicates += 1;
                return false;
            }
            None => {
                self.foreign += 1;
                return false;
            }
        }
        match wire::hex_u64(text) {
            Some(at) => self.e2e.record(now_ns.saturating_sub(at)),
            None => self.malformed += 1,
        }
        let last = &mut self.last_seq[member as usize];
        if *last != u64::MAX && id.seq < *last {
            self.out_of_sender_order += 1;
        } else {
            *last = id.seq;
        }
        // RFC 3339 with a fixed offset and nine fractional digits orders like its bytes.
        if sent < self.last_sent.as_slice() {
            self.sent_regressions += 1;
        }
        self.last_sent.clear();
        self.last_sent.extend_from_slice(sent);
        true
    }
}
