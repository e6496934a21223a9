//! What Linux's /proc says about the server and about this process: resident memory, CPU time,
//! and the open-files limit.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

/// `utime` and `stime` in /proc/PID/stat count in USER_HZ ticks, which is 100 on every Linux
/// architecture's user ABI (independent of the kernel's CONFIG_HZ).
const USER_HZ: f64 = 100.0;

/// Which process to read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Proc {
    /// This bench process.
    Myself,
    /// Another process (the server).
    Pid(u32),
}

impl Proc {
    fn path(self, file: &str) -> String {
        match self {
            Proc::Myself => format!("/proc/self/{file}"),
            Proc::Pid(pid) => format!("/proc/{pid}/{file}"),
        }
    }
}

/// Resident set size in bytes (VmRSS of /proc/PID/status).
pub(crate) fn rss_bytes(proc: Proc) -> Result<u64> {
    let path = proc.path("status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&status).ok_or_else(|| anyhow!("no VmRSS line in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

/// User + system CPU time consumed so far (all threads), in seconds.
pub(crate) fn cpu_seconds(proc: Proc) -> Result<f64> {
    let path = proc.path("stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / USER_HZ)
        .ok_or_else(|| anyhow!("cannot parse {path}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is parenthesised and may hold spaces: fields restart after the
    // last ')'. utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The soft limit on open files of this process.
pub(crate) fn open_files_limit() -> Result<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .ok_or_else(|| anyhow!("no 'Max open files' in /proc/self/limits"))?;
    let soft = line["Max open files".len()..]
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("malformed 'Max open files' line"))?;
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse().context("parsing the open-files limit")
}

/// CPU seconds all processes of the machine spent busy so far (the `cpu` line of /proc/stat:
/// user + nice + system + irq + softirq + steal, summed over every core).
pub(crate) fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_busy(&stat)
        .map(|ticks| ticks as f64 / USER_HZ)
        .ok_or_else(|| anyhow!("cannot parse /proc/stat"))
}

fn parse_machine_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

/// Fails early when this process cannot hold `sockets` connections.
pub(crate) fn check_fd_budget(sockets: u64) -> Result<()> {
    let limit = open_files_limit()?;
    let needed = sockets + 64;
    if needed > limit {
        bail!(
            "{sockets} sockets need about {needed} file descriptors but the limit is {limit}: \
             raise it with `ulimit -n` in the shell that starts chatoy-bench"
        );
    }
    Ok(())
}

/// A CPU-time reading of the bench and (optionally) the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuMark {
    at: std::time::Instant,
    bench: f64,
    server: Option<f64>,
    machine: f64,
}

/// CPU used over an interval (all zero until measured).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct CpuUsage {
    /// Wall-clock length of the interval in seconds.
    pub(crate) wall_secs: f64,
    /// CPU seconds (user + system) of the bench process.
    pub(crate) bench_cpu_secs: f64,
    /// CPU seconds (user + system) of the server, with --pid.
    pub(crate) server_cpu_secs: Option<f64>,
    /// CPU seconds every process of the machine used (all cores).
    pub(crate) machine_cpu_secs: f64,
    /// CPU seconds used by everything but the bench and the server: load from other work on
    /// the same machine, which skews the figures when it is large.
    pub(crate) others_cpu_secs: f64,
    /// Cores of the machine.
    pub(crate) cores: usize,
}

impl CpuUsage {
    /// Cores kept busy by the bench on average.
    pub(crate) fn bench_cores(&self) -> f64 {
        self.bench_cpu_secs / self.wall_secs.max(1e-9)
    }

    /// Cores kept busy by the server on average.
    pub(crate) fn server_cores(&self) -> Option<f64> {
        self.server_cpu_secs.map(|cpu| cpu / self.wall_secs.max(1e-9))
    }

    /// Cores kept busy by other processes on average.
    pub(crate) fn others_cores(&self) -> f64 {
        self.others_cpu_secs / self.wall_secs.max(1e-9)
    }
}

impl CpuMark {
    /// Reads the CPU time of this process and of `server`.
    pub(crate) fn now(server: Option<u32>) -> Result<CpuMark> {
        Ok(CpuMark {
            at: std::time::Instant::now(),
            bench: cpu_seconds(Proc::Myself)?,
            server: server.map(|pid| cpu_seconds(Proc::Pid(pid))).transpose()?,
            machine: machine_busy_seconds()?,
        })
    }

    /// The CPU used since `self`.
    pub(crate) fn usage_until(&self, end: &CpuMark) -> CpuUsage {
        let bench_cpu_secs = end.bench - self.bench;
        let server_cpu_secs = match (self.server, end.server) {
            (Some(start), Some(end)) => Some(end - start),
            _ => None,
        };
        let machine_cpu_secs = end.machine - self.machine;
        CpuUsage {
            wall_secs: end.at.duration_since(self.at).as_secs_f64(),
            bench_cpu_secs,
            server_cpu_secs,
            machine_cpu_secs,
            others_cpu_secs: (machine_cpu_secs - bench_cpu_secs - server_cpu_secs.unwrap_or(0.0)).max(0.0),
            cores: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// How a settle wait ended.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Settled {
    /// The last RSS sample in bytes.
    pub(crate) rss_bytes: u64,
    /// Whether two consecutive samples agreed within 1% before the timeout.
    pub(crate) stable: bool,
    /// Samples taken.
    pub(crate) samples: u32,
}

/// Samples the RSS of `pid` every 500 ms until two consecutive samples are within 1% of each
/// other, or `timeout` passes.
pub(crate) async fn settle_rss(pid: u32, timeout: Duration) -> Result<Settled> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut previous = rss_bytes(Proc::Pid(pid))?;
    let mut samples = 1;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let current = rss_bytes(Proc::Pid(pid))?;
        samples += 1;
        let diff = current.abs_diff(previous) as f64;
        if diff <= previous.max(1) as f64 * 0.01 {
            return Ok(Settled {
                rss_bytes: current,
                stable: true,
                samples,
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Settled {
                rss_bytes: current,
                stable: false,
                samples,
            });
        }
        previous = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tchatoy\nVmPeak:\t  99 kB\nVmRSS:\t   12345 kB\nThreads: 3\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn reads_cpu_ticks_after_a_name_with_spaces() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 70 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(320));
    }

    #[test]
    fn reads_machine_busy_time() {
        let stat = "cpu  100 5 50 9000 20 3 2 1 0 0\ncpu0 50 2 25 4500 10 1 1 0 0 0\n";
        assert_eq!(parse_machine_busy(stat), Some(161));
        assert!(machine_busy_seconds().is_ok());
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_bytes(Proc::Myself).is_ok_and(|rss| rss > 0));
        assert!(cpu_seconds(Proc::Myself).is_ok());
        assert!(open_files_limit().is_ok_and(|limit| limit > 0));
    }
}
