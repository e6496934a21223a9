//! `churn`: a population of authenticated sockets of which --rate per second are closed and
//! replaced by new ones (TCP connect + upgrade + auth), optionally while a paced sender per room
//! keeps messages flowing. Measures the reconnect rate achieved, connect latency, failures by
//! cause and the server's RSS before and after the churn, and checks the deliveries owed to
//! every socket still open at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::{ChurnArgs, Common, Pick, MAX_TOTAL_MESSAGES};
use crate::connect::{self, Conn, Dial, Target};
use crate::histogram::{Histogram, Summary};
use crate::ids;
use crate::procfs::{self, CpuMark, Settled};
use crate::progress::{self, human_rate, Phase};
use crate::report::{bytes, note_counts, refused_acks, Report};
use crate::setup::Api;
use crate::socket::{self, words_per_sender, Counters, End, Outcome, Role, SendPlan, Shared};

/// Unacknowledged messages a room's sender keeps in flight at most.
const WINDOW: u32 = 64;
/// Text size of the senders' messages in bytes.
const SIZE: usize = 64;
/// A message is owed to a socket only if its send was scheduled at least this long after the
/// socket's `auth` answer was read; the margin absorbs rounding in the pacing arithmetic.
const OWED_MARGIN_NS: u64 = 1_000_000;
/// Most memory the run may hold in delivery bitmaps (sockets x messages per room / 8).
const MAX_BITMAP_BYTES: u64 = 512 << 20;
/// RSS growth over the churn within this many bytes plus [`RSS_TOLERANCE_SHARE`] of the start
/// RSS is allocator noise; beyond it the summary says so (a note, not a problem).
const RSS_TOLERANCE_BYTES: u64 = 2 << 20;
/// See [`RSS_TOLERANCE_BYTES`].
const RSS_TOLERANCE_SHARE: f64 = 0.05;
/// The drain ends once no `recv` arrived for this long.
const QUIET: Duration = Duration::from_millis(250);
/// The `slot` of a sender's socket (senders are not churned).
const SENDER: usize = usize::MAX;

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
    /// From writing a `msg` frame to reading its code-0 `send`.
    pub(crate) ack_latency: Summary,
    /// `recv` frames received by every socket, churned ones included.
    pub(crate) recv_frames: u64,
    /// `recv_frames` / the churn's length.
    pub(crate) recv_per_sec: f64,
    /// From writing a `msg` frame to reading its `recv` (first copies, every socket).
    pub(crate) delivery_latency: Summary,
    /// Sockets open from their `auth` to the end, whose deliveries were checked.
    pub(crate) checked_sockets: u64,
    /// Deliveries owed to the checked sockets: every code-0 message of the room scheduled
    /// after the socket's `auth` answer.
    pub(crate) expected: u64,
    /// Owed deliveries that arrived.
    pub(crate) delivered: u64,
    /// Owed deliveries that never arrived.
    pub(crate) lost: u64,
    /// Deliveries of code-0 messages scheduled before the socket's `auth` (allowed, not owed).
    pub(crate) unchecked: u64,
    /// Deliveries of messages whose ack was not code 0 (checked sockets).
    pub(crate) unexpected: u64,
    /// Deliveries of a message the socket already had (every socket).
    pub(crate) duplicates: u64,
    /// Deliveries of messages this run did not send to that room (every socket).
    pub(crate) foreign: u64,
    /// Deliveries back to the sending socket.
    pub(crate) echoed_to_sender: u64,
    /// Deliveries that came after a later message of the same sender.
    pub(crate) out_of_sender_order: u64,
    /// Frames the bench could not read, plus unexpected `send`/`auth`/`error` frames.
    pub(crate) malformed_or_other: u64,
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
        let lat = &self.connect_latency;
        let _ = writeln!(
            out,
            "reconnect      p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  (TCP connect to auth ok)",
            ms(lat.p50_us),
            ms(lat.p99_us),
            ms(lat.p999_us),
            ms(lat.max_us)
        );
        if !self.failures.is_empty() {
            let causes: Vec<String> = self.failures.iter().map(|(c, n)| format!("{c} {n}")).collect();
            let _ = writeln!(out, "failures       {}", causes.join(", "));
        }
        if let Some(m) = &self.messages {
            let _ = writeln!(
                out,
                "messages       {}/s per room: sent {}, acked {} ({}), unacked {}, ack p99 {:.3} ms",
                m.msg_rate,
                m.sent,
                m.acked,
                m.acks_by_code
                    .iter()
                    .map(|(code, n)| format!("{code}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                m.unacked,
                ms(m.ack_latency.p99_us)
            );
            let _ = writeln!(
                out,
                "delivery       p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms; {} recv ({} recv/s)",
                ms(m.delivery_latency.p50_us),
                ms(m.delivery_latency.p99_us),
                ms(m.delivery_latency.p999_us),
                ms(m.delivery_latency.max_us),
                m.recv_frames,
                human_rate(m.recv_per_sec)
            );
            let _ = writeln!(
                out,
                "check          {} sockets open to the end: owed {}, delivered {}, lost {}, unexpected {} (+{} unowed)",
                m.checked_sockets, m.expected, m.delivered, m.lost, m.unexpected, m.unchecked
            );
            let _ = writeln!(
                out,
                "all sockets    duplicates {}, foreign {}, echoed {}, out of sender order {}",
                m.duplicates, m.foreign, m.echoed_to_sender, m.out_of_sender_order
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

/// Which socket to replace next.
struct Picker {
    pick: Pick,
    next: usize,
    rng: u64,
}

impl Picker {
    fn new(pick: Pick, seed: u64) -> Picker {
        Picker {
            pick,
            next: 0,
            rng: seed | 1,
        }
    }

    /// A slot of `0..len` that is not `busy`, if any: in turn, or at random (falling back to
    /// the next free one in turn after a few busy draws).
    fn pick(&mut self, len: usize, busy: impl Fn(usize) -> bool) -> Option<usize> {
        if len == 0 {
            return None;
        }
        if self.pick == Pick::Random {
            for _ in 0..8 {
                // xorshift64
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let slot = (self.rng % len as u64) as usize;
                if !busy(slot) {
                    return Some(slot);
                }
            }
        }
        for _ in 0..len {
            let slot = self.next % len;
            self.next = (slot + 1) % len;
            if !busy(slot) {
                return Some(slot);
            }
        }
        None
    }
}

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

/// Who a socket task was: its population slot (or [`SENDER`]), its connection number and when
/// its `auth` answer was read (ns since the run's epoch).
#[derive(Debug, Clone, Copy)]
struct Meta {
    slot: usize,
    conn: u64,
    auth_ns: u64,
}

/// A population slot: the socket currently in it, if any.
struct Slot {
    stop: CancellationToken,
    /// The current socket's connection number; 0 while none is open.
    conn: u64,
    /// Whether a new socket is being dialled for it.
    dialling: bool,
}

/// A finished dial.
struct Dialled {
    slot: usize,
    conn: u64,
    result: Result<Conn>,
    latency: Duration,
}

/// What every socket's outcome adds up to.
#[derive(Default)]
struct Tally {
    ends: BTreeMap<String, u64>,
    recv_frames: u64,
    duplicates: u64,
    foreign: u64,
    own: u64,
    out_of_sender_order: u64,
    malformed_or_other: u64,
    delivery: Histogram,
}

impl Tally {
    fn add(&mut self, outcome: &Outcome) {
        *self.ends.entry(super::end_key(outcome.end)).or_insert(0) += 1;
        let received = &outcome.received;
        self.recv_frames += received.frames;
        self.duplicates += received.duplicates;
        self.foreign += received.foreign;
        self.own += received.own;
        self.out_of_sender_order += received.out_of_sender_order;
        self.malformed_or_other += received.malformed + received.other + received.stray_acks;
        self.delivery.merge(&received.e2e);
    }
}

/// Socket tasks, each handing back who it was with its outcome.
type Tasks = JoinSet<(Meta, Outcome)>;

fn spawn_socket(
    tasks: &mut Tasks,
    conn: Conn,
    role: Role,
    shared: &Arc<Shared>,
    meta: Meta,
    stop: CancellationToken,
) {
    let shared = shared.clone();
    tasks.spawn(async move { (meta, socket::drive_until(conn, role, shared, stop).await) });
}

/// Closes the socket in `slot` (its task writes a close frame and ends), if any, and dials
/// connection number `conn` in its place with one attempt, timed from its TCP connect.
fn replace(
    slot: &mut Slot,
    index: usize,
    conn: u64,
    target: &Arc<Target>,
    token: Arc<str>,
    dial: Dial,
    connecting: &mut JoinSet<Dialled>,
) {
    slot.stop.cancel();
    slot.conn = 0;
    slot.dialling = true;
    let target = target.clone();
    connecting.spawn(async move {
        let began = Instant::now();
        let result = connect::attempt(&target, conn, &token, dial).await;
        Dialled {
            slot: index,
            conn,
            result,
            latency: began.elapsed(),
        }
    });
}

/// Runs `churn`.
pub(crate) async fn run(common: &Common, args: &ChurnArgs) -> Result<Report> {
    let users = args.users.min(args.sockets);
    let rooms = args.rooms;
    if rooms > users {
        bail!("--rooms ({rooms}) cannot exceed the users ({users}): every room needs its own users");
    }
    let per_room = if rooms > 0 {
        (args.msg_rate * args.seconds as f64).ceil() as u64
    } else {
        0
    };
    if rooms * per_room > MAX_TOTAL_MESSAGES {
        bail!("--rooms x --msg-rate x --seconds exceeds the cap of {MAX_TOTAL_MESSAGES} messages");
    }
    if args.sockets * words_per_sender(per_room) * 8 > MAX_BITMAP_BYTES {
        bail!("--sockets x --msg-rate x --seconds is too large: the delivery bitmaps would exceed 512 MiB");
    }
    if rooms > u64::from(ids::MAX_SOCKET) {
        bail!("too many rooms for the uuid layout");
    }
    procfs::check_fd_budget(args.sockets + rooms + u64::from(common.connect_concurrency))?;
    if let Some(pid) = common.pid {
        procfs::rss_bytes(procfs::Proc::Pid(pid))
            .map_err(|err| anyhow!("--pid must be a running process on this machine: {err:#}"))?;
    }
    let target = Arc::new(connect::target(&common.url, common.source_addrs).await?);
    let api = Api::new(common.url.clone(), usize::from(common.setup_concurrency))?;
    eprintln!(
        "setup: {users} users, {rooms} rooms (prefix {}) on {}",
        api.prefix, target.addr
    );
    let setup_started = Instant::now();
    let (tokens, room_ids) = tokio::time::timeout(common.setup_timeout, async {
        let accounts = api.accounts(users).await?;
        // Users 0..rooms own one room each; every other user joins room `user % rooms`.
        let owners: Vec<_> = accounts.iter().take(rooms as usize).collect();
        let room_ids = api.create_rooms(&owners).await?;
        let joins: Vec<_> = accounts
            .iter()
            .enumerate()
            .skip(rooms as usize)
            .filter_map(|(i, account)| Some((account, *room_ids.get(i.checked_rem(room_ids.len())?)?)))
            .collect();
        api.join_all(&joins).await?;
        let tokens: Vec<Arc<str>> = accounts.into_iter().map(|a| Arc::from(a.token)).collect();
        anyhow::Ok((tokens, room_ids))
    })
    .await
    .map_err(|_| anyhow!("setup did not finish within --setup-timeout"))??;
    let setup_secs = setup_started.elapsed().as_secs_f64();

    let phase = Phase::default();
    // One sender per room with socket index = room index, so `members = senders = 1` makes the
    // receivers attribute every delivery to its room and track it in a bitmap of `per_room` bits.
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        run: rand::random(),
        members: 1,
        senders: u64::from(rooms > 0),
        messages: per_room,
        track: rooms > 0,
        start: CancellationToken::new(),
        stop: CancellationToken::new(),
        counters: Counters::default(),
        senders_left: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        sender_done: Notify::new(),
    });
    let now_ns = || shared.epoch.elapsed().as_nanos() as u64;
    let progress_done = CancellationToken::new();
    progress::spawn(shared.clone(), phase.clone(), progress_done.clone(), common.quiet);

    let room_of = |slot: u64| if rooms == 0 { 0 } else { (slot % users) % rooms };
    let receiver = |slot: u64| Role {
        // Never a sender's index, so no delivery is mistaken for the socket's own message.
        global: ids::MAX_SOCKET,
        room_index: room_of(slot) as u32,
        member: 1,
        room_id: room_ids.get(room_of(slot) as usize).copied().unwrap_or(0),
        send: None,
    };
    let plan = SendPlan {
        window: WINDOW,
        size: SIZE,
        rate: Some(args.msg_rate),
        ack_timeout: args.ack_timeout,
    };

    phase.set("connect");
    let deadline = tokio::time::Instant::now() + common.duration;
    let dial = Dial {
        attempts: common.connect_attempts,
        timeout: common.connect_timeout,
        read_buffer: 4096,
    };
    let population = args.sockets as usize;
    let mut slots: Vec<Slot> = (0..population)
        .map(|_| Slot {
            stop: CancellationToken::new(),
            conn: 0,
            dialling: false,
        })
        .collect();
    let mut tasks = Tasks::new();
    let mut next_conn = 0u64;
    // Sockets 0..sockets are the population, sockets..sockets+rooms the rooms' senders.
    let connect = super::open_each(
        common,
        &target,
        dial,
        args.sockets + rooms,
        |index| {
            if index < args.sockets {
                (&*tokens[(index % users) as usize], receiver(index))
            } else {
                let room = index - args.sockets;
                let role = Role {
                    global: room as u32,
                    room_index: room as u32,
                    member: 0,
                    room_id: room_ids[room as usize],
                    send: Some(plan),
                };
                (&*tokens[room as usize], role)
            }
        },
        deadline,
        |index, conn, role| {
            next_conn += 1;
            let slot = if index < args.sockets {
                index as usize
            } else {
                SENDER
            };
            let stop = shared.stop.child_token();
            if slot != SENDER {
                slots[slot].stop = stop.clone();
                slots[slot].conn = next_conn;
            }
            let meta = Meta {
                slot,
                conn: next_conn,
                auth_ns: now_ns(),
            };
            spawn_socket(&mut tasks, conn, role, &shared, meta, stop);
        },
    )
    .await;
    shared
        .senders_left
        .store(connect.opened_senders, Ordering::Release);
    let open_at_start = connect.opened - connect.opened_senders;

    let rss_start = match common.pid {
        Some(pid) => {
            phase.set("settle");
            Some(procfs::settle_rss(pid, args.settle_timeout).await?)
        }
        None => None,
    };

    // The churn.
    phase.set("churn");
    let cpu_start = CpuMark::now(common.pid)?;
    let start_ns = now_ns();
    shared.start.cancel();
    let started_at = tokio::time::Instant::now();
    let planned_end = started_at + Duration::from_secs(args.seconds);
    let until = planned_end.min(deadline);
    let mut result = ChurnResult {
        sockets: args.sockets,
        users,
        rooms,
        open_at_start,
        asked_per_sec: args.rate,
        stopped_by_duration: until < planned_end,
        rss_start,
        ..ChurnResult::default()
    };
    let mut picker = Picker::new(args.pick, rand::random());
    let mut connecting: JoinSet<Dialled> = JoinSet::new();
    let mut latency = Histogram::default();
    let mut tally = Tally::default();
    let mut senders: Vec<Outcome> = Vec::new();
    let mut task_failures = Vec::new();
    let concurrency = usize::from(common.connect_concurrency);
    let due = |n: u64| started_at + Duration::from_secs_f64(n as f64 / args.rate);

    // A finished dial: the new socket takes its slot, or the failure is counted.
    let mut on_dialled =
        |dialled: Dialled, slots: &mut Vec<Slot>, tasks: &mut Tasks, result: &mut ChurnResult| {
            let slot = &mut slots[dialled.slot];
            slot.dialling = false;
            match dialled.result {
                Ok(conn) => {
                    latency.record(dialled.latency.as_nanos() as u64);
                    result.connected += 1;
                    let stop = shared.stop.child_token();
                    slot.stop = stop.clone();
                    slot.conn = dialled.conn;
                    let meta = Meta {
                        slot: dialled.slot,
                        conn: dialled.conn,
                        auth_ns: now_ns(),
                    };
                    spawn_socket(tasks, conn, receiver(dialled.slot as u64), &shared, meta, stop);
                }
                Err(err) => {
                    result.failed += 1;
                    *result.failures.entry(connect::failure_cause(&err)).or_insert(0) += 1;
                    result.first_failure.get_or_insert_with(|| format!("{err:#}"));
                }
            }
        };
    // A socket task that ended before the run's end: a replaced socket, or one that died.
    let on_ended = |ended: Result<(Meta, Outcome), tokio::task::JoinError>,
                    slots: &mut Vec<Slot>,
                    tally: &mut Tally,
                    senders: &mut Vec<Outcome>,
                    task_failures: &mut Vec<String>| {
        match ended {
            Ok((meta, outcome)) if meta.slot == SENDER => senders.push(outcome),
            Ok((meta, outcome)) => {
                if slots[meta.slot].conn == meta.conn {
                    // It died in place: the slot is empty until it is picked again.
                    slots[meta.slot].conn = 0;
                }
                tally.add(&outcome);
            }
            Err(err) => task_failures.push(err.to_string()),
        }
    };

    let mut issued = 0u64;
    while due(issued) < until {
        tokio::select! {
            biased;
            Some(dialled) = connecting.join_next() => match dialled {
                Ok(dialled) => on_dialled(dialled, &mut slots, &mut tasks, &mut result),
                Err(err) => task_failures.push(err.to_string()),
            },
            Some(ended) = tasks.join_next() => {
                on_ended(ended, &mut slots, &mut tally, &mut senders, &mut task_failures);
            }
            _ = tokio::time::sleep_until(due(issued)) => {
                // Every reconnect due by now (several per wake-up at high rates).
                let now = tokio::time::Instant::now();
                while due(issued) <= now && due(issued) < until {
                    issued += 1;
                    let free = connecting.len() < concurrency;
                    let picked = if free { picker.pick(population, |i| slots[i].dialling) } else { None };
                    let Some(index) = picked else {
                        result.skipped += 1;
                        continue;
                    };
                    result.started += 1;
                    next_conn += 1;
                    let token = tokens[(index as u64 % users) as usize].clone();
                    replace(&mut slots[index], index, next_conn, &target, token, dial, &mut connecting);
                }
            }
        }
    }
    result.asked = issued;
    result.churn_secs = started_at.elapsed().as_secs_f64();

    // The dials still in flight (each is bounded by --connect-timeout).
    phase.set("drain");
    while let Some(dialled) = connecting.join_next().await {
        match dialled {
            Ok(dialled) => on_dialled(dialled, &mut slots, &mut tasks, &mut result),
            Err(err) => task_failures.push(err.to_string()),
        }
    }
    result.connects_per_sec = result.connected as f64 / result.churn_secs.max(1e-9);
    result.connect_latency = latency.summary();
    if rooms > 0 {
        // The senders finish on their own about when the churn ends; then the last deliveries.
        while shared.senders_left.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                result.stopped_by_duration = true;
                break;
            }
            tokio::select! {
                _ = shared.sender_done.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let drain_until = (tokio::time::Instant::now() + args.drain).min(deadline);
        let mut last = shared.counters.recv.load(Ordering::Relaxed);
        let mut quiet_since = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            if now >= drain_until || now.duration_since(quiet_since) >= QUIET {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let recv = shared.counters.recv.load(Ordering::Relaxed);
            if recv != last {
                (last, quiet_since) = (recv, tokio::time::Instant::now());
            }
        }
    }
    let cpu_end = CpuMark::now(common.pid)?;
    if let Some(pid) = common.pid {
        phase.set("settle");
        let end = procfs::settle_rss(pid, args.settle_timeout).await?;
        result.rss_end = Some(end);
        if let Some(start) = &result.rss_start {
            let growth = end.rss_bytes as i64 - start.rss_bytes as i64;
            result.rss_growth = Some(growth);
            result.rss_growth_per_reconnect = Some(growth as f64 / result.connected.max(1) as f64);
            let tolerance = RSS_TOLERANCE_BYTES as f64 + RSS_TOLERANCE_SHARE * start.rss_bytes as f64;
            result.rss_growth_beyond_tolerance = growth as f64 > tolerance;
        }
    }

    phase.set("close");
    shared.stop.cancel();
    // Sockets still in their slot are the survivors: their deliveries are checked.
    let mut survivors: Vec<(u32, u64, Vec<u64>)> = Vec::new();
    while let Some(ended) = tasks.join_next().await {
        match ended {
            Ok((meta, mut outcome))
                if meta.slot != SENDER
                    && slots[meta.slot].conn == meta.conn
                    && outcome.end == End::Stopped =>
            {
                tally.add(&outcome);
                let got = std::mem::take(&mut outcome.received.got);
                survivors.push((outcome.role.room_index, meta.auth_ns, got));
            }
            other => on_ended(other, &mut slots, &mut tally, &mut senders, &mut task_failures),
        }
    }
    progress_done.cancel();
    result.open_at_end = survivors.len() as u64;
    for sender in &senders {
        tally.add(sender);
    }
    if rooms > 0 {
        result.messages = Some(account_messages(
            args,
            rooms,
            per_room,
            start_ns,
            &senders,
            &survivors,
            &tally,
            result.churn_secs,
        ));
    }

    let mut report = Report {
        tool: format!("chatoy-bench {}", env!("CARGO_PKG_VERSION")),
        scenario: "churn",
        url: common.url.to_string(),
        server_pid: common.pid,
        prefix: api.prefix.clone(),
        params: json!({
            "sockets": args.sockets,
            "users": users,
            "rate": args.rate,
            "seconds": args.seconds,
            "pick": match args.pick { Pick::RoundRobin => "round-robin", Pick::Random => "random" },
            "rooms": rooms,
            "msg_rate": args.msg_rate,
            "window": WINDOW,
            "size": SIZE,
            "drain_secs": args.drain.as_secs_f64(),
            "connect_concurrency": common.connect_concurrency,
            "connect_timeout_secs": common.connect_timeout.as_secs_f64(),
            "source_addrs": target.sources.len(),
            "threads": common.threads,
        }),
        setup_secs,
        connect,
        cpu: cpu_start.usage_until(&cpu_end),
        socket_ends: tally.ends.clone(),
        task_failures,
        idle: None,
        fanout: None,
        churn: None,
        problems: Vec::new(),
    };
    report.note_common_problems();
    note_problems(&result, &mut report.problems);
    report.churn = Some(result);
    Ok(report)
}

/// Adds up the senders' outcomes and checks every survivor against its room's code-0 acks.
#[allow(clippy::too_many_arguments)]
fn account_messages(
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
    m.acks_by_code = codes
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(code, &n)| {
            (
                if code == 7 {
                    "7+".to_owned()
                } else {
                    code.to_string()
                },
                n,
            )
        })
        .collect();
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
    m.recv_frames = tally.recv_frames;
    m.recv_per_sec = tally.recv_frames as f64 / churn_secs.max(1e-9);
    m.delivery_latency = tally.delivery.summary();
    m.duplicates = tally.duplicates;
    m.foreign = tally.foreign;
    m.echoed_to_sender = tally.own;
    m.out_of_sender_order = tally.out_of_sender_order;
    m.malformed_or_other += tally.malformed_or_other;
    m
}

fn note_problems(result: &ChurnResult, problems: &mut Vec<String>) {
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
    let Some(m) = &result.messages else {
        return;
    };
    note_counts(
        problems,
        &[
            (m.lost, "owed deliveries lost"),
            (m.duplicates, "duplicate deliveries"),
            (m.unexpected, "deliveries of messages not acked with code 0"),
            (
                m.foreign,
                "deliveries of messages not sent to that room by this run",
            ),
            (
                m.echoed_to_sender,
                "messages delivered back to their sending socket",
            ),
            (m.out_of_sender_order, "deliveries out of sender order"),
            (m.unacked, "messages never acked"),
            (m.senders_timed_out, "senders gave up waiting for an ack"),
            (m.malformed_or_other, "unreadable or unexpected frames"),
            (refused_acks(&m.acks_by_code), "acks with a non-zero code"),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skips_busy_slots_and_wraps() {
        let mut picker = Picker::new(Pick::RoundRobin, 1);
        let picks: Vec<_> = (0..5).map(|_| picker.pick(3, |i| i == 1)).collect();
        assert_eq!(picks, [Some(0), Some(2), Some(0), Some(2), Some(0)]);
        assert_eq!(picker.pick(3, |_| true), None);
        assert_eq!(picker.pick(0, |_| false), None);
    }

    #[test]
    fn random_picks_stay_in_range_and_avoid_busy_slots() {
        let mut picker = Picker::new(Pick::Random, 42);
        let mut seen = [0u32; 10];
        for _ in 0..1000 {
            let Some(slot) = picker.pick(10, |i| i == 3) else {
                panic!("no slot")
            };
            seen[slot] += 1;
        }
        assert_eq!(seen[3], 0);
        assert!(
            seen.iter().enumerate().all(|(i, &n)| i == 3 || n > 50),
            "{seen:?}"
        );
        assert_eq!(picker.pick(1, |_| false), Some(0));
    }

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
