//! One socket's life: the upgrade, the `auth` phase (boxed, so its state is freed once done),
//! the optional `since` replay, then the main loop that multiplexes reads, queued writes,
//! pings and shutdown in a single task.

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
use super::registry::{Added, Peer};
use super::wire::{self, CloseReason};
use crate::http::{error_response, Body};
use crate::limit::Bucket;
use crate::Shared;
use chatoy_store::Session;

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Answers `GET /ws`: checks the handshake, reserves a socket slot, and spawns the socket task.
pub(crate) fn upgrade(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
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
struct SocketSlot(Arc<Shared>);

impl SocketSlot {
    fn shared(&self) -> &Shared {
        &self.0
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.shared().sockets.fetch_sub(1, Ordering::AcqRel);
        self.shared().metrics.sockets_open.dec();
    }
}

async fn serve(shared: &Arc<Shared>, ws: &mut Socket) {
    shared.metrics.sockets_open.inc();
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    // Boxed: the auth phase's state is large and must not live as long as the socket.
    let Some((peer, mut live)) = Box::pin(authenticate(shared, ws, conn)).await else {
        return;
    };
    run(shared, ws, &peer, &mut live).await;
    shared.registry.remove(&peer);
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

async fn authenticate(shared: &Arc<Shared>, ws: &mut Socket, conn: u64) -> Option<(Arc<Peer>, Live)> {
    let deadline = tokio::time::sleep(shared.config.auth_timeout);
    tokio::pin!(deadline);
    let mut failures = 0;
    let timeout = shared.config.write_timeout;
    loop {
        let item = tokio::select! {
            _ = &mut deadline => {
                let _ = write_raw(ws, &wire::close(CloseReason::AUTH_TIMEOUT), timeout).await;
                return None;
            }
            _ = shared.shutdown.cancelled() => {
                let _ = write_raw(ws, &wire::close(CloseReason::GOING_AWAY), timeout).await;
                return None;
            }
            item = ws.next() => item,
        };
        let text = match classify_read(item) {
            ReadOutcome::Text(text) => text,
            ReadOutcome::Nothing => continue,
            ReadOutcome::Closed(reason) => {
                finish(ws, reason, timeout).await;
                return None;
            }
        };
        let reply = match ClientFrame::parse(text.as_bytes()) {
            Ok(ClientFrame::Auth { token, since }) => {
                shared.metrics.in_auth.inc();
                match shared.accounts.authenticate(&shared.store, &token).await {
                    Ok(Some((session, token_hash))) => {
                        return admit(shared, ws, conn, session, token_hash, since).await;
                    }
                    Ok(None) => None,
                    Err(err) => {
                        tracing::warn!(cause = %err, "session lookup failed");
                        let _ = write_raw(ws, &wire::close(CloseReason::UNAVAILABLE), timeout).await;
                        return None;
                    }
                }
            }
            Err(FrameError::BadAuth) => {
                shared.metrics.in_auth.inc();
                None
            }
            // Not a failed authentication: the client may send a corrected `auth`.
            Err(FrameError::BadSince(why)) => {
                shared.metrics.in_auth.inc();
                shared.metrics.out_error.inc();
                Some(error_frame(why))
            }
            Ok(ClientFrame::Msg { uuid, .. }) | Err(FrameError::BadMsg { uuid }) => {
                shared.metrics.in_msg.inc();
                shared.metrics.ack(SendCode::NotAuthenticated);
                Some(send_refusal(SendCode::NotAuthenticated, uuid))
            }
            Err(FrameError::Unreadable(msg)) => {
                shared.metrics.in_invalid.inc();
                shared.metrics.out_error.inc();
                Some(error_frame(msg))
            }
        };
        let frame = match reply {
            Some(frame) => frame,
            None => {
                failures += 1;
                shared.metrics.out_auth.inc();
                let answer = encode(&ServerFrame::auth(AuthCode::Expired));
                if write_raw(ws, &answer, timeout).await.is_err() {
                    return None;
                }
                if failures >= shared.config.max_auth_failures {
                    let _ = write_raw(ws, &wire::close(CloseReason::AUTH_FAILURES), timeout).await;
                    return None;
                }
                continue;
            }
        };
        if write_raw(ws, &frame, timeout).await.is_err() {
            return None;
        }
    }
}

/// Registers an authenticated socket in its user's and rooms' subscriptions, answers `auth`, and
/// replays `since`. Live frames queue in the mailbox meanwhile and are de-duplicated at the seam.
async fn admit(
    shared: &Arc<Shared>,
    ws: &mut Socket,
    conn: u64,
    session: Session,
    token_hash: [u8; 32],
    since: Option<Since>,
) -> Option<(Arc<Peer>, Live)> {
    let timeout = shared.config.write_timeout;
    let user = session.user_id;
    let peer = Arc::new(Peer::new(conn, user, token_hash, session.expires));
    let member = match shared.registry.add(&peer, shared.config.max_sockets_per_user) {
        Added::TooMany => {
            shared.metrics.refused_sockets_per_user.inc();
            let _ = write_raw(ws, &wire::close(CloseReason::TOO_MANY_SOCKETS), timeout).await;
            return None;
        }
        added => added,
    };
    let registered = register(shared, &peer, member).await;
    let rooms = match registered {
        Ok(rooms) => rooms,
        Err(err) => {
            tracing::warn!(cause = %err, user, "cannot register socket");
            shared.registry.remove(&peer);
            let _ = write_raw(ws, &wire::close(CloseReason::UNAVAILABLE), timeout).await;
            return None;
        }
    };
    shared.metrics.out_auth.inc();
    if write_raw(ws, &encode(&ServerFrame::auth(AuthCode::Ok)), timeout)
        .await
        .is_err()
    {
        shared.registry.remove(&peer);
        return None;
    }
    let Some(since) = since else {
        return Some((peer, Live::new(&shared.config, None)));
    };
    match replay(shared, ws, &rooms, &since).await {
        Ok(seam) => Some((peer, Live::new(&shared.config, Some(seam)))),
        Err(()) => {
            shared.registry.remove(&peer);
            let _ = write_raw(ws, &wire::close(CloseReason::UNAVAILABLE), timeout).await;
            None
        }
    }
}

/// Subscribes the socket's user to its rooms (the user's first socket here reads them; the
/// others find them) and waits until every room's subscription is active; returns the rooms.
async fn register(shared: &Arc<Shared>, peer: &Arc<Peer>, added: Added) -> Result<Vec<u64>, String> {
    // A shutdown that began before `add` did not find this socket in `close_all`.
    if shared.shutdown.is_cancelled() {
        peer.mailbox.close(CloseReason::GOING_AWAY);
    }
    let (member, waits) = match added {
        Added::First(member) => {
            let waits = shared.registry.load(&member).await?;
            (member, waits)
        }
        Added::Another(member) => {
            let waits =
                tokio::time::timeout(shared.config.send_timeout, shared.registry.wait_loaded(&member))
                    .await
                    .map_err(|_| "the user's rooms were not read in time".to_owned())??;
            (member, waits)
        }
        Added::TooMany => return Err("too many sockets".into()),
    };
    let all_ready = async {
        for mut ready in waits {
            ready
                .wait_for(|ready| *ready)
                .await
                .map_err(|_| "subscription failed".to_owned())?;
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(shared.config.send_timeout, all_ready)
        .await
        .map_err(|_| "subscriptions not ready in time".to_owned())??;
    Ok(member.rooms())
}

/// Messages read from the store per page of a `since` replay: what a socket holds at most
/// while it replays, besides its outbound queue.
const REPLAY_PAGE: usize = 64;

/// Sends, room after room, the newest `--since-limit` stored messages newer than where `since`
/// says the client left off in that room, oldest first, a page at a time. Returns, per room that
/// got any, the `sent` of the last one sent: the seam for live frames queued meanwhile.
async fn replay(
    shared: &Arc<Shared>,
    ws: &mut Socket,
    rooms: &[u64],
    since: &Since,
) -> Result<HashMap<u64, Timestamp>, ()> {
    let store = &shared.store;
    let limit = shared.config.since_limit;
    let mut seam = HashMap::new();
    let mut total = 0u64;
    let mut out = Vec::new();
    for &room in rooms {
        let Some(after) = since.for_room(room) else {
            continue;
        };
        let failed =
            |err: chatoy_store::StoreError| tracing::warn!(cause = %err, room, "since replay failed");
        let mut cursor = store.replay_start(room, after, limit).await.map_err(failed)?;
        let mut left = limit;
        while left > 0 {
            let want = REPLAY_PAGE.min(left);
            let page = store.page_after(room, cursor, want).await.map_err(failed)?;
            let got = page.len();
            for message in page {
                cursor = message.sent;
                out.extend_from_slice(&wire::text(&recv_frame(message)));
                if out.len() >= 64 * 1024 {
                    write_raw(ws, &out, shared.config.write_timeout).await?;
                    out.clear();
                }
            }
            total += got as u64;
            left -= got;
            if got < want {
                break;
            }
        }
        if cursor > after {
            seam.insert(room, cursor);
        }
    }
    if !out.is_empty() {
        write_raw(ws, &out, shared.config.write_timeout).await?;
    }
    shared.metrics.out_recv.inc_by(total);
    Ok(seam)
}

/// What woke an idle socket.
enum Wake {
    Mailbox,
    Read(Option<Result<Message, WsError>>),
}

/// The socket's state between wake-ups.
struct Live {
    seam: Seam,
    /// The `msg` rate limit.
    limit: Bucket,
}

impl Live {
    fn new(config: &crate::config::GatewayConfig, seam: Seam) -> Live {
        Live {
            seam,
            limit: Bucket::full(config.msg_burst, Instant::now()),
        }
    }
}

async fn run(shared: &Arc<Shared>, ws: &mut Socket, peer: &Arc<Peer>, live: &mut Live) {
    // The idle state is only this `select!`: pings, the idle timeout and shutdown reach the
    // socket through its mailbox (see `Registry::keepalive` and `Registry::close_all`), and the
    // work after a wake-up runs in a boxed future, so none of it is part of every idle
    // socket's task.
    loop {
        let wake = tokio::select! {
            _ = peer.mailbox.wait() => Wake::Mailbox,
            item = ws.next() => Wake::Read(item),
        };
        if Box::pin(on_wake(shared, ws, peer, live, wake)).await {
            return;
        }
    }
}

/// Handles one wake-up; returns whether the socket is done.
async fn on_wake(
    shared: &Arc<Shared>,
    ws: &mut Socket,
    peer: &Arc<Peer>,
    live: &mut Live,
    wake: Wake,
) -> bool {
    let timeout = shared.config.write_timeout;
    match wake {
        Wake::Mailbox => !matches!(flush(ws, peer, &mut live.seam, timeout).await, Ok(false)),
        Wake::Read(item) => {
            peer.seen();
            match classify_read(item) {
                ReadOutcome::Text(text) => {
                    handle_text(shared, peer, &mut live.limit, text.as_bytes()).await;
                    false
                }
                ReadOutcome::Nothing => false,
                ReadOutcome::Closed(reason) => {
                    finish(ws, reason, timeout).await;
                    true
                }
            }
        }
    }
}

/// Writes everything queued, then the close frame if one was requested. Returns whether the
/// socket is done.
async fn flush(ws: &mut Socket, peer: &Peer, seam: &mut Seam, timeout: Duration) -> Result<bool, ()> {
    let drained = peer.mailbox.drain();
    let mut frames = drained.frames;
    if let Some(filter) = seam.as_mut() {
        frames.retain(|item| item.recv.is_none_or(|key| keep_after_seam(filter, key)));
        if filter.is_empty() {
            *seam = None;
        }
    }
    let closing = drained.close.map(wire::close);
    let single = frames.len() == 1 && closing.is_none();
    if single {
        if let Some(item) = frames.pop_front() {
            write_raw(ws, &item.frame, timeout).await?;
        }
    } else if !frames.is_empty() || closing.is_some() {
        let size = frames.iter().map(|item| item.frame.len()).sum::<usize>()
            + closing.as_ref().map_or(0, Bytes::len);
        let mut buffer = Vec::with_capacity(size);
        for item in &frames {
            buffer.extend_from_slice(&item.frame);
        }
        drop(frames);
        if let Some(close) = &closing {
            buffer.extend_from_slice(close);
        }
        write_raw(ws, &buffer, timeout).await?;
    }
    Ok(closing.is_some())
}

/// Whether a live frame is new after the `since` replay: frames up to the replayed `sent` of
/// their room were already sent. Once a room passes its seam it is forgotten.
fn keep_after_seam(filter: &mut HashMap<u64, Timestamp>, key: RecvKey) -> bool {
    let room = key.room.get();
    match filter.get(&room) {
        Some(&last) if key.sent <= last => false,
        Some(_) => {
            filter.remove(&room);
            true
        }
        None => true,
    }
}

/// Ends a socket whose read side ended: with our close frame for a violation, or by sending the
/// close reply tungstenite queued when the client closed first.
async fn finish(ws: &mut Socket, reason: Option<CloseReason>, timeout: Duration) {
    match reason {
        Some(reason) => {
            let _ = write_raw(ws, &wire::close(reason), timeout).await;
            // Half-close, then read and drop what the client still sends (the rest of an
            // oversized frame): closing with unread input makes the kernel answer with a reset,
            // which a proxy in between may deliver before our close frame.
            let io = ws.get_mut();
            let _ = io.shutdown().await;
            let mut sink = vec![0u8; 4096];
            let mut drained = 0usize;
            let drain = async {
                while let Ok(read) = io.read(&mut sink).await {
                    drained += read;
                    if read == 0 || drained > 1 << 20 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        }
        None => {
            let _ = tokio::time::timeout(timeout, ws.flush()).await;
        }
    }
}

/// Writes pre-encoded frames straight to the socket, after whatever tungstenite itself still
/// holds (a pong or a close reply), so frames never interleave.
async fn write_raw(ws: &mut Socket, bytes: &[u8], timeout: Duration) -> Result<(), ()> {
    let write = async {
        ws.flush().await.map_err(|_| ())?;
        let io = ws.get_mut();
        io.write_all(bytes).await.map_err(|_| ())?;
        io.flush().await.map_err(|_| ())
    };
    tokio::time::timeout(timeout, write).await.map_err(|_| ())?
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

fn queue(shared: &Shared, peer: &Peer, frame: Bytes) {
    if peer
        .mailbox
        .push(Outbound::control(frame), shared.config.outbound_queue)
        == Pushed::Overflowed
    {
        shared.metrics.slow_consumers.inc();
    }
}

async fn handle_text(shared: &Arc<Shared>, peer: &Arc<Peer>, limit: &mut Bucket, text: &[u8]) {
    let metrics = &shared.metrics;
    match ClientFrame::parse(text) {
        Ok(ClientFrame::Auth { .. }) | Err(FrameError::BadAuth | FrameError::BadSince(_)) => {
            metrics.in_auth.inc();
            metrics.out_auth.inc();
            queue(
                shared,
                peer,
                encode(&ServerFrame::auth(AuthCode::AlreadyAuthenticated)),
            );
        }
        Ok(ClientFrame::Msg { uuid, room, data }) => {
            metrics.in_msg.inc();
            handle_msg(shared, peer, limit, uuid, room, data).await;
        }
        Err(FrameError::BadMsg { uuid }) => {
            metrics.in_msg.inc();
            metrics.ack(SendCode::Invalid);
            queue(shared, peer, send_refusal(SendCode::Invalid, uuid));
        }
        Err(FrameError::Unreadable(msg)) => {
            metrics.in_invalid.inc();
            metrics.out_error.inc();
            queue(shared, peer, error_frame(msg));
        }
    }
}

async fn handle_msg(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
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
                peer,
                encode(&ServerFrame::send(SendCode::Invalid, why, uuid, Timestamp::now())),
            );
            return;
        }
    };
    let (rate, burst) = (shared.config.msg_rate, shared.config.msg_burst);
    if limit.take(rate, burst, Instant::now()).is_err() {
        shared.metrics.ack(SendCode::RateLimited);
        queue(shared, peer, send_refusal(SendCode::RateLimited, uuid));
        return;
    }
    let request = MsgRequest {
        uuid: id,
        sender: peer.user,
        room,
        content: data,
        origin: Origin {
            gateway: shared.gateway_id,
            conn: peer.id,
        },
    };
    // Submitted here, in the socket's task, so one socket's messages keep their order; only
    // the wait for the answer runs on its own.
    let started = Instant::now();
    let timeout = shared.config.send_timeout;
    let submitted = tokio::time::timeout(timeout, shared.bus.submit(request)).await;
    shared.metrics.bus_submit.observe(started.elapsed().as_secs_f64());
    let (shared, peer) = (shared.clone(), peer.clone());
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
            &peer,
            encode(&ServerFrame::send(reply.code, reply.msg, uuid, reply.sent)),
        );
    });
}
