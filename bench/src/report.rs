//! The run's report: one serializable value written with --json, and the human summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cli::Common;
use crate::scenario::churn::ChurnResult;
use crate::scenario::fanout::FanoutResult;
use crate::scenario::idle::IdleResult;
use crate::scenario::Measured;

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
    /// What every scenario measures: setup, connects, CPU, socket ends and task failures.
    #[serde(flatten)]
    pub(crate) measured: Measured,
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
    /// The report of a `scenario` run with what every scenario measures and the problems that
    /// shows (see [`Measured::note_problems`]); the scenario adds its own results.
    pub(crate) fn new(
        scenario: &'static str,
        common: &Common,
        prefix: String,
        params: serde_json::Value,
        measured: Measured,
    ) -> Report {
        let mut problems = Vec::new();
        measured.note_problems(&mut problems);
        Report {
            tool: format!("chatoy-bench {}", env!("CARGO_PKG_VERSION")),
            scenario,
            url: common.url.to_string(),
            server_pid: common.pid,
            prefix,
            params,
            measured,
            idle: None,
            fanout: None,
            churn: None,
            problems,
        }
    }

    /// The human summary.
    pub(crate) fn summary(&self) -> String {
        let mut out = String::new();
        let (measured, cpu) = (&self.measured, &self.measured.cpu);
        let _ = writeln!(
            out,
            "== {} {} against {} (prefix {})",
            self.tool, self.scenario, self.url, self.prefix
        );
        let _ = writeln!(out, "setup          {:.1} s", measured.setup_secs);
        let _ = writeln!(
            out,
            "connect        {} of {} sockets in {:.2} s ({:.0}/s)",
            measured.connect.opened,
            measured.connect.requested,
            measured.connect.secs,
            measured.connect.per_sec
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
            cpu.bench_cpu_secs,
            cpu.bench_cores()
        );
        match (cpu.server_cpu_secs, cpu.server_cores()) {
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
            cpu.others_cpu_secs,
            cpu.others_cores(),
            cpu.wall_secs,
            cpu.cores
        );
        let ends: Vec<String> = measured
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
