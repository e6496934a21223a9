//! `idle`: the server's memory per idle authenticated socket.
//!
//! Setup, then the server's RSS settles (before); N sockets connect and authenticate; the RSS
//! settles again (after); the sockets stay open answering pings for --hold; they close and the
//! RSS settles a third time (after close), which shows whether the server gives the memory back.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, IdleArgs};
use crate::connect::{self, Dial};
use crate::procfs::{self, CpuMark, Settled};
use crate::progress::{self, Phase};
use crate::report::{bytes, Report};
use crate::scenario::Measured;
use crate::setup::Api;
use crate::socket::{Role, RunContext};

/// The `idle` results.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IdleResult {
    /// Authenticated sockets measured.
    pub(crate) sockets: u64,
    /// Users the sockets shared.
    pub(crate) users: u64,
    /// Rooms the users were spread over.
    pub(crate) rooms: u64,
    /// Server RSS after setup, before any socket.
    pub(crate) rss_before: Settled,
    /// Server RSS with every socket open and authenticated.
    pub(crate) rss_after: Settled,
    /// (after - before) / sockets.
    pub(crate) bytes_per_socket: f64,
    /// Seconds the sockets were held open after the RSS settled.
    pub(crate) held_secs: f64,
    /// Sockets still open at the end of the hold.
    pub(crate) open_at_end: u64,
    /// Server RSS after every socket closed. The server's allocator returns freed memory to the
    /// system gradually (and only when it is active), so this is an upper bound: a value well
    /// above `rss_before` is not by itself a leak; repeat the run on the same server and compare
    /// `rss_after` to tell.
    pub(crate) rss_after_close: Settled,
    /// Frames other than pings that idle sockets received (there should be none).
    pub(crate) unexpected_frames: u64,
}

impl IdleResult {
    /// Appends the human summary lines.
    pub(crate) fn summary(&self, out: &mut String) {
        let stable = |s: &Settled| if s.stable { "" } else { " (NOT stable)" };
        let _ = writeln!(
            out,
            "sockets        {} authenticated, {} users, {} rooms",
            self.sockets, self.users, self.rooms
        );
        let _ = writeln!(
            out,
            "server rss     before {}{}, after {}{}, after close {}{} (the allocator may return more later)",
            bytes(self.rss_before.rss_bytes as f64),
            stable(&self.rss_before),
            bytes(self.rss_after.rss_bytes as f64),
            stable(&self.rss_after),
            bytes(self.rss_after_close.rss_bytes as f64),
            stable(&self.rss_after_close),
        );
        let _ = writeln!(
            out,
            "per socket     {:.0} bytes per idle authenticated socket",
            self.bytes_per_socket
        );
        let _ = writeln!(
            out,
            "hold           {:.1} s, {} sockets still open at its end",
            self.held_secs, self.open_at_end
        );
    }
}

/// Runs `idle`.
pub(crate) async fn run(common: &Common, args: &IdleArgs) -> Result<Report> {
    let pid = common
        .pid
        .ok_or_else(|| anyhow!("idle measures the server's memory: pass --pid <server pid>"))?;
    procfs::rss_bytes(procfs::Proc::Pid(pid)).context("--pid must be a running process on this machine")?;
    procfs::check_fd_budget(args.sockets)?;
    let target = connect::target(&common.url, common.source_addrs).await?;
    let users = args.users.min(args.sockets);
    let rooms = args.rooms.min(users);
    let api = Api::new(common.url.clone(), usize::from(common.setup_concurrency))?;
    eprintln!(
        "setup: {users} users, {rooms} rooms (prefix {}) on {}",
        api.prefix, target.addr
    );
    let mut measured = Measured::default();
    let (accounts, _) = measured
        .set_up(common, api.accounts_in_rooms(users, rooms))
        .await?;

    let phase = Phase::default();
    let ctx = Arc::new(RunContext::new(1, 0, 0, false));
    let progress_done = CancellationToken::new();
    progress::spawn(ctx.clone(), phase.clone(), progress_done.clone(), common.quiet);

    phase.set("settle");
    eprintln!("waiting for the server's RSS to settle before connecting");
    let rss_before = procfs::settle_rss(pid, args.settle_timeout).await?;

    let cpu_start = CpuMark::now(Some(pid))?;
    let deadline = tokio::time::Instant::now() + common.duration;
    phase.set("connect");
    let dial = Dial {
        attempts: common.connect_attempts,
        timeout: common.connect_timeout,
        read_buffer: 512,
    };
    let (handles, connect) = super::open_all(
        common,
        &target,
        dial,
        args.sockets,
        |index| {
            let account = &accounts[(index % users) as usize];
            let role = Role {
                global: index as u32,
                room_index: 0,
                member: 0,
                room_id: 0,
                send: None,
            };
            (account.token.as_str(), role)
        },
        &ctx,
        deadline,
    )
    .await;
    measured.connect = connect;

    phase.set("settle");
    let rss_after = procfs::settle_rss(pid, args.settle_timeout).await?;
    let open = ctx.counters.open.load(Ordering::Relaxed);
    let bytes_per_socket = (rss_after.rss_bytes as f64 - rss_before.rss_bytes as f64) / open.max(1) as f64;

    phase.set("hold");
    let hold_until = (tokio::time::Instant::now() + args.hold).min(deadline);
    let hold_started = Instant::now();
    tokio::time::sleep_until(hold_until).await;
    let held_secs = hold_started.elapsed().as_secs_f64();
    let open_at_end = ctx.counters.open.load(Ordering::Relaxed);
    measured.cpu = cpu_start.usage_until(&CpuMark::now(Some(pid))?);

    phase.set("close");
    ctx.stop.cancel();
    let outcomes = measured.collect(handles).await;
    phase.set("settle");
    let rss_after_close = procfs::settle_rss(pid, args.settle_timeout).await?;
    progress_done.cancel();

    let unexpected_frames = outcomes
        .iter()
        .map(|o| o.received.frames + o.received.other + o.received.malformed)
        .sum();
    let params = json!({
        "sockets": args.sockets,
        "users": users,
        "rooms": rooms,
        "hold_secs": args.hold.as_secs_f64(),
        "source_addrs": target.sources.len(),
        "connect_concurrency": common.connect_concurrency,
        "threads": common.threads,
    });
    let mut report = Report::new("idle", common, api.prefix.clone(), params, measured);
    report.idle = Some(IdleResult {
        sockets: open,
        users,
        rooms,
        rss_before,
        rss_after,
        bytes_per_socket,
        held_secs,
        open_at_end,
        rss_after_close,
        unexpected_frames,
    });
    if open_at_end < open {
        report
            .problems
            .push(format!("{} sockets closed during the hold", open - open_at_end));
    }
    if !rss_after.stable {
        report
            .problems
            .push("the RSS with every socket open did not settle within --settle-timeout".to_owned());
    }
    if held_secs + 0.5 < args.hold.as_secs_f64() {
        report
            .problems
            .push(format!("--duration cut the hold short ({held_secs:.1} s)"));
    }
    Ok(report)
}
