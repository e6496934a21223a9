//! `churn`: a population of authenticated sockets of which --rate per second are closed and
//! replaced by new ones (TCP connect + upgrade + auth), optionally while a paced sender per room
//! keeps messages flowing. Measures the reconnect rate achieved, connect latency, failures by
//! cause and the server's RSS before and after the churn, and checks the deliveries owed to
//! every socket still open at the end.
//!
//! `run` goes through named phases: check the sizes, set up the accounts and rooms, open the
//! population (`population.rs`), settle, churn, drain, settle again, close, then check the
//! deliveries (`check.rs`) and report (`result.rs`). `picker.rs` chooses the socket to replace.

mod check;
mod picker;
mod population;
mod result;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub(crate) use self::result::ChurnResult;

use self::check::account_messages;
use self::population::{wait_for_deliveries, Population};
use self::result::note_problems;
use crate::cli::{ChurnArgs, Common, Pick, MAX_TOTAL_MESSAGES};
use crate::connect::{self, Dial, Target};
use crate::ids;
use crate::procfs::{self, CpuMark, Settled};
use crate::progress::{self, Phase};
use crate::report::Report;
use crate::scenario::Measured;
use crate::setup::Api;
use crate::socket::{words_per_sender, Role, RunContext, SendPlan};

/// Unacknowledged messages a room's sender keeps in flight at most.
const WINDOW: u32 = 64;
/// Text size of the senders' messages in bytes.
const SIZE: usize = 64;
/// Most memory the run may hold in delivery bitmaps (sockets x messages per room / 8).
const MAX_BITMAP_BYTES: u64 = 512 << 20;
/// RSS growth over the churn within this many bytes plus [`RSS_TOLERANCE_SHARE`] of the start
/// RSS is allocator noise; beyond it the summary says so (a note, not a problem).
const RSS_TOLERANCE_BYTES: u64 = 2 << 20;
/// See [`RSS_TOLERANCE_BYTES`].
const RSS_TOLERANCE_SHARE: f64 = 0.05;

/// Runs `churn`.
pub(crate) async fn run(common: &Common, args: &ChurnArgs) -> Result<Report> {
    let sizes = Sizes::check(common, args)?;
    let target = Arc::new(connect::target(&common.url, common.source_addrs).await?);
    let api = Api::new(common.url.clone(), usize::from(common.setup_concurrency))?;
    eprintln!(
        "setup: {} users, {} rooms (prefix {}) on {}",
        sizes.users, sizes.rooms, api.prefix, target.addr
    );
    let mut measured = Measured::default();
    let (tokens, room_ids) = set_up(common, &api, sizes, &mut measured).await?;

    let phase = Phase::default();
    let ctx = Arc::new(context(sizes));
    let progress_done = CancellationToken::new();
    progress::spawn(ctx.clone(), phase.clone(), progress_done.clone(), common.quiet);

    phase.set("connect");
    let plan = Plan {
        common,
        args,
        users: sizes.users,
        rooms: sizes.rooms,
        target,
        dial: Dial {
            attempts: common.connect_attempts,
            timeout: common.connect_timeout,
            read_buffer: 4096,
        },
        tokens,
        room_ids,
        ctx,
        deadline: tokio::time::Instant::now() + common.duration,
    };
    let mut population = Population::new(args.sockets as usize);
    measured.connect = population.open(&plan).await;
    let opened_senders = measured.connect.opened_senders;
    plan.ctx.senders_left.store(opened_senders, Ordering::Release);
    let open_at_start = measured.connect.opened - opened_senders;
    let rss_start = settle(common, args, &phase).await?;

    phase.set("churn");
    let cpu_start = CpuMark::now(common.pid)?;
    let start_ns = plan.now_ns();
    plan.ctx.start.cancel();
    let started_at = tokio::time::Instant::now();
    let planned_end = started_at + Duration::from_secs(args.seconds);
    let until = planned_end.min(plan.deadline);
    let mut result = ChurnResult {
        sockets: args.sockets,
        users: sizes.users,
        rooms: sizes.rooms,
        open_at_start,
        asked_per_sec: args.rate,
        stopped_by_duration: until < planned_end,
        rss_start,
        ..ChurnResult::default()
    };
    population.churn(&plan, &mut result, started_at, until).await;

    phase.set("drain");
    population.finish_dials(&plan, &mut result).await;
    if sizes.rooms > 0 {
        wait_for_deliveries(&plan, &mut result).await;
    }
    measured.cpu = cpu_start.usage_until(&CpuMark::now(common.pid)?);
    if let Some(end) = settle(common, args, &phase).await? {
        record_rss_end(&mut result, end);
    }

    phase.set("close");
    let survivors = population.close(&plan.ctx).await;
    progress_done.cancel();
    result.open_at_end = survivors.len() as u64;
    for sender in &population.senders {
        population.tally.add(sender);
    }
    if sizes.rooms > 0 {
        result.messages = Some(account_messages(
            args,
            sizes.rooms,
            sizes.per_room,
            start_ns,
            &population.senders,
            &survivors,
            &population.tally,
            result.churn_secs,
        ));
    }

    measured.socket_ends = std::mem::take(&mut population.tally.ends);
    measured.task_failures = std::mem::take(&mut population.task_failures);
    let mut report = Report::new("churn", common, api.prefix, params(&plan), measured);
    note_problems(&result, &mut report.problems);
    report.churn = Some(result);
    Ok(report)
}

/// The run's sizes, checked against the bench's limits before anything is set up.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    /// Users the population shares (at most one per socket).
    users: u64,
    /// Rooms with a sender.
    rooms: u64,
    /// Messages each room's sender sends.
    per_room: u64,
}

impl Sizes {
    fn check(common: &Common, args: &ChurnArgs) -> Result<Sizes> {
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
            bail!(
                "--sockets x --msg-rate x --seconds is too large: the delivery bitmaps would exceed 512 MiB"
            );
        }
        if rooms > u64::from(ids::MAX_SOCKET) {
            bail!("too many rooms for the uuid layout");
        }
        procfs::check_fd_budget(args.sockets + rooms + u64::from(common.connect_concurrency))?;
        if let Some(pid) = common.pid {
            procfs::rss_bytes(procfs::Proc::Pid(pid))
                .map_err(|err| anyhow!("--pid must be a running process on this machine: {err:#}"))?;
        }
        Ok(Sizes {
            users,
            rooms,
            per_room,
        })
    }
}

/// Registers the users and logs them in, and creates the rooms: users 0..rooms own one room
/// each; every other user joins room `user % rooms`, timed into `measured`. Returns the users'
/// tokens and the rooms' ids.
async fn set_up(
    common: &Common,
    api: &Api,
    sizes: Sizes,
    measured: &mut Measured,
) -> Result<(Vec<Arc<str>>, Vec<u64>)> {
    let Sizes { users, rooms, .. } = sizes;
    let (accounts, room_ids) = measured
        .set_up(common, api.accounts_in_rooms(users, rooms))
        .await?;
    let tokens: Vec<Arc<str>> = accounts.into_iter().map(|a| Arc::from(a.token)).collect();
    Ok((tokens, room_ids))
}

/// The run's context. One sender per room with socket index = room index, so
/// `members = senders = 1` makes the receivers attribute every delivery to its room and track
/// it in a bitmap of `per_room` bits.
fn context(sizes: Sizes) -> RunContext {
    RunContext::new(1, u64::from(sizes.rooms > 0), sizes.per_room, sizes.rooms > 0)
}

/// What the run's phases share once the accounts and rooms exist.
struct Plan<'a> {
    common: &'a Common,
    args: &'a ChurnArgs,
    users: u64,
    rooms: u64,
    target: Arc<Target>,
    dial: Dial,
    /// User `i`'s token.
    tokens: Vec<Arc<str>>,
    /// Room `i`'s id on the server.
    room_ids: Vec<u64>,
    ctx: Arc<RunContext>,
    /// --duration from the first connect: the whole run ends by then.
    deadline: tokio::time::Instant,
}

impl Plan<'_> {
    /// Nanoseconds since the run's epoch.
    fn now_ns(&self) -> u64 {
        self.ctx.epoch.elapsed().as_nanos() as u64
    }

    /// The room of population socket `slot`: its user's.
    fn room_of(&self, slot: u64) -> u64 {
        if self.rooms == 0 {
            0
        } else {
            (slot % self.users) % self.rooms
        }
    }

    /// The role of population socket `slot`: a receiver in its user's room.
    fn receiver(&self, slot: u64) -> Role {
        Role {
            // Never a sender's index, so no delivery is mistaken for the socket's own message.
            global: ids::MAX_SOCKET,
            room_index: self.room_of(slot) as u32,
            member: 1,
            room_id: self
                .room_ids
                .get(self.room_of(slot) as usize)
                .copied()
                .unwrap_or(0),
            send: None,
        }
    }

    /// The role of room `room`'s sender.
    fn sender(&self, room: u64) -> Role {
        Role {
            global: room as u32,
            room_index: room as u32,
            member: 0,
            room_id: self.room_ids[room as usize],
            send: Some(SendPlan {
                window: WINDOW,
                size: SIZE,
                rate: Some(self.args.msg_rate),
                ack_timeout: self.args.ack_timeout,
            }),
        }
    }
}

/// With --pid, the `settle` phase: the server's RSS once it stopped changing.
async fn settle(common: &Common, args: &ChurnArgs, phase: &Phase) -> Result<Option<Settled>> {
    let Some(pid) = common.pid else {
        return Ok(None);
    };
    phase.set("settle");
    Ok(Some(procfs::settle_rss(pid, args.settle_timeout).await?))
}

/// The server's RSS once settled after the churn, and its growth over the churn.
fn record_rss_end(result: &mut ChurnResult, end: Settled) {
    result.rss_end = Some(end);
    if let Some(start) = &result.rss_start {
        let growth = end.rss_bytes as i64 - start.rss_bytes as i64;
        result.rss_growth = Some(growth);
        result.rss_growth_per_reconnect = Some(growth as f64 / result.connected.max(1) as f64);
        let tolerance = RSS_TOLERANCE_BYTES as f64 + RSS_TOLERANCE_SHARE * start.rss_bytes as f64;
        result.rss_growth_beyond_tolerance = growth as f64 > tolerance;
    }
}

/// The report's `params`: the run's flags as used.
fn params(plan: &Plan<'_>) -> serde_json::Value {
    let (common, args) = (plan.common, plan.args);
    json!({
        "sockets": args.sockets,
        "users": plan.users,
        "rate": args.rate,
        "seconds": args.seconds,
        "pick": match args.pick { Pick::RoundRobin => "round-robin", Pick::Random => "random" },
        "rooms": plan.rooms,
        "msg_rate": args.msg_rate,
        "window": WINDOW,
        "size": SIZE,
        "drain_secs": args.drain.as_secs_f64(),
        "connect_concurrency": common.connect_concurrency,
        "connect_timeout_secs": common.connect_timeout.as_secs_f64(),
        "source_addrs": plan.target.sources.len(),
        "threads": common.threads,
    })
}
