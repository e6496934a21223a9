//! A thin client of the HTTP API that checks the documented shapes of what it is answered, and
//! the reading of a room's whole history.

use serde_json::{json, Value};

use crate::shape::{assert_id, assert_keys, assert_message, assert_token, assert_user, ts};
use crate::util::{random_hex, WAIT};

/// A password that satisfies the 8–128 byte rule.
pub const PASSWORD: &str = "correct horse battery";

/// One HTTP answer: status, body as JSON (`Value::Null` if it was not JSON) and raw text.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    /// `Retry-After`, if the answer had one.
    pub retry_after: Option<String>,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// Asserts the documented error shape: `status`, body exactly `{"code": status, "msg": "..."}`.
    #[track_caller]
    pub fn assert_error(&self, status: u16) {
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
    pub fn assert_ok(&self, status: u16) {
        assert_eq!(self.status, status, "status of {self:?}");
        self.assert_json();
        assert_eq!(self.body, json!({"code": 0, "msg": ""}), "body of {self:?}");
    }

    /// Asserts the `Content-Type` is `application/json`.
    #[track_caller]
    pub fn assert_json(&self) {
        assert!(
            self.content_type.starts_with("application/json"),
            "Content-Type of {self:?}"
        );
    }
}

/// A user registered and logged in for a test.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: u64,
    pub username: String,
    pub token: String,
}

/// A registration body (`username`, [`PASSWORD`]) padded with trailing spaces to `len` bytes,
/// for the body size limits.
pub fn padded_registration(username: &str, len: usize) -> Vec<u8> {
    let mut body = json!({"username": username, "password": PASSWORD})
        .to_string()
        .into_bytes();
    body.resize(len, b' ');
    body
}

/// A thin client for the HTTP API.
#[derive(Clone)]
pub struct Api {
    base: String,
    /// The base URLs whose `/metrics` are summed: every gateway.
    metrics: Vec<String>,
    http: reqwest::Client,
}

impl Api {
    /// A client of `base` whose metrics are the sum of those of `metrics`.
    pub fn new(base: String, metrics: Vec<String>) -> Api {
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("build reqwest client");
        Api { base, metrics, http }
    }

    /// Sends a request with an optional bearer token and optional raw body.
    pub async fn raw(
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
    pub async fn raw_authorization(
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
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await.expect("read body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            retry_after,
            body,
            text,
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.raw(reqwest::Method::GET, path, token, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        let bytes = serde_json::to_vec(body).expect("encode body");
        self.raw(reqwest::Method::POST, path, token, Some(bytes)).await
    }

    /// `POST path` without a body.
    pub async fn post_empty(&self, path: &str, token: Option<&str>) -> Reply {
        self.raw(reqwest::Method::POST, path, token, None).await
    }

    /// Registers `username`, asserting 201.
    pub async fn register(&self, username: &str) {
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
    pub async fn login(&self, username: &str) -> (String, Value) {
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
    pub async fn new_user(&self, prefix: &str) -> TestUser {
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
    pub async fn create_room(&self, token: &str, name: &str) -> u64 {
        let reply = self.post("/rooms", Some(token), &json!({"name": name})).await;
        assert_eq!(reply.status, 201, "create room: {reply:?}");
        reply.assert_json();
        assert_keys(&reply.body, &["id"]);
        let id = reply.body["id"].as_u64().expect("room id");
        assert_id(id);
        id
    }

    /// Joins a room, asserting 200 `{"code":0,"msg":""}`.
    pub async fn join(&self, token: &str, room: u64) {
        self.post_empty(&format!("/rooms/{room}/join"), Some(token))
            .await
            .assert_ok(200);
    }

    /// `GET /rooms/{room}/messages` with optional `before` (percent-encoded) and `limit`.
    pub async fn history_reply(
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
    pub async fn history(
        &self,
        token: &str,
        room: u64,
        before: Option<&str>,
        limit: Option<u32>,
    ) -> Vec<Value> {
        let limit = limit.map(|l| l.to_string());
        history_page(
            self.history_reply(token, room, before, limit.as_deref()).await,
            room,
        )
    }

    /// A page of 200 as [`Api::history`] reads it, asked again while the answer is 503 (for
    /// up to [`RECOVERY_LIMIT`]): a deployment recovering from a fault has no gateway ready
    /// behind its load balancer for a while, or a gateway whose store is still reconnecting.
    async fn history_when_served(&self, token: &str, room: u64, before: Option<&str>) -> Vec<Value> {
        let asked = std::time::Instant::now();
        loop {
            let reply = self.history_reply(token, room, before, Some("200")).await;
            if reply.status != 503 || asked.elapsed() >= RECOVERY_LIMIT {
                if reply.status == 200 && asked.elapsed() > RETRY_PAUSE {
                    eprintln!(
                        "history of room {room} served after {:.1?} of 503",
                        asked.elapsed()
                    );
                }
                return history_page(reply, room);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Reads one sample of a Prometheus metric (exact series name with labels), summed over
    /// every gateway that has it; `None` if none has. An external deployment's client has no
    /// gateways to read: asking fails the test.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        assert!(
            !self.metrics.is_empty(),
            "{series}: the metrics of an external deployment are not this test's own"
        );
        let mut sum = None;
        for base in &self.metrics {
            let url = format!("{base}/metrics");
            let response = self
                .http
                .get(&url)
                .send()
                .await
                .unwrap_or_else(|err| panic!("{url}: {err}"));
            assert_eq!(response.status().as_u16(), 200, "{url}");
            let text = response.text().await.expect("read metrics");
            if let Some(value) = metric_value(&text, series) {
                sum = Some(sum.unwrap_or(0.0) + value);
            }
        }
        sum
    }

    /// A room's whole history, oldest first, as (uuid, `sent` in ns): paged with `before` = the
    /// oldest `sent` of the previous page, each page waited for while the deployment answers 503.
    pub async fn full_history(&self, token: &str, room: u64) -> Vec<(String, i64)> {
        let mut newest_first = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let page = self.history_when_served(token, room, before.as_deref()).await;
            let Some(oldest) = page.last() else { break };
            before = Some(oldest["sent"].as_str().expect("sent").to_owned());
            for message in &page {
                newest_first.push((
                    message["uuid"].as_str().expect("uuid").to_owned(),
                    ts(message["sent"].as_str().expect("sent")),
                ));
            }
        }
        newest_first.reverse();
        newest_first
    }
}

/// How long [`Api::full_history`] waits for a recovering deployment to serve history again.
pub const RECOVERY_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// A history answer that must be a page of `room`'s well-formed messages.
fn history_page(reply: Reply, room: u64) -> Vec<Value> {
    assert_eq!(reply.status, 200, "history: {reply:?}");
    reply.assert_json();
    let messages = reply.body.as_array().expect("history is an array").clone();
    for message in &messages {
        assert_message(message);
        assert_eq!(message["room"], json!(room));
    }
    messages
}

/// Percent-encodes everything outside the URL-unreserved set.
pub fn percent_encode(text: &str) -> String {
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
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name.trim() == series).then(|| value.trim().parse().ok())?
        })
}
