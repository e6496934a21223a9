//! A client that behaves as PROTOCOL.md asks of a real one, for the fault suite and the scaling
//! tests: it reconnects through the load balancer after any drop (jittered backoff), resumes
//! with `since`, resends every unanswered message with the same uuid (after code 4 or 5, no
//! answer, or a reconnect), and de-duplicates by uuid. It records everything it sees for the
//! checker.
//!
//! `since` on reconnect is per room, as docs/client-guide.md teaches: for each of the member's
//! rooms, the newest `sent` seen in that room (or the start of the load for a room it has seen
//! nothing of). Each room has its own sequencer, so no single timestamp is a safe resume point.
//!
//! [`LoadPlan`] registers the members of a load; [`Crowd`] runs many members and waits on what
//! they saw; [`check`] compares what they saw with the rooms' histories.

mod check;
mod crowd;
mod load;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::shape::{msg_frame, ts};
use crate::util::new_uuid;

pub use check::{check, Verdict};
pub use crowd::{Acked, Crowd};
pub use load::{LoadPlan, Registered};

/// How long a message may stay unanswered before it is sent again.
const ANSWER_LIMIT: Duration = Duration::from_secs(3);
/// Longest wait for an upgrade or an `auth` answer.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);

/// What the suite tells every member.
#[derive(Default)]
pub struct Control {
    /// Senders make new messages while this is set.
    pub sending: AtomicBool,
    /// Members leave once this is set (senders only when nothing is unanswered).
    pub stop: AtomicBool,
}

/// Who a member is and how it behaves.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    pub label: String,
    pub token: String,
    pub rooms: Vec<u64>,
    /// The first connection's URL (pinned to a gateway, to spread the members).
    pub first_url: String,
    /// Every later connection's URL (balanced by the load balancer).
    pub url: String,
    /// New messages per second (0: a listener).
    pub rate: f64,
    /// Most unanswered messages at once.
    pub window: usize,
    /// `since` for a room the member has seen nothing of yet: just before the load began.
    pub start: i64,
}

/// Everything a member saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every `recv`: (uuid, room, sent), in arrival order, repeats included.
    pub received: Vec<(String, u64, i64)>,
    /// Its own messages answered code 0: uuid → (room, sent).
    pub acked: HashMap<String, (u64, i64)>,
    /// uuids of `received`, for quick membership tests.
    pub have: HashSet<String>,
    /// Messages made but not yet answered code 0.
    pub unanswered: usize,
    pub connects: usize,
    /// Per connection: how many frames had been received before it, and its `since` (JSON).
    pub connected_at: Vec<(usize, Option<String>)>,
    pub resends: usize,
    /// Refusals (`send` codes 4 and 5) and close codes seen, by code.
    pub codes: HashMap<String, usize>,
    /// What a correct server never does (an unknown answer, a message of another room, two
    /// `sent` for one uuid...).
    pub violations: Vec<String>,
}

impl Seen {
    fn count(&mut self, what: String) {
        *self.codes.entry(what).or_default() += 1;
    }
}

/// A member: its spec and what it saw (shared with the suite while it runs).
pub struct Member {
    pub spec: MemberSpec,
    pub seen: Arc<Mutex<Seen>>,
}

struct Outgoing {
    room: u64,
    text: String,
    last_attempt: Instant,
    /// Refusals with code 4 or 5 so far: each doubles the wait before the next attempt.
    refusals: u32,
}

/// Runs the member until `control.stop` (and, for a sender, until everything it made is
/// answered code 0). Never panics on what the server does: violations are recorded.
pub async fn run(spec: MemberSpec, seen: Arc<Mutex<Seen>>, control: Arc<Control>) {
    let period = (spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.rate));
    let mut unanswered: HashMap<String, Outgoing> = HashMap::new();
    let mut made = 0usize;
    let mut last_seen: HashMap<u64, i64> = HashMap::new();
    let mut backoff = Duration::from_millis(20);
    let mut first = true;
    loop {
        if control.stop.load(Ordering::SeqCst) && unanswered.is_empty() {
            return;
        }
        let url = if first { &spec.first_url } else { &spec.url };
        let since = (!first).then(|| {
            let rooms: serde_json::Map<String, Value> = spec
                .rooms
                .iter()
                .map(|room| {
                    let at = last_seen.get(room).copied().unwrap_or(spec.start);
                    (room.to_string(), Value::from(rfc3339(at)))
                })
                .collect();
            Value::Object(rooms).to_string()
        });
        let Some(ws) = connect(url, &spec.token, since.as_deref(), &seen).await else {
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
            continue;
        };
        first = false;
        backoff = Duration::from_millis(20);
        {
            let mut seen = seen.lock().expect("seen");
            seen.connects += 1;
            let at = seen.received.len();
            seen.connected_at.push((at, since));
        }
        let (mut tx, mut rx) = ws.split();
        // Whatever was unanswered when the last connection ended goes again, same uuid.
        let mut alive = true;
        for (uuid, out) in unanswered.iter_mut() {
            if tx
                .send(WsMessage::text(msg_frame(uuid, out.room, &out.text)))
                .await
                .is_err()
            {
                alive = false;
                break;
            }
            out.last_attempt = Instant::now();
            seen.lock().expect("seen").resends += 1;
        }
        let mut tick = tokio::time::interval(
            period
                .unwrap_or(Duration::from_millis(50))
                .min(Duration::from_millis(50)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_make = Instant::now();
        while alive {
            tokio::select! {
                frame = rx.next() => {
                    let text = match frame {
                        Some(Ok(WsMessage::Text(text))) => text,
                        Some(Ok(WsMessage::Close(close))) => {
                            let code = close.map_or(1005, |c| u16::from(c.code));
                            seen.lock().expect("seen").count(format!("close {code}"));
                            break;
                        }
                        Some(Ok(WsMessage::Binary(_))) => {
                            seen.lock().expect("seen").violations.push(format!("{}: a binary frame", spec.label));
                            continue;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => {
                            seen.lock().expect("seen").count("dropped".into());
                            break;
                        }
                    };
                    let frame: Value = match serde_json::from_str(&text) {
                        Ok(frame) => frame,
                        Err(_) => {
                            seen.lock().expect("seen").violations.push(format!("{}: not JSON: {text}", spec.label));
                            continue;
                        }
                    };
                    on_frame(&spec, &frame, &seen, &mut unanswered, &mut last_seen);
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let sending = control.sending.load(Ordering::SeqCst);
                    if let Some(period) = period {
                        if !sending {
                            next_make = now;
                        }
                        while sending && next_make <= now && unanswered.len() < spec.window {
                            let uuid = new_uuid();
                            let room = spec.rooms[made % spec.rooms.len()];
                            let text = format!("{} message {made}", spec.label);
                            made += 1;
                            next_make += period;
                            seen.lock().expect("seen").unanswered += 1;
                            let frame = msg_frame(&uuid, room, &text);
                            unanswered.insert(uuid, Outgoing { room, text, last_attempt: now, refusals: 0 });
                            if tx.send(WsMessage::text(frame)).await.is_err() {
                                alive = false;
                                break;
                            }
                        }
                        if next_make < now {
                            // The window was full: the rate is what the cluster allows.
                            next_make = now;
                        }
                    }
                    for (uuid, out) in unanswered.iter_mut() {
                        if alive && out.last_attempt + ANSWER_LIMIT <= now {
                            out.last_attempt = now;
                            seen.lock().expect("seen").resends += 1;
                            if tx.send(WsMessage::text(msg_frame(uuid, out.room, &out.text))).await.is_err() {
                                alive = false;
                            }
                        }
                    }
                    if control.stop.load(Ordering::SeqCst) && unanswered.is_empty() {
                        let _ = tx.send(WsMessage::Close(None)).await;
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(jitter(backoff)).await;
    }
}

/// Opens a socket and authenticates; `None` (after counting why) if either fails.
async fn connect(
    url: &str,
    token: &str,
    since: Option<&str>,
    seen: &Mutex<Seen>,
) -> Option<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let attempt = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|err| match err {
                tokio_tungstenite::tungstenite::Error::Http(response) => {
                    format!("upgrade {}", response.status().as_u16())
                }
                _ => "connect failed".to_owned(),
            })?;
        let mut auth = serde_json::json!({"type": "auth", "token": token});
        if let Some(since) = since {
            auth["since"] = serde_json::from_str(since).map_err(|_| "since not JSON".to_owned())?;
        }
        ws.send(WsMessage::text(auth.to_string()))
            .await
            .map_err(|_| "auth not sent".to_owned())?;
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(text))) => {
                    let frame: Value =
                        serde_json::from_str(&text).map_err(|_| "auth answer not JSON".to_owned())?;
                    if frame["type"] == "auth" && frame["code"] == 0 {
                        return Ok(ws);
                    }
                    return Err(format!("auth {}", frame["code"]));
                }
                Some(Ok(WsMessage::Close(close))) => {
                    return Err(format!("close {}", close.map_or(1005, |c| u16::from(c.code))))
                }
                Some(Ok(_)) => continue,
                _ => return Err("dropped before auth".to_owned()),
            }
        }
    };
    match tokio::time::timeout(CONNECT_LIMIT, attempt).await {
        Ok(Ok(ws)) => Some(ws),
        Ok(Err(why)) => {
            seen.lock().expect("seen").count(why);
            None
        }
        Err(_) => {
            seen.lock().expect("seen").count("connect timeout".into());
            None
        }
    }
}

fn on_frame(
    spec: &MemberSpec,
    frame: &Value,
    seen: &Mutex<Seen>,
    unanswered: &mut HashMap<String, Outgoing>,
    last_seen: &mut HashMap<u64, i64>,
) {
    let mut seen = seen.lock().expect("seen");
    match frame["type"].as_str() {
        Some("recv") => {
            let data = &frame["data"];
            let (Some(uuid), Some(room), Some(sent)) = (
                data["uuid"].as_str(),
                data["room"].as_u64(),
                data["sent"].as_str(),
            ) else {
                seen.violations
                    .push(format!("{}: a malformed recv {frame}", spec.label));
                return;
            };
            if !spec.rooms.contains(&room) {
                seen.violations
                    .push(format!("{}: a recv of room {room}, not its own", spec.label));
                return;
            }
            let sent = ts(sent);
            let newest = last_seen.entry(room).or_insert(sent);
            *newest = (*newest).max(sent);
            seen.have.insert(uuid.to_owned());
            seen.received.push((uuid.to_owned(), room, sent));
        }
        Some("send") => {
            let (Some(uuid), Some(code), Some(sent)) = (
                frame["uuid"].as_str(),
                frame["code"].as_u64(),
                frame["sent"].as_str(),
            ) else {
                seen.violations
                    .push(format!("{}: a malformed send {frame}", spec.label));
                return;
            };
            let sent = ts(sent);
            match code {
                0 => {
                    if let Some(out) = unanswered.remove(uuid) {
                        seen.unanswered -= 1;
                        seen.acked.insert(uuid.to_owned(), (out.room, sent));
                    } else if let Some(&(_, first)) = seen.acked.get(uuid) {
                        if first != sent {
                            seen.violations
                                .push(format!("{}: {uuid} acked with two sent", spec.label));
                        }
                    } else {
                        seen.violations
                            .push(format!("{}: an answer to nothing sent: {frame}", spec.label));
                    }
                }
                4 | 5 => {
                    seen.count(format!("send {code}"));
                    if let Some(out) = unanswered.get_mut(uuid) {
                        // Resend after a growing pause: the cluster asked to slow down.
                        let pause = Duration::from_millis(200) * 2u32.pow(out.refusals.min(3));
                        out.refusals += 1;
                        out.last_attempt = Instant::now() - ANSWER_LIMIT + jitter(pause).min(ANSWER_LIMIT);
                    }
                }
                _ => seen
                    .violations
                    .push(format!("{}: refused with code {code}: {frame}", spec.label)),
            }
        }
        _ => seen
            .violations
            .push(format!("{}: unexpected frame {frame}", spec.label)),
    }
}

/// `base` ± 50 %.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(0.5 + rand::random::<f64>())
}

/// Nanoseconds since the epoch as RFC 3339 with nine fractional digits.
pub fn rfc3339(nanos: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(nanos).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}
