//! The router's small HTTP endpoint: `/healthz` (alive) and `/readyz` (NATS connected, store
//! answering, not draining), for load balancers and Kubernetes probes.

use std::convert::Infallible;

use bytes::Bytes;
use chatoy_bus::DynBus;
use chatoy_store::DynStore;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves the probes until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, bus: DynBus, store: DynStore, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = shutdown.cancelled() => return,
        };
        let (bus, store, shutdown) = (bus.clone(), store.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (bus, store, shutdown) = (bus.clone(), store.clone(), shutdown.clone());
                async move {
                    let (status, body) = match req.uri().path() {
                        "/healthz" => (StatusCode::OK, "ok"),
                        "/readyz" if shutdown.is_cancelled() => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
                        "/readyz" if !bus.is_ready() => (StatusCode::SERVICE_UNAVAILABLE, "bus unavailable"),
                        "/readyz" => match store.ping().await {
                            Ok(()) => (StatusCode::OK, "ready"),
                            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
                        },
                        _ => (StatusCode::NOT_FOUND, "not found"),
                    };
                    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
