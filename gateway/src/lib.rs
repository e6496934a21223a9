//! The gateway: Chatoy's edge. It serves the HTTP API and `/ws`, authenticates tokens against
//! the store, publishes each `msg` to the bus and relays the answer as `send`, and fans each
//! room's `recv` out to its local sockets. It holds no durable state.

mod accounts;
pub mod config;
pub mod health;
mod http;
mod limit;
mod metrics;
mod ws;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use chatoy_bus::DynBus;
use chatoy_store::DynStore;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ws::wire::CloseReason;

pub use config::{AllowedOrigins, GatewayConfig};

use crate::accounts::{Accounts, LoginThrottle};
use crate::health::Health;
use crate::http::{AddrBuckets, Admission, ConnInfo};
use crate::metrics::Metrics;
use crate::ws::registry::Registry;

/// State shared by every connection of one gateway.
pub(crate) struct Gateway {
    config: GatewayConfig,
    store: DynStore,
    bus: DynBus,
    accounts: Accounts,
    /// Failed logins per username and per client address.
    logins: LoginThrottle,
    /// New connections per second, per gateway and per client address.
    admission: Admission,
    /// Registrations per second per client address.
    registrations: AddrBuckets,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    /// This process's random id on the bus, so its own sockets are recognised in room events.
    gateway_id: u64,
    next_conn: AtomicU64,
    /// Open WebSockets, for the `max_sockets` limit.
    sockets: AtomicUsize,
    /// Cancelled on SIGTERM: stop accepting, answer 503 on `/readyz`, close sockets with 1001.
    shutdown: CancellationToken,
    /// Every socket task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// What `/readyz` reports.
    health: Arc<Health>,
}

/// Why the gateway could not start. The cause is the source (`{:#}` in the binary prints both).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The argon2 flags make no valid parameter set.
    /// (argon2's errors are not `std` errors, so the cause is part of the message.)
    #[error("invalid argon2 parameters: {0}")]
    Argon2Params(argon2::Error),
    /// The dummy hash (compared against for unknown users) could not be computed.
    #[error("cannot compute the dummy password hash: {0}")]
    DummyHash(argon2::password_hash::Error),
    /// The gateway's metrics could not be registered (a name registered twice).
    #[error("cannot register the gateway's metrics")]
    Metrics(#[source] prometheus::Error),
    /// The bus refused the subscription to user events.
    #[error("cannot subscribe to user events")]
    UserEvents(#[source] chatoy_bus::BusError),
}

/// Serves HTTP and WebSockets on `listener` until `shutdown`, then drains: sockets get 1001
/// and the call returns once they are gone or the drain timeout passed. The gateway's metrics
/// are registered in `metrics`, and `/metrics` shows everything that registry holds (in the
/// single process, the router's too).
pub async fn run(
    config: GatewayConfig,
    store: DynStore,
    bus: DynBus,
    listener: TcpListener,
    metrics: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let accounts = Accounts::new(
        config.argon2_memory_kib,
        config.argon2_iterations,
        config.token_ttl,
        config.max_concurrent_hashes,
        config.hash_wait,
    )?;
    let metrics = Arc::new(Metrics::new(bus.clone(), metrics).map_err(GatewayError::Metrics)?);
    let gateway_id = rand::random::<u64>();
    let registry = Registry::new(
        bus.clone(),
        store.clone(),
        gateway_id,
        config.outbound_queue,
        config.since_limit,
        metrics.clone(),
    );
    let logins = LoginThrottle::new(
        config.login_failures_per_user,
        config.login_failures_per_ip,
        config.login_failures_per_user_all,
        config.login_lockout,
    );
    let admission = Admission::new(&config);
    let registrations = AddrBuckets::new(config.register_rate_per_ip, config.register_burst_per_ip);
    // Ready from the first request on if the store answers now.
    let health = Health::start(bus.clone(), store.clone(), shutdown.clone()).await;
    let shared = Arc::new(Gateway {
        config,
        store,
        bus,
        accounts,
        logins,
        admission,
        registrations,
        metrics,
        registry,
        gateway_id,
        next_conn: AtomicU64::new(1),
        sockets: AtomicUsize::new(0),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
        health,
    });
    // User events (joins, logouts) must reach sockets from the first one on.
    let users = shared
        .bus
        .subscribe_users()
        .await
        .map_err(GatewayError::UserEvents)?;
    let user_feed = tokio::spawn(shared.registry.clone().user_feed(users));
    let keepalive = tokio::spawn(
        shared
            .registry
            .clone()
            .keepalive(shared.config.ping_interval, shared.config.idle_timeout),
    );
    let http = TaskTracker::new();
    while let Some((stream, peer)) = health::accept(&listener, &shutdown).await {
        let _ = stream.set_nodelay(true);
        let header_timeout = shared.config.http_timeout;
        // hyper refuses a read buffer under 8 KiB; the flag's minimum is that.
        let max_header_size = shared.config.max_header_size;
        let shutdown = shutdown.clone();
        let shared = shared.clone();
        let conn = Arc::new(ConnInfo::new(peer));
        http.spawn(async move {
            let service = service_fn(move |req| http::handle(shared.clone(), conn.clone(), req));
            // A request head that is not complete within the header timeout, or larger than
            // the limit, ends the connection (the latter with 431).
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(max_header_size.max(8192))
                .max_header_size(max_header_size)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(cause = %err, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("draining");
    shared.registry.close_all(CloseReason::GOING_AWAY);
    shared.tasks.close();
    http.close();
    let drained = async {
        shared.tasks.wait().await;
        http.wait().await;
    };
    if tokio::time::timeout(shared.config.drain_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed with connections still open");
    }
    user_feed.abort();
    keepalive.abort();
    Ok(())
}
