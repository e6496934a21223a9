//! What the scenarios share: opening many sockets with bounded concurrency, collecting the socket
//! tasks' outcomes, and what every scenario measures (`Measured`). `accounting.rs` is the message accounting of `fanout` and `churn`.

pub(crate) mod accounting;
pub(crate) mod churn;
pub(crate) mod fanout;
pub(crate) mod idle;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::cli::Common;
use crate::connect::{self, Conn, Dial, Target};
use crate::procfs::CpuUsage;
use crate::socket::{self, End, Outcome, Role, RunContext};

/// How opening the sockets went.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ConnectStats {
    /// Sockets asked for.
    pub(crate) requested: u64,
    /// Sockets authenticated.
    pub(crate) opened: u64,
    /// Of those, sockets that send.
    pub(crate) opened_senders: u64,
    /// Sockets that failed every attempt.
    pub(crate) failed: u64,
    /// Whether --duration ran out while connecting.
    pub(crate) deadline_hit: bool,
    /// Seconds from the first connect to the last auth.
    pub(crate) secs: f64,
    /// Authenticated sockets per second.
    pub(crate) per_sec: f64,
    /// The first failure, for the reader.
    pub(crate) first_error: Option<String>,
}

/// Opens `count` sockets, `--connect-concurrency` at a time, and spawns each one's task as soon
/// as it is authenticated (so it answers pings while the others connect). `plan(i)` names the
/// token and the role of socket `i`.
pub(crate) async fn open_all<'a>(
    common: &Common,
    target: &Target,
    dial: Dial,
    count: u64,
    plan: impl Fn(u64) -> (&'a str, Role),
    ctx: &Arc<RunContext>,
    deadline: tokio::time::Instant,
) -> (Vec<JoinHandle<Outcome>>, ConnectStats) {
    let mut handles = Vec::with_capacity(count as usize);
    let stats = open_each(common, target, dial, count, plan, deadline, |_, conn, role| {
        handles.push(tokio::spawn(socket::drive(conn, role, ctx.clone())));
    })
    .await;
    (handles, stats)
}

/// Opens `count` sockets, `--connect-concurrency` at a time (each with `--connect-attempts`),
/// and hands each authenticated one to `opened(i, conn, role)` at once. `plan(i)` names the
/// token and the role of socket `i`.
pub(crate) async fn open_each<'a>(
    common: &Common,
    target: &Target,
    dial: Dial,
    count: u64,
    plan: impl Fn(u64) -> (&'a str, Role),
    deadline: tokio::time::Instant,
    mut opened: impl FnMut(u64, Conn, Role),
) -> ConnectStats {
    let started = Instant::now();
    let mut stats = ConnectStats {
        requested: count,
        ..ConnectStats::default()
    };
    let attempts = futures_util::stream::iter(0..count)
        .map(|index| {
            let (token, role) = plan(index);
            async move {
                let conn = connect::open(target, index, token, dial).await?;
                anyhow::Ok((index, conn, role))
            }
        })
        .buffer_unordered(usize::from(common.connect_concurrency));
    tokio::pin!(attempts);
    let expiry = tokio::time::sleep_until(deadline);
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            item = attempts.next() => match item {
                None => break,
                Some(Ok((index, conn, role))) => {
                    stats.opened_senders += u64::from(role.send.is_some());
                    opened(index, conn, role);
                    stats.opened += 1;
                }
                Some(Err(err)) => {
                    stats.failed += 1;
                    stats.first_error.get_or_insert_with(|| format!("{err:#}"));
                }
            },
            _ = &mut expiry => {
                stats.deadline_hit = true;
                stats.failed = count - stats.opened;
                break;
            }
        }
    }
    stats.secs = started.elapsed().as_secs_f64();
    stats.per_sec = stats.opened as f64 / stats.secs.max(1e-9);
    stats
}

/// What every scenario measures besides its own results, filled in phase by phase: the setup,
/// the connects, the CPU over the measured interval and how the socket tasks ended.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Measured {
    /// Seconds spent registering users, logging in, creating and joining rooms.
    pub(crate) setup_secs: f64,
    /// How opening the sockets went.
    pub(crate) connect: ConnectStats,
    /// CPU time of the bench and the server over the measured interval.
    pub(crate) cpu: CpuUsage,
    /// Sockets per end reason (`stopped` is the normal end).
    pub(crate) socket_ends: BTreeMap<String, u64>,
    /// Socket tasks that panicked (a bench bug).
    pub(crate) task_failures: Vec<String>,
}

impl Measured {
    /// Runs the scenario's `setup` (users, logins, rooms) within --setup-timeout and times it.
    pub(crate) async fn set_up<T>(
        &mut self,
        common: &Common,
        setup: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let value = tokio::time::timeout(common.setup_timeout, setup)
            .await
            .map_err(|_| anyhow!("setup did not finish within --setup-timeout"))??;
        self.setup_secs = started.elapsed().as_secs_f64();
        Ok(value)
    }

    /// Waits for every socket task (told to stop) and counts how they ended; returns the
    /// outcomes. A task that panicked is counted as a task failure.
    pub(crate) async fn collect(&mut self, handles: Vec<JoinHandle<Outcome>>) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(handles.len());
        for handle in handles {
            match handle.await {
                Ok(outcome) => {
                    *self.socket_ends.entry(end_key(outcome.end)).or_insert(0) += 1;
                    outcomes.push(outcome);
                }
                Err(err) => self.task_failures.push(err.to_string()),
            }
        }
        outcomes
    }

    /// Adds the problems every scenario can have: sockets that could not be opened or ended
    /// early, socket tasks that panicked, and other processes busy enough to skew the figures.
    pub(crate) fn note_problems(&self, problems: &mut Vec<String>) {
        if self.connect.failed > 0 {
            problems.push(format!(
                "{} of {} sockets could not be opened (first error: {})",
                self.connect.failed,
                self.connect.requested,
                self.connect.first_error.as_deref().unwrap_or("deadline")
            ));
        }
        for (end, count) in &self.socket_ends {
            if end != "stopped" {
                problems.push(format!("{count} sockets ended early: {end}"));
            }
        }
        for failure in &self.task_failures {
            problems.push(format!("socket task failed: {failure}"));
        }
        if self.cpu.others_cores() > 0.25 {
            problems.push(format!(
                "other processes kept {:.2} cores busy during the measurement: the figures are skewed",
                self.cpu.others_cores()
            ));
        }
    }
}

/// The report's name of a socket's end reason (`stopped` is the normal end).
pub(crate) fn end_key(end: End) -> String {
    match end {
        End::Stopped => "stopped".to_owned(),
        End::ServerClose(Some(code)) => format!("server_close_{code}"),
        End::ServerClose(None) => "server_close".to_owned(),
        End::Eof => "eof".to_owned(),
        End::Io => "io_error".to_owned(),
        End::Wire => "bad_frames".to_owned(),
    }
}
