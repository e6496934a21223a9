//! Every limit and timeout of the gateway: the flags of the processes that serve clients, with
//! their defaults.

use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use clap::{CommandFactory, FromArgMatches};

/// Browser origins allowed to call the API and open WebSockets (`--allowed-origins`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// Only same-origin pages (an `Origin` whose host and port are the request's `Host`) and
    /// clients that send no `Origin` at all; no CORS headers are ever sent.
    #[default]
    SameOrigin,
    /// Those, and these origins (`scheme://host[:port]`, lower case, no trailing slash), which
    /// also get CORS headers.
    List(Vec<String>),
    /// Every origin (`*`): CORS headers for whatever `Origin` a request carries.
    Any,
}

impl AllowedOrigins {
    /// Parses a comma-separated list: empty for [`AllowedOrigins::SameOrigin`], `*` alone for
    /// [`AllowedOrigins::Any`], else origins of the form `scheme://host[:port]`.
    pub fn parse(text: &str) -> Result<AllowedOrigins, String> {
        let entries: Vec<&str> = text.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        if entries.is_empty() {
            return Ok(AllowedOrigins::SameOrigin);
        }
        if entries.contains(&"*") {
            if entries.len() > 1 {
                return Err("`*` allows every origin and cannot be combined with others".into());
            }
            return Ok(AllowedOrigins::Any);
        }
        let mut origins = Vec::with_capacity(entries.len());
        for entry in entries {
            let origin = entry.trim_end_matches('/').to_ascii_lowercase();
            let valid = origin.split_once("://").is_some_and(|(scheme, authority)| {
                !scheme.is_empty()
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                    && !authority.is_empty()
                    && !authority.contains(['/', '?', '#', '@', ' '])
            });
            if !valid {
                return Err(format!(
                    "{entry:?} is not an origin: expected scheme://host[:port], e.g. https://chat.example.com"
                ));
            }
            origins.push(origin);
        }
        Ok(AllowedOrigins::List(origins))
    }
}

/// Gateway settings: the flags and `CHATOY_*` variables of every process that serves clients
/// (the binary flattens this struct into its commands, so each default is written once, here).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayConfig {
    /// How long a login token stays valid.
    #[arg(long, env = "CHATOY_TOKEN_TTL", default_value = "48h", value_parser = parse::positive_duration)]
    pub token_ttl: Duration,
    /// Close a WebSocket that has not authenticated within this time of the upgrade (1008).
    #[arg(long, env = "CHATOY_AUTH_TIMEOUT", default_value = "10s", value_parser = parse::positive_duration)]
    pub auth_timeout: Duration,
    /// Close a WebSocket after this many failed auth attempts (1008).
    #[arg(long, env = "CHATOY_MAX_AUTH_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_auth_failures: u32,
    /// How often the server pings each WebSocket.
    #[arg(long, env = "CHATOY_PING_INTERVAL", default_value = "30s", value_parser = parse::positive_duration)]
    pub ping_interval: Duration,
    /// Close a WebSocket from which nothing (not even a pong) arrived for this long (1008).
    #[arg(long, env = "CHATOY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse::positive_duration)]
    pub idle_timeout: Duration,
    /// Largest inbound WebSocket frame or message in bytes; larger closes with 1009.
    #[arg(long, env = "CHATOY_MAX_FRAME_SIZE", default_value_t = 65536, value_parser = RangedU64ValueParser::<usize>::new().range(1024..=16_777_216))]
    pub max_frame_size: usize,
    /// Frames queued for one socket before it is closed as a slow consumer (1008).
    #[arg(long, env = "CHATOY_OUTBOUND_QUEUE", default_value_t = 1024, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub outbound_queue: usize,
    /// Drop a connection whose writes make no progress for this long.
    #[arg(long, env = "CHATOY_WRITE_TIMEOUT", default_value = "10s", value_parser = parse::positive_duration)]
    pub write_timeout: Duration,
    /// How long to wait for the router's answer to a msg before answering code 5.
    #[arg(long, env = "CHATOY_SEND_TIMEOUT", default_value = "5s", value_parser = parse::positive_duration)]
    pub send_timeout: Duration,
    /// Sustained msg frames per second per socket; above it the answer is code 4.
    #[arg(long, env = "CHATOY_MSG_RATE", default_value = "100", value_parser = parse::positive_rate)]
    pub msg_rate: f64,
    /// Burst of msg frames per socket allowed above the sustained rate.
    #[arg(long, env = "CHATOY_MSG_BURST", default_value = "200", value_parser = parse::positive_rate)]
    pub msg_burst: f64,
    /// Open WebSockets per process; above it the upgrade answers 503.
    #[arg(long, env = "CHATOY_MAX_SOCKETS", default_value_t = 19_000)]
    pub max_sockets: usize,
    /// Authenticated sockets of one user per process; the next `auth` is closed with 1008.
    #[arg(long, env = "CHATOY_MAX_SOCKETS_PER_USER", default_value_t = 64, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_sockets_per_user: usize,
    /// Rooms one user may be in (created or joined); creating or joining more answers 403.
    #[arg(long, env = "CHATOY_MAX_ROOMS_PER_USER", default_value_t = 1000, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_rooms_per_user: usize,
    /// Password hashes computed at once (argon2id: about --argon2-memory-kib each); a
    /// registration or login that cannot start one within --hash-wait answers 503.
    #[arg(long, env = "CHATOY_MAX_CONCURRENT_HASHES", default_value_t = 4, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub max_concurrent_hashes: usize,
    /// How long a registration or login waits for one of the concurrent hashes.
    #[arg(long, env = "CHATOY_HASH_WAIT", default_value = "2s", value_parser = parse::duration)]
    pub hash_wait: Duration,
    /// Registrations per second per client address, sustained (0: no limit); over it, 429.
    #[arg(long, env = "CHATOY_REGISTER_RATE_PER_IP", default_value = "0.2", value_parser = parse::rate_or_off)]
    pub register_rate_per_ip: f64,
    /// Burst of registrations per client address allowed above the sustained rate.
    #[arg(long, env = "CHATOY_REGISTER_BURST_PER_IP", default_value = "20", value_parser = parse::burst)]
    pub register_burst_per_ip: f64,
    /// On SIGTERM, how long to wait for sockets and in-flight requests before exiting.
    #[arg(long, env = "CHATOY_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse::duration)]
    pub drain_timeout: Duration,
    /// Most stored messages replayed per room for `auth` with `since` (the newest ones).
    #[arg(long, env = "CHATOY_SINCE_LIMIT", default_value_t = 1000, value_parser = RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub since_limit: usize,
    /// Largest HTTP request body in bytes (413 above).
    #[arg(long, env = "CHATOY_MAX_BODY_SIZE", default_value_t = 65536, value_parser = RangedU64ValueParser::<usize>::new().range(1024..))]
    pub max_body_size: usize,
    /// Time allowed for an HTTP request's headers (else the connection is closed), and
    /// separately for its body (else 408). Also how long an idle keep-alive connection stays.
    #[arg(long, env = "CHATOY_HTTP_TIMEOUT", default_value = "10s", value_parser = parse::positive_duration)]
    pub http_timeout: Duration,
    /// Largest HTTP request head (request line and headers) in bytes (431 above).
    #[arg(long, env = "CHATOY_MAX_HEADER_SIZE", default_value_t = 16_384, value_parser = RangedU64ValueParser::<usize>::new().range(8192..=1_048_576))]
    pub max_header_size: usize,
    /// New connections per second per process, counted at a connection's first request that is
    /// not a probe (/healthz, /readyz, /metrics); above it the request answers 503.
    #[arg(long, env = "CHATOY_CONN_RATE", default_value = "1000", value_parser = parse::positive_rate)]
    pub conn_rate: f64,
    /// Burst of new connections per process allowed above the sustained rate.
    #[arg(long, env = "CHATOY_CONN_BURST", default_value = "2000", value_parser = parse::burst)]
    pub conn_burst: f64,
    /// New connections per second per client address (IPv6: per /64); above it the request
    /// answers 429. 0 turns it off (behind a proxy without --client-ip-header every client
    /// has the proxy's address).
    #[arg(long, env = "CHATOY_CONN_RATE_PER_IP", default_value = "100", value_parser = parse::rate_or_off)]
    pub conn_rate_per_ip: f64,
    /// Burst of new connections per client address allowed above the sustained rate.
    #[arg(long, env = "CHATOY_CONN_BURST_PER_IP", default_value = "1000", value_parser = parse::burst)]
    pub conn_burst_per_ip: f64,
    /// Failed logins of one username from one client address before that address's logins of
    /// it answer 429 (0: no limit).
    #[arg(long, env = "CHATOY_LOGIN_FAILURES_PER_USER", default_value_t = 10)]
    pub login_failures_per_user: u32,
    /// Failed logins of one username from all addresses before its logins answer 429, except
    /// from addresses it logged in from within --login-lockout (0: no limit).
    #[arg(long, env = "CHATOY_LOGIN_FAILURES_PER_USER_ALL", default_value_t = 1000)]
    pub login_failures_per_user_all: u32,
    /// Failed logins from one client address before its logins answer 429 (0: no limit).
    #[arg(long, env = "CHATOY_LOGIN_FAILURES_PER_IP", default_value_t = 100)]
    pub login_failures_per_ip: u32,
    /// Failed logins count until this long passes without one; a locked username or address
    /// is refused until this long after its last failure.
    #[arg(long, env = "CHATOY_LOGIN_LOCKOUT", default_value = "15m", value_parser = parse::positive_duration)]
    pub login_lockout: Duration,
    /// Header that carries the client's address, set by a proxy in front of every gateway
    /// (e.g. x-forwarded-for; its last entry counts). Unset: the TCP peer's address. Set it only
    /// if clients cannot reach the process except through that proxy.
    #[arg(long, env = "CHATOY_CLIENT_IP_HEADER", value_name = "HEADER", value_parser = parse::header_name)]
    pub client_ip_header: Option<String>,
    /// Browser origins allowed besides the gateway's own host, comma-separated
    /// (`https://chat.example.com,https://app.example.com`), or `*` for any. They get CORS
    /// headers; a request or WebSocket upgrade with any other Origin answers 403. Requests
    /// without an Origin (non-browser clients) are always allowed.
    #[arg(long, env = "CHATOY_ALLOWED_ORIGINS", default_value = "", value_name = "ORIGINS", value_parser = AllowedOrigins::parse)]
    pub allowed_origins: AllowedOrigins,
    /// argon2id memory cost per password hash, in KiB.
    #[arg(long, env = "CHATOY_ARGON2_MEMORY_KIB", default_value_t = 19_456, value_parser = clap::value_parser!(u32).range(8..))]
    pub argon2_memory_kib: u32,
    /// argon2id iterations per password hash.
    #[arg(long, env = "CHATOY_ARGON2_ITERATIONS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub argon2_iterations: u32,
}

impl Default for GatewayConfig {
    /// The flags' defaults, whatever the environment says.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: GatewayConfig,
        }
        let command = Defaults::command().mut_args(|arg| arg.env(None));
        let matches = command.get_matches_from(["chatoy"]);
        Defaults::from_arg_matches(&matches)
            .expect("the defaults are valid")
            .config
    }
}

/// Value parsers of flags: each says what it accepts when a value is refused.
pub mod parse {
    use std::time::Duration;

    /// A duration like `500ms`, `10s` or `48h`.
    pub fn duration(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text).map_err(|err| format!("{err} (examples: 500ms, 10s, 48h)"))
    }

    /// A duration greater than zero.
    pub fn positive_duration(text: &str) -> Result<Duration, String> {
        let value = duration(text)?;
        if value.is_zero() {
            return Err("must be greater than zero".into());
        }
        Ok(value)
    }

    /// A rate greater than zero.
    pub fn positive_rate(text: &str) -> Result<f64, String> {
        match text.parse::<f64>() {
            Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
            _ => Err("must be a number greater than zero".into()),
        }
    }

    /// A rate, or 0 for no limit.
    pub fn rate_or_off(text: &str) -> Result<f64, String> {
        match text.parse::<f64>() {
            Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
            _ => Err("must be a number, zero or greater (0 turns the limit off)".into()),
        }
    }

    /// A burst: at least one.
    pub fn burst(text: &str) -> Result<f64, String> {
        match text.parse::<f64>() {
            Ok(value) if value.is_finite() && value >= 1.0 => Ok(value),
            _ => Err("must be a number, 1 or greater".into()),
        }
    }

    /// An HTTP header name, in lower case.
    pub fn header_name(text: &str) -> Result<String, String> {
        let name = text.trim().to_ascii_lowercase();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(format!("{text:?} is not an HTTP header name"));
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::AllowedOrigins;

    #[test]
    fn allowed_origins_parse() {
        assert_eq!(AllowedOrigins::parse(""), Ok(AllowedOrigins::SameOrigin));
        assert_eq!(AllowedOrigins::parse(" , "), Ok(AllowedOrigins::SameOrigin));
        assert_eq!(AllowedOrigins::parse("*"), Ok(AllowedOrigins::Any));
        assert_eq!(
            AllowedOrigins::parse("HTTPS://Chat.Example.com/, http://localhost:3000"),
            Ok(AllowedOrigins::List(vec![
                "https://chat.example.com".into(),
                "http://localhost:3000".into()
            ]))
        );
        for bad in [
            "*,https://a.example",
            "chat.example.com",
            "https://a.example/app",
            "https://",
            "://x",
        ] {
            assert!(AllowedOrigins::parse(bad).is_err(), "{bad}");
        }
    }
}
