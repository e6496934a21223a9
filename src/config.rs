//! Command-line flags and `CHATOY_*` environment variables. Every limit and timeout of the
//! product is here, with a default that works on a laptop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chatoy_bus::NatsConfig;
use chatoy_gateway::config::parse::{duration, positive_duration};
use chatoy_gateway::GatewayConfig;
use chatoy_router::RouterConfig;
use chatoy_store::{CqlConfig, CqlConsistency};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Chatoy: a chat backend that scales horizontally.
///
/// With no subcommand, runs `standalone`: the whole server in one process, storing in SQLite.
#[derive(Debug, Parser)]
#[command(name = "chatoy", version, args_conflicts_with_subcommands = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    #[command(flatten)]
    pub(crate) standalone: StandaloneArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Gateway and router in one process, on the in-process bus and an embedded SQLite store (the default).
    Standalone(StandaloneArgs),
    /// A cluster gateway: serves HTTP and WebSockets; talks to routers over NATS, reads ScyllaDB.
    Gateway(ClusterGatewayArgs),
    /// A cluster router: sequences, stores in ScyllaDB and acknowledges messages from NATS.
    Router(RouterArgs),
    /// Creates or updates the ScyllaDB keyspace and tables (idempotent), then exits.
    Migrate(MigrateArgs),
    /// The terminal client: register, log in, list, create and join rooms, send, tail a room.
    Client(crate::client::ClientArgs),
}

/// NATS settings every cluster process shares.
#[derive(Debug, Clone, Args)]
pub(crate) struct NatsArgs {
    /// NATS server URLs, comma-separated.
    #[arg(
        long,
        env = "CHATOY_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_name = "URLS"
    )]
    pub(crate) nats_url: String,
    /// Prefix of every subject (and of the JetStream stream's name), so deployments can share a NATS.
    #[arg(long, env = "CHATOY_NATS_PREFIX", default_value = "chatoy")]
    pub(crate) nats_prefix: String,
    /// Partitions rooms are spread over, each one sequencer; fixed for a deployment (all processes agree).
    #[arg(long, env = "CHATOY_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) partitions: u32,
    /// Replicas of the JetStream work stream (1 with one NATS server, 3 with a NATS cluster).
    #[arg(long, env = "CHATOY_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=5))]
    pub(crate) nats_replicas: u32,
    /// A router that stops pulling a partition loses it to another router after this long.
    #[arg(long, env = "CHATOY_FAILOVER_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub(crate) failover_timeout: Duration,
    /// Messages of one partition delivered to its router but not yet acknowledged.
    #[arg(long, env = "CHATOY_MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_in_flight: u32,
}

impl NatsArgs {
    pub(crate) fn config(&self, name: String) -> NatsConfig {
        NatsConfig {
            url: self.nats_url.clone(),
            prefix: self.nats_prefix.clone(),
            partitions: self.partitions,
            replicas: self.nats_replicas as usize,
            failover_timeout: self.failover_timeout,
            max_in_flight: i64::from(self.max_in_flight),
            name,
        }
    }
}

/// ScyllaDB settings every cluster process shares.
#[derive(Debug, Clone, Args)]
pub(crate) struct CqlArgs {
    /// ScyllaDB contact points, `host:port`, comma-separated.
    #[arg(
        long,
        env = "CHATOY_CQL_NODES",
        default_value = "127.0.0.1:9042",
        value_delimiter = ',',
        value_name = "NODES"
    )]
    pub(crate) cql_nodes: Vec<String>,
    /// The keyspace.
    #[arg(long, env = "CHATOY_KEYSPACE", default_value = "chatoy")]
    pub(crate) keyspace: String,
    /// Consistency of reads and writes (lightweight transactions use the matching serial level).
    #[arg(long, env = "CHATOY_CONSISTENCY", value_enum, default_value = "local-quorum")]
    pub(crate) consistency: CqlConsistency,
    /// The local datacenter (the keyspace's replication names it; requests prefer its nodes).
    #[arg(long, env = "CHATOY_DATACENTER", default_value = "datacenter1")]
    pub(crate) datacenter: String,
    /// Width of a room's message bucket (a partition of the messages table); fixed for a deployment.
    #[arg(long, env = "CHATOY_BUCKET_WIDTH", default_value = "10days", value_parser = positive_duration)]
    pub(crate) bucket_width: Duration,
}

impl CqlArgs {
    pub(crate) fn config(&self, replication_factor: u32) -> CqlConfig {
        CqlConfig {
            nodes: self.cql_nodes.clone(),
            keyspace: self.keyspace.clone(),
            consistency: self.consistency,
            replication_factor,
            datacenter: self.datacenter.clone(),
            bucket_width_nanos: i64::try_from(self.bucket_width.as_nanos()).unwrap_or(i64::MAX),
        }
    }
}

/// Flags of `chatoy gateway`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ClusterGatewayArgs {
    #[command(flatten)]
    pub(crate) common: GatewayArgs,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    #[command(flatten)]
    pub(crate) cql: CqlArgs,
    /// This process's name in logs and in NATS (defaults to the host name and pid).
    #[arg(long, env = "CHATOY_NODE_ID")]
    pub(crate) node_id: Option<String>,
}

/// Flags of `chatoy router`.
#[derive(Debug, Clone, Args)]
pub(crate) struct RouterArgs {
    /// Address of the router's /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "CHATOY_LISTEN",
        default_value = "127.0.0.1:8081",
        value_name = "ADDR"
    )]
    pub(crate) listen: SocketAddr,
    #[command(flatten)]
    pub(crate) log: LogArgs,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    #[command(flatten)]
    pub(crate) cql: CqlArgs,
    #[command(flatten)]
    pub(crate) tuning: RouterTuning,
    /// On SIGTERM, how long to let the batch in hand finish.
    #[arg(long, env = "CHATOY_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub(crate) drain_timeout: Duration,
    /// This process's name in logs and in NATS (defaults to the host name and pid).
    #[arg(long, env = "CHATOY_NODE_ID")]
    pub(crate) node_id: Option<String>,
}

/// Flags of `chatoy migrate`.
#[derive(Debug, Clone, Args)]
pub(crate) struct MigrateArgs {
    #[command(flatten)]
    pub(crate) log: LogArgs,
    #[command(flatten)]
    pub(crate) cql: CqlArgs,
    /// Replicas per datacenter of the keyspace when it is created (3 in production, 1 on a laptop).
    #[arg(long, env = "CHATOY_REPLICATION_FACTOR", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub(crate) replication_factor: u32,
}

/// Logging flags of every command.
#[derive(Debug, Clone, Args)]
pub(crate) struct LogArgs {
    /// Log format on stderr.
    #[arg(long, env = "CHATOY_LOG_FORMAT", value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    /// Log level or filter, e.g. `info`, `debug`, `chatoy_gateway=debug,info`. Tokens and
    /// passwords are not logged at any level.
    #[arg(long = "log", env = "CHATOY_LOG", default_value = "info", value_name = "FILTER", value_parser = log_filter)]
    pub(crate) log: String,
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn log_filter(text: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| text.to_owned())
        .map_err(|err| format!("{err} (examples: info, debug, chatoy_gateway=debug,info)"))
}

/// Flags of every process that serves clients.
#[derive(Debug, Clone, Args)]
pub(crate) struct GatewayArgs {
    /// Address to serve HTTP and WebSockets on.
    #[arg(
        long,
        env = "CHATOY_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub(crate) listen: SocketAddr,
    #[command(flatten)]
    pub(crate) log: LogArgs,
    #[command(flatten)]
    pub(crate) config: GatewayConfig,
}

/// Flags of `chatoy standalone` (and of `chatoy` with no subcommand).
#[derive(Debug, Clone, Args)]
pub(crate) struct StandaloneArgs {
    #[command(flatten)]
    pub(crate) common: GatewayArgs,
    /// Directory of the SQLite database (`chatoy.db`); created if missing.
    #[arg(
        long,
        env = "CHATOY_DATA_DIR",
        default_value = "./chatoy-data",
        value_name = "DIR"
    )]
    pub(crate) data_dir: PathBuf,
    /// How long a SQLite write waits for a lock held by another process before answering code 5.
    #[arg(long, env = "CHATOY_SQLITE_BUSY_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub(crate) sqlite_busy_timeout: Duration,
    /// Ordered work queues rooms are spread over; each is one sequencer.
    #[arg(long, env = "CHATOY_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) partitions: u32,
    #[command(flatten)]
    pub(crate) tuning: RouterTuning,
}

/// How the router's workers batch and pipeline, for both roles that run one.
#[derive(Debug, Clone, Args)]
pub(crate) struct RouterTuning {
    /// Most messages a router worker takes in one batch (one store write).
    #[arg(long, env = "CHATOY_ROUTER_BATCH", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(crate) router_batch: u32,
    /// Batches a router worker may have being written at once (1: each batch waits for the one before).
    #[arg(long, env = "CHATOY_ROUTER_PIPELINE", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) router_pipeline: u32,
}

impl RouterTuning {
    pub(crate) fn config(&self, name: String, drain_timeout: Duration) -> RouterConfig {
        RouterConfig {
            max_batch: self.router_batch as usize,
            pipeline: self.router_pipeline as usize,
            name,
            drain_timeout,
            ..RouterConfig::default()
        }
    }
}
