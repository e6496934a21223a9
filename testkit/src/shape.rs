//! The exact shapes of PROTOCOL.md, asserted: HTTP bodies, frames, ids, tokens and timestamps;
//! and the frames a test sends.

use std::collections::BTreeSet;

use serde_json::{json, Value};

/// Asserts the object has exactly these keys.
#[track_caller]
pub fn assert_keys(value: &Value, keys: &[&str]) {
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("expected an object, got {value}"));
    let got: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(got, want, "keys of {value}");
}

/// Asserts an id is a JSON integer in 1..=2^53-1.
#[track_caller]
pub fn assert_id(id: u64) {
    assert!((1..=(1u64 << 53) - 1).contains(&id), "id {id} out of range");
}

/// Asserts a token is 64 hex characters.
#[track_caller]
pub fn assert_token(token: &str) {
    assert_eq!(token.len(), 64, "token {token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "token {token:?}");
}

/// The uuids of messages per room, each room in arrival order (a `since` replay orders each room
/// by `sent` and sends the rooms one after another).
pub fn uuids_by_room(messages: &[Value]) -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut rooms: std::collections::BTreeMap<u64, Vec<String>> = std::collections::BTreeMap::new();
    for message in messages {
        let room = message["room"].as_u64().expect("room");
        let uuid = message["uuid"].as_str().expect("uuid").to_owned();
        rooms.entry(room).or_default().push(uuid);
    }
    rooms
}

/// The uuids of `recv.data` values (or history messages), in order.
pub fn uuids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["uuid"].as_str().expect("uuid").to_owned())
        .collect()
}

/// Asserts `text` is RFC 3339 with exactly nine fractional digits and returns it as
/// nanoseconds since the epoch.
#[track_caller]
pub fn ts(text: &str) -> i64 {
    parse_ts(text).unwrap_or_else(|| panic!("{text:?} is not RFC 3339 with nine fractional digits"))
}

/// `text` as nanoseconds since the epoch if it is RFC 3339 with exactly nine fractional digits.
pub fn parse_ts(text: &str) -> Option<i64> {
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
pub fn assert_user(user: &Value) {
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
pub fn assert_message(message: &Value) {
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
pub fn assert_send(frame: &Value, code: u64, uuid: &str) -> i64 {
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
pub fn assert_recent(nanos: i64) {
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
pub fn assert_auth(frame: &Value, code: u64) {
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
pub fn assert_error_frame(frame: &Value) {
    assert_keys(frame, &["type", "code", "msg"]);
    assert_eq!(frame["type"], json!("error"), "{frame}");
    assert_eq!(frame["code"], json!(3), "{frame}");
    assert!(frame["msg"].as_str().is_some_and(|m| !m.is_empty()), "{frame}");
}

/// Asserts a `recv` frame and returns its `data`.
#[track_caller]
pub fn recv_data(frame: &Value) -> Value {
    assert_keys(frame, &["type", "data"]);
    assert_eq!(frame["type"], json!("recv"), "{frame}");
    assert_message(&frame["data"]);
    frame["data"].clone()
}

/// A `msg` frame with Text content.
pub fn msg_frame(uuid: &str, room: u64, text: &str) -> String {
    json!({"type": "msg", "uuid": uuid, "room": room, "data": {"type": "Text", "text": text}}).to_string()
}

/// An `auth` frame, optionally with `since`.
pub fn auth_frame(token: &str, since: Option<&str>) -> String {
    match since {
        Some(since) => json!({"type": "auth", "token": token, "since": since}).to_string(),
        None => json!({"type": "auth", "token": token}).to_string(),
    }
}
