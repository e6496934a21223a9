//! Command-line flags and `CHATOY_*` environment variables. Every limit and timeout of the
//! product is here, with a default that works on a laptop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chatoy_bus::NatsConfig;
use chatoy_gateway::{AllowedOrigins, GatewayConfig};
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

/// The consistency of ordinary ScyllaDB reads and writes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Consistency {
    One,
    LocalOne,
    Quorum,
    LocalQuorum,
    EachQuorum,
    All,
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
    pub(crate) consistency: Consistency,
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
            consistency: match self.consistency {
                Consistency::One => CqlConsistency::One,
                Consistency::LocalOne => CqlConsistency::LocalOne,
                Consistency::Quorum => CqlConsistency::Quorum,
                Consistency::LocalQuorum => CqlConsistency::LocalQuorum,
                Consistency::EachQuorum => CqlConsistency::EachQuorum,
                Consistency::All => CqlConsistency::All,
            },
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
    /// Log format on stderr.
    #[arg(long, env = "CHATOY_LOG_FORMAT", value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    /// Log level or filter, e.g. `info`, `debug`, `chatoy_router=debug,info`.
    #[arg(long = "log", env = "CHATOY_LOG", default_value = "info", value_name = "FILTER", value_parser = log_filter)]
    pub(crate) log: String,
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
    /// Log format on stderr.
    #[arg(long, env = "CHATOY_LOG_FORMAT", value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    /// Log level or filter, e.g. `info`, `debug`.
    #[arg(long = "log", env = "CHATOY_LOG", default_value = "info", value_name = "FILTER", value_parser = log_filter)]
    pub(crate) log: String,
    #[command(flatten)]
    pub(crate) cql: CqlArgs,
    /// Replicas per datacenter of the keyspace when it is created (3 in production, 1 on a laptop).
    #[arg(long, env = "CHATOY_REPLICATION_FACTOR", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub(crate) replication_factor: u32,
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("{err} (examples: 500ms, 10s, 48h)"))
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    let value = duration(text)?;
    if value.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(value)
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err("must be a number greater than zero".into()),
    }
}

fn rate_or_off(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err("must be a number, zero or greater (0 turns the limit off)".into()),
    }
}

fn burst(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 1.0 => Ok(value),
        _ => Err("must be a number, 1 or greater".into()),
    }
}

fn log_filter(text: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| text.to_owned())
        .map_err(|err| format!("{err} (examples: info, debug, chatoy_gateway=debug,info)"))
}

fn header_name(text: &str) -> Result<String, String> {
    let name = text.trim().to_ascii_lowercase();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{text:?} is not an HTTP header name"));
    }
    Ok(name)
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
    /// Log format on stderr.
    #[arg(long, env = "CHATOY_LOG_FORMAT", value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    /// Log level or filter, e.g. `info`, `debug`, `chatoy_gateway=debug,info`. Tokens and
    /// passwords are not logged at any level.
    #[arg(long = "log", env = "CHATOY_LOG", default_value = "info", value_name = "FILTER", value_parser = log_filter)]
    pub(crate) log: String,
    /// How long a login token stays valid.
    #[arg(long, env = "CHATOY_TOKEN_TTL", default_value = "48h", value_parser = positive_duration)]
    pub(crate) token_ttl: Duration,
    /// Close a WebSocket that has not authenticated within this time of the upgrade (1008).
    #[arg(long, env = "CHATOY_AUTH_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub(crate) auth_timeout: Duration,
    /// Close a WebSocket after this many failed auth attempts (1008).
    #[arg(long, env = "CHATOY_MAX_AUTH_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_auth_failures: u32,
    /// How often the server pings each WebSocket.
    #[arg(long, env = "CHATOY_PING_INTERVAL", default_value = "30s", value_parser = positive_duration)]
    pub(crate) ping_interval: Duration,
    /// Close a WebSocket from which nothing (not even a pong) arrived for this long (1008).
    #[arg(long, env = "CHATOY_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) idle_timeout: Duration,
    /// Largest inbound WebSocket frame or message in bytes; larger closes with 1009.
    #[arg(long, env = "CHATOY_MAX_FRAME_SIZE", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub(crate) max_frame_size: u32,
    /// Frames queued for one socket before it is closed as a slow consumer (1008).
    #[arg(long, env = "CHATOY_OUTBOUND_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) outbound_queue: u32,
    /// Drop a connection whose writes make no progress for this long.
    #[arg(long, env = "CHATOY_WRITE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub(crate) write_timeout: Duration,
    /// How long to wait for the router's answer to a msg before answering code 5.
    #[arg(long, env = "CHATOY_SEND_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub(crate) send_timeout: Duration,
    /// Sustained msg frames per second per socket; above it the answer is code 4.
    #[arg(long, env = "CHATOY_MSG_RATE", default_value = "100", value_parser = positive_rate)]
    pub(crate) msg_rate: f64,
    /// Burst of msg frames per socket allowed above the sustained rate.
    #[arg(long, env = "CHATOY_MSG_BURST", default_value = "200", value_parser = positive_rate)]
    pub(crate) msg_burst: f64,
    /// Open WebSockets per process; above it the upgrade answers 503.
    #[arg(long, env = "CHATOY_MAX_SOCKETS", default_value_t = 19_000)]
    pub(crate) max_sockets: usize,
    /// Authenticated sockets of one user per process; the next `auth` is closed with 1008.
    #[arg(long, env = "CHATOY_MAX_SOCKETS_PER_USER", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_sockets_per_user: u32,
    /// Rooms one user may be in (created or joined); creating or joining more answers 403.
    #[arg(long, env = "CHATOY_MAX_ROOMS_PER_USER", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_rooms_per_user: u32,
    /// Password hashes computed at once (argon2id: about --argon2-memory-kib each); a
    /// registration or login that cannot start one within --hash-wait answers 503.
    #[arg(long, env = "CHATOY_MAX_CONCURRENT_HASHES", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) max_concurrent_hashes: u32,
    /// How long a registration or login waits for one of the concurrent hashes.
    #[arg(long, env = "CHATOY_HASH_WAIT", default_value = "2s", value_parser = duration)]
    pub(crate) hash_wait: Duration,
    /// Registrations per second per client address, sustained (0: no limit); over it, 429.
    #[arg(long, env = "CHATOY_REGISTER_RATE_PER_IP", default_value = "0.2", value_parser = rate_or_off)]
    pub(crate) register_rate_per_ip: f64,
    /// Burst of registrations per client address allowed above the sustained rate.
    #[arg(long, env = "CHATOY_REGISTER_BURST_PER_IP", default_value = "20", value_parser = burst)]
    pub(crate) register_burst_per_ip: f64,
    /// On SIGTERM, how long to wait for sockets and in-flight requests before exiting.
    #[arg(long, env = "CHATOY_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub(crate) drain_timeout: Duration,
    /// Most stored messages replayed per room for `auth` with `since` (the newest ones).
    #[arg(long, env = "CHATOY_SINCE_LIMIT", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) since_limit: u32,
    /// Largest HTTP request body in bytes (413 above).
    #[arg(long, env = "CHATOY_MAX_BODY_SIZE", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1024..))]
    pub(crate) max_body_size: u32,
    /// Time allowed for an HTTP request's headers (else the connection is closed), and
    /// separately for its body (else 408). Also how long an idle keep-alive connection stays.
    #[arg(long, env = "CHATOY_HTTP_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub(crate) http_timeout: Duration,
    /// Largest HTTP request head (request line and headers) in bytes (431 above).
    #[arg(long, env = "CHATOY_MAX_HEADER_SIZE", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(8192..=1_048_576))]
    pub(crate) max_header_size: u32,
    /// New connections per second per process, counted at a connection's first request that is
    /// not a probe (/healthz, /readyz, /metrics); above it the request answers 503.
    #[arg(long, env = "CHATOY_CONN_RATE", default_value = "1000", value_parser = positive_rate)]
    pub(crate) conn_rate: f64,
    /// Burst of new connections per process allowed above the sustained rate.
    #[arg(long, env = "CHATOY_CONN_BURST", default_value = "2000", value_parser = burst)]
    pub(crate) conn_burst: f64,
    /// New connections per second per client address (IPv6: per /64); above it the request
    /// answers 429. 0 turns it off (behind a proxy without --client-ip-header every client
    /// has the proxy's address).
    #[arg(long, env = "CHATOY_CONN_RATE_PER_IP", default_value = "100", value_parser = rate_or_off)]
    pub(crate) conn_rate_per_ip: f64,
    /// Burst of new connections per client address allowed above the sustained rate.
    #[arg(long, env = "CHATOY_CONN_BURST_PER_IP", default_value = "1000", value_parser = burst)]
    pub(crate) conn_burst_per_ip: f64,
    /// Failed logins of one username from one client address before that address's logins of
    /// it answer 429 (0: no limit).
    #[arg(long, env = "CHATOY_LOGIN_FAILURES_PER_USER", default_value_t = 10)]
    pub(crate) login_failures_per_user: u32,
    /// Failed logins of one username from all addresses before its logins answer 429, except
    /// from addresses it logged in from within --login-lockout (0: no limit).
    #[arg(long, env = "CHATOY_LOGIN_FAILURES_PER_USER_ALL", default_value_t = 1000)]
    pub(crate) login_failures_per_user_all: u32,
    /// Failed logins from one client address before its logins answer 429 (0: no limit).
    #[arg(long, env = "CHATOY_LOGIN_FAILURES_PER_IP", default_value_t = 100)]
    pub(crate) login_failures_per_ip: u32,
    /// Failed logins count until this long passes without one; a locked username or address
    /// is refused until this long after its last failure.
    #[arg(long, env = "CHATOY_LOGIN_LOCKOUT", default_value = "15m", value_parser = positive_duration)]
    pub(crate) login_lockout: Duration,
    /// Header that carries the client's address, set by a proxy in front of every gateway
    /// (e.g. x-forwarded-for; its last entry counts). Unset: the TCP peer's address. Set it only
    /// if clients cannot reach the process except through that proxy.
    #[arg(long, env = "CHATOY_CLIENT_IP_HEADER", value_name = "HEADER", value_parser = header_name)]
    pub(crate) client_ip_header: Option<String>,
    /// Browser origins allowed besides the gateway's own host, comma-separated
    /// (`https://chat.example.com,https://app.example.com`), or `*` for any. They get CORS
    /// headers; a request or WebSocket upgrade with any other Origin answers 403. Requests
    /// without an Origin (non-browser clients) are always allowed.
    #[arg(long, env = "CHATOY_ALLOWED_ORIGINS", default_value = "", value_name = "ORIGINS", value_parser = AllowedOrigins::parse)]
    pub(crate) allowed_origins: AllowedOrigins,
    /// argon2id memory cost per password hash, in KiB.
    #[arg(long, env = "CHATOY_ARGON2_MEMORY_KIB", default_value_t = 19_456, value_parser = clap::value_parser!(u32).range(8..))]
    pub(crate) argon2_memory_kib: u32,
    /// argon2id iterations per password hash.
    #[arg(long, env = "CHATOY_ARGON2_ITERATIONS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) argon2_iterations: u32,
}

impl GatewayArgs {
    pub(crate) fn gateway_config(&self) -> GatewayConfig {
        GatewayConfig {
            token_ttl: self.token_ttl,
            auth_timeout: self.auth_timeout,
            max_auth_failures: self.max_auth_failures,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            max_frame_size: self.max_frame_size as usize,
            outbound_queue: self.outbound_queue as usize,
            write_timeout: self.write_timeout,
            send_timeout: self.send_timeout,
            msg_rate: self.msg_rate,
            msg_burst: self.msg_burst,
            max_sockets: self.max_sockets,
            max_sockets_per_user: self.max_sockets_per_user as usize,
            max_rooms_per_user: self.max_rooms_per_user as usize,
            max_concurrent_hashes: self.max_concurrent_hashes as usize,
            hash_wait: self.hash_wait,
            register_rate_per_ip: self.register_rate_per_ip,
            register_burst_per_ip: self.register_burst_per_ip,
            drain_timeout: self.drain_timeout,
            since_limit: self.since_limit as usize,
            max_body_size: self.max_body_size as usize,
            http_timeout: self.http_timeout,
            max_header_size: self.max_header_size as usize,
            conn_rate: self.conn_rate,
            conn_burst: self.conn_burst,
            conn_rate_per_ip: self.conn_rate_per_ip,
            conn_burst_per_ip: self.conn_burst_per_ip,
            login_failures_per_user: self.login_failures_per_user,
            login_failures_per_user_all: self.login_failures_per_user_all,
            login_failures_per_ip: self.login_failures_per_ip,
            login_lockout: self.login_lockout,
            client_ip_header: self.client_ip_header.clone(),
            allowed_origins: self.allowed_origins.clone(),
            argon2_memory_kib: self.argon2_memory_kib,
            argon2_iterations: self.argon2_iterations,
        }
    }
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
