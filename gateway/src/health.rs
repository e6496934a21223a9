//! Health for both roles: `/healthz` (alive), `/readyz` (not draining, the bus connected, the
//! store answering lately) and `/metrics`, answered the same way on a gateway's API port and on
//! a router's probe port ([`serve_probes`]); and the one accept loop both use.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatoy_bus::DynBus;
use chatoy_protocol::backoff::Backoff;
use chatoy_store::DynStore;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, TextEncoder};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::http::{error_response, ok_response, Body};

/// How often the store is pinged for `/readyz`, how long one ping may take, and how long after
/// its last good ping the store still counts as reachable.
const STORE_PING_EVERY: Duration = Duration::from_secs(1);
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);
const STORE_GRACE: Duration = Duration::from_secs(3);

/// What `/readyz` reports. The store's reachability is kept by one background task, so that
/// `/readyz` answers at once: a store that is slow under load must not make every process look
/// down to the load balancer or to Kubernetes (a probe that pinged the store itself timed out
/// under load and took healthy gateways out of rotation).
pub struct Health {
    bus: DynBus,
    store: DynStore,
    shutdown: CancellationToken,
    started: Instant,
    /// Milliseconds since `started` of the last good ping; 0 = none yet.
    store_ok_ms: AtomicU64,
}

impl Health {
    /// Pings the store once (ready from the first probe on if it answers now), then keeps
    /// pinging it in the background until `shutdown`, when `/readyz` answers "draining".
    pub async fn start(bus: DynBus, store: DynStore, shutdown: CancellationToken) -> Arc<Health> {
        let health = Arc::new(Health {
            bus,
            store,
            shutdown,
            started: Instant::now(),
            store_ok_ms: AtomicU64::new(0),
        });
        health.ping_store().await;
        let watch = health.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(STORE_PING_EVERY) => watch.ping_store().await,
                    _ = watch.shutdown.cancelled() => return,
                }
            }
        });
        health
    }

    fn now_ms(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    async fn ping_store(&self) {
        if let Ok(Ok(())) = tokio::time::timeout(STORE_PING_TIMEOUT, self.store.ping()).await {
            self.store_ok_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Whether the process should get traffic; if not, why.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.shutdown.is_cancelled() {
            return Err("draining");
        }
        if !self.bus.is_ready() {
            return Err("bus unavailable");
        }
        let last = self.store_ok_ms.load(Ordering::Relaxed);
        if last == 0 || self.now_ms().saturating_sub(last) > STORE_GRACE.as_millis() as u64 {
            return Err("store unavailable");
        }
        Ok(())
    }

    /// The answer to `/healthz`, `/readyz` or `/metrics` (with `metrics` rendering the
    /// exposition), or `None` for any other path.
    pub(crate) fn probe(&self, path: &str, metrics: impl FnOnce() -> Vec<u8>) -> Option<Response<Body>> {
        match path.trim_matches('/') {
            "healthz" => Some(ok_response(StatusCode::OK)),
            "readyz" => Some(match self.readiness() {
                Ok(()) => ok_response(StatusCode::OK),
                Err(why) => error_response(StatusCode::SERVICE_UNAVAILABLE, why),
            }),
            "metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(metrics())));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                Some(response)
            }
            _ => None,
        }
    }
}

/// The Prometheus text exposition of everything `registry` holds.
pub fn render(registry: &prometheus::Registry) -> Vec<u8> {
    let mut out = Vec::new();
    // Encoding into a Vec cannot fail.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    out
}

/// The next connection of `listener`, or `None` once `shutdown` is cancelled. An accept error
/// (out of file descriptors and the like) is retried with backoff rather than in a spin.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    let mut retry = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let err = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(err) => err,
            },
            _ = shutdown.cancelled() => return None,
        };
        tracing::warn!(cause = %err, "accept failed");
        tokio::select! {
            _ = tokio::time::sleep(retry.next_delay()) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` (everything `registry` holds) on `listener`
/// until `shutdown`: a router's probe port.
pub async fn serve_probes(
    listener: TcpListener,
    health: Arc<Health>,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) {
    while let Some((stream, _)) = accept(&listener, &shutdown).await {
        let (health, registry) = (health.clone(), registry.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = health
                    .probe(req.uri().path(), || render(&registry))
                    .unwrap_or_else(|| error_response(StatusCode::NOT_FOUND, "no such path"));
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
