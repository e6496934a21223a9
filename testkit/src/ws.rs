//! A tungstenite WebSocket client for tests: it answers pings while it reads, keeps the frames a
//! test skipped while waiting for an answer, and fails the test on anything off the protocol.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::server::Server;
use crate::shape::{assert_auth, assert_send, auth_frame, msg_frame, recv_data};
use crate::util::{new_uuid, within, WAIT};

/// What a WebSocket client observed next.
#[derive(Debug)]
pub enum Event {
    /// A text frame, parsed as JSON.
    Json(Value),
    /// A close frame: code and reason.
    Close(u16, String),
    /// The connection ended without (further) frames.
    Ended(String),
}

/// A client WebSocket as tokio-tungstenite opens it.
pub type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A tungstenite client: answers pings while it reads, keeps frames it skipped for later.
pub struct Ws {
    inner: Stream,
    pending: VecDeque<Value>,
}

impl Ws {
    /// Opens a WebSocket to the server.
    pub async fn connect(server: &Server) -> Ws {
        Ws::connect_url(&server.ws_url()).await
    }

    /// Opens a WebSocket to a URL and authenticates, asserting auth code 0.
    pub async fn authed_url(url: &str, token: &str) -> Ws {
        let mut ws = Ws::connect_url(url).await;
        let answer = ws.auth(token, None).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Wraps a WebSocket the caller upgraded itself (e.g. with extra request headers).
    pub fn from_stream(inner: Stream) -> Ws {
        Ws {
            inner,
            pending: VecDeque::new(),
        }
    }

    /// Opens a WebSocket to a URL.
    pub async fn connect_url(url: &str) -> Ws {
        let (inner, response) = within(WAIT, "the upgrade", tokio_tungstenite::connect_async(url))
            .await
            .unwrap_or_else(|err| panic!("connect {url}: {err}"));
        assert_eq!(response.status().as_u16(), 101);
        Ws {
            inner,
            pending: VecDeque::new(),
        }
    }

    /// Connects and authenticates, asserting auth code 0.
    pub async fn authed(server: &Server, token: &str) -> Ws {
        let mut ws = Ws::connect(server).await;
        let answer = ws.auth(token, None).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Connects and authenticates with `since`, asserting auth code 0.
    pub async fn authed_since(server: &Server, token: &str, since: &str) -> Ws {
        let mut ws = Ws::connect(server).await;
        let answer = ws.auth(token, Some(since)).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Connects and authenticates with a per-room `since` (`{"<room>": "<ts>"}`), asserting
    /// auth code 0.
    pub async fn authed_rooms(server: &Server, token: &str, since: &[(u64, &str)]) -> Ws {
        let mut ws = Ws::connect(server).await;
        let answer = ws.auth_rooms(token, since).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Sends `auth` with a per-room `since` and returns the answer.
    pub async fn auth_rooms(&mut self, token: &str, since: &[(u64, &str)]) -> Value {
        let since: serde_json::Map<String, Value> = since
            .iter()
            .map(|(room, at)| (room.to_string(), Value::from(*at)))
            .collect();
        self.send_text(&json!({"type": "auth", "token": token, "since": since}).to_string())
            .await;
        self.next_json().await
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        within(WAIT, "sending a frame", self.inner.send(WsMessage::text(text)))
            .await
            .unwrap_or_else(|err| panic!("send: {err}"));
    }

    /// Sends `auth` and returns the next frame (the answer).
    pub async fn auth(&mut self, token: &str, since: Option<&str>) -> Value {
        self.send_text(&auth_frame(token, since)).await;
        self.next_json().await
    }

    /// Sends a Text `msg` and returns its `send` answer; frames that arrive before it are kept.
    pub async fn send_msg(&mut self, uuid: &str, room: u64, text: &str) -> Value {
        self.send_text(&msg_frame(uuid, room, text)).await;
        self.answer_to(uuid).await
    }

    /// Sends a Text `msg`, asserts code 0 and returns `sent` as text.
    pub async fn send_ok(&mut self, uuid: &str, room: u64, text: &str) -> String {
        let answer = self.send_msg(uuid, room, text).await;
        assert_send(&answer, 0, uuid);
        answer["sent"].as_str().expect("sent").to_owned()
    }

    /// Sends `count` Text messages to `room` (the i-th says `text(i)`) keeping at most `window`
    /// unanswered, asserts that each is answered code 0, and returns each one's uuid and `sent`
    /// (ns), in `sent` order. Every frame the socket reads meanwhile must be an answer.
    pub async fn send_pipelined(
        &mut self,
        room: u64,
        count: usize,
        window: usize,
        text: impl Fn(usize) -> String,
    ) -> Vec<(String, i64)> {
        let mut acked = Vec::with_capacity(count);
        let mut in_flight = 0;
        let mut next = 0;
        while acked.len() < count {
            while next < count && in_flight < window {
                self.send_text(&msg_frame(&new_uuid(), room, &text(next))).await;
                next += 1;
                in_flight += 1;
            }
            let frame = self.next_json().await;
            let uuid = frame["uuid"].as_str().expect("a send answer").to_owned();
            let sent = assert_send(&frame, 0, &uuid);
            acked.push((uuid, sent));
            in_flight -= 1;
        }
        acked.sort_by_key(|(_, sent)| *sent);
        acked
    }

    /// Waits for the `send` frame for `uuid`, keeping every other frame for later reads.
    pub async fn answer_to(&mut self, uuid: &str) -> Value {
        // Answers may come in any order: one may already be among the frames kept earlier.
        let kept = self
            .pending
            .iter()
            .position(|frame| frame["type"] == "send" && frame["uuid"] == uuid);
        if let Some(answer) = kept.and_then(|at| self.pending.remove(at)) {
            return answer;
        }
        let mut skipped = VecDeque::new();
        let answer = loop {
            let frame = self.read_json().await;
            if frame["type"] == "send" && frame["uuid"] == uuid {
                break frame;
            }
            skipped.push_back(frame);
        };
        // Frames read before the answer come before frames still queued from earlier.
        skipped.extend(self.pending.drain(..));
        self.pending = skipped;
        answer
    }

    /// The next event from the wire (after frames kept by [`Ws::answer_to`]).
    pub async fn next_event(&mut self) -> Event {
        if let Some(frame) = self.pending.pop_front() {
            return Event::Json(frame);
        }
        self.read_event(WAIT).await
    }

    async fn read_event(&mut self, limit: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Ok(next) => next,
                Err(_) => panic!("timed out after {limit:?} waiting for a frame"),
            };
            match next {
                None => return Event::Ended("stream ended".into()),
                Some(Err(err)) => return Event::Ended(err.to_string()),
                Some(Ok(WsMessage::Text(text))) => {
                    let value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|err| panic!("server sent non-JSON {text:?}: {err}"));
                    return Event::Json(value);
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    return match frame {
                        Some(frame) => Event::Close(u16::from(frame.code), frame.reason.to_string()),
                        None => Event::Close(1005, String::new()),
                    }
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected frame from server: {other:?}"),
            }
        }
    }

    async fn read_json(&mut self) -> Value {
        match self.read_event(WAIT).await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next frame, which must be a JSON text frame.
    pub async fn next_json(&mut self) -> Value {
        match self.next_event().await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next frame, which must be `recv`; returns its `data`.
    pub async fn next_recv(&mut self) -> Value {
        let frame = self.next_json().await;
        recv_data(&frame)
    }

    /// Reads `recv` frames until the one with `uuid` arrives; returns all of them in order.
    pub async fn recv_until(&mut self, uuid: &str) -> Vec<Value> {
        let mut got = Vec::new();
        loop {
            let data = self.next_recv().await;
            let done = data["uuid"] == uuid;
            got.push(data);
            if done {
                return got;
            }
        }
    }

    /// The next event must be a close frame; returns code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        match self.next_event().await {
            Event::Close(code, reason) => (code, reason),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// Asserts nothing but pings arrives for `quiet`, answering pings meanwhile.
    pub async fn expect_quiet(&mut self, quiet: Duration) {
        if let Some(frame) = self.pending.pop_front() {
            panic!("expected no frame, got {frame}");
        }
        if let Ok(next) = tokio::time::timeout(quiet, self.read_event(quiet + WAIT)).await {
            panic!("expected no frame for {quiet:?}, got {next:?}");
        }
    }

    /// Starts a clean close and waits for the server's close (bounded).
    pub async fn close(mut self) {
        let _ = within(WAIT, "closing", self.inner.close(None)).await;
        let _ =
            tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = self.inner.next().await {} }).await;
    }
}
