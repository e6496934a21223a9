//! The `chatoy` binary: parses flags and `CHATOY_*` variables, starts tracing, and runs the
//! chosen role. With no subcommand it runs `standalone`: gateway and router in one process on
//! the in-process bus and the embedded SQLite store.

mod client;
mod config;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chatoy_bus::{InProcBus, NatsBus};
use chatoy_gateway::health::{serve_probes, Health};
use chatoy_protocol::backoff::Backoff;
use chatoy_store::{CqlStore, SqliteConfig, SqliteStore};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{
    Cli, ClusterGatewayArgs, Command, CqlArgs, GatewayArgs, LogFormat, MigrateArgs, NatsArgs, RouterArgs,
    StandaloneArgs,
};

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
    let (format, filter) = match &command {
        Command::Standalone(args) => (args.common.log.log_format, args.common.log.log.as_str()),
        Command::Gateway(args) => (args.common.log.log_format, args.common.log.log.as_str()),
        Command::Router(args) => (args.log.log_format, args.log.log.as_str()),
        Command::Migrate(args) => (args.log.log_format, args.log.log.as_str()),
        // The client's output is its stdout; only warnings of the libraries it uses go to stderr.
        Command::Client(_) => (LogFormat::Text, "warn"),
    };
    init_tracing(format, filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("chatoy: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Standalone(args) => standalone(args).await,
            Command::Gateway(args) => gateway(args).await,
            Command::Router(args) => router(args).await,
            Command::Migrate(args) => migrate(args).await,
            Command::Client(args) => client::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chatoy: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `filter` (already validated by the flag's parser).
fn init_tracing(format: LogFormat, filter: &str) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // tungstenite traces every frame's payload, `auth` tokens included: never let it log above
    // debug, whatever the filter says.
    let hygiene = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("tungstenite", LevelFilter::DEBUG)
        .with_target("tokio_tungstenite", LevelFilter::DEBUG);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter).with(hygiene);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init(),
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
    })?;
    let store: chatoy_store::DynStore = Arc::new(store);
    let bus: chatoy_bus::DynBus = Arc::new(InProcBus::new(args.partitions as usize));
    let router_stop = CancellationToken::new();
    let router_config = args
        .tuning
        .config(node_name("standalone", &None), Duration::from_secs(10));
    // One registry: the gateway's /metrics shows the router's metrics too.
    let registry = prometheus::Registry::new();
    let router_metrics =
        chatoy_router::Metrics::new(&registry).context("cannot register the router's metrics")?;
    let router = tokio::spawn(chatoy_router::run(
        router_config,
        bus.clone(),
        store.clone(),
        router_metrics,
        router_stop.clone(),
    ));
    let ready =
        |local| tracing::info!(%local, data_dir = %args.data_dir.display(), "chatoy standalone ready");
    serve_clients(&args.common, store, bus, registry, shutdown_on_signal(), ready).await?;
    router_stop.cancel();
    router
        .await
        .context("the router task failed")?
        .context("the router stopped")?;
    tracing::info!("stopped");
    Ok(())
}

fn node_name(role: &str, node_id: &Option<String>) -> String {
    node_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{role}-{}-{}", host.trim(), std::process::id())
    })
}

/// The bus and store of a cluster process.
async fn connect_cluster(
    nats: &NatsArgs,
    cql: &CqlArgs,
    name: &str,
) -> anyhow::Result<(chatoy_bus::DynBus, chatoy_store::DynStore)> {
    let bus = NatsBus::connect(nats.config(name.to_owned()))
        .await
        .map_err(anyhow::Error::msg)?;
    let store = CqlStore::connect(&cql.config(1)).await?;
    Ok((Arc::new(bus), Arc::new(store)))
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<(TcpListener, std::net::SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener
        .local_addr()
        .context("cannot read the listening address")?;
    Ok((listener, local))
}

/// Serves clients on `args.listen` until `shutdown`: `ready` logs the bound address, and the
/// address is printed for whoever started the process.
async fn serve_clients(
    args: &GatewayArgs,
    store: chatoy_store::DynStore,
    bus: chatoy_bus::DynBus,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
    ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let (listener, local) = bind(args.listen).await?;
    ready(local);
    println!("chatoy listening on http://{local}");
    chatoy_gateway::run(args.config.clone(), store, bus, listener, registry, shutdown).await?;
    Ok(())
}

async fn gateway(args: ClusterGatewayArgs) -> anyhow::Result<()> {
    let name = node_name("gateway", &args.node_id);
    let (bus, store) = connect_cluster(&args.nats, &args.cql, &name).await?;
    let shutdown = shutdown_on_signal();
    let registry = prometheus::Registry::new();
    let layout = tokio::spawn(check_layout(bus.clone(), shutdown.clone()));
    let ready = |local| tracing::info!(%local, node = %name, "chatoy gateway ready");
    serve_clients(&args.common, store, bus, registry, shutdown, ready).await?;
    if layout.is_finished() {
        layout.await.context("the layout check failed")??;
    } else {
        layout.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Checks, as soon as the bus answers, that it is laid out for this gateway's number of
/// partitions (a gateway that disagreed with the routers would send messages to partitions no
/// router takes); on a mismatch, stops the gateway with the reason.
async fn check_layout(bus: chatoy_bus::DynBus, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match bus.check_layout().await {
            Ok(()) => return Ok(()),
            Err(err @ chatoy_bus::BusError::Misconfigured(_)) => {
                tracing::error!(cause = %err, "stopping");
                shutdown.cancel();
                return Err(err.into());
            }
            Err(err) => tracing::debug!(cause = %err, "cannot check the bus's layout yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry.next_delay()) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn router(args: RouterArgs) -> anyhow::Result<()> {
    let name = node_name("router", &args.node_id);
    let (bus, store) = connect_cluster(&args.nats, &args.cql, &name).await?;
    let (listener, local) = bind(args.listen).await?;
    let shutdown = shutdown_on_signal();
    let registry = prometheus::Registry::new();
    let metrics = chatoy_router::Metrics::new(&registry).context("cannot register the router's metrics")?;
    tracing::info!(%local, node = %name, "chatoy router ready");
    println!("chatoy router health on http://{local}");
    let health = Health::start(bus.clone(), store.clone(), shutdown.clone()).await;
    let probes = tokio::spawn(serve_probes(listener, health, registry, shutdown.clone()));
    let config = args.tuning.config(name, args.drain_timeout);
    let result = chatoy_router::run(config, bus, store, metrics, shutdown).await;
    probes.abort();
    result.context("the router stopped")?;
    tracing::info!("stopped");
    Ok(())
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    chatoy_store::cql::migrate(&args.cql.config(args.replication_factor)).await?;
    tracing::info!(keyspace = %args.cql.keyspace, "schema is up to date");
    println!("migrated keyspace {}", args.cql.keyspace);
    Ok(())
}
