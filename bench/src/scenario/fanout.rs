//! `fanout`: rooms of member sockets, some of which send; measures `send` ack latency,
//! end-to-end delivery latency, delivered `recv` frames per second, and counts every
//! (receiver, message) pair to find lost, duplicated and unexpected deliveries.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, FanoutArgs, MAX_SOCKETS, MAX_TOTAL_MESSAGES};
use crate::connect::{self, Dial};
use crate::histogram::{Histogram, Summary};
use crate::ids;
use crate::procfs::{self, CpuMark, Proc};
use crate::progress::{self, human_rate, Phase};
use crate::report::{acks_by_code, bytes, note_counts, refused_acks, Report};
use crate::setup::Api;
use crate::socket::{words_per_sender, Outcome, ReceivedTotals, Role, RunContext, SendPlan};

/// The `fanout` results.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct FanoutResult {
    /// `msg` frames written.
    pub(crate) sent: u64,
    /// Acks received (any code).
    pub(crate) acked: u64,
    /// Acks by `send` code.
    pub(crate) acks_by_code: BTreeMap<String, u64>,
    /// Messages never acknowledged.
    pub(crate) unacked: u64,
    /// Senders that gave up waiting for an ack (--ack-timeout).
    pub(crate) senders_timed_out: u64,
    /// Whether --duration stopped the run before every sender finished.
    pub(crate) stopped_by_duration: bool,
    /// Deliveries owed: for every code-0 message, every other member socket of its room.
    pub(crate) expected: u64,
    /// Owed deliveries that arrived (first copies).
    pub(crate) delivered: u64,
    /// Owed deliveries that never arrived.
    pub(crate) lost: u64,
    /// Deliveries of a message the receiver already had.
    pub(crate) duplicates: u64,
    /// Deliveries of messages whose ack was not code 0 (or never came).
    pub(crate) unexpected: u64,
    /// Deliveries of messages this run did not send to that room.
    pub(crate) foreign: u64,
    /// Deliveries back to the very socket that sent the message.
    pub(crate) echoed_to_sender: u64,
    /// Deliveries that came after a later message of the same sender.
    pub(crate) out_of_sender_order: u64,
    /// Deliveries whose `sent` was earlier than the previous delivery's on that socket.
    pub(crate) sent_regressions: u64,
    /// Frames the bench could not read, plus unexpected `send`/`auth`/`error` frames.
    pub(crate) malformed_or_other: u64,
    /// `recv` frames received, all of them.
    pub(crate) recv_frames: u64,
    /// Seconds from the start signal to the last ack.
    pub(crate) send_secs: f64,
    /// Seconds from the start signal to the last `recv`.
    pub(crate) delivery_secs: f64,
    /// Code-0 acks per second over `send_secs`.
    pub(crate) acked_per_sec: f64,
    /// `recv` frames per second over `delivery_secs`.
    pub(crate) recv_per_sec: f64,
    /// From writing a `msg` frame to reading its code-0 `send` frame.
    pub(crate) ack_latency: Summary,
    /// From writing a `msg` frame to reading its `recv` on another socket (first copies).
    pub(crate) delivery_latency: Summary,
    /// Server RSS before the sockets opened, with --pid.
    pub(crate) rss_before: Option<u64>,
    /// Server RSS at the end of the measured interval, with --pid.
    pub(crate) rss_after: Option<u64>,
}

impl FanoutResult {
    /// Appends the human summary lines.
    pub(crate) fn summary(&self, out: &mut String) {
        let ms = |us: f64| us / 1000.0;
        let _ = writeln!(
            out,
            "sent           {} msg, acked {} ({}), unacked {}",
            self.sent,
            self.acked,
            self.acks_by_code
                .iter()
                .map(|(code, n)| format!("{code}: {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.unacked
        );
        let _ = writeln!(
            out,
            "ack latency    p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} acks, {}/s)",
            ms(self.ack_latency.p50_us),
            ms(self.ack_latency.p99_us),
            ms(self.ack_latency.p999_us),
            ms(self.ack_latency.max_us),
            self.ack_latency.count,
            human_rate(self.acked_per_sec)
        );
        let _ = writeln!(
            out,
            "delivery       p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            ms(self.delivery_latency.p50_us),
            ms(self.delivery_latency.p99_us),
            ms(self.delivery_latency.p999_us),
            ms(self.delivery_latency.max_us),
        );
        let _ = writeln!(
            out,
            "recv           {} frames in {:.3} s = {} recv/s",
            self.recv_frames,
            self.delivery_secs,
            human_rate(self.recv_per_sec)
        );
        let _ = writeln!(
            out,
            "accounting     expected {}, delivered {}, lost {}, duplicates {}, unexpected {}, foreign {}, echoed {}",
            self.expected,
            self.delivered,
            self.lost,
            self.duplicates,
            self.unexpected,
            self.foreign,
            self.echoed_to_sender
        );
        let _ = writeln!(
            out,
            "ordering       {} out of sender order, {} `sent` regressions",
            self.out_of_sender_order, self.sent_regressions
        );
        if let (Some(before), Some(after)) = (self.rss_before, self.rss_after) {
            let _ = writeln!(
                out,
                "server rss     before {}, after {}",
                bytes(before as f64),
                bytes(after as f64)
            );
        }
    }
}

/// The run's shape, checked against the caps.
struct Shape {
    rooms: u64,
    members: u64,
    senders: u64,
    users_per_room: u64,
    sockets: u64,
}

fn shape(args: &FanoutArgs) -> Result<Shape> {
    let sockets = args
        .rooms
        .checked_mul(args.members)
        .filter(|&n| n <= MAX_SOCKETS)
        .ok_or_else(|| anyhow!("--rooms x --members must be at most {MAX_SOCKETS}"))?;
    if sockets > u64::from(ids::MAX_SOCKET) {
        bail!("too many sockets for the uuid layout");
    }
    if args.senders > args.members {
        bail!(
            "--senders ({}) cannot exceed --members ({})",
            args.senders,
            args.members
        );
    }
    if args.members < 2 {
        bail!("--members must be at least 2: a room needs a receiver");
    }
    let total = args.rooms * args.senders * args.messages;
    if total > MAX_TOTAL_MESSAGES {
        bail!("--rooms x --senders x --messages = {total} exceeds the cap of {MAX_TOTAL_MESSAGES}");
    }
    Ok(Shape {
        rooms: args.rooms,
        members: args.members,
        senders: args.senders,
        users_per_room: args.members.div_ceil(args.sockets_per_user),
        sockets,
    })
}

/// Runs `fanout`.
pub(crate) async fn run(common: &Common, args: &FanoutArgs) -> Result<Report> {
    let shape = shape(args)?;
    procfs::check_fd_budget(shape.sockets)?;
    let target = connect::target(&common.url, common.source_addrs).await?;
    let api = Api::new(common.url.clone(), usize::from(common.setup_concurrency))?;
    let users = shape.rooms * shape.users_per_room;
    eprintln!(
        "setup: {users} users, {} rooms of {} sockets (prefix {}) on {}",
        shape.rooms, shape.members, api.prefix, target.addr
    );
    let setup_started = Instant::now();
    let (accounts, room_ids) = tokio::time::timeout(common.setup_timeout, async {
        let accounts = api.accounts(users).await?;
        let owners: Vec<_> = accounts.iter().step_by(shape.users_per_room as usize).collect();
        let room_ids = api.create_rooms(&owners).await?;
        let joins: Vec<_> = accounts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u64 % shape.users_per_room != 0)
            .map(|(i, account)| (account, room_ids[i / shape.users_per_room as usize]))
            .collect();
        api.join_all(&joins).await?;
        anyhow::Ok((accounts, room_ids))
    })
    .await
    .map_err(|_| anyhow!("setup did not finish within --setup-timeout"))??;
    let setup_secs = setup_started.elapsed().as_secs_f64();

    let phase = Phase::default();
    let ctx = Arc::new(RunContext::new(shape.members, shape.senders, args.messages, true));
    let progress_done = CancellationToken::new();
    progress::spawn(ctx.clone(), phase.clone(), progress_done.clone(), common.quiet);
    let rss_before = common
        .pid
        .map(|pid| procfs::rss_bytes(Proc::Pid(pid)))
        .transpose()?;

    phase.set("connect");
    let deadline = tokio::time::Instant::now() + common.duration;
    let dial = Dial {
        attempts: common.connect_attempts,
        timeout: common.connect_timeout,
        read_buffer: 64 * 1024,
    };
    let plan = SendPlan {
        window: args.window,
        size: args.size as usize,
        rate: args.rate,
        ack_timeout: args.ack_timeout,
    };
    let (handles, connect) = super::open_all(
        common,
        &target,
        dial,
        shape.sockets,
        |index| {
            let (room, member) = (index / shape.members, index % shape.members);
            let user = room * shape.users_per_room + member / args.sockets_per_user;
            let role = Role {
                global: index as u32,
                room_index: room as u32,
                member: member as u32,
                room_id: room_ids[room as usize],
                send: (member < shape.senders).then_some(plan),
            };
            (accounts[user as usize].token.as_str(), role)
        },
        &ctx,
        deadline,
    )
    .await;
    // Senders whose socket could not be opened will never report: wait only for the others.
    ctx.senders_left.store(connect.opened_senders, Ordering::Release);

    let cpu_start = CpuMark::now(common.pid)?;
    let start_ns = ctx.epoch.elapsed().as_nanos() as u64;
    phase.set("send");
    ctx.start.cancel();
    let mut stopped_by_duration = false;
    // Wait for the senders, then for the deliveries they are owed.
    loop {
        let left = ctx.senders_left.load(Ordering::Acquire);
        if left == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            stopped_by_duration = true;
            break;
        }
        tokio::select! {
            _ = ctx.sender_done.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    phase.set("drain");
    let drain_until = (tokio::time::Instant::now() + args.drain).min(deadline);
    while !stopped_by_duration {
        if ctx.counters.fresh.load(Ordering::Relaxed) >= ctx.expected.load(Ordering::Acquire) {
            break;
        }
        if tokio::time::Instant::now() >= drain_until {
            stopped_by_duration = tokio::time::Instant::now() >= deadline;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu_end = CpuMark::now(common.pid)?;
    let rss_after = common
        .pid
        .map(|pid| procfs::rss_bytes(Proc::Pid(pid)))
        .transpose()?;
    phase.set("close");
    ctx.stop.cancel();
    let (outcomes, task_failures) = super::collect(handles).await;
    progress_done.cancel();

    let mut result = account(&shape, args, &outcomes, start_ns);
    result.stopped_by_duration = stopped_by_duration;
    result.rss_before = rss_before;
    result.rss_after = rss_after;
    let params = json!({
        "rooms": shape.rooms,
        "members": shape.members,
        "senders": shape.senders,
        "window": args.window,
        "messages": args.messages,
        "size": args.size,
        "rate": args.rate,
        "sockets_per_user": args.sockets_per_user,
        "drain_secs": args.drain.as_secs_f64(),
        "ack_timeout_secs": args.ack_timeout.as_secs_f64(),
        "source_addrs": target.sources.len(),
        "threads": common.threads,
    });
    let mut report = Report::new(
        "fanout",
        common,
        api.prefix.clone(),
        params,
        setup_secs,
        connect,
        cpu_start.usage_until(&cpu_end),
        super::tally_ends(&outcomes),
        task_failures,
    );
    note_problems(&result, &mut report.problems);
    report.fanout = Some(result);
    Ok(report)
}

fn note_problems(result: &FanoutResult, problems: &mut Vec<String>) {
    note_counts(
        problems,
        &[
            (result.lost, "deliveries lost"),
            (result.duplicates, "duplicate deliveries"),
            (result.unexpected, "deliveries of messages not acked with code 0"),
            (
                result.foreign,
                "deliveries of messages not sent to that room by this run",
            ),
            (
                result.echoed_to_sender,
                "messages delivered back to their sending socket",
            ),
            (result.unacked, "messages never acked"),
            (result.senders_timed_out, "senders gave up waiting for an ack"),
            (result.malformed_or_other, "unreadable or unexpected frames"),
            (refused_acks(&result.acks_by_code), "acks with a non-zero code"),
        ],
    );
    if result.stopped_by_duration {
        problems.push("--duration ran out before the run finished".to_owned());
    }
}

/// Merges every socket's statistics and does the exact per-(receiver, message) accounting.
fn account(shape: &Shape, args: &FanoutArgs, outcomes: &[Outcome], start_ns: u64) -> FanoutResult {
    let words = words_per_sender(args.messages) as usize;
    let mut result = FanoutResult::default();
    let mut ack = Histogram::default();
    let mut received_totals = ReceivedTotals::default();
    let mut codes = [0u64; 8];
    let mut last_ack_ns = start_ns;
    // ok[room][sender] = bitmap of code-0 acks (empty if the sender never reported).
    let mut ok: Vec<Vec<&[u64]>> = vec![vec![&[][..]; shape.senders as usize]; shape.rooms as usize];
    for outcome in outcomes {
        if let Some(sent) = &outcome.sent {
            result.sent += sent.sent;
            result.acked += sent.acked;
            result.unacked += sent.unacked + (args.messages - sent.sent);
            result.senders_timed_out += u64::from(sent.timed_out);
            result.malformed_or_other += sent.bad_acks + sent.duplicate_acks;
            for (all, code) in codes.iter_mut().zip(sent.codes) {
                *all += code;
            }
            ack.merge(&sent.ack);
            last_ack_ns = last_ack_ns.max(sent.last_ack_ns);
            ok[outcome.role.room_index as usize][outcome.role.member as usize] = &sent.ok;
        }
    }
    // Senders whose socket never opened sent nothing; their messages count as unsent.
    let reported = outcomes.iter().filter(|o| o.sent.is_some()).count() as u64;
    result.unacked += (shape.rooms * shape.senders - reported) * args.messages;
    for outcome in outcomes {
        let received = &outcome.received;
        received_totals.add(received);
        let senders = &ok[outcome.role.room_index as usize];
        for (sender, acked_ok) in senders.iter().enumerate() {
            if sender == outcome.role.member as usize {
                continue;
            }
            let got = &received.got[sender * words..(sender + 1) * words];
            for (i, &got_word) in got.iter().enumerate() {
                let ok_word = acked_ok.get(i).copied().unwrap_or(0);
                result.expected += u64::from(ok_word.count_ones());
                result.delivered += u64::from((ok_word & got_word).count_ones());
                result.lost += u64::from((ok_word & !got_word).count_ones());
                result.unexpected += u64::from((got_word & !ok_word).count_ones());
            }
        }
    }
    // Sockets that never opened were owed deliveries too.
    let opened_per_room = {
        let mut counts = vec![0u64; shape.rooms as usize];
        for outcome in outcomes {
            counts[outcome.role.room_index as usize] += 1;
        }
        counts
    };
    for (room, senders) in ok.iter().enumerate() {
        let missing = shape.members - opened_per_room[room];
        let room_ok: u64 = senders
            .iter()
            .map(|bits| bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum();
        result.expected += missing * room_ok;
        result.lost += missing * room_ok;
    }
    result.recv_frames = received_totals.frames;
    result.duplicates = received_totals.duplicates;
    result.foreign = received_totals.foreign;
    result.echoed_to_sender = received_totals.own;
    result.out_of_sender_order = received_totals.out_of_sender_order;
    result.sent_regressions = received_totals.sent_regressions;
    result.malformed_or_other += received_totals.malformed_or_other;
    let last_recv_ns = start_ns.max(received_totals.last_ns);
    result.acks_by_code = acks_by_code(&codes);
    result.send_secs = (last_ack_ns - start_ns) as f64 / 1e9;
    result.delivery_secs = (last_recv_ns - start_ns) as f64 / 1e9;
    result.acked_per_sec = codes[0] as f64 / result.send_secs.max(1e-9);
    result.recv_per_sec = result.recv_frames as f64 / result.delivery_secs.max(1e-9);
    result.ack_latency = ack.summary();
    result.delivery_latency = received_totals.e2e.summary();
    result
}
