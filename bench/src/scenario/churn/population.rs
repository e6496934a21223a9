//! The churned population: a slot per socket, the socket tasks and the dials in flight, and
//! the phases that drive them: open every socket, replace --rate of them per second, finish
//! the dials in flight, and close what is left (the survivors, whose deliveries are checked).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::connect::{self, Conn};
use crate::histogram::Histogram;
use crate::scenario::{open_each, ConnectStats};
use crate::socket::{self, End, Outcome, Role, RunContext};

use super::check::Tally;
use super::picker::Picker;
use super::result::ChurnResult;
use super::Plan;

/// The drain ends once no `recv` arrived for this long.
const QUIET: Duration = Duration::from_millis(250);
/// The `slot` of a sender's socket (senders are not churned).
const SENDER: usize = usize::MAX;

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

/// Socket tasks, each handing back who it was with its outcome.
type Tasks = JoinSet<(Meta, Outcome)>;

/// A population socket still in its slot at the end: its room's index, when its `auth` answer
/// was read (ns since the run's epoch) and which of the room's messages it got (a bitmap).
pub(super) type Survivor = (u32, u64, Vec<u64>);

/// The population's slots, the socket tasks and dials in flight, and what ended ones left.
pub(super) struct Population {
    slots: Vec<Slot>,
    tasks: Tasks,
    /// Dials of replacements in flight.
    connecting: JoinSet<Dialled>,
    /// The last connection number handed out.
    next_conn: u64,
    /// Reconnect latencies, from the TCP connect to `auth` code 0.
    latency: Histogram,
    /// What the ended population sockets (and, at the end, the senders) add up to.
    pub(super) tally: Tally,
    /// The senders' outcomes.
    pub(super) senders: Vec<Outcome>,
    /// Socket and dial tasks that panicked.
    pub(super) task_failures: Vec<String>,
}

impl Population {
    /// `sockets` empty slots.
    pub(super) fn new(sockets: usize) -> Population {
        Population {
            slots: (0..sockets)
                .map(|_| Slot {
                    stop: CancellationToken::new(),
                    conn: 0,
                    dialling: false,
                })
                .collect(),
            tasks: Tasks::new(),
            connecting: JoinSet::new(),
            next_conn: 0,
            latency: Histogram::default(),
            tally: Tally::default(),
            senders: Vec::new(),
            task_failures: Vec::new(),
        }
    }

    /// Opens the population and the rooms' senders, each socket's task spawned as soon as it
    /// is authenticated.
    pub(super) async fn open(&mut self, plan: &Plan<'_>) -> ConnectStats {
        let sockets = plan.args.sockets;
        // Sockets 0..sockets are the population, sockets..sockets+rooms the rooms' senders.
        open_each(
            plan.common,
            &plan.target,
            plan.dial,
            sockets + plan.rooms,
            |index| {
                if index < sockets {
                    (&*plan.tokens[(index % plan.users) as usize], plan.receiver(index))
                } else {
                    let room = index - sockets;
                    (&*plan.tokens[room as usize], plan.sender(room))
                }
            },
            plan.deadline,
            |index, conn, role| {
                self.next_conn += 1;
                let slot = if index < sockets { index as usize } else { SENDER };
                let stop = plan.ctx.stop.child_token();
                if slot != SENDER {
                    self.slots[slot].stop = stop.clone();
                    self.slots[slot].conn = self.next_conn;
                }
                let meta = Meta {
                    slot,
                    conn: self.next_conn,
                    auth_ns: plan.now_ns(),
                };
                self.spawn(conn, role, &plan.ctx, meta, stop);
            },
        )
        .await
    }

    fn spawn(&mut self, conn: Conn, role: Role, ctx: &Arc<RunContext>, meta: Meta, stop: CancellationToken) {
        let ctx = ctx.clone();
        self.tasks
            .spawn(async move { (meta, socket::drive_until(conn, role, ctx, stop).await) });
    }

    /// Replaces --rate sockets per second from `started_at` until `until`, at most
    /// --connect-concurrency dials at once; a reconnect due while none can start is skipped.
    pub(super) async fn churn(
        &mut self,
        plan: &Plan<'_>,
        result: &mut ChurnResult,
        started_at: tokio::time::Instant,
        until: tokio::time::Instant,
    ) {
        let mut picker = Picker::new(plan.args.pick, rand::random());
        let concurrency = usize::from(plan.common.connect_concurrency);
        let population = self.slots.len();
        let due = |n: u64| started_at + Duration::from_secs_f64(n as f64 / plan.args.rate);
        let mut issued = 0u64;
        while due(issued) < until {
            tokio::select! {
                biased;
                Some(dialled) = self.connecting.join_next() => match dialled {
                    Ok(dialled) => self.on_dialled(plan, dialled, result),
                    Err(err) => self.task_failures.push(err.to_string()),
                },
                Some(ended) = self.tasks.join_next() => self.on_ended(ended),
                _ = tokio::time::sleep_until(due(issued)) => {
                    // Every reconnect due by now (several per wake-up at high rates).
                    let now = tokio::time::Instant::now();
                    while due(issued) <= now && due(issued) < until {
                        issued += 1;
                        let free = self.connecting.len() < concurrency;
                        let slots = &self.slots;
                        let picked = if free { picker.pick(population, |i| slots[i].dialling) } else { None };
                        let Some(index) = picked else {
                            result.skipped += 1;
                            continue;
                        };
                        result.started += 1;
                        self.replace(plan, index);
                    }
                }
            }
        }
        result.asked = issued;
        result.churn_secs = started_at.elapsed().as_secs_f64();
    }

    /// Closes the socket in slot `index` (its task writes a close frame and ends), if any, and
    /// dials the next connection number in its place with one attempt, timed from its TCP
    /// connect.
    fn replace(&mut self, plan: &Plan<'_>, index: usize) {
        self.next_conn += 1;
        let conn = self.next_conn;
        let token = plan.tokens[(index as u64 % plan.users) as usize].clone();
        let slot = &mut self.slots[index];
        slot.stop.cancel();
        slot.conn = 0;
        slot.dialling = true;
        let target = plan.target.clone();
        let dial = plan.dial;
        self.connecting.spawn(async move {
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

    /// A finished dial: the new socket takes its slot, or the failure is counted.
    fn on_dialled(&mut self, plan: &Plan<'_>, dialled: Dialled, result: &mut ChurnResult) {
        let slot = &mut self.slots[dialled.slot];
        slot.dialling = false;
        match dialled.result {
            Ok(conn) => {
                self.latency.record(dialled.latency.as_nanos() as u64);
                result.connected += 1;
                let stop = plan.ctx.stop.child_token();
                slot.stop = stop.clone();
                slot.conn = dialled.conn;
                let meta = Meta {
                    slot: dialled.slot,
                    conn: dialled.conn,
                    auth_ns: plan.now_ns(),
                };
                self.spawn(conn, plan.receiver(dialled.slot as u64), &plan.ctx, meta, stop);
            }
            Err(err) => {
                result.failed += 1;
                *result.failures.entry(connect::failure_cause(&err)).or_insert(0) += 1;
                result.first_failure.get_or_insert_with(|| format!("{err:#}"));
            }
        }
    }

    /// A socket task that ended before the run's end: a replaced socket, or one that died.
    fn on_ended(&mut self, ended: Result<(Meta, Outcome), JoinError>) {
        match ended {
            Ok((meta, outcome)) if meta.slot == SENDER => self.senders.push(outcome),
            Ok((meta, outcome)) => {
                if self.slots[meta.slot].conn == meta.conn {
                    // It died in place: the slot is empty until it is picked again.
                    self.slots[meta.slot].conn = 0;
                }
                self.tally.add(&outcome);
            }
            Err(err) => self.task_failures.push(err.to_string()),
        }
    }

    /// Waits for the dials still in flight (each is bounded by --connect-timeout), and sums up
    /// the reconnects.
    pub(super) async fn finish_dials(&mut self, plan: &Plan<'_>, result: &mut ChurnResult) {
        while let Some(dialled) = self.connecting.join_next().await {
            match dialled {
                Ok(dialled) => self.on_dialled(plan, dialled, result),
                Err(err) => self.task_failures.push(err.to_string()),
            }
        }
        result.connects_per_sec = result.connected as f64 / result.churn_secs.max(1e-9);
        result.connect_latency = self.latency.summary();
    }

    /// Stops every socket and collects the tasks; sockets still in their slot are the
    /// survivors, whose deliveries are checked.
    pub(super) async fn close(&mut self, ctx: &RunContext) -> Vec<Survivor> {
        ctx.stop.cancel();
        let mut survivors: Vec<Survivor> = Vec::new();
        while let Some(ended) = self.tasks.join_next().await {
            match ended {
                Ok((meta, mut outcome))
                    if meta.slot != SENDER
                        && self.slots[meta.slot].conn == meta.conn
                        && outcome.end == End::Stopped =>
                {
                    self.tally.add(&outcome);
                    let got = std::mem::take(&mut outcome.received.got);
                    survivors.push((outcome.role.room_index, meta.auth_ns, got));
                }
                other => self.on_ended(other),
            }
        }
        survivors
    }
}

/// Once the churn is over: waits for the senders to finish (about when the churn ends), then
/// for the last deliveries, until no `recv` came for [`QUIET`] or --drain ran out.
pub(super) async fn wait_for_deliveries(plan: &Plan<'_>, result: &mut ChurnResult) {
    let ctx = &plan.ctx;
    while ctx.senders_left.load(Ordering::Acquire) > 0 {
        if tokio::time::Instant::now() >= plan.deadline {
            result.stopped_by_duration = true;
            break;
        }
        tokio::select! {
            _ = ctx.sender_done.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let drain_until = (tokio::time::Instant::now() + plan.args.drain).min(plan.deadline);
    let mut last = ctx.counters.recv.load(Ordering::Relaxed);
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if now >= drain_until || now.duration_since(quiet_since) >= QUIET {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let recv = ctx.counters.recv.load(Ordering::Relaxed);
        if recv != last {
            (last, quiet_since) = (recv, tokio::time::Instant::now());
        }
    }
}
