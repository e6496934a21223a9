//! The HTTP side of the gateway: admitting connections (the connection-rate limits), checking
//! the browser origin and answering CORS, routing requests, and the JSON API of PROTOCOL.md.
//! `GET /ws` is handed to the WebSocket module; `GET /` and its two assets are the embedded web
//! client of `gateway/web/`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatoy_protocol::bus::UserEvent;
use chatoy_protocol::http::{CodeMsg, Credentials, LoginReply, NewRoom, RoomId};
use chatoy_protocol::{validate, Timestamp};
use chatoy_store::StoreError;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH,
    CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, HOST, IF_NONE_MATCH, ORIGIN, REFERRER_POLICY, RETRY_AFTER,
    VARY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::accounts::{session_key, token_hash, Accounts};
use crate::config::{AllowedOrigins, GatewayConfig};
use crate::Shared;

/// Every response body is a complete buffer.
pub(crate) type Body = Full<Bytes>;

/// A handler's early exit: the error to answer with.
type Reply<T> = Result<T, ApiError>;

/// An HTTP error: the status and the `msg` of the `{"code","msg"}` body.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    msg: std::borrow::Cow<'static, str>,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<std::borrow::Cow<'static, str>>) -> ApiError {
        ApiError {
            status,
            msg: msg.into(),
        }
    }

    fn into_response(self) -> Response<Body> {
        error_response(self.status, &self.msg)
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

fn ok_response(status: StatusCode) -> Response<Body> {
    json_response(
        status,
        &CodeMsg {
            code: 0,
            msg: String::new(),
        },
    )
}

fn store_error(err: StoreError) -> ApiError {
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

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// Most client addresses with a partly used bucket; a full bucket is the same as none, so
/// addresses whose bucket refilled are forgotten. Past this, new addresses go unchecked (the
/// gateway-wide bucket still holds).
const MAX_TRACKED_ADDRS: usize = 65_536;

/// The connection-rate limits: one bucket for the gateway, one per client address.
pub(crate) struct Admission {
    rate: f64,
    burst: f64,
    per_ip_rate: f64,
    per_ip_burst: f64,
    gateway: Mutex<Bucket>,
    addrs: Mutex<AddrBuckets>,
}

struct AddrBuckets {
    buckets: HashMap<IpAddr, Bucket>,
    /// When full buckets were last dropped.
    pruned: Instant,
}

/// Why a connection was refused: the status to answer and how long to wait.
pub(crate) struct Refused {
    status: StatusCode,
    retry_after: Duration,
}

impl Admission {
    pub(crate) fn new(config: &GatewayConfig) -> Admission {
        let now = Instant::now();
        Admission {
            rate: config.conn_rate,
            burst: config.conn_burst.max(1.0),
            per_ip_rate: config.conn_rate_per_ip,
            per_ip_burst: config.conn_burst_per_ip.max(1.0),
            gateway: Mutex::new(Bucket::full(config.conn_burst.max(1.0), now)),
            addrs: Mutex::new(AddrBuckets {
                buckets: HashMap::new(),
                pruned: now,
            }),
        }
    }

    /// Counts a new connection from `addr`: 429 over the address's rate (which then does not
    /// use up the gateway's), 503 over the gateway's.
    fn admit(&self, addr: IpAddr) -> Result<(), Refused> {
        let now = Instant::now();
        if self.per_ip_rate > 0.0 {
            let (rate, burst) = (self.per_ip_rate, self.per_ip_burst);
            let mut addrs = self.addrs.lock();
            // A bucket refills completely within burst / rate; after that it can be dropped.
            // When the map is full, prune at most once a second: a flood from many addresses
            // must not make every connection walk the whole map.
            let refill = Duration::from_secs_f64((burst / rate).min(3600.0));
            let every = if addrs.buckets.len() >= MAX_TRACKED_ADDRS {
                Duration::from_secs(1)
            } else {
                refill.max(Duration::from_secs(10))
            };
            if now.saturating_duration_since(addrs.pruned) >= every {
                addrs.buckets.retain(|_, bucket| {
                    bucket.refill(rate, burst, now);
                    bucket.tokens < burst
                });
                addrs.pruned = now;
            }
            let full = addrs.buckets.len() >= MAX_TRACKED_ADDRS;
            let taken = match addrs.buckets.get_mut(&addr) {
                Some(bucket) => bucket.take(rate, burst, now),
                None if !full => {
                    let mut bucket = Bucket::full(burst, now);
                    let taken = bucket.take(rate, burst, now);
                    addrs.buckets.insert(addr, bucket);
                    taken
                }
                None => Ok(()),
            };
            taken.map_err(|retry_after| Refused {
                status: StatusCode::TOO_MANY_REQUESTS,
                retry_after,
            })?;
        }
        self.gateway
            .lock()
            .take(self.rate, self.burst, now)
            .map_err(|retry_after| Refused {
                status: StatusCode::SERVICE_UNAVAILABLE,
                retry_after,
            })
    }
}

/// The key a client address is counted under: IPv4 as is (also when mapped into IPv6), IPv6 by
/// its /64, the smallest block one host is usually given.
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// The client's address: the last entry of `--client-ip-header` when it is configured and
/// readable (the entry the trusted proxy added), else the TCP peer.
fn client_addr(config: &GatewayConfig, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    let forwarded = config.client_ip_header.as_deref().and_then(|name| {
        let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
        let last = value.rsplit(',').next()?.trim();
        last.parse::<IpAddr>()
            .ok()
            .or_else(|| last.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
    });
    addr_key(forwarded.unwrap_or(peer.ip()))
}

/// A refusal that asks the client to come back later and ends the connection.
fn refusal(status: StatusCode, msg: &str, retry_after: Duration, close: bool) -> Response<Body> {
    let mut response = error_response(status, msg);
    set_retry_after(&mut response, retry_after);
    if close {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// `Retry-After` in whole seconds, at least 1.
fn set_retry_after(response: &mut Response<Body>, wait: Duration) {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
}

/// Checks the `Origin` header. `Ok(Some(origin))`: a cross-origin request from an allowed origin,
/// to answer with CORS headers; `Ok(None)`: no `Origin`, or the request's own host; `Err`: 403.
fn check_origin(config: &GatewayConfig, headers: &HeaderMap) -> Reply<Option<HeaderValue>> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(None);
    };
    let text = origin.to_str().unwrap_or_default().trim_end_matches('/');
    let listed = match &config.allowed_origins {
        AllowedOrigins::Any => true,
        AllowedOrigins::List(list) => list.iter().any(|allowed| allowed.eq_ignore_ascii_case(text)),
        AllowedOrigins::SameOrigin => false,
    };
    if listed {
        return Ok(Some(origin.clone()));
    }
    let same_host = text.split_once("://").is_some_and(|(_, authority)| {
        headers
            .get(HOST)
            .and_then(|host| host.to_str().ok())
            .is_some_and(|host| host.eq_ignore_ascii_case(authority))
    });
    if same_host {
        return Ok(None);
    }
    Err(ApiError::new(StatusCode::FORBIDDEN, "origin not allowed"))
}

/// The CORS headers for an allowed cross-origin request.
fn add_cors(response: &mut Response<Body>, origin: HeaderValue) {
    let h = response.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("retry-after"),
    );
    h.append(VARY, HeaderValue::from_static("origin"));
}

/// The answer to a CORS preflight from an allowed origin (its `Access-Control-Allow-Origin` is
/// added like on every other answer).
fn preflight() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let h = response.headers_mut();
    h.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    response
}

/// The web client (`gateway/web/`), embedded in the binary: file name (`""` is `/`), content
/// type, contents. The files reference each other by these absolute paths.
const WEB_FILES: [(&str, &str, &str); 3] = [
    ("", "text/html; charset=utf-8", include_str!("../web/index.html")),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../web/app.css"),
    ),
];

/// The web client's policy: its own scripts, styles and connections only (WebSockets to the
/// page's own host included), never framed.
const WEB_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

fn web_file(name: &str) -> Option<&'static (&'static str, &'static str, &'static str)> {
    WEB_FILES.iter().find(|(file, _, _)| *file == name)
}

/// One embedded file. It is revalidated on every use (`no-cache`) against a strong `ETag` of its
/// contents, so a new binary's client is picked up at once and an unchanged one costs a 304.
fn web_response(name: &str, headers: &HeaderMap) -> Option<Response<Body>> {
    use sha2::{Digest, Sha256};
    use std::sync::LazyLock;

    static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
        WEB_FILES
            .iter()
            .map(|(_, _, body)| format!("\"{}\"", hex::encode(&Sha256::digest(body.as_bytes())[..12])))
            .collect()
    });
    let index = WEB_FILES.iter().position(|(file, _, _)| *file == name)?;
    let (_, content_type, body) = WEB_FILES[index];
    let etag = &ETAGS[index];
    let fresh = headers
        .get(IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let mut response = if fresh {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    };
    let h = response.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(etag) {
        h.insert(ETAG, value);
    }
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(WEB_CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    Some(response)
}

/// Whether a path is one the gateway serves (with some method).
fn known_path(segments: &[&str]) -> bool {
    if let [file] = segments {
        if web_file(file).is_some() {
            return true;
        }
    }
    matches!(
        segments,
        ["ws" | "healthz" | "readyz" | "metrics" | "users" | "login" | "logout" | "rooms"]
            | ["users" | "rooms", _]
            | ["rooms", _, "join" | "messages"]
    )
}

/// Routes one request. Never fails: every problem becomes a documented error response.
pub(crate) async fn handle(
    shared: Arc<Shared>,
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
            return Ok(refusal(refused.status, msg, refused.retry_after, true));
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
        (["healthz"], &Method::GET) => Ok(ok_response(StatusCode::OK)),
        (["readyz"], &Method::GET) => Ok(readiness(&shared)),
        (["metrics"], &Method::GET) => {
            let mut response = Response::new(Full::new(Bytes::from(shared.metrics.render())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(response)
        }
        (["users"], &Method::POST) => register(&shared, req).await,
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

fn readiness(shared: &Shared) -> Response<Body> {
    if shared.shutdown.is_cancelled() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    if !shared.bus.is_ready() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "bus unavailable");
    }
    if !shared.store_health.ready() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    }
    ok_response(StatusCode::OK)
}

async fn read_json<T: DeserializeOwned>(shared: &Shared, req: Request<Incoming>) -> Reply<T> {
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

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// The user id behind the request's bearer token, or a 401.
async fn caller(shared: &Shared, req: &Request<Incoming>) -> Reply<u64> {
    let Some(token) = bearer(req) else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing bearer token"));
    };
    match shared.accounts.authenticate(&shared.store, token).await {
        Ok(Some((user, _))) => Ok(user),
        Ok(None) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token unknown, expired or revoked",
        )),
        Err(err) => Err(store_error(err)),
    }
}

fn parse_id(text: &str) -> Reply<u64> {
    match text.parse::<u64>() {
        Ok(id) if validate::id(id) => Ok(id),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ids are integers in 1..=2^53-1",
        )),
    }
}

async fn register(shared: &Shared, req: Request<Incoming>) -> Reply<Response<Body>> {
    let credentials: Credentials = read_json(shared, req).await?;
    validate::username(&credentials.username).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    validate::password(&credentials.password).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    let hash = shared
        .accounts
        .hash_password(credentials.password)
        .await
        .map_err(|err| {
            tracing::error!(cause = %err, "password hashing failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot hash password")
        })?;
    match shared
        .store
        .create_user(&credentials.username, &hash, Timestamp::now())
        .await
    {
        Ok(user) => {
            tracing::info!(user = user.id, "user registered");
            Ok(ok_response(StatusCode::CREATED))
        }
        Err(StoreError::Conflict) => Err(ApiError::new(StatusCode::CONFLICT, "username taken")),
        Err(err) => Err(store_error(err)),
    }
}

async fn get_user(shared: &Shared, id: &str) -> Reply<Response<Body>> {
    let id = parse_id(id)?;
    match shared.store.user(id).await {
        Ok(Some(user)) => Ok(json_response(StatusCode::OK, &user)),
        Ok(None) => Err(ApiError::new(StatusCode::NOT_FOUND, "no such user")),
        Err(err) => Err(store_error(err)),
    }
}

async fn login(shared: &Shared, req: Request<Incoming>, addr: IpAddr) -> Reply<Response<Body>> {
    let credentials: Credentials = read_json(shared, req).await?;
    if let Err(wait) = shared.logins.attempt(&credentials.username, addr) {
        shared.metrics.refused_login.inc();
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &LoginReply {
                code: StatusCode::TOO_MANY_REQUESTS.as_u16(),
                msg: "too many failed logins, try again later".into(),
                user: None,
            },
        );
        set_retry_after(&mut response, wait);
        return Ok(response);
    }
    let found = match shared.store.user_by_name(&credentials.username).await {
        Ok(found) => found,
        Err(err) => {
            shared.logins.cancel(&credentials.username, addr);
            return Err(store_error(err));
        }
    };
    let (user, hash) = match found {
        Some(found) => (Some(found.user), Some(found.password_hash)),
        None => (None, None),
    };
    let verified = shared.accounts.verify(credentials.password, hash).await;
    if verified {
        shared.logins.succeeded(&credentials.username, addr);
    }
    let Some(user) = user.filter(|_| verified) else {
        return Ok(json_response(
            StatusCode::UNAUTHORIZED,
            &LoginReply {
                code: StatusCode::UNAUTHORIZED.as_u16(),
                msg: "wrong username or password".into(),
                user: None,
            },
        ));
    };
    let issued = Accounts::issue_token();
    shared
        .store
        .create_session(&issued.hash, shared.accounts.new_session(user.id))
        .await
        .map_err(store_error)?;
    tracing::info!(user = user.id, "login");
    Ok(json_response(
        StatusCode::OK,
        &LoginReply {
            code: 0,
            msg: issued.token,
            user: Some(user),
        },
    ))
}

async fn logout(shared: &Shared, req: Request<Incoming>) -> Reply<Response<Body>> {
    let user = caller(shared, &req).await?;
    let hash = token_hash(bearer(&req).unwrap_or_default());
    shared.store.revoke_session(&hash).await.map_err(store_error)?;
    let event = UserEvent::Revoked {
        session: session_key(&hash),
    };
    if let Err(err) = shared.bus.publish_user(user, event).await {
        // The token is revoked in the store; open sockets just are not told at once.
        tracing::warn!(cause = %err, user, "cannot announce logout");
    }
    tracing::info!(user, "logout");
    Ok(ok_response(StatusCode::OK))
}

async fn create_room(shared: &Shared, req: Request<Incoming>) -> Reply<Response<Body>> {
    let user = caller(shared, &req).await?;
    let new: NewRoom = read_json(shared, req).await?;
    validate::room(&new.name, &new.description).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    let room = shared
        .store
        .create_room(&new.name, &new.description, user, Timestamp::now())
        .await
        .map_err(store_error)?;
    announce_join(shared, user, room.id).await;
    Ok(json_response(StatusCode::CREATED, &RoomId { id: room.id }))
}

async fn announce_join(shared: &Shared, user: u64, room: u64) {
    shared
        .registry
        .join_local(user, room, shared.config.send_timeout)
        .await;
    if let Err(err) = shared.bus.publish_user(user, UserEvent::Joined { room }).await {
        tracing::warn!(cause = %err, user, room, "cannot announce join; sockets get it on reconnect");
    }
}

async fn my_rooms(shared: &Shared, req: Request<Incoming>) -> Reply<Response<Body>> {
    let user = caller(shared, &req).await?;
    let rooms = shared.store.user_rooms(user).await.map_err(store_error)?;
    Ok(json_response(StatusCode::OK, &rooms))
}

async fn get_room(shared: &Shared, id: &str) -> Reply<Response<Body>> {
    let id = parse_id(id)?;
    match shared.store.room(id).await {
        Ok(Some(room)) => Ok(json_response(StatusCode::OK, &room)),
        Ok(None) => Err(ApiError::new(StatusCode::NOT_FOUND, "no such room")),
        Err(err) => Err(store_error(err)),
    }
}

async fn join_room(shared: &Shared, req: Request<Incoming>, id: &str) -> Reply<Response<Body>> {
    let user = caller(shared, &req).await?;
    let room = parse_id(id)?;
    match shared.store.join_room(room, user, Timestamp::now()).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => return Err(ApiError::new(StatusCode::NOT_FOUND, "no such room")),
        Err(err) => return Err(store_error(err)),
    }
    announce_join(shared, user, room).await;
    Ok(ok_response(StatusCode::OK))
}

async fn history(shared: &Shared, req: Request<Incoming>, id: &str) -> Reply<Response<Body>> {
    let user = caller(shared, &req).await?;
    let room = parse_id(id)?;
    let mut before = Timestamp(i64::MAX);
    let mut limit = 50;
    for (key, value) in url::form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            // A '+' in the offset arrives as ' ' when the client did not percent-encode it.
            "before" => {
                before = Timestamp::parse(&value.replace(' ', "+")).ok_or_else(|| {
                    ApiError::new(StatusCode::BAD_REQUEST, "before must be an RFC 3339 timestamp")
                })?;
            }
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=200).contains(n))
                    .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "limit must be 1-200"))?;
            }
            _ => {}
        }
    }
    if !shared.store.is_member(room, user).await.map_err(store_error)? {
        return match shared.store.room(room).await.map_err(store_error)? {
            None => Err(ApiError::new(StatusCode::NOT_FOUND, "no such room")),
            Some(_) => Err(ApiError::new(StatusCode::FORBIDDEN, "not a member of this room")),
        };
    }
    let messages = shared
        .store
        .history(room, before, limit)
        .await
        .map_err(store_error)?;
    Ok(json_response(StatusCode::OK, &messages))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_count_by_ipv4_or_ipv6_slash_64() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(addr_key(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(addr_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(addr_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn client_address_from_the_last_header_entry() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut config = GatewayConfig::default();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1, 2.2.2.2"));
        assert_eq!(
            client_addr(&config, peer, &headers),
            peer.ip(),
            "no header configured"
        );
        config.client_ip_header = Some("x-forwarded-for".into());
        assert_eq!(
            client_addr(&config, peer, &headers),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("[2001:db8::1]:443"));
        assert_eq!(
            client_addr(&config, peer, &headers),
            "2001:db8::".parse::<IpAddr>().unwrap()
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("unknown"));
        assert_eq!(
            client_addr(&config, peer, &headers),
            peer.ip(),
            "unreadable: the peer"
        );
    }

    #[test]
    fn origins_same_host_listed_or_any() {
        let mut config = GatewayConfig::default();
        let headers = |origin: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(HOST, HeaderValue::from_static("chat.example.com"));
            headers.insert(ORIGIN, HeaderValue::from_static(origin));
            headers
        };
        assert!(matches!(check_origin(&config, &HeaderMap::new()), Ok(None)));
        assert!(matches!(
            check_origin(&config, &headers("https://chat.example.com")),
            Ok(None)
        ));
        assert!(check_origin(&config, &headers("https://evil.example")).is_err());
        config.allowed_origins = AllowedOrigins::parse("https://app.example.com").unwrap();
        assert!(matches!(
            check_origin(&config, &headers("https://app.example.com")),
            Ok(Some(_))
        ));
        assert!(check_origin(&config, &headers("https://app.example.com:444")).is_err());
        config.allowed_origins = AllowedOrigins::Any;
        assert!(matches!(check_origin(&config, &headers("null")), Ok(Some(_))));
    }

    #[test]
    fn web_client_files_with_types_etags_and_policy() {
        for (path, kind) in [
            ("", "text/html"),
            ("app.js", "text/javascript"),
            ("app.css", "text/css"),
        ] {
            let response = web_response(path, &HeaderMap::new()).expect("served");
            assert_eq!(response.status(), StatusCode::OK);
            let h = response.headers();
            assert!(h[CONTENT_TYPE].to_str().unwrap().starts_with(kind), "{path}");
            assert_eq!(h[X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert!(h[CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("frame-ancestors 'none'"));
            let mut again = HeaderMap::new();
            again.insert(IF_NONE_MATCH, h[ETAG].clone());
            let cached = web_response(path, &again).expect("served");
            assert_eq!(cached.status(), StatusCode::NOT_MODIFIED, "{path}");
        }
        assert!(web_response("index.html", &HeaderMap::new()).is_none());
        assert!(known_path(&[""]) && known_path(&["app.js"]) && !known_path(&["app.map"]));
    }

    #[test]
    fn admission_per_address_then_per_gateway() {
        let config = GatewayConfig {
            conn_rate: 0.001,
            conn_burst: 3.0,
            conn_rate_per_ip: 0.001,
            conn_burst_per_ip: 2.0,
            ..GatewayConfig::default()
        };
        let admission = Admission::new(&config);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(admission.admit(a).is_ok());
        assert!(admission.admit(a).is_ok());
        let refused = admission.admit(a).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.retry_after > Duration::from_secs(900));
        assert!(
            admission.admit(b).is_ok(),
            "the refusal did not use the gateway's token"
        );
        assert_eq!(
            admission.admit(b).unwrap_err().status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
