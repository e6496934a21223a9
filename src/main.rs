//! The `chatoy` binary: parses flags and `CHATOY_*` variables, starts tracing, and runs the
//! chosen role. With no subcommand it runs `standalone`: gateway and router in one process on
//! the in-process bus and the embedded SQLite store.

mod config;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use chatoy_bus::InProcBus;
use chatoy_store::{SqliteConfig, SqliteStore};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Cli, Command, LogFormat, StandaloneArgs};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let rendered = err.to_string();
            let line = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("chatoy: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Standalone(cli.standalone));
    let Command::Standalone(args) = command;
    init_tracing(args.common.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("chatoy: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(standalone(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chatoy: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHATOY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels the returned token on SIGTERM or Ctrl-C.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(err) => {
                    tracing::error!(cause = %err, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    trigger.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    token
}

async fn standalone(args: StandaloneArgs) -> anyhow::Result<()> {
    let store = SqliteStore::open(&SqliteConfig {
        data_dir: args.data_dir.clone(),
        busy_timeout: args.sqlite_busy_timeout,
    })
    .map_err(anyhow::Error::msg)?;
    let store: chatoy_store::DynStore = Arc::new(store);
    let bus: chatoy_bus::DynBus = Arc::new(InProcBus::new(args.partitions as usize));
    let router_stop = CancellationToken::new();
    let router = chatoy_router::start(
        bus.clone(),
        store.clone(),
        args.router_config(),
        router_stop.clone(),
    )
    .await
    .context("cannot start the router")?;
    let listener = TcpListener::bind(args.common.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.common.listen))?;
    let local = listener
        .local_addr()
        .context("cannot read the listening address")?;
    tracing::info!(%local, data_dir = %args.data_dir.display(), "chatoy standalone ready");
    println!("chatoy listening on http://{local}");
    let shutdown = shutdown_on_signal();
    chatoy_gateway::run(args.common.gateway_config(), store, bus, listener, shutdown)
        .await
        .map_err(anyhow::Error::msg)?;
    router_stop.cancel();
    router.wait().await;
    tracing::info!("stopped");
    Ok(())
}
