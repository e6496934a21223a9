//! The HTTP side of the gateway: admitting connections (the connection-rate limits), checking
//! the browser origin and answering CORS, routing requests, and the JSON API of PROTOCOL.md.
//! `GET /ws` is handed to the WebSocket module; `GET /` and its two assets are the embedded web
//! client of `gateway/web/`.

mod admission;
mod api;
mod cors;
mod web;

use admission::{client_addr, refused_response};
pub(crate) use admission::{AddrBuckets, Admission};
use api::{create_room, get_room, get_user, history, join_room, login, logout, my_rooms, register};
use cors::{add_cors, check_origin, preflight};
use web::{known_path, web_file, web_response};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chatoy_protocol::http::CodeMsg;
use chatoy_protocol::validate;
use chatoy_store::StoreError;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCESS_CONTROL_REQUEST_METHOD, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Gateway;

/// Every response body is a complete buffer.
pub(crate) type Body = Full<Bytes>;

/// A handler's early exit: the error to answer with.
pub(super) type Reply<T> = Result<T, ApiError>;

/// An HTTP error: the status and the `msg` of the `{"code","msg"}` body.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    msg: std::borrow::Cow<'static, str>,
    /// Sent as `Retry-After` (429 and 503 that a client should retry).
    retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, msg: impl Into<std::borrow::Cow<'static, str>>) -> ApiError {
        ApiError {
            status,
            msg: msg.into(),
            retry_after: None,
        }
    }

    /// An error the client should retry after `wait` (a `Retry-After` header).
    pub(super) fn later(
        status: StatusCode,
        msg: impl Into<std::borrow::Cow<'static, str>>,
        wait: std::time::Duration,
    ) -> ApiError {
        ApiError {
            retry_after: Some(wait),
            ..ApiError::new(status, msg)
        }
    }

    pub(super) fn into_response(self) -> Response<Body> {
        let mut response = error_response(self.status, &self.msg);
        if let Some(wait) = self.retry_after {
            admission::set_retry_after(&mut response, wait);
        }
        response
    }
}

/// A JSON response.
pub(crate) fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The `{"code": status, "msg": ...}` error body PROTOCOL.md promises for every failure.
pub(crate) fn error_response(status: StatusCode, msg: &str) -> Response<Body> {
    json_response(
        status,
        &CodeMsg {
            code: status.as_u16(),
            msg: msg.to_owned(),
        },
    )
}

pub(crate) fn ok_response(status: StatusCode) -> Response<Body> {
    json_response(
        status,
        &CodeMsg {
            code: 0,
            msg: String::new(),
        },
    )
}

pub(super) fn store_error(err: StoreError) -> ApiError {
    match err {
        StoreError::Conflict => ApiError::new(StatusCode::CONFLICT, "already exists"),
        StoreError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not found"),
        StoreError::Unavailable(cause) => {
            tracing::warn!(%cause, "store unavailable");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable")
        }
        // Only the router's fenced writes can be deposed; the API makes none.
        StoreError::Deposed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable"),
    }
}

/// What the gateway knows of one TCP connection while it serves its requests.
pub(crate) struct ConnInfo {
    peer: SocketAddr,
    /// Set once the connection passed the connection-rate limits, at its first request that is
    /// not a probe; later requests on it are not counted again.
    admitted: AtomicBool,
}

impl ConnInfo {
    pub(crate) fn new(peer: SocketAddr) -> ConnInfo {
        ConnInfo {
            peer,
            admitted: AtomicBool::new(false),
        }
    }
}

/// Routes one request. Never fails: every problem becomes a documented error response.
pub(crate) async fn handle(
    shared: Arc<Gateway>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let probe = matches!(segments.as_slice(), ["healthz" | "readyz" | "metrics"]);
    let addr = client_addr(&shared.config, conn.peer, req.headers());
    // Probes are never refused, so a load balancer does not take a busy gateway out of rotation.
    if !probe && !conn.admitted.load(Ordering::Relaxed) {
        if let Err(refused) = shared.admission.admit(addr) {
            let (metric, msg) = if refused.status == StatusCode::TOO_MANY_REQUESTS {
                (
                    &shared.metrics.refused_conn_rate_ip,
                    "too many new connections from this address",
                )
            } else {
                (&shared.metrics.refused_conn_rate, "too many new connections")
            };
            metric.inc();
            return Ok(refused_response(refused.status, msg, refused.retry_after, true));
        }
        conn.admitted.store(true, Ordering::Relaxed);
    }
    let cors = match check_origin(&shared.config, req.headers()) {
        Ok(cors) => cors,
        Err(err) => {
            shared.metrics.refused_origin.inc();
            return Ok(err.into_response());
        }
    };
    let is_preflight = method == Method::OPTIONS
        && cors.is_some()
        && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        && known_path(&segments);
    let response = match (segments.as_slice(), &method) {
        _ if is_preflight => Ok(preflight()),
        (["ws"], &Method::GET) => Ok(crate::ws::upgrade(&shared, req)),
        (["healthz" | "readyz" | "metrics"], &Method::GET) => shared
            .health
            .probe(&path, || shared.metrics.render())
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such path")),
        (["users"], &Method::POST) => register(&shared, req, addr).await,
        (["users", id], &Method::GET) => get_user(&shared, id).await,
        (["login"], &Method::POST) => login(&shared, req, addr).await,
        (["logout"], &Method::POST) => logout(&shared, req).await,
        (["rooms"], &Method::POST) => create_room(&shared, req).await,
        (["rooms", "me"], &Method::GET) => my_rooms(&shared, req).await,
        (["rooms", id], &Method::GET) => get_room(&shared, id).await,
        (["rooms", id, "join"], &Method::POST) => join_room(&shared, req, id).await,
        (["rooms", id, "messages"], &Method::GET) => history(&shared, req, id).await,
        ([file], &Method::GET | &Method::HEAD) if web_file(file).is_some() => {
            web_response(file, req.headers())
                .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such path"))
        }
        (known, _) if known_path(known) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        )),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "no such path")),
    };
    let mut response = response.unwrap_or_else(ApiError::into_response);
    if let Some(origin) = cors {
        add_cors(&mut response, origin);
    }
    // The path and the status only: headers and bodies carry tokens and passwords.
    tracing::debug!(%method, path, status = response.status().as_u16(), client = %addr, "http request");
    Ok(response)
}

pub(super) async fn read_json<T: DeserializeOwned>(shared: &Gateway, req: Request<Incoming>) -> Reply<T> {
    let max = shared.config.max_body_size;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
    }
    let collect = Limited::new(req.into_body(), max).collect();
    let body = match tokio::time::timeout(shared.config.http_timeout, collect).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body not received in time",
            ))
        }
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
        }
        Ok(Err(_)) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "cannot read body")),
        Ok(Ok(body)) => body.to_bytes(),
    };
    // serde would also accept a struct written as an array; the API takes objects only.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|err| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {err}")))
}

pub(super) fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// The user id behind the request's bearer token, or a 401.
pub(super) async fn caller(shared: &Gateway, req: &Request<Incoming>) -> Reply<u64> {
    let Some(token) = bearer(req) else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing bearer token"));
    };
    match shared.accounts.authenticate(&shared.store, token).await {
        Ok(Some((session, _))) => Ok(session.user_id),
        Ok(None) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token unknown, expired or revoked",
        )),
        Err(err) => Err(store_error(err)),
    }
}

pub(super) fn parse_id(text: &str) -> Reply<u64> {
    match text.parse::<u64>() {
        Ok(id) if validate::id(id) => Ok(id),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ids are integers in 1..=2^53-1",
        )),
    }
}
