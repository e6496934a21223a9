//! Every limit and timeout of the gateway, passed in explicitly by the binary.

use std::time::Duration;

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
    /// Grace period for sockets and in-flight work on shutdown.
    pub drain_timeout: Duration,
    /// Most messages replayed per room for `since`.
    pub since_limit: usize,
    /// Largest HTTP request body in bytes (413 above).
    pub max_body_size: usize,
    /// Time allowed to send request headers, and separately the body.
    pub http_timeout: Duration,
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
            drain_timeout: Duration::from_secs(10),
            since_limit: 1000,
            max_body_size: 64 * 1024,
            http_timeout: Duration::from_secs(10),
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
        }
    }
}
