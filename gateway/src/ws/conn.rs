//! One socket's life: the upgrade, the `auth` phase (boxed, so its state is freed once done),
//! the optional `since` replay, then the main loop that multiplexes reads, queued writes,
//! pings and shutdown in a single task. The upgrade and frame handling are here; the `auth`
//! phase and the replay are in `conn/auth.rs`, the live loop in `conn/live.rs`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatoy_protocol::bus::{MsgReply, MsgRequest, Origin};
use chatoy_protocol::frame::{recv_frame, FrameError};
use chatoy_protocol::{
    validate, AuthCode, ClientFrame, MessageContent, SendCode, ServerFrame, Since, Timestamp,
};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::mailbox::{Outbound, Pushed, RecvKey};
use super::registry::{Added, SocketHandle};
use super::wire::{self, CloseReason};
use crate::http::{error_response, Body};
use crate::limit::Bucket;
use crate::Gateway;
use chatoy_store::Session;

mod auth;
mod live;

use auth::*;
use live::*;

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Answers `GET /ws`: checks the handshake, reserves a socket slot, and spawns the socket task.
pub(crate) fn upgrade(shared: &Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    let is_upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_ok = headers.get(SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13");
    let Some(key) = headers
        .get(SEC_WEBSOCKET_KEY)
        .filter(|_| is_upgrade && version_ok)
    else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)",
        );
    };
    if shared.shutdown.is_cancelled() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "server is draining");
    }
    let open = shared.sockets.fetch_add(1, Ordering::AcqRel);
    if open >= shared.config.max_sockets {
        shared.sockets.fetch_sub(1, Ordering::AcqRel);
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "too many connections");
    }
    let slot = SocketSlot(shared.clone());
    let accept = derive_accept_key(key.as_bytes());
    let task_shared = shared.clone();
    // Taken out of the request here, so that the request is not part of the socket's task.
    let upgraded = hyper::upgrade::on(req);
    let fut = async move {
        let _slot = slot;
        // Boxed: the upgrade's state must not live as long as the socket.
        // `let else`, not `if let`: the awaited `Option` must not stay in the task's state.
        let Some(mut ws) = Box::pin(open_socket(upgraded, task_shared.config.max_frame_size)).await else {
            return;
        };
        serve(&task_shared, &mut ws).await;
    };
    shared.tasks.spawn(fut);
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// Completes the upgrade and wraps the connection in a WebSocket with small buffers.
async fn open_socket(upgraded: hyper::upgrade::OnUpgrade, max_frame_size: usize) -> Option<Socket> {
    match upgraded.await {
        Ok(upgraded) => {
            let config = WebSocketConfig::default()
                .read_buffer_size(256)
                .write_buffer_size(0)
                .max_write_buffer_size(64 * 1024)
                .max_message_size(Some(max_frame_size))
                .max_frame_size(Some(max_frame_size));
            Some(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await)
        }
        Err(err) => {
            tracing::debug!(cause = %err, "websocket upgrade failed");
            None
        }
    }
}

/// Holds one of the `max_sockets` places and the open-sockets gauge while the socket lives.
struct SocketSlot(Arc<Gateway>);

impl SocketSlot {
    fn shared(&self) -> &Gateway {
        &self.0
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.shared().sockets.fetch_sub(1, Ordering::AcqRel);
        self.shared().metrics.sockets_open.dec();
    }
}

async fn serve(shared: &Arc<Gateway>, ws: &mut Socket) {
    shared.metrics.sockets_open.inc();
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    // Boxed: the auth phase's state is large and must not live as long as the socket.
    let Some((socket, mut live)) = Box::pin(authenticate(shared, ws, conn)).await else {
        return;
    };
    run(shared, ws, &socket, &mut live).await;
    shared.registry.remove(&socket);
}

/// Per room, the newest `sent` already replayed by `since`; live frames up to it are dropped.
type Seam = Option<HashMap<u64, Timestamp>>;

/// What a frame read ended in, other than a text frame to handle.
enum ReadOutcome {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    Nothing,
    Closed(Option<CloseReason>),
}

fn classify_read(item: Option<Result<Message, WsError>>) -> ReadOutcome {
    match item {
        Some(Ok(Message::Text(text))) => ReadOutcome::Text(text),
        Some(Ok(Message::Binary(_))) => ReadOutcome::Closed(Some(CloseReason::UNSUPPORTED)),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => ReadOutcome::Nothing,
        Some(Ok(Message::Close(_))) | None => ReadOutcome::Closed(None),
        Some(Err(WsError::Capacity(_))) => ReadOutcome::Closed(Some(CloseReason::TOO_BIG)),
        Some(Err(WsError::Utf8(_))) => ReadOutcome::Closed(Some(CloseReason::BAD_UTF8)),
        Some(Err(WsError::Protocol(_))) => ReadOutcome::Closed(Some(CloseReason::PROTOCOL)),
        Some(Err(_)) => ReadOutcome::Closed(None),
    }
}

fn encode(frame: &ServerFrame) -> Bytes {
    wire::text(&frame.to_json())
}

fn error_frame(msg: String) -> Bytes {
    encode(&ServerFrame::Error { code: 3, msg })
}

fn send_refusal(code: SendCode, uuid: String) -> Bytes {
    encode(&ServerFrame::send(code, code.message(), uuid, Timestamp::now()))
}

fn queue(shared: &Gateway, socket: &SocketHandle, frame: Bytes) {
    if socket
        .mailbox
        .push(Outbound::control(frame), shared.config.outbound_queue)
        == Pushed::Overflowed
    {
        shared.metrics.slow_consumers.inc();
    }
}

async fn handle_text(shared: &Arc<Gateway>, socket: &Arc<SocketHandle>, limit: &mut Bucket, text: &[u8]) {
    let metrics = &shared.metrics;
    match ClientFrame::parse(text) {
        Ok(ClientFrame::Auth { .. }) | Err(FrameError::BadAuth | FrameError::BadSince(_)) => {
            metrics.in_auth.inc();
            metrics.out_auth.inc();
            queue(
                shared,
                socket,
                encode(&ServerFrame::auth(AuthCode::AlreadyAuthenticated)),
            );
        }
        Ok(ClientFrame::Msg { uuid, room, data }) => {
            metrics.in_msg.inc();
            handle_msg(shared, socket, limit, uuid, room, data).await;
        }
        Err(FrameError::BadMsg { uuid }) => {
            metrics.in_msg.inc();
            metrics.ack(SendCode::Invalid);
            queue(shared, socket, send_refusal(SendCode::Invalid, uuid));
        }
        Err(FrameError::Unreadable(msg)) => {
            metrics.in_invalid.inc();
            metrics.out_error.inc();
            queue(shared, socket, error_frame(msg));
        }
    }
}

async fn handle_msg(
    shared: &Arc<Gateway>,
    socket: &Arc<SocketHandle>,
    limit: &mut Bucket,
    uuid: String,
    room: u64,
    data: MessageContent,
) {
    let checked = validate::message_uuid(&uuid).and_then(|id| {
        if !validate::id(room) {
            return Err("room must be an integer in 1..=2^53-1");
        }
        validate::content(&data)?;
        Ok(id)
    });
    let id = match checked {
        Ok(id) => id,
        Err(why) => {
            shared.metrics.ack(SendCode::Invalid);
            queue(
                shared,
                socket,
                encode(&ServerFrame::send(SendCode::Invalid, why, uuid, Timestamp::now())),
            );
            return;
        }
    };
    let (rate, burst) = (shared.config.msg_rate, shared.config.msg_burst);
    if limit.take(rate, burst, Instant::now()).is_err() {
        shared.metrics.ack(SendCode::RateLimited);
        queue(shared, socket, send_refusal(SendCode::RateLimited, uuid));
        return;
    }
    let request = MsgRequest {
        uuid: id,
        sender: socket.user,
        room,
        content: data,
        origin: Origin {
            gateway: shared.gateway_id,
            conn: socket.id,
        },
    };
    // Submitted here, in the socket's task, so one socket's messages keep their order; only
    // the wait for the answer runs on its own.
    let started = Instant::now();
    let timeout = shared.config.send_timeout;
    let submitted = tokio::time::timeout(timeout, shared.bus.submit(request)).await;
    shared.metrics.bus_submit.observe(started.elapsed().as_secs_f64());
    let (shared, socket) = (shared.clone(), socket.clone());
    tokio::spawn(async move {
        let answer = match submitted {
            Ok(Ok(pending)) => {
                chatoy_bus::wait_reply(pending, timeout.saturating_sub(started.elapsed())).await
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(chatoy_bus::BusError::Timeout),
        };
        let reply = match answer {
            Ok(reply) => reply,
            Err(err) => {
                tracing::debug!(cause = %err, "msg request failed");
                MsgReply {
                    code: SendCode::Unavailable,
                    msg: SendCode::Unavailable.message().to_owned(),
                    sent: Timestamp::now(),
                }
            }
        };
        shared.metrics.ack(reply.code);
        shared
            .metrics
            .ack_latency
            .observe(started.elapsed().as_secs_f64());
        queue(
            &shared,
            &socket,
            encode(&ServerFrame::send(reply.code, reply.msg, uuid, reply.sent)),
        );
    });
}
