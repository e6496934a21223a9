//! Every limit and timeout of the gateway, passed in explicitly by the binary.

use std::time::Duration;

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

/// Gateway settings; the defaults are PROTOCOL.md's.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How long a token stays valid after login.
    pub token_ttl: Duration,
    /// A socket that has not authenticated this long after the upgrade is closed (1008).
    pub auth_timeout: Duration,
    /// Failed `auth` attempts before the socket is closed (1008).
    pub max_auth_failures: u32,
    /// How often the server pings each socket.
    pub ping_interval: Duration,
    /// A socket silent (no frame, not even a pong) this long is closed (1008).
    pub idle_timeout: Duration,
    /// Largest inbound frame or message in bytes; larger closes with 1009.
    pub max_frame_size: usize,
    /// Frames queued for one socket before it counts as a slow consumer and is closed (1008).
    pub outbound_queue: usize,
    /// A write to one socket that makes no progress this long drops the connection.
    pub write_timeout: Duration,
    /// How long the gateway waits for the router's answer before answering code 5.
    pub send_timeout: Duration,
    /// Sustained `msg` frames per second per socket before code 4.
    pub msg_rate: f64,
    /// Burst of `msg` frames per socket allowed above the rate.
    pub msg_burst: f64,
    /// Open WebSockets per gateway; the upgrade answers 503 above it.
    pub max_sockets: usize,
    /// Authenticated sockets of one user per gateway; the next `auth` closes with 1008.
    pub max_sockets_per_user: usize,
    /// Rooms one user may be in (created or joined); creating or joining more answers 403.
    pub max_rooms_per_user: usize,
    /// Password hashes (argon2id: about `argon2_memory_kib` each) computed at once; a
    /// registration or login that cannot start one within `hash_wait` answers 503.
    pub max_concurrent_hashes: usize,
    /// How long a registration or login waits for one of the concurrent hashes.
    pub hash_wait: Duration,
    /// Registrations per second per client address (sustained); over it, 429. Zero disables.
    pub register_rate_per_ip: f64,
    /// Burst of registrations per client address allowed above `register_rate_per_ip`.
    pub register_burst_per_ip: f64,
    /// Grace period for sockets and in-flight work on shutdown.
    pub drain_timeout: Duration,
    /// Most messages replayed per room for `since`.
    pub since_limit: usize,
    /// Largest HTTP request body in bytes (413 above).
    pub max_body_size: usize,
    /// Time allowed to send request headers, and separately the body: a connection whose
    /// request head is not complete in time is closed; a body not complete in time gets 408.
    pub http_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; 431 above. At least 8192.
    pub max_header_size: usize,
    /// New connections per second per gateway (sustained), counted at a connection's first
    /// request that is not a probe (`/healthz`, `/readyz`, `/metrics`); over it, 503.
    pub conn_rate: f64,
    /// Burst of new connections per gateway allowed above `conn_rate`.
    pub conn_burst: f64,
    /// New connections per second per client address (an IPv6 address counts by its /64);
    /// over it, 429. Zero disables the per-address limit.
    pub conn_rate_per_ip: f64,
    /// Burst of new connections per client address allowed above `conn_rate_per_ip`.
    pub conn_burst_per_ip: f64,
    /// Failed logins of one username from one client address before that address's logins
    /// of the username are refused with 429; 0 disables.
    pub login_failures_per_user: u32,
    /// Failed logins of one username from all addresses before its logins are refused with
    /// 429 — except from addresses it logged in from successfully within `login_lockout`; 0
    /// disables.
    pub login_failures_per_user_all: u32,
    /// Failed logins from one client address before its logins are refused with 429; 0
    /// disables.
    pub login_failures_per_ip: u32,
    /// Failures count until this long passes without one; a locked username or address is
    /// refused until this long after its last failure.
    pub login_lockout: Duration,
    /// A request header naming the client's address, set by a trusted proxy in front of every
    /// gateway (e.g. `x-forwarded-for`; its last entry is used). `None`: the TCP peer.
    pub client_ip_header: Option<String>,
    /// Browser origins allowed (the WebSocket upgrade and every HTTP request).
    pub allowed_origins: AllowedOrigins,
    /// argon2id memory cost in KiB.
    pub argon2_memory_kib: u32,
    /// argon2id iterations.
    pub argon2_iterations: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            token_ttl: Duration::from_secs(48 * 3600),
            auth_timeout: Duration::from_secs(10),
            max_auth_failures: 5,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_frame_size: 64 * 1024,
            outbound_queue: 1024,
            write_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(5),
            msg_rate: 100.0,
            msg_burst: 200.0,
            max_sockets: 19_000,
            max_sockets_per_user: 64,
            max_rooms_per_user: 1000,
            max_concurrent_hashes: 4,
            hash_wait: Duration::from_secs(2),
            register_rate_per_ip: 0.2,
            register_burst_per_ip: 20.0,
            drain_timeout: Duration::from_secs(10),
            since_limit: 1000,
            max_body_size: 64 * 1024,
            http_timeout: Duration::from_secs(10),
            max_header_size: 16 * 1024,
            conn_rate: 1000.0,
            conn_burst: 2000.0,
            conn_rate_per_ip: 100.0,
            conn_burst_per_ip: 1000.0,
            login_failures_per_user: 10,
            login_failures_per_user_all: 1000,
            login_failures_per_ip: 100,
            login_lockout: Duration::from_secs(15 * 60),
            client_ip_header: None,
            allowed_origins: AllowedOrigins::SameOrigin,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
        }
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
