//! `chatoy-bench`: a load generator for Chatoy (see `chatoy-bench --help`).
//!
//! Exit status: 0 when the run completed with nothing wrong, 2 when it completed but found
//! problems (lost or duplicated messages, sockets that failed or were closed, ...; listed in the
//! summary and the report), 1 when it could not run.

mod cli;
mod connect;
mod histogram;
mod ids;
mod procfs;
mod progress;
mod report;
mod scenario;
mod setup;
mod socket;
mod wire;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{Cli, Scenario};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(err) => {
            eprintln!("chatoy-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenario; `Ok(false)` when the report lists problems.
fn run(cli: Cli) -> Result<bool> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(cli.common.threads))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(async {
        match &cli.scenario {
            Scenario::Idle(args) => scenario::idle::run(&cli.common, args).await,
            Scenario::Fanout(args) => scenario::fanout::run(&cli.common, args).await,
            Scenario::Churn(args) => scenario::churn::run(&cli.common, args).await,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    let report = report?;
    print!("{}", report.summary());
    if let Some(path) = &cli.common.json {
        report.write_json(path)?;
        eprintln!("report written to {}", path.display());
    }
    Ok(report.problems.is_empty())
}
