//! The HTTP side of the gateway: accepting connections, routing requests, and the JSON API of
//! PROTOCOL.md. `GET /ws` is handed to the WebSocket module.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use chatoy_protocol::bus::UserEvent;
use chatoy_protocol::http::{CodeMsg, Credentials, LoginReply, NewRoom, RoomId};
use chatoy_protocol::{validate, Timestamp};
use chatoy_store::StoreError;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::accounts::{session_key, token_hash, Accounts};
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
    }
}

/// Routes one request. Never fails: every problem becomes a documented error response.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let response = match (segments.as_slice(), &method) {
        (["ws"], &Method::GET) => Ok(crate::ws::upgrade(&shared, req)),
        (["healthz"], &Method::GET) => Ok(ok_response(StatusCode::OK)),
        (["readyz"], &Method::GET) => Ok(readiness(&shared).await),
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
        (["login"], &Method::POST) => login(&shared, req).await,
        (["logout"], &Method::POST) => logout(&shared, req).await,
        (["rooms"], &Method::POST) => create_room(&shared, req).await,
        (["rooms", "me"], &Method::GET) => my_rooms(&shared, req).await,
        (["rooms", id], &Method::GET) => get_room(&shared, id).await,
        (["rooms", id, "join"], &Method::POST) => join_room(&shared, req, id).await,
        (["rooms", id, "messages"], &Method::GET) => history(&shared, req, id).await,
        (["ws" | "healthz" | "readyz" | "metrics" | "users" | "login" | "logout" | "rooms"], _)
        | (["users" | "rooms", _], _)
        | (["rooms", _, "join" | "messages"], _) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        )),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "no such path")),
    };
    Ok(response.unwrap_or_else(ApiError::into_response))
}

async fn readiness(shared: &Shared) -> Response<Body> {
    if shared.shutdown.is_cancelled() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    if !shared.bus.is_ready() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "bus unavailable");
    }
    match shared.store.ping().await {
        Ok(()) => ok_response(StatusCode::OK),
        Err(_) => error_response(StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
    }
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

async fn login(shared: &Shared, req: Request<Incoming>) -> Reply<Response<Body>> {
    let credentials: Credentials = read_json(shared, req).await?;
    let found = shared
        .store
        .user_by_name(&credentials.username)
        .await
        .map_err(store_error)?;
    let (user, hash) = match found {
        Some(found) => (Some(found.user), Some(found.password_hash)),
        None => (None, None),
    };
    let verified = shared.accounts.verify(credentials.password, hash).await;
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
