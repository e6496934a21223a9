//! The fixtures every end-to-end test stands on: a real `chatoy` process on a fresh data
//! directory, an HTTP client for its API, a tungstenite WebSocket client and a raw one that can
//! put any bytes on the wire, and the exact-shape assertions shared by all tests.

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take before the test fails instead of hanging.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Flags every test server gets: cheap password hashing keeps logins fast.
const FAST_ARGON2: [&str; 4] = ["--argon2-memory-kib", "1024", "--argon2-iterations", "1"];

/// A password that satisfies the 8–128 byte rule.
pub(crate) const PASSWORD: &str = "correct horse battery";

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub(crate) async fn within<T>(limit: Duration, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// A random lower-case hex string of `len` characters.
pub(crate) fn random_hex(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// A fresh v4 uuid in the canonical hyphenated form.
pub(crate) fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A directory under the system temp dir, removed with everything in it on drop.
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a directory with a random name.
    pub(crate) fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("chatoy-e2e-{}", random_hex(16)));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A running `chatoy standalone` process on its own data directory.
///
/// Dropping it kills the process and removes the directory; [`Server::terminate`] stops it the
/// way an orchestrator does (SIGTERM) and [`Server::restart`] starts it again on the same data.
pub(crate) struct Server {
    child: Option<Child>,
    port: u16,
    extra: Vec<String>,
    dir: TempDir,
}

impl Server {
    /// Starts a server with the default configuration (plus cheap password hashing).
    pub(crate) async fn start() -> Server {
        Server::start_with(&[]).await
    }

    /// Starts a server with extra command-line flags.
    pub(crate) async fn start_with(extra: &[&str]) -> Server {
        let mut server = Server {
            child: None,
            port: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: TempDir::new(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("open stderr log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatoy"))
            .arg("standalone")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(FAST_ARGON2)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn chatoy");
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = oneshot::channel::<String>();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(line);
                }
            }
        });
        self.child = Some(child);
        let line = match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => panic!(
                "chatoy exited before printing its listening line; stderr:\n{}",
                self.stderr()
            ),
            Err(_) => panic!(
                "chatoy printed no listening line within 30 s; stderr:\n{}",
                self.stderr()
            ),
        };
        let port = line
            .strip_prefix("chatoy listening on http://127.0.0.1:")
            .and_then(|port| port.trim().parse::<u16>().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
        self.port = port;
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `ws://127.0.0.1:PORT/ws`.
    pub(crate) fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The SQLite database inside the data directory.
    pub(crate) fn db_path(&self) -> PathBuf {
        self.dir.path().join("chatoy.db")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    /// Everything the process (and earlier incarnations on this data dir) wrote to stderr.
    pub(crate) fn stderr(&self) -> String {
        fs::read(self.stderr_path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// An HTTP client for this server.
    pub(crate) fn api(&self) -> Api {
        Api::new(self.base_url())
    }

    /// Whether the process is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Sends SIGTERM and waits (at most `limit`) for the process to exit.
    pub(crate) async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server is running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chatoy did not exit within {limit:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the process again on the same data directory (on a new port).
    pub(crate) async fn restart(&mut self) {
        self.spawn().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP answer: status, body as JSON (`Value::Null` if it was not JSON) and raw text.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) body: Value,
    pub(crate) text: String,
}

impl Reply {
    /// Asserts the documented error shape: `status`, body exactly `{"code": status, "msg": "..."}`.
    #[track_caller]
    pub(crate) fn assert_error(&self, status: u16) {
        assert_eq!(self.status, status, "status of {self:?}");
        self.assert_json();
        assert_keys(&self.body, &["code", "msg"]);
        assert_eq!(self.body["code"], json!(status), "code of {self:?}");
        assert!(
            self.body["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "msg must be a non-empty string: {self:?}"
        );
    }

    /// Asserts `status` and the body `{"code":0,"msg":""}`.
    #[track_caller]
    pub(crate) fn assert_ok(&self, status: u16) {
        assert_eq!(self.status, status, "status of {self:?}");
        self.assert_json();
        assert_eq!(self.body, json!({"code": 0, "msg": ""}), "body of {self:?}");
    }

    /// Asserts the `Content-Type` is `application/json`.
    #[track_caller]
    pub(crate) fn assert_json(&self) {
        assert!(
            self.content_type.starts_with("application/json"),
            "Content-Type of {self:?}"
        );
    }
}

/// A user registered and logged in for a test.
#[derive(Debug, Clone)]
pub(crate) struct TestUser {
    pub(crate) id: u64,
    pub(crate) username: String,
    pub(crate) token: String,
}

/// A thin client for the HTTP API.
#[derive(Clone)]
pub(crate) struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base: String) -> Api {
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("build reqwest client");
        Api { base, http }
    }

    /// Sends a request with an optional bearer token and optional raw body.
    pub(crate) async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let authorization = token.map(|token| format!("Bearer {token}"));
        self.raw_authorization(method, path, authorization.as_deref(), body)
            .await
    }

    /// Sends a request with an optional literal `Authorization` header and optional raw body.
    pub(crate) async fn raw_authorization(
        &self,
        method: reqwest::Method,
        path: &str,
        authorization: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let mut request = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = request.send().await.unwrap_or_else(|err| panic!("{path}: {err}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.expect("read body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            body,
            text,
        }
    }

    /// `GET path`.
    pub(crate) async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.raw(reqwest::Method::GET, path, token, None).await
    }

    /// `POST path` with a JSON body.
    pub(crate) async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        let bytes = serde_json::to_vec(body).expect("encode body");
        self.raw(reqwest::Method::POST, path, token, Some(bytes)).await
    }

    /// `POST path` without a body.
    pub(crate) async fn post_empty(&self, path: &str, token: Option<&str>) -> Reply {
        self.raw(reqwest::Method::POST, path, token, None).await
    }

    /// Registers `username`, asserting 201.
    pub(crate) async fn register(&self, username: &str) {
        let reply = self
            .post(
                "/users",
                None,
                &json!({"username": username, "password": PASSWORD}),
            )
            .await;
        reply.assert_ok(201);
    }

    /// Logs in, asserting success; returns the token and the `user` object.
    pub(crate) async fn login(&self, username: &str) -> (String, Value) {
        let reply = self
            .post(
                "/login",
                None,
                &json!({"username": username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(reply.status, 200, "login: {reply:?}");
        reply.assert_json();
        assert_keys(&reply.body, &["code", "msg", "user"]);
        assert_eq!(reply.body["code"], json!(0));
        let token = reply.body["msg"].as_str().expect("token").to_owned();
        assert_token(&token);
        assert_user(&reply.body["user"]);
        assert_eq!(reply.body["user"]["username"], json!(username));
        (token, reply.body["user"].clone())
    }

    /// Registers and logs in a user with a random name starting with `prefix`.
    pub(crate) async fn new_user(&self, prefix: &str) -> TestUser {
        let username = format!("{prefix}_{}", random_hex(8));
        self.register(&username).await;
        let (token, user) = self.login(&username).await;
        TestUser {
            id: user["id"].as_u64().expect("user id"),
            username,
            token,
        }
    }

    /// Creates a room, asserting 201 `{"id":N}`; returns N.
    pub(crate) async fn create_room(&self, token: &str, name: &str) -> u64 {
        let reply = self.post("/rooms", Some(token), &json!({"name": name})).await;
        assert_eq!(reply.status, 201, "create room: {reply:?}");
        reply.assert_json();
        assert_keys(&reply.body, &["id"]);
        let id = reply.body["id"].as_u64().expect("room id");
        assert_id(id);
        id
    }

    /// Joins a room, asserting 200 `{"code":0,"msg":""}`.
    pub(crate) async fn join(&self, token: &str, room: u64) {
        self.post_empty(&format!("/rooms/{room}/join"), Some(token))
            .await
            .assert_ok(200);
    }

    /// `GET /rooms/{room}/messages` with optional `before` (percent-encoded) and `limit`.
    pub(crate) async fn history_reply(
        &self,
        token: &str,
        room: u64,
        before: Option<&str>,
        limit: Option<&str>,
    ) -> Reply {
        let mut query = Vec::new();
        if let Some(before) = before {
            query.push(format!("before={}", percent_encode(before)));
        }
        if let Some(limit) = limit {
            query.push(format!("limit={}", percent_encode(limit)));
        }
        let mut path = format!("/rooms/{room}/messages");
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        self.get(&path, Some(token)).await
    }

    /// History that must succeed; each element is checked to be a well-formed `Message`.
    pub(crate) async fn history(
        &self,
        token: &str,
        room: u64,
        before: Option<&str>,
        limit: Option<u32>,
    ) -> Vec<Value> {
        let limit = limit.map(|l| l.to_string());
        let reply = self.history_reply(token, room, before, limit.as_deref()).await;
        assert_eq!(reply.status, 200, "history: {reply:?}");
        reply.assert_json();
        let messages = reply.body.as_array().expect("history is an array").clone();
        for message in &messages {
            assert_message(message);
            assert_eq!(message["room"], json!(room));
        }
        messages
    }

    /// Reads one sample of a Prometheus metric (exact series name with labels), if present.
    pub(crate) async fn metric(&self, series: &str) -> Option<f64> {
        let reply = self.get("/metrics", None).await;
        assert_eq!(reply.status, 200, "metrics: {reply:?}");
        metric_value(&reply.text, series)
    }
}

/// Percent-encodes everything outside the URL-unreserved set.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The value of one series in Prometheus text exposition.
pub(crate) fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name.trim() == series).then(|| value.trim().parse().ok())?
        })
}

/// Asserts the object has exactly these keys.
#[track_caller]
pub(crate) fn assert_keys(value: &Value, keys: &[&str]) {
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("expected an object, got {value}"));
    let got: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(got, want, "keys of {value}");
}

/// Asserts an id is a JSON integer in 1..=2^53-1.
#[track_caller]
pub(crate) fn assert_id(id: u64) {
    assert!((1..=(1u64 << 53) - 1).contains(&id), "id {id} out of range");
}

/// Asserts a token is 64 hex characters.
#[track_caller]
pub(crate) fn assert_token(token: &str) {
    assert_eq!(token.len(), 64, "token {token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "token {token:?}");
}

/// Asserts `text` is RFC 3339 with exactly nine fractional digits and returns it as
/// nanoseconds since the epoch.
#[track_caller]
pub(crate) fn ts(text: &str) -> i64 {
    parse_ts(text).unwrap_or_else(|| panic!("{text:?} is not RFC 3339 with nine fractional digits"))
}

/// `text` as nanoseconds since the epoch if it is RFC 3339 with exactly nine fractional digits.
pub(crate) fn parse_ts(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let digits =
        |range: std::ops::Range<usize>| range.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let offset_ok = match b.get(29) {
        Some(b'Z') => b.len() == 30,
        Some(b'+' | b'-') => b.len() == 35 && digits(30..32) && b[32] == b':' && digits(33..35),
        _ => false,
    };
    let shape_ok = b.len() >= 30
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..29)
        && offset_ok;
    if !shape_ok {
        return None;
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()?
        .timestamp_nanos_opt()
}

/// Asserts a `User` object: exact keys, no secret.
#[track_caller]
pub(crate) fn assert_user(user: &Value) {
    assert_keys(
        user,
        &["id", "username", "nickname", "slogan", "status", "registered"],
    );
    assert_id(user["id"].as_u64().expect("user id is an integer"));
    for key in ["username", "nickname", "slogan", "status"] {
        assert!(user[key].is_string(), "{key} of {user}");
    }
    ts(user["registered"].as_str().expect("registered"));
    assert!(
        !user.to_string().contains("$argon2"),
        "a password hash leaked: {user}"
    );
}

/// Asserts a `Message` object (history element, `recv.data`) has exactly the documented shape.
#[track_caller]
pub(crate) fn assert_message(message: &Value) {
    assert_keys(message, &["uuid", "sender", "room", "data", "sent", "modified"]);
    assert!(message["uuid"].is_string(), "uuid of {message}");
    assert_id(message["sender"].as_u64().expect("sender is an integer"));
    assert_id(message["room"].as_u64().expect("room is an integer"));
    assert_keys(&message["data"], &["type", "text"]);
    assert_eq!(message["data"]["type"], json!("Text"));
    assert!(message["data"]["text"].is_string());
    ts(message["sent"].as_str().expect("sent is a string"));
    assert_eq!(message["modified"], json!(false));
}

/// Asserts a `send` frame with this code and uuid; returns its `sent` in nanoseconds.
#[track_caller]
pub(crate) fn assert_send(frame: &Value, code: u64, uuid: &str) -> i64 {
    assert_keys(frame, &["type", "code", "msg", "uuid", "sent"]);
    assert_eq!(frame["type"], json!("send"), "{frame}");
    assert_eq!(frame["code"], json!(code), "{frame}");
    assert_eq!(frame["uuid"], json!(uuid), "{frame}");
    let msg = frame["msg"].as_str().expect("msg is a string");
    if code == 0 {
        assert_eq!(msg, "", "{frame}");
    } else {
        assert!(!msg.is_empty(), "a refusal explains itself: {frame}");
    }
    if code == 1 {
        assert_eq!(msg, "Please login first!", "{frame}");
    }
    let sent = ts(frame["sent"].as_str().expect("sent is a string"));
    assert_recent(sent);
    sent
}

/// Asserts a server timestamp (ns) is within five minutes of this machine's clock: the server
/// stamps with the real time, in UTC or with a correct offset.
#[track_caller]
pub(crate) fn assert_recent(nanos: i64) {
    let now = chrono::Utc::now().timestamp_nanos_opt().expect("now in range");
    let skew = (now - nanos).abs();
    assert!(
        skew < 300 * 1_000_000_000,
        "timestamp is {} s away from now",
        skew / 1_000_000_000
    );
}

/// Asserts an `auth` answer with this code and its documented message.
#[track_caller]
pub(crate) fn assert_auth(frame: &Value, code: u64) {
    let msg = match code {
        0 => "",
        1 => "Login status expired!",
        2 => "Already authenticated!",
        _ => panic!("no auth code {code}"),
    };
    assert_eq!(
        frame,
        &json!({"type": "auth", "code": code, "msg": msg}),
        "auth answer"
    );
}

/// Asserts an `error` frame with code 3.
#[track_caller]
pub(crate) fn assert_error_frame(frame: &Value) {
    assert_keys(frame, &["type", "code", "msg"]);
    assert_eq!(frame["type"], json!("error"), "{frame}");
    assert_eq!(frame["code"], json!(3), "{frame}");
    assert!(frame["msg"].as_str().is_some_and(|m| !m.is_empty()), "{frame}");
}

/// Asserts a `recv` frame and returns its `data`.
#[track_caller]
pub(crate) fn recv_data(frame: &Value) -> Value {
    assert_keys(frame, &["type", "data"]);
    assert_eq!(frame["type"], json!("recv"), "{frame}");
    assert_message(&frame["data"]);
    frame["data"].clone()
}

/// A `msg` frame with Text content.
pub(crate) fn msg_frame(uuid: &str, room: u64, text: &str) -> String {
    json!({"type": "msg", "uuid": uuid, "room": room, "data": {"type": "Text", "text": text}}).to_string()
}

/// An `auth` frame, optionally with `since`.
pub(crate) fn auth_frame(token: &str, since: Option<&str>) -> String {
    match since {
        Some(since) => json!({"type": "auth", "token": token, "since": since}).to_string(),
        None => json!({"type": "auth", "token": token}).to_string(),
    }
}

/// What a WebSocket client observed next.
#[derive(Debug)]
pub(crate) enum Event {
    /// A text frame, parsed as JSON.
    Json(Value),
    /// A close frame: code and reason.
    Close(u16, String),
    /// The connection ended without (further) frames.
    Ended(String),
}

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A tungstenite client: answers pings while it reads, keeps frames it skipped for later.
pub(crate) struct Ws {
    inner: Stream,
    pending: VecDeque<Value>,
}

impl Ws {
    /// Opens a WebSocket to the server.
    pub(crate) async fn connect(server: &Server) -> Ws {
        Ws::connect_url(&server.ws_url()).await
    }

    /// Opens a WebSocket to a URL.
    pub(crate) async fn connect_url(url: &str) -> Ws {
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
    pub(crate) async fn authed(server: &Server, token: &str) -> Ws {
        let mut ws = Ws::connect(server).await;
        let answer = ws.auth(token, None).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Connects and authenticates with `since`, asserting auth code 0.
    pub(crate) async fn authed_since(server: &Server, token: &str, since: &str) -> Ws {
        let mut ws = Ws::connect(server).await;
        let answer = ws.auth(token, Some(since)).await;
        assert_auth(&answer, 0);
        ws
    }

    /// Sends a text frame.
    pub(crate) async fn send_text(&mut self, text: &str) {
        within(WAIT, "sending a frame", self.inner.send(WsMessage::text(text)))
            .await
            .unwrap_or_else(|err| panic!("send: {err}"));
    }

    /// Sends `auth` and returns the next frame (the answer).
    pub(crate) async fn auth(&mut self, token: &str, since: Option<&str>) -> Value {
        self.send_text(&auth_frame(token, since)).await;
        self.next_json().await
    }

    /// Sends a Text `msg` and returns its `send` answer; frames that arrive before it are kept.
    pub(crate) async fn send_msg(&mut self, uuid: &str, room: u64, text: &str) -> Value {
        self.send_text(&msg_frame(uuid, room, text)).await;
        self.answer_to(uuid).await
    }

    /// Sends a Text `msg`, asserts code 0 and returns `sent` as text.
    pub(crate) async fn send_ok(&mut self, uuid: &str, room: u64, text: &str) -> String {
        let answer = self.send_msg(uuid, room, text).await;
        assert_send(&answer, 0, uuid);
        answer["sent"].as_str().expect("sent").to_owned()
    }

    /// Waits for the `send` frame for `uuid`, keeping every other frame for later reads.
    pub(crate) async fn answer_to(&mut self, uuid: &str) -> Value {
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
    pub(crate) async fn next_event(&mut self) -> Event {
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
    pub(crate) async fn next_json(&mut self) -> Value {
        match self.next_event().await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next frame, which must be `recv`; returns its `data`.
    pub(crate) async fn next_recv(&mut self) -> Value {
        let frame = self.next_json().await;
        recv_data(&frame)
    }

    /// Reads `recv` frames until the one with `uuid` arrives; returns all of them in order.
    pub(crate) async fn recv_until(&mut self, uuid: &str) -> Vec<Value> {
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
    pub(crate) async fn expect_close(&mut self) -> (u16, String) {
        match self.next_event().await {
            Event::Close(code, reason) => (code, reason),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// Asserts nothing but pings arrives for `quiet`, answering pings meanwhile.
    pub(crate) async fn expect_quiet(&mut self, quiet: Duration) {
        if let Some(frame) = self.pending.pop_front() {
            panic!("expected no frame, got {frame}");
        }
        if let Ok(next) = tokio::time::timeout(quiet, self.read_event(quiet + WAIT)).await {
            panic!("expected no frame for {quiet:?}, got {next:?}");
        }
    }

    /// Starts a clean close and waits for the server's close (bounded).
    pub(crate) async fn close(mut self) {
        let _ = within(WAIT, "closing", self.inner.close(None)).await;
        let _ =
            tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = self.inner.next().await {} }).await;
    }
}

/// WebSocket opcodes used by [`RawWs`].
pub(crate) mod opcode {
    /// Continuation frame.
    pub(crate) const CONTINUATION: u8 = 0x0;
    /// Text frame.
    pub(crate) const TEXT: u8 = 0x1;
    /// Binary frame.
    pub(crate) const BINARY: u8 = 0x2;
    /// Close frame.
    pub(crate) const CLOSE: u8 = 0x8;
    /// Ping frame.
    pub(crate) const PING: u8 = 0x9;
    /// Pong frame.
    pub(crate) const PONG: u8 = 0xA;
}

/// One frame as [`RawWs`] reads it.
#[derive(Debug)]
pub(crate) struct RawFrame {
    /// The opcode.
    pub(crate) opcode: u8,
    /// The unmasked payload.
    pub(crate) payload: Vec<u8>,
}

/// A hand-rolled WebSocket client over a plain TCP stream: it sends any bytes (invalid UTF-8,
/// oversized or binary frames), never answers pings unless told to, and can shrink its receive
/// buffer so a client that stops reading backs the server up quickly.
pub(crate) struct RawWs {
    reader: tokio::io::BufReader<TcpStream>,
}

impl RawWs {
    /// Connects and performs the HTTP upgrade by hand.
    pub(crate) async fn connect(server: &Server) -> RawWs {
        RawWs::connect_with(server, None).await
    }

    /// Connects with an optional `SO_RCVBUF`, then upgrades.
    pub(crate) async fn connect_with(server: &Server, recv_buffer: Option<u32>) -> RawWs {
        let addr: std::net::SocketAddr = server.addr().parse().expect("addr");
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let stream = within(WAIT, "TCP connect", socket.connect(addr))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut reader = tokio::io::BufReader::new(stream);
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.addr()
        );
        within(
            WAIT,
            "writing the upgrade",
            reader.get_mut().write_all(request.as_bytes()),
        )
        .await
        .expect("write upgrade");
        let mut head = Vec::new();
        within(WAIT, "the upgrade response", async {
            while !head.ends_with(b"\r\n\r\n") {
                let byte = reader.read_u8().await.expect("read upgrade response");
                head.push(byte);
            }
        })
        .await;
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "bad accept key: {head}"
        );
        RawWs { reader }
    }

    /// Sends one masked frame with FIN set.
    pub(crate) async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.send_fragment(true, opcode, payload).await;
    }

    /// Sends one masked frame; `fin` false starts or continues a fragmented message.
    pub(crate) async fn send_fragment(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(if fin { 0x80 | opcode } else { opcode });
        let len = payload.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len <= usize::from(u16::MAX) {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask: [u8; 4] = rand::rng().random();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        // The server may already have closed (e.g. after an oversized frame); a failed write
        // then shows up as the close or end the caller reads next.
        let _ = within(WAIT, "writing a frame", self.reader.get_mut().write_all(&frame)).await;
    }

    /// Sends a text frame (the bytes need not be UTF-8).
    pub(crate) async fn send_text(&mut self, payload: &[u8]) {
        self.send_frame(opcode::TEXT, payload).await;
    }

    /// Reads the next frame of any kind; `None` when the connection ended.
    pub(crate) async fn read_frame(&mut self, limit: Duration) -> Option<RawFrame> {
        within(limit, "a raw frame", self.read_frame_inner()).await
    }

    async fn read_frame_inner(&mut self) -> Option<RawFrame> {
        let mut message: Option<RawFrame> = None;
        loop {
            let first = self.reader.read_u8().await.ok()?;
            let second = self.reader.read_u8().await.ok()?;
            assert_eq!(second & 0x80, 0, "server frames must not be masked");
            let len = match second & 0x7f {
                126 => u64::from(self.reader.read_u16().await.ok()?),
                127 => self.reader.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0; usize::try_from(len).expect("frame length")];
            self.reader.read_exact(&mut payload).await.ok()?;
            let fin = first & 0x80 != 0;
            let code = first & 0x0f;
            if code == opcode::CONTINUATION {
                let partial = message.as_mut().expect("continuation without a start");
                partial.payload.extend_from_slice(&payload);
            } else {
                message = Some(RawFrame {
                    opcode: code,
                    payload,
                });
            }
            if fin {
                return message;
            }
        }
    }

    /// The next text frame as JSON, answering pings; panics on anything else.
    pub(crate) async fn next_json(&mut self) -> Value {
        match self.next_event(WAIT).await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next text or close frame, answering pings on the way.
    pub(crate) async fn next_event(&mut self, limit: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(frame) = self.read_frame(left).await else {
                return Event::Ended("connection ended".into());
            };
            match frame.opcode {
                opcode::TEXT => {
                    let value = serde_json::from_slice(&frame.payload).unwrap_or_else(|err| {
                        panic!(
                            "server sent non-JSON {:?}: {err}",
                            String::from_utf8_lossy(&frame.payload)
                        )
                    });
                    return Event::Json(value);
                }
                opcode::CLOSE => {
                    return Event::Close(close_code(&frame.payload), close_reason(&frame.payload))
                }
                opcode::PING => self.send_frame(opcode::PONG, &frame.payload).await,
                opcode::PONG => {}
                other => panic!("unexpected opcode {other} from server"),
            }
        }
    }

    /// Authenticates, asserting code 0.
    pub(crate) async fn auth_ok(&mut self, token: &str, since: Option<&str>) {
        self.send_text(auth_frame(token, since).as_bytes()).await;
        let answer = self.next_json().await;
        assert_auth(&answer, 0);
    }
}

/// The status code of a close payload (1005 when absent).
pub(crate) fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => 1005,
    }
}

/// The reason of a close payload.
pub(crate) fn close_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned()
}

/// The seed for a randomised test: `CHATOY_E2E_SEED` if set, else random; printed so a failure
/// can be replayed.
pub(crate) fn seed(test: &str) -> u64 {
    let seed = std::env::var("CHATOY_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{test}: seed {seed} (replay with CHATOY_E2E_SEED={seed})");
    seed
}
