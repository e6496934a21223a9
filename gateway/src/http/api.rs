//! The JSON API of PROTOCOL.md: accounts, tokens, rooms and history.

use std::net::IpAddr;

use chatoy_protocol::bus::UserEvent;
use chatoy_protocol::http::{Credentials, LoginReply, NewRoom, Room, RoomId, User};
use chatoy_protocol::{validate, Message, Timestamp};
use chatoy_store::{RoomDraft, StoreError};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::admission::set_retry_after;
use super::{
    bearer, caller, json_response, ok_response, parse_id, read_json, store_error, ApiError, Body, Reply,
};
use crate::accounts::{session_key, token_hash, Accounts};
use crate::Gateway;

/// The answer when no password hash could start in time: each takes tens of MiB, so only a few
/// run at once.
fn hashing_busy(shared: &Gateway) -> ApiError {
    shared.metrics.refused_hashing.inc();
    ApiError::later(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many logins and registrations at once, try again shortly",
        std::time::Duration::from_secs(1),
    )
}

pub(super) async fn register(
    shared: &Gateway,
    req: Request<Incoming>,
    addr: IpAddr,
) -> Reply<Response<Body>> {
    if let Err(wait) = shared.registrations.take(addr) {
        shared.metrics.refused_registration.inc();
        return Err(ApiError::later(
            StatusCode::TOO_MANY_REQUESTS,
            "too many registrations from this address",
            wait,
        ));
    }
    let credentials: Credentials = read_json(shared, req).await?;
    validate::username(&credentials.username).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    validate::password(&credentials.password).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    // A taken name costs no hash; the store's unique claim still decides a race.
    if shared
        .store
        .user_by_name(&credentials.username)
        .await
        .map_err(store_error)?
        .is_some()
    {
        return Err(ApiError::new(StatusCode::CONFLICT, "username taken"));
    }
    let hash = match shared.accounts.hash_password(credentials.password).await {
        Err(_) => return Err(hashing_busy(shared)),
        Ok(hashed) => {
            shared.metrics.password_hashes.inc();
            hashed.map_err(|err| {
                tracing::error!(cause = %err, "password hashing failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot hash password")
            })?
        }
    };
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

pub(super) async fn get_user(shared: &Gateway, id: &str) -> Reply<Response<Body>> {
    let user = shared.store.user(parse_id(id)?).await;
    found::<User>(user, "no such user")
}

/// 200 with the wire form `T` of what the store found, or 404 with `missing`.
fn found<T: serde::Serialize>(
    result: Result<Option<impl Into<T>>, StoreError>,
    missing: &'static str,
) -> Reply<Response<Body>> {
    match result {
        Ok(Some(item)) => Ok(json_response(StatusCode::OK, &item.into())),
        Ok(None) => Err(ApiError::new(StatusCode::NOT_FOUND, missing)),
        Err(err) => Err(store_error(err)),
    }
}

pub(super) async fn login(shared: &Gateway, req: Request<Incoming>, addr: IpAddr) -> Reply<Response<Body>> {
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
    let verified = match shared.accounts.verify(credentials.password, hash).await {
        Ok(verified) => {
            shared.metrics.password_hashes.inc();
            verified
        }
        Err(_) => {
            shared.logins.cancel(&credentials.username, addr);
            return Err(hashing_busy(shared));
        }
    };
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
            user: Some(user.into()),
        },
    ))
}

pub(super) async fn logout(shared: &Gateway, req: Request<Incoming>) -> Reply<Response<Body>> {
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

/// Refuses (403) a user who is in as many rooms as a user may be.
async fn check_room_count(shared: &Gateway, user: u64) -> Reply<()> {
    let count = shared.store.room_count(user).await.map_err(store_error)?;
    if count >= shared.config.max_rooms_per_user {
        shared.metrics.refused_rooms.inc();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "a user may be in at most {} rooms",
                shared.config.max_rooms_per_user
            ),
        ));
    }
    Ok(())
}

pub(super) async fn create_room(shared: &Gateway, req: Request<Incoming>) -> Reply<Response<Body>> {
    let user = caller(shared, &req).await?;
    let new: NewRoom = read_json(shared, req).await?;
    validate::room(&new.name, &new.description).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    check_room_count(shared, user).await?;
    let room = shared
        .store
        .create_room(
            RoomDraft {
                name: &new.name,
                description: &new.description,
                creator: user,
            },
            Timestamp::now(),
        )
        .await
        .map_err(store_error)?;
    announce_join(shared, user, room.id).await;
    Ok(json_response(StatusCode::CREATED, &RoomId { id: room.id }))
}

async fn announce_join(shared: &Gateway, user: u64, room: u64) {
    shared
        .registry
        .join_local(user, room, shared.config.send_timeout)
        .await;
    if let Err(err) = shared.bus.publish_user(user, UserEvent::Joined { room }).await {
        tracing::warn!(cause = %err, user, room, "cannot announce join; sockets get it on reconnect");
    }
}

pub(super) async fn my_rooms(shared: &Gateway, req: Request<Incoming>) -> Reply<Response<Body>> {
    let user = caller(shared, &req).await?;
    let rooms = shared.store.user_rooms(user).await.map_err(store_error)?;
    let rooms: Vec<Room> = rooms.into_iter().map(Room::from).collect();
    Ok(json_response(StatusCode::OK, &rooms))
}

pub(super) async fn get_room(shared: &Gateway, id: &str) -> Reply<Response<Body>> {
    let room = shared.store.room(parse_id(id)?).await;
    found::<Room>(room, "no such room")
}

pub(super) async fn join_room(shared: &Gateway, req: Request<Incoming>, id: &str) -> Reply<Response<Body>> {
    let user = caller(shared, &req).await?;
    let room = parse_id(id)?;
    // Joining again is fine at the limit: joins are idempotent.
    if !shared.store.is_member(room, user).await.map_err(store_error)? {
        check_room_count(shared, user).await?;
    }
    match shared.store.join_room(room, user, Timestamp::now()).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => return Err(ApiError::new(StatusCode::NOT_FOUND, "no such room")),
        Err(err) => return Err(store_error(err)),
    }
    announce_join(shared, user, room).await;
    Ok(ok_response(StatusCode::OK))
}

pub(super) async fn history(shared: &Gateway, req: Request<Incoming>, id: &str) -> Reply<Response<Body>> {
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
    let messages: Vec<Message> = messages.into_iter().map(Message::from).collect();
    Ok(json_response(StatusCode::OK, &messages))
}
