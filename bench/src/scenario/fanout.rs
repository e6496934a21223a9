//! `fanout`: rooms of member sockets, some of which send; measures `send` ack latency,
//! end-to-end delivery latency, delivered `recv` frames per second, and counts every
//! (receiver, message) pair to find lost, duplicated and unexpected deliveries.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, FanoutArgs, MAX_SOCKETS, MAX_TOTAL_MESSAGES};
use crate::connect::{self, Dial};
use crate::ids;
use crate::procfs::{self, CpuMark, Proc};
use crate::progress::{self, human_rate, Phase};
use crate::report::{bytes, Report};
use crate::scenario::accounting::{check, Accounting};
use crate::scenario::Measured;
use crate::setup::Api;
use crate::socket::{words_per_sender, Outcome, ReceivedTotals, Role, RunContext, SendPlan, SentTotals};

/// The `fanout` results.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct FanoutResult {
    /// Sent, acked, received and checked: every code-0 message is owed to every other member
    /// socket of its room.
    #[serde(flatten)]
    pub(crate) accounting: Accounting,
    /// Whether --duration stopped the run before every sender finished.
    pub(crate) stopped_by_duration: bool,
    /// Seconds from the start signal to the last ack.
    pub(crate) send_secs: f64,
    /// Seconds from the start signal to the last `recv`.
    pub(crate) delivery_secs: f64,
    /// Code-0 acks per second over `send_secs`.
    pub(crate) acked_per_sec: f64,
    /// `recv` frames per second over `delivery_secs`.
    pub(crate) recv_per_sec: f64,
    /// Server RSS before the sockets opened, with --pid.
    pub(crate) rss_before: Option<u64>,
    /// Server RSS at the end of the measured interval, with --pid.
    pub(crate) rss_after: Option<u64>,
}

impl FanoutResult {
    /// Appends the human summary lines.
    pub(crate) fn summary(&self, out: &mut String) {
        let a = &self.accounting;
        let _ = writeln!(out, "messages       {}", a.sends_text());
        let _ = writeln!(
            out,
            "ack latency    {}  ({} acks, {}/s)",
            a.ack_latency,
            a.ack_latency.count,
            human_rate(self.acked_per_sec)
        );
        let _ = writeln!(out, "delivery       {}", a.delivery_latency);
        let _ = writeln!(
            out,
            "recv           {} frames in {:.3} s = {} recv/s",
            a.recv_frames,
            self.delivery_secs,
            human_rate(self.recv_per_sec)
        );
        let _ = writeln!(
            out,
            "accounting     expected {}, delivered {}, lost {}, duplicates {}, unexpected {}, foreign {}, echoed {}",
            a.expected,
            a.delivered,
            a.lost,
            a.duplicates,
            a.unexpected,
            a.foreign,
            a.echoed_to_sender
        );
        let _ = writeln!(
            out,
            "ordering       {} out of sender order, {} `sent` regressions",
            a.out_of_sender_order, a.sent_regressions
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
    let mut measured = Measured::default();
    let setup = async {
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
    };
    let (accounts, room_ids) = measured.set_up(common, setup).await?;

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
    measured.connect = connect;
    // Senders whose socket could not be opened will never report: wait only for the others.
    ctx.senders_left
        .store(measured.connect.opened_senders, Ordering::Release);

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
    measured.cpu = cpu_start.usage_until(&CpuMark::now(common.pid)?);
    let rss_after = common
        .pid
        .map(|pid| procfs::rss_bytes(Proc::Pid(pid)))
        .transpose()?;
    phase.set("close");
    ctx.stop.cancel();
    let outcomes = measured.collect(handles).await;
    progress_done.cancel();

    let mut result = account(&shape, args.messages, &outcomes, start_ns);
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
    let mut report = Report::new("fanout", common, api.prefix.clone(), params, measured);
    result.accounting.note_problems(&mut report.problems);
    if result.stopped_by_duration {
        report
            .problems
            .push("--duration ran out before the run finished".to_owned());
    }
    report.fanout = Some(result);
    Ok(report)
}

/// Merges every socket's statistics and does the exact per-(receiver, message) accounting; each
/// sender was to send `messages`.
fn account(shape: &Shape, messages: u64, outcomes: &[Outcome], start_ns: u64) -> FanoutResult {
    let words = words_per_sender(messages) as usize;
    let mut senders = SentTotals::new(messages);
    let mut received = ReceivedTotals::default();
    // ok[room][sender] = bitmap of code-0 acks (empty if the sender never reported).
    let mut ok: Vec<Vec<&[u64]>> = vec![vec![&[][..]; shape.senders as usize]; shape.rooms as usize];
    // Sockets opened per room: the others were owed their deliveries too.
    let mut opened = vec![0u64; shape.rooms as usize];
    for outcome in outcomes {
        let room = outcome.role.room_index as usize;
        received.add(&outcome.received);
        opened[room] += 1;
        if let Some(sent) = &outcome.sent {
            senders.add(sent);
            ok[room][outcome.role.member as usize] = &sent.ok;
        }
    }
    let mut accounting = Accounting::new(&senders, shape.rooms * shape.senders, &received);
    for outcome in outcomes {
        let room_senders = &ok[outcome.role.room_index as usize];
        for (sender, acked_ok) in room_senders.iter().enumerate() {
            if sender != outcome.role.member as usize {
                let got = &outcome.received.got[sender * words..(sender + 1) * words];
                accounting.add_check(&check(acked_ok, got, 0));
            }
        }
    }
    for (room, room_senders) in ok.iter().enumerate() {
        let room_ok: u64 = room_senders
            .iter()
            .map(|bits| bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum();
        accounting.add_unopened(shape.members - opened[room], room_ok);
    }
    let send_secs = (start_ns.max(senders.last_ack_ns) - start_ns) as f64 / 1e9;
    let delivery_secs = (start_ns.max(received.last_ns) - start_ns) as f64 / 1e9;
    FanoutResult {
        acked_per_sec: senders.codes[0] as f64 / send_secs.max(1e-9),
        recv_per_sec: received.frames as f64 / delivery_secs.max(1e-9),
        send_secs,
        delivery_secs,
        accounting,
        ..FanoutResult::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::{End, Received, Sent};

    fn outcome(member: u32, got: Vec<u64>, sent: Option<Sent>) -> Outcome {
        let mut received = Received::default();
        received.got = got;
        Outcome {
            role: Role {
                global: member,
                room_index: 0,
                member,
                room_id: 1,
                send: None,
            },
            end: End::Stopped,
            received,
            sent,
        }
    }

    fn sender(sent: u64, ok: u64) -> Sent {
        let mut codes = [0; 8];
        codes[0] = u64::from(ok.count_ones());
        Sent {
            sent,
            acked: codes[0],
            codes,
            ok: vec![ok],
            ..Sent::default()
        }
    }

    #[test]
    fn accounts_every_receiver_and_message() {
        // One room of 3 members, 2 senders of 3 messages; member 2 never opened.
        let shape = Shape {
            rooms: 1,
            members: 3,
            senders: 2,
            users_per_room: 3,
            sockets: 3,
        };
        let outcomes = [
            // Sender 0 had all 3 acked; it got sender 1's 0 and 1, and 2 that was never acked.
            outcome(0, vec![0, 0b111], Some(sender(3, 0b111))),
            // Sender 1 wrote 2 of its 3, both acked; it got sender 0's 0 and 2, not 1.
            outcome(1, vec![0b101, 0], Some(sender(2, 0b011))),
        ];
        let a = account(&shape, 3, &outcomes, 0).accounting;
        // Owed: 2 to member 0, 3 to member 1, and all 5 to the member that never opened.
        assert_eq!((a.expected, a.delivered, a.lost, a.unexpected), (10, 4, 6, 1));
        assert_eq!((a.sent, a.acked, a.unacked), (5, 5, 1));
        assert_eq!(a.acks_by_code.get("0"), Some(&5));
    }
}
