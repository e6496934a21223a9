//! One socket's task: it reads every frame (answering pings at once) and, for a sender, keeps
//! its window of unacknowledged messages full, all in a single loop with no per-frame
//! allocation. Statistics stay in the task and are handed back when it ends; the shared atomic
//! counters (for the progress line and the coordinator) are bumped once per read, not per frame.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::connect::Conn;
use crate::histogram::Histogram;
use crate::ids::MsgId;
use crate::wire::{self, Frame, Server, WireError, WriteBuf, OP_PONG, OP_TEXT};

mod stats;

use stats::*;
pub(crate) use stats::{words_per_sender, Outcome, Received, ReceivedTotals, Sent, SentTotals};

/// Running totals over all sockets, read by the progress line and the coordinator.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Sockets whose task is running.
    pub(crate) open: AtomicU64,
    /// `msg` frames written.
    pub(crate) sent: AtomicU64,
    /// `send` acks received (any code).
    pub(crate) acked: AtomicU64,
    /// `recv` frames received.
    pub(crate) recv: AtomicU64,
    /// First deliveries of this run's messages to a member of their room.
    pub(crate) fresh: AtomicU64,
}

/// A run's context, shared by its coordinator and every socket task: the run's identity (epoch
/// and uuid tag), the rooms' shape the receivers attribute deliveries by, the start and stop
/// signals, and the running counters the coordinator and the progress line read.
#[derive(Debug)]
pub(crate) struct RunContext {
    /// The run's epoch: send instants are nanoseconds since it.
    pub(crate) epoch: Instant,
    /// The run's random tag, the first 32 bits of every uuid.
    pub(crate) run: u32,
    /// Member sockets per room.
    pub(crate) members: u64,
    /// Senders per room (the first members).
    pub(crate) senders: u64,
    /// Messages per sender.
    pub(crate) messages: u64,
    /// Whether receivers record every (sender, seq) they get (fan-out) or only count frames.
    pub(crate) track: bool,
    /// Cancelled when senders may start.
    pub(crate) start: CancellationToken,
    /// Cancelled when every task must close its socket and return.
    pub(crate) stop: CancellationToken,
    /// See [`Counters`].
    pub(crate) counters: Counters,
    /// Senders that have not finished yet.
    pub(crate) senders_left: AtomicU64,
    /// Deliveries expected so far: each finished sender adds its code-0 acks times the other
    /// members of its room.
    pub(crate) expected: AtomicU64,
    /// Notified whenever a sender finishes.
    pub(crate) sender_done: Notify,
}

impl RunContext {
    /// A run's context, its epoch now: rooms of `members` sockets, the first `senders` of
    /// which send `messages` each; receivers record every delivery if `track`.
    pub(crate) fn new(members: u64, senders: u64, messages: u64, track: bool) -> RunContext {
        RunContext {
            epoch: Instant::now(),
            run: rand::random(),
            members,
            senders,
            messages,
            track,
            start: CancellationToken::new(),
            stop: CancellationToken::new(),
            counters: Counters::default(),
            senders_left: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            sender_done: Notify::new(),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// What one sender does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendPlan {
    /// Most unacknowledged messages.
    pub(crate) window: u32,
    /// Text size in bytes (at least 16).
    pub(crate) size: usize,
    /// Messages per second, if paced.
    pub(crate) rate: Option<f64>,
    /// Give up when no ack arrives for this long while messages are in flight.
    pub(crate) ack_timeout: Duration,
}

/// Who a socket is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Role {
    /// Index over all sockets of the run (encoded in the uuids it sends).
    pub(crate) global: u32,
    /// Index of its room in the run.
    pub(crate) room_index: u32,
    /// Index among its room's members; senders are the first ones.
    pub(crate) member: u32,
    /// The room's id on the server.
    pub(crate) room_id: u64,
    /// Set for senders.
    pub(crate) send: Option<SendPlan>,
}

/// Why a socket's task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum End {
    /// The run told it to stop (the normal end).
    Stopped,
    /// The server sent a close frame with this code.
    ServerClose(Option<u16>),
    /// The server closed the TCP connection without a close frame.
    Eof,
    /// A read or write failed.
    Io,
    /// The server's bytes were not valid WebSocket frames.
    Wire,
}

/// A sender's state: a pre-built `msg` frame patched in place per message, and a ring of send
/// instants for the messages in flight.
struct Sender {
    plan: SendPlan,
    template: Vec<u8>,
    uuid_at: usize,
    text_at: usize,
    next: u64,
    total: u64,
    in_flight: u32,
    /// (seq, send instant in ns) by `seq % len`; a slot overwritten before its ack only loses
    /// that ack's latency sample.
    ring: Vec<(u64, u64)>,
    acked: Vec<u64>,
    stats: Sent,
    last_progress: Instant,
    paced_from: Option<Instant>,
    /// A paced sender's offset within its period, so that paced senders spread out over the
    /// period instead of all sending at its start (a burst every period).
    phase: Duration,
    finished: bool,
}

impl Sender {
    fn new(plan: SendPlan, room_id: u64, total: u64, global: u32) -> Sender {
        let uuid = "0".repeat(36);
        let mut text = "0".repeat(16);
        text.push_str(&"x".repeat(plan.size.saturating_sub(16)));
        let template = format!(
            r#"{{"type":"msg","uuid":"{uuid}","room":{room_id},"data":{{"type":"Text","text":"{text}"}}}}"#
        )
        .into_bytes();
        let uuid_at = r#"{"type":"msg","uuid":""#.len();
        let text_at = template.len() - text.len() - 3;
        let ring_len = (plan.window as usize * 4).max(1024);
        let bits = total.div_ceil(64) as usize;
        Sender {
            plan,
            template,
            uuid_at,
            text_at,
            next: 0,
            total,
            in_flight: 0,
            ring: vec![(u64::MAX, 0); ring_len],
            acked: vec![0; bits],
            stats: Sent {
                ok: vec![0; bits],
                ..Sent::default()
            },
            last_progress: Instant::now(),
            paced_from: None,
            phase: plan.rate.map_or(Duration::ZERO, |rate| {
                // Golden-ratio spacing: evenly spread whatever the number of senders.
                let fraction = (f64::from(global) * 0.618_033_988_749_895).fract();
                Duration::from_secs_f64(fraction / rate)
            }),
            finished: false,
        }
    }

    /// Appends as many `msg` frames as the window (and the pace) allow. Returns how many, and
    /// when the pace allows the next one if that is what stopped it.
    fn fill(
        &mut self,
        out: &mut WriteBuf,
        ctx: &RunContext,
        me: &Role,
        now: Instant,
    ) -> (u64, Option<Instant>) {
        let mut written = 0;
        let paced_from = *self.paced_from.get_or_insert(now + self.phase);
        while self.in_flight < self.plan.window && self.next < self.total {
            if let Some(rate) = self.plan.rate {
                let due = paced_from + Duration::from_secs_f64(self.next as f64 / rate);
                if due > now {
                    return (written, Some(due));
                }
            }
            let seq = self.next;
            let mut uuid = [0u8; 36];
            MsgId {
                run: ctx.run,
                socket: me.global,
                seq,
            }
            .write(&mut uuid);
            let now_ns = ctx.now_ns();
            self.template[self.uuid_at..self.uuid_at + 36].copy_from_slice(&uuid);
            let digits = format_hex16(now_ns);
            self.template[self.text_at..self.text_at + 16].copy_from_slice(&digits);
            out.frame(OP_TEXT, &self.template);
            let slot = (seq % self.ring.len() as u64) as usize;
            self.ring[slot] = (seq, now_ns);
            self.next += 1;
            self.in_flight += 1;
            written += 1;
        }
        if written > 0 && self.in_flight == written as u32 {
            // The window was empty: the ack timeout counts from now.
            self.last_progress = now;
        }
        self.stats.sent = self.next;
        (written, None)
    }

    fn on_ack(
        &mut self,
        ctx: &RunContext,
        me: &Role,
        code: u64,
        uuid: &[u8],
        now: Instant,
        now_ns: u64,
    ) -> bool {
        let Some(id) =
            MsgId::read(uuid).filter(|id| id.run == ctx.run && id.socket == me.global && id.seq < self.next)
        else {
            self.stats.bad_acks += 1;
            return false;
        };
        if bit_test_and_set(&mut self.acked, id.seq) != Some(false) {
            self.stats.duplicate_acks += 1;
            return false;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        self.stats.acked += 1;
        self.stats.codes[code.min(7) as usize] += 1;
        self.stats.last_ack_ns = now_ns;
        self.last_progress = now;
        if code == 0 {
            bit_test_and_set(&mut self.stats.ok, id.seq);
            let (seq, at) = self.ring[(id.seq % self.ring.len() as u64) as usize];
            if seq == id.seq {
                self.stats.ack.record(now_ns.saturating_sub(at));
            }
        }
        true
    }

    /// Whether every message was sent and answered, or acks stopped coming.
    fn check_done(&mut self, now: Instant) -> bool {
        if self.finished {
            return false;
        }
        if self.next == self.total && self.in_flight == 0 {
            self.finished = true;
        } else if self.in_flight > 0 && now.duration_since(self.last_progress) >= self.plan.ack_timeout {
            self.stats.timed_out = true;
            self.finished = true;
        }
        self.finished
    }

    /// Tells the coordinator this sender is done and how many deliveries it is owed.
    fn report_finished(&self, ctx: &RunContext) {
        ctx.expected
            .fetch_add(self.stats.codes[0] * (ctx.members - 1), Ordering::AcqRel);
        ctx.senders_left.fetch_sub(1, Ordering::AcqRel);
        ctx.sender_done.notify_one();
    }

    fn into_stats(mut self) -> Sent {
        self.stats.unacked = u64::from(self.in_flight);
        self.stats
    }
}

fn format_hex16(value: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = HEX[(value >> (60 - 4 * i)) as usize & 0xF];
    }
    out
}

/// Per-read deltas for the shared counters.
#[derive(Default)]
struct Batch {
    recv: u64,
    fresh: u64,
    acked: u64,
}

/// Runs one socket until the run stops it or the connection ends.
pub(crate) async fn drive(conn: Conn, role: Role, ctx: Arc<RunContext>) -> Outcome {
    let stop = ctx.stop.clone();
    drive_until(conn, role, ctx, stop).await
}

/// [`drive`], stopped by `stop` (for a socket closed on its own, a child of `ctx.stop`).
pub(crate) async fn drive_until(
    mut conn: Conn,
    role: Role,
    ctx: Arc<RunContext>,
    stop: CancellationToken,
) -> Outcome {
    ctx.counters.open.fetch_add(1, Ordering::Relaxed);
    let mut received = Received::new(&ctx);
    let mut sender = role
        .send
        .map(|plan| Sender::new(plan, role.room_id, ctx.messages, role.global));
    let mut started = ctx.start.is_cancelled();
    let start = ctx.start.cancelled();
    let stop = stop.cancelled();
    let pace = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(start, stop, pace);
    let mut pace_armed = false;
    // Senders wake up now and then to notice a missing ack; other sockets need no timer.
    let check_every = role.send.map_or(Duration::from_secs(3600), |plan| {
        (plan.ack_timeout / 8).max(Duration::from_millis(50))
    });
    let mut check = tokio::time::interval(check_every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let end = loop {
        if let Some(active) = sender.as_mut().filter(|s| started && !s.finished) {
            let now = Instant::now();
            let (written, due) = active.fill(&mut conn.writer, &ctx, &role, now);
            ctx.counters.sent.fetch_add(written, Ordering::Relaxed);
            pace_armed = false;
            if let Some(due) = due {
                pace.as_mut().reset(due.into());
                pace_armed = true;
            }
            if active.check_done(now) {
                active.report_finished(&ctx);
            }
        }
        if !conn.writer.buf.is_empty() {
            if conn.stream.write_all(&conn.writer.buf).await.is_err() {
                break End::Io;
            }
            conn.writer.buf.clear();
        }
        let sending = sender.as_ref().is_some_and(|s| started && !s.finished);
        tokio::select! {
            biased;
            _ = &mut stop => break End::Stopped,
            _ = &mut start, if !started => started = true,
            read = conn.stream.read(conn.reader.spare()) => {
                match read {
                    Ok(0) => break End::Eof,
                    Ok(n) => conn.reader.filled(n),
                    Err(_) => break End::Io,
                }
                let now = Instant::now();
                let now_ns = ctx.now_ns();
                let mut batch = Batch::default();
                let outcome = read_frames(&mut conn, &ctx, &role, &mut received, sender.as_mut(), &mut batch, now, now_ns);
                let counters = &ctx.counters;
                if batch.recv > 0 {
                    counters.recv.fetch_add(batch.recv, Ordering::Relaxed);
                }
                if batch.fresh > 0 {
                    counters.fresh.fetch_add(batch.fresh, Ordering::Relaxed);
                }
                if batch.acked > 0 {
                    counters.acked.fetch_add(batch.acked, Ordering::Relaxed);
                }
                if let Err(end) = outcome {
                    break end;
                }
            }
            _ = &mut pace, if pace_armed => pace_armed = false,
            _ = check.tick(), if sending => {}
        }
    };
    if let Some(active) = sender.as_mut().filter(|s| !s.finished && end != End::Stopped) {
        // The connection died: this sender is done, with what it has.
        active.finished = true;
        active.report_finished(&ctx);
    }
    if end == End::Stopped {
        // A polite close; the server's answer is not awaited.
        conn.writer.buf.clear();
        conn.writer.close(1000);
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.stream.write_all(&conn.writer.buf)).await;
    }
    drop(conn);
    ctx.counters.open.fetch_sub(1, Ordering::Relaxed);
    Outcome {
        role,
        end,
        received,
        sent: sender.map(Sender::into_stats),
    }
}

/// Handles every complete frame in the read buffer.
#[allow(clippy::too_many_arguments)]
#[inline]
fn read_frames(
    conn: &mut Conn,
    ctx: &RunContext,
    role: &Role,
    received: &mut Received,
    mut sender: Option<&mut Sender>,
    batch: &mut Batch,
    now: Instant,
    now_ns: u64,
) -> Result<(), End> {
    loop {
        let frame = match conn.reader.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(WireError::Protocol(_) | WireError::Fragmented | WireError::TooLarge) => {
                return Err(End::Wire)
            }
        };
        match frame {
            Frame::Text(payload) => match wire::classify(payload) {
                Server::Recv { uuid, text, sent } => {
                    batch.recv += 1;
                    if received.on_recv(ctx, role, uuid, text, sent, now_ns) {
                        batch.fresh += 1;
                    }
                }
                Server::Send { code, uuid } => match sender.as_deref_mut() {
                    Some(sender) => {
                        if sender.on_ack(ctx, role, code, uuid, now, now_ns) {
                            batch.acked += 1;
                        }
                    }
                    None => received.stray_acks += 1,
                },
                Server::Auth { .. } | Server::Other => received.other += 1,
                Server::Malformed => received.malformed += 1,
            },
            Frame::Ping(payload) => conn.writer.frame(OP_PONG, payload),
            Frame::Pong => {}
            Frame::Binary => received.other += 1,
            Frame::Close(code) => return Err(End::ServerClose(code)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_msg_template_is_the_protocol_frame() {
        let plan = SendPlan {
            window: 1,
            size: 20,
            rate: None,
            ack_timeout: Duration::from_secs(1),
        };
        let mut sender = Sender::new(plan, 42, 3, 0);
        let digits = format_hex16(0x1234);
        sender.template[sender.text_at..sender.text_at + 16].copy_from_slice(&digits);
        let value: serde_json::Value = serde_json::from_slice(&sender.template).unwrap_or_default();
        assert_eq!(value["type"], "msg");
        assert_eq!(value["room"], 42);
        assert_eq!(value["data"]["type"], "Text");
        assert_eq!(value["data"]["text"], "0000000000001234xxxx");
        assert_eq!(value["uuid"].as_str().map(str::len), Some(36));
        assert_eq!(
            &sender.template[sender.uuid_at..sender.uuid_at + 36],
            "0".repeat(36).as_bytes()
        );
    }
}
