//! The gateway: Chatoy's edge. It serves the HTTP API and `/ws`, authenticates tokens against
//! the store, publishes each `msg` to the bus and relays the answer as `send`, and fans each
//! room's `recv` out to its local sockets. It holds no durable state.

mod accounts;
mod config;
mod http;
mod metrics;
mod ws;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use crate::http::{AddrBuckets, Admission, ConnInfo};
use crate::metrics::Metrics;
use crate::ws::registry::Registry;

/// State shared by every connection of one gateway.
pub(crate) struct Shared {
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
    /// Whether the store answered lately, for `/readyz`.
    store_health: StoreHealth,
}

/// How often the store is pinged for `/readyz`, how long one ping may take, and how long after
/// its last good ping the store still counts as reachable.
const STORE_PING_EVERY: Duration = Duration::from_secs(1);
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);
const STORE_GRACE: Duration = Duration::from_secs(3);

/// The store's reachability, kept by one background task so that `/readyz` answers at once: a
/// store that is slow under load must not make every gateway look down to the load balancer
/// (which would close their sockets, or leave the Service without endpoints).
pub(crate) struct StoreHealth {
    started: Instant,
    /// Milliseconds since `started` of the last good ping; 0 = none yet.
    last_ok_ms: AtomicU64,
}

impl StoreHealth {
    fn new() -> StoreHealth {
        StoreHealth {
            started: Instant::now(),
            last_ok_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    /// Whether the store answered a ping within the last [`STORE_GRACE`].
    pub(crate) fn ready(&self) -> bool {
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        last != 0 && self.now_ms().saturating_sub(last) <= STORE_GRACE.as_millis() as u64
    }

    async fn check(&self, store: &DynStore) {
        if let Ok(Ok(())) = tokio::time::timeout(STORE_PING_TIMEOUT, store.ping()).await {
            self.last_ok_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    async fn watch(shared: Arc<Shared>) {
        loop {
            tokio::time::sleep(STORE_PING_EVERY).await;
            shared.store_health.check(&shared.store).await;
        }
    }
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
) -> Result<(), String> {
    let accounts = Accounts::new(
        config.argon2_memory_kib,
        config.argon2_iterations,
        config.token_ttl,
        config.max_concurrent_hashes,
        config.hash_wait,
    )?;
    let metrics = Arc::new(
        Metrics::new(bus.clone(), metrics)
            .map_err(|err| format!("cannot register the gateway's metrics: {err}"))?,
    );
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
    let shared = Arc::new(Shared {
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
        store_health: StoreHealth::new(),
    });
    // Ready from the first request on if the store answers now.
    shared.store_health.check(&shared.store).await;
    let store_watch = tokio::spawn(StoreHealth::watch(shared.clone()));
    // User events (joins, logouts) must reach sockets from the first one on.
    let users = shared
        .bus
        .subscribe_users()
        .await
        .map_err(|err| err.to_string())?;
    let user_feed = tokio::spawn(shared.registry.clone().user_feed(users));
    let keepalive = tokio::spawn(
        shared
            .registry
            .clone()
            .keepalive(shared.config.ping_interval, shared.config.idle_timeout),
    );
    let http = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off briefly rather than spin.
                    tracing::warn!(cause = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
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
    store_watch.abort();
    Ok(())
}
