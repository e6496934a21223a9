//! The run's report: one serializable value written with --json, and the human summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cli::Common;
use crate::procfs::CpuUsage;
use crate::scenario::churn::ChurnResult;
use crate::scenario::fanout::FanoutResult;
use crate::scenario::idle::IdleResult;
use crate::scenario::ConnectStats;

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// `chatoy-bench <version>`.
    pub(crate) tool: String,
    /// `idle`, `fanout` or `churn`.
    pub(crate) scenario: &'static str,
    /// The server's base URL.
    pub(crate) url: String,
    /// The server's pid (--pid).
    pub(crate) server_pid: Option<u32>,
    /// The run's user and room name prefix.
    pub(crate) prefix: String,
    /// The scenario's parameters.
    pub(crate) params: serde_json::Value,
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
    /// The `idle` results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) idle: Option<IdleResult>,
    /// The `fanout` results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fanout: Option<FanoutResult>,
    /// The `churn` results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) churn: Option<ChurnResult>,
    /// Anything that went wrong, in words; non-empty makes the exit status 2.
    pub(crate) problems: Vec<String>,
}

/// Adds `"{count} {what}"` to `problems` for every non-zero count.
pub(crate) fn note_counts(problems: &mut Vec<String>, counts: &[(u64, &str)]) {
    for &(count, what) in counts {
        if count > 0 {
            problems.push(format!("{count} {what}"));
        }
    }
}

/// The report's count of acks per `send` code, from a count per code (the last counts every
/// code from 7 on: `"7+"`); codes never seen are left out.
pub(crate) fn acks_by_code(codes: &[u64]) -> BTreeMap<String, u64> {
    let last = codes.len().saturating_sub(1);
    codes
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(code, &n)| {
            let key = if code == last {
                format!("{code}+")
            } else {
                code.to_string()
            };
            (key, n)
        })
        .collect()
}

/// Acks with a code other than 0, from a count per code.
pub(crate) fn refused_acks(acks_by_code: &BTreeMap<String, u64>) -> u64 {
    acks_by_code
        .iter()
        .filter(|(code, _)| code.as_str() != "0")
        .map(|(_, n)| n)
        .sum()
}

/// `12_345_678` bytes → `11.77 MiB`.
pub(crate) fn bytes(value: f64) -> String {
    let abs = value.abs();
    if abs >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", value / (1024.0 * 1024.0 * 1024.0))
    } else if abs >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", value / (1024.0 * 1024.0))
    } else if abs >= 1024.0 {
        format!("{:.1} KiB", value / 1024.0)
    } else {
        format!("{value:.0} B")
    }
}

impl Report {
    /// The report of a `scenario` run with what every scenario measures, its generic problems
    /// noted (see [`Report::note_common_problems`]); the scenario adds its own results.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        scenario: &'static str,
        common: &Common,
        prefix: String,
        params: serde_json::Value,
        setup_secs: f64,
        connect: ConnectStats,
        cpu: CpuUsage,
        socket_ends: BTreeMap<String, u64>,
        task_failures: Vec<String>,
    ) -> Report {
        let mut report = Report {
            tool: format!("chatoy-bench {}", env!("CARGO_PKG_VERSION")),
            scenario,
            url: common.url.to_string(),
            server_pid: common.pid,
            prefix,
            params,
            setup_secs,
            connect,
            cpu,
            socket_ends,
            task_failures,
            idle: None,
            fanout: None,
            churn: None,
            problems: Vec::new(),
        };
        report.note_common_problems();
        report
    }

    /// Collects the generic problems (connects, socket ends, panics) into `problems`.
    pub(crate) fn note_common_problems(&mut self) {
        if self.connect.failed > 0 {
            self.problems.push(format!(
                "{} of {} sockets could not be opened (first error: {})",
                self.connect.failed,
                self.connect.requested,
                self.connect.first_error.as_deref().unwrap_or("deadline")
            ));
        }
        for (end, count) in &self.socket_ends {
            if end != "stopped" {
                self.problems.push(format!("{count} sockets ended early: {end}"));
            }
        }
        for failure in &self.task_failures {
            self.problems.push(format!("socket task failed: {failure}"));
        }
        if self.cpu.others_cores() > 0.25 {
            self.problems.push(format!(
                "other processes kept {:.2} cores busy during the measurement: the figures are skewed",
                self.cpu.others_cores()
            ));
        }
    }

    /// The human summary.
    pub(crate) fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== {} {} against {} (prefix {})",
            self.tool, self.scenario, self.url, self.prefix
        );
        let _ = writeln!(out, "setup          {:.1} s", self.setup_secs);
        let _ = writeln!(
            out,
            "connect        {} of {} sockets in {:.2} s ({:.0}/s)",
            self.connect.opened, self.connect.requested, self.connect.secs, self.connect.per_sec
        );
        if let Some(idle) = &self.idle {
            idle.summary(&mut out);
        }
        if let Some(fanout) = &self.fanout {
            fanout.summary(&mut out);
        }
        if let Some(churn) = &self.churn {
            churn.summary(&mut out);
        }
        let _ = write!(
            out,
            "cpu            bench {:.2} s ({:.2} cores)",
            self.cpu.bench_cpu_secs,
            self.cpu.bench_cores()
        );
        match (self.cpu.server_cpu_secs, self.cpu.server_cores()) {
            (Some(secs), Some(cores)) => {
                let _ = write!(out, ", server {secs:.2} s ({cores:.2} cores)");
            }
            _ => {
                let _ = write!(out, ", server unknown (no --pid)");
            }
        }
        let _ = writeln!(
            out,
            ", other processes {:.2} s ({:.2} cores), over {:.2} s on {} cores",
            self.cpu.others_cpu_secs,
            self.cpu.others_cores(),
            self.cpu.wall_secs,
            self.cpu.cores
        );
        let ends: Vec<String> = self
            .socket_ends
            .iter()
            .map(|(end, n)| format!("{end} {n}"))
            .collect();
        let _ = writeln!(out, "socket ends    {}", ends.join(", "));
        if self.problems.is_empty() {
            let _ = writeln!(out, "problems       none");
        } else {
            for problem in &self.problems {
                let _ = writeln!(out, "PROBLEM        {problem}");
            }
        }
        out
    }

    /// Writes the JSON report.
    pub(crate) fn write_json(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).context("encoding the report")?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_read_well() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(2048.0), "2.0 KiB");
        assert_eq!(bytes(-3.0 * 1024.0 * 1024.0), "-3.00 MiB");
    }
}
