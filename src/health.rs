//! The router's small HTTP endpoint: `/healthz` (alive), `/readyz` (NATS connected, store
//! answering, not draining) for load balancers and Kubernetes probes, and `/metrics`.

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
pub(crate) async fn serve(
    listener: TcpListener,
    bus: DynBus,
    store: DynStore,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = shutdown.cancelled() => return,
        };
        let (bus, store, registry, shutdown) =
            (bus.clone(), store.clone(), registry.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (bus, store, registry, shutdown) =
                    (bus.clone(), store.clone(), registry.clone(), shutdown.clone());
                async move {
                    if req.uri().path() == "/metrics" {
                        let mut body = Vec::new();
                        let _ = prometheus::Encoder::encode(
                            &prometheus::TextEncoder::new(),
                            &registry.gather(),
                            &mut body,
                        );
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        response.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        return Ok::<_, Infallible>(response);
                    }
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
