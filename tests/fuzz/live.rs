//! Runs generated sequences against a real `chatoy standalone` process: one fresh user per
//! sequence drives a raw socket (the subject) through every step, each answer is checked
//! against the model as it arrives, and at the end of the sequence so are the invariants that
//! span connections: a second socket of the user (the twin) got every new message exactly
//! once and in order, a bystander pair in another room still talks, `/healthz` answers and the
//! process is alive.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chatoy_protocol::{AuthCode, MessageContent, ServerFrame, Timestamp};
use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde_json::Value;

use crate::actions::{
    Action, CloseKind, MsgKind, ResendKind, RoomKind, SinceKind, Template, TextKind, TokenKind, UuidKind,
    Violation, BAD_DATA, BAD_UUIDS, MALFORMED_AUTH, NON_STRING_UUIDS, ROOM_LITERALS,
};
use crate::model::{close_reply, Conn, Expect, Model, SendExpect, Stored, MAX_FRAME};
use chatoy_testkit::fuzz::json::Tree;
use chatoy_testkit::fuzz::{sorted_keys, BAD_UTF8};
use chatoy_testkit::{
    close_code, close_reason, new_uuid, opcode, random_hex, Api, RawWs, Server, Ws, UNLIMITED_CONNS,
    UNLIMITED_MSGS, WAIT,
};
use sha2::Digest;

/// The fuzzed server's flags besides [`UNLIMITED_MSGS`] and [`UNLIMITED_CONNS`] (sequences send
/// and reconnect as fast as the machine allows: no rate may refuse them): no auth or idle
/// timeout within reach (so every answer is determined), short-lived tokens, and a ping every
/// second so server pings interleave with the traffic.
const FLAGS: &[&str] = &[
    "--auth-timeout",
    "10m",
    "--idle-timeout",
    "10m",
    "--ping-interval",
    "1s",
    "--token-ttl",
    "1h",
];

/// What a run tried, for the report at its end.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) sequences: AtomicU64,
    pub(crate) actions: AtomicU64,
    /// WebSocket frames the subjects sent.
    pub(crate) frames: AtomicU64,
    /// HTTP calls the steps made (logins for fresh tokens, logouts, new rooms).
    pub(crate) http: AtomicU64,
    /// Frames made by mutating a valid or corpus frame.
    pub(crate) mutated: AtomicU64,
    /// Answers by kind (`send 0`, `close 1009`, ...).
    pub(crate) answers: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn answer(&self, kind: String) {
        if let Ok(mut answers) = self.answers.lock() {
            *answers.entry(kind).or_insert(0) += 1;
        }
    }

    /// One line per figure.
    pub(crate) fn report(&self) -> String {
        let mut out = format!(
            "{} sequences, {} actions, {} frames sent ({} mutated), {} HTTP calls",
            self.sequences.load(Ordering::Relaxed),
            self.actions.load(Ordering::Relaxed),
            self.frames.load(Ordering::Relaxed),
            self.mutated.load(Ordering::Relaxed),
            self.http.load(Ordering::Relaxed),
        );
        if let Ok(answers) = self.answers.lock() {
            let list: Vec<String> = answers.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            let _ = write!(out, "; answers: {}", list.join(", "));
        }
        out
    }
}

/// The speaker and listener of the bystander room.
struct Bystanders {
    speaker: Ws,
    listener: Ws,
}

/// The harness: the server under fuzzing and what every sequence shares.
pub(crate) struct Harness {
    server: tokio::sync::Mutex<Server>,
    api: Api,
    /// A token whose lifetime ends at `expired_at`.
    expired: String,
    expired_at: tokio::time::Instant,
    /// The bystanders' room, of which no fuzzed user is a member.
    stage: u64,
    bystanders: tokio::sync::Mutex<Bystanders>,
    corpus: Vec<Vec<u8>>,
    pub(crate) stats: Stats,
}

/// The subject socket and the token it authenticated with.
#[derive(Default)]
struct Subject {
    ws: Option<RawWs>,
    token: Option<String>,
}

/// One sequence's user.
struct User {
    name: String,
    model: Model,
    /// Everything sent and received, for the failure message.
    log: Vec<String>,
}

/// What the subject observed next.
#[derive(Debug)]
enum Event {
    Frame(ServerFrame, Value),
    Close(u16, String),
    Pong(Vec<u8>),
    Ended,
}

/// The first bytes of a payload, for logs.
fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let short: String = text.chars().take(160).collect();
    if short.len() < text.len() {
        format!("{short:?}... ({} bytes)", bytes.len())
    } else {
        format!("{short:?}")
    }
}

/// A `msg` frame from raw JSON pieces; `None` leaves the field out.
fn msg_json(uuid: Option<&str>, room: Option<&str>, data: &str) -> String {
    let mut fields = vec![r#""type":"msg""#.to_owned()];
    if let Some(uuid) = uuid {
        fields.push(format!(r#""uuid":{uuid}"#));
    }
    if let Some(room) = room {
        fields.push(format!(r#""room":{room}"#));
    }
    fields.push(format!(r#""data":{data}"#));
    format!("{{{}}}", fields.join(","))
}

fn quote(text: &str) -> String {
    chatoy_testkit::fuzz::json::quote(text)
}

fn text_data(text: &str) -> String {
    format!(r#"{{"type":"Text","text":{}}}"#, quote(text))
}

fn valid_msg(room: u64, text: &str) -> String {
    msg_json(
        Some(&quote(&new_uuid())),
        Some(&room.to_string()),
        &text_data(text),
    )
}

fn empty_to_none(literal: &str) -> Option<&str> {
    (!literal.is_empty()).then_some(literal)
}

impl Harness {
    /// Starts the server, the bystanders, and the token that will expire.
    pub(crate) async fn start(corpus: Vec<Vec<u8>>) -> Harness {
        let server = Server::start_with(&[&UNLIMITED_MSGS[..], &UNLIMITED_CONNS, FLAGS].concat()).await;
        let api = server.api();
        let stale = api.new_user("stale").await;
        // An expired token: a session of the stale user that ended long ago, written straight
        // into the server's database (tokens live an hour here, so that no socket's token
        // expires during a run: that closes the socket, which the model does not predict).
        let expired = random_hex(64);
        let hash = sha2::Sha256::digest(expired.as_bytes());
        server
            .database()
            .execute(
                "INSERT INTO sessions (token_hash, user_id, generated, expires) VALUES (?1, ?2, 1, 2)",
                rusqlite::params![&hash[..], stale.id as i64],
            )
            .expect("insert an expired session");
        let expired_at = tokio::time::Instant::now();
        let speaker = api.new_user("speaker").await;
        let listener = api.new_user("listener").await;
        let stage = api.create_room(&speaker.token, "stage").await;
        api.join(&listener.token, stage).await;
        let bystanders = Bystanders {
            speaker: Ws::authed(&server, &speaker.token).await,
            listener: Ws::authed(&server, &listener.token).await,
        };
        Harness {
            server: tokio::sync::Mutex::new(server),
            api,
            expired,
            expired_at,
            stage,
            bystanders: tokio::sync::Mutex::new(bystanders),
            corpus,
            stats: Stats::default(),
        }
    }

    /// Runs one sequence; on a violation, the error carries the sequence's transcript.
    pub(crate) async fn run(&self, actions: &[Action]) -> Result<(), String> {
        self.stats.sequences.fetch_add(1, Ordering::Relaxed);
        let test_user = self.api.new_user("fz").await;
        let room = self.api.create_room(&test_user.token, "fuzz").await;
        let server = self.server.lock().await;
        let mut twin = Ws::authed(&server, &test_user.token).await;
        drop(server);
        let mut user = User {
            name: test_user.username.clone(),
            model: Model::new(test_user.id, room),
            log: Vec::new(),
        };
        let mut subject = Subject::default();
        let mut outcome = Ok(());
        for (i, action) in actions.iter().enumerate() {
            self.stats.actions.fetch_add(1, Ordering::Relaxed);
            user.log.push(format!("#{i} {action:?}"));
            if let Err(err) = self.step(&mut user, &mut subject, action).await {
                outcome = Err(err);
                break;
            }
        }
        if outcome.is_ok() {
            outcome = self.finish(&mut user, subject, &mut twin).await;
        }
        outcome.map_err(|err| {
            let log = user.log.join("\n  ");
            format!(
                "{err}\nuser {} (id {}), transcript:\n  {log}",
                user.name, user.model.user
            )
        })
    }

    /// A token of this kind, and the token that may authenticate (a fresh one, unedited).
    async fn token(&self, user: &User, kind: &TokenKind) -> (String, Option<String>) {
        match kind {
            TokenKind::Fresh => {
                let token = self.login(user).await;
                (token.clone(), Some(token))
            }
            TokenKind::Expired => {
                tokio::time::sleep_until(self.expired_at).await;
                (self.expired.clone(), None)
            }
            TokenKind::Revoked => {
                let token = self.login(user).await;
                self.stats.http.fetch_add(1, Ordering::Relaxed);
                self.api.post_empty("/logout", Some(&token)).await.assert_ok(200);
                (token, None)
            }
            TokenKind::Unknown(a, b) => (format!("{a:032x}{b:032x}"), None),
            TokenKind::Edited(edit) => {
                let token = self.login(user).await;
                let edited = edit.apply(&token);
                let valid = (edited == token).then_some(token);
                (edited, valid)
            }
        }
    }

    async fn login(&self, user: &User) -> String {
        self.stats.http.fetch_add(1, Ordering::Relaxed);
        self.api.login(&user.name).await.0
    }

    fn since(model: &Model, kind: &SinceKind) -> serde_json::Value {
        match kind {
            SinceKind::Epoch => "1970-01-01T00:00:00Z".into(),
            SinceKind::Future => "2200-01-01T00:00:00.000000001Z".into(),
            SinceKind::PerRoom(at, shift, skip_first) => {
                let mut rooms = serde_json::Map::new();
                for (n, room) in model.rooms.iter().enumerate() {
                    if *skip_first && n == 0 {
                        continue;
                    }
                    let stored: Vec<_> = model.stored.iter().filter(|m| m.room == *room).collect();
                    let sent = stored
                        .get(at.index(stored.len().max(1)))
                        .map_or(0, |message| message.sent + shift);
                    rooms.insert(room.to_string(), Timestamp(sent).to_string().into());
                }
                rooms.into()
            }
            SinceKind::Stored(at, shift, offset) => {
                let Some(message) = model.stored.get(at.index(model.stored.len().max(1))) else {
                    return "1970-01-01T00:00:00Z".into();
                };
                let at = DateTime::<Utc>::from_timestamp_nanos(message.sent + shift);
                match (offset, FixedOffset::east_opt(8 * 3600)) {
                    (true, Some(zone)) => at
                        .with_timezone(&zone)
                        .to_rfc3339_opts(SecondsFormat::Nanos, false),
                    _ => Timestamp(message.sent + shift).to_string(),
                }
                .into()
            }
        }
    }

    /// The payload of a `msg` step.
    fn msg_payload(&self, model: &Model, kind: &MsgKind) -> String {
        let own = |at: &proptest::sample::Index| model.rooms[at.index(model.rooms.len())];
        match kind {
            MsgKind::New(uuid, room, text) => {
                let fresh = new_uuid();
                let uuid = match uuid {
                    UuidKind::Fresh => Some(quote(&fresh)),
                    UuidKind::Upper => Some(quote(&fresh.to_uppercase())),
                    UuidKind::Bad(i) => Some(quote(&BAD_UUIDS[*i].replace("UUID", &fresh))),
                    UuidKind::NotString(i) => empty_to_none(NON_STRING_UUIDS[*i]).map(String::from),
                };
                let room = match room {
                    RoomKind::Own(at) => Some(own(at).to_string()),
                    RoomKind::Foreign => Some(self.stage.to_string()),
                    RoomKind::Literal(i) => empty_to_none(ROOM_LITERALS[*i]).map(String::from),
                };
                let text = match text {
                    TextKind::Any(text) => text.clone(),
                    TextKind::Max(c) => std::iter::repeat_n(*c, 4000).collect(),
                    TextKind::Over(c) => std::iter::repeat_n(*c, 4001).collect(),
                };
                msg_json(uuid.as_deref(), room.as_deref(), &text_data(&text))
            }
            MsgKind::Resend(at, how) => {
                let Some(stored) = model.stored.get(at.index(model.stored.len().max(1))) else {
                    return valid_msg(model.rooms[0], "nothing to resend yet");
                };
                let (uuid, room, text) = match how {
                    ResendKind::Same => (stored.uuid.clone(), stored.room, stored.text.clone()),
                    ResendKind::Upper => (stored.uuid.to_uppercase(), stored.room, stored.text.clone()),
                    ResendKind::OtherText(text) => (stored.uuid.clone(), stored.room, text.clone()),
                    ResendKind::OtherRoom(at) => (stored.uuid.clone(), own(at), stored.text.clone()),
                };
                msg_json(Some(&quote(&uuid)), Some(&room.to_string()), &text_data(&text))
            }
            MsgKind::BadData(i) => msg_json(
                Some(&quote(&new_uuid())),
                Some(&model.rooms[0].to_string()),
                BAD_DATA[*i],
            ),
        }
    }

    /// Opens the subject socket if there is none.
    async fn open(&self, user: &mut User, subject: &mut Subject) {
        if subject.ws.is_none() || user.model.conn == Conn::Closed {
            let server = self.server.lock().await;
            subject.ws = Some(RawWs::connect(&server).await);
            subject.token = None;
            user.model.conn = Conn::Fresh(0);
            user.log.push("   (connected)".into());
        }
    }

    fn ws(subject: &mut Subject) -> Result<&mut RawWs, String> {
        subject.ws.as_mut().ok_or_else(|| "no subject socket".to_owned())
    }

    /// Sends a text frame and checks its answer.
    async fn text(
        &self,
        user: &mut User,
        subject: &mut Subject,
        payload: &[u8],
        valid_token: Option<String>,
    ) -> Result<(), String> {
        self.open(user, subject).await;
        let expect = user.model.text(payload, valid_token.as_deref());
        user.log.push(format!("   -> text {}", show(payload)));
        self.stats.frames.fetch_add(1, Ordering::Relaxed);
        Self::ws(subject)?.send_text(payload).await;
        if matches!(expect, Expect::AuthOk(_)) {
            subject.token = valid_token;
        }
        self.check(user, subject, expect).await
    }

    /// Sends one frame of another kind and checks its answer.
    async fn frame(
        &self,
        user: &mut User,
        subject: &mut Subject,
        frames: &[(bool, u8, &[u8])],
        expect: impl FnOnce(&mut Model) -> Expect,
    ) -> Result<(), String> {
        self.open(user, subject).await;
        let expect = expect(&mut user.model);
        for (fin, code, payload) in frames {
            user.log
                .push(format!("   -> opcode {code:#x} fin {fin} {}", show(payload)));
            self.stats.frames.fetch_add(1, Ordering::Relaxed);
            Self::ws(subject)?.send_fragment(*fin, *code, payload).await;
        }
        self.check(user, subject, expect).await
    }

    async fn step(&self, user: &mut User, subject: &mut Subject, action: &Action) -> Result<(), String> {
        match action {
            Action::Auth(kind, since) => {
                let (token, valid) = self.token(user, kind).await;
                let mut frame = serde_json::json!({"type": "auth", "token": token});
                if let Some(since) = since {
                    frame["since"] = Self::since(&user.model, since);
                }
                self.text(user, subject, frame.to_string().as_bytes(), valid)
                    .await
            }
            Action::MalformedAuth(i) => {
                let token = self.login(user).await;
                let frame = MALFORMED_AUTH[*i].replace("TOKEN", &token);
                self.text(user, subject, frame.as_bytes(), Some(token)).await
            }
            Action::Msg(kind) => {
                let payload = self.msg_payload(&user.model, kind);
                self.text(user, subject, payload.as_bytes(), None).await
            }
            Action::Text(text) => self.text(user, subject, text.as_bytes(), None).await,
            Action::Binary(payload) => {
                self.frame(user, subject, &[(true, opcode::BINARY, payload)], |m| {
                    m.close(1003, Some("binary frames are not supported"))
                })
                .await
            }
            Action::Ping(payload) => {
                let pong = Expect::Pong(payload.clone());
                self.frame(user, subject, &[(true, opcode::PING, payload)], |_| pong)
                    .await
            }
            Action::Pong(payload) => {
                self.frame(user, subject, &[(true, opcode::PONG, payload)], |_| {
                    Expect::Nothing
                })
                .await
            }
            Action::Violation(violation) => {
                let long;
                let frames: Vec<(bool, u8, &[u8])> = match violation {
                    Violation::ReservedOpcode(code) => vec![(true, *code, b"x")],
                    Violation::ReservedBits(bits) => vec![(true, (bits << 4) | opcode::TEXT, b"{}")],
                    Violation::LongControl(n) => {
                        long = vec![b'p'; *n];
                        vec![(true, opcode::PING, &long)]
                    }
                    Violation::FragmentedControl => vec![(false, opcode::PING, b"x")],
                    Violation::OrphanContinuation => vec![(true, opcode::CONTINUATION, b"x")],
                    Violation::TextInsideText => {
                        vec![(false, opcode::TEXT, b"{\"ty"), (true, opcode::TEXT, b"{}")]
                    }
                };
                self.frame(user, subject, &frames, |m| m.close(1002, Some("protocol error")))
                    .await
            }
            Action::Close(kind) => {
                let payload: Vec<u8> = match kind {
                    CloseKind::Code(code) => code.to_be_bytes().to_vec(),
                    CloseKind::Empty => Vec::new(),
                    CloseKind::OneByte => vec![3],
                    CloseKind::BadReason => vec![3, 232, 0xff, b'x'],
                };
                let (code, reason) = close_reply(&payload);
                self.frame(user, subject, &[(true, opcode::CLOSE, &payload)], |m| {
                    m.close(code, reason)
                })
                .await
            }
            Action::Logout => {
                let Some(token) = subject.token.clone().filter(|_| user.model.conn == Conn::Authed) else {
                    user.log.push("   (not authenticated: nothing to log out)".into());
                    return Ok(());
                };
                self.stats.http.fetch_add(1, Ordering::Relaxed);
                self.api.post_empty("/logout", Some(&token)).await.assert_ok(200);
                user.log.push("   -> POST /logout".into());
                let expect = user.model.close(1008, Some("token revoked"));
                self.check(user, subject, expect).await
            }
            Action::Reconnect => {
                subject.ws = None;
                user.model.conn = Conn::Closed;
                self.open(user, subject).await;
                Ok(())
            }
            Action::Resume(since) => {
                subject.ws = None;
                user.model.conn = Conn::Closed;
                let auth = Action::Auth(TokenKind::Fresh, Some(since.clone()));
                Box::pin(self.step(user, subject, &auth)).await
            }
            Action::CreateRoom => {
                let token = self.login(user).await;
                self.stats.http.fetch_add(1, Ordering::Relaxed);
                let room = self.api.create_room(&token, "another").await;
                user.model.rooms.push(room);
                user.log.push(format!("   -> POST /rooms: {room}"));
                Ok(())
            }
            Action::InvalidUtf8(at, bad) => {
                let mut payload = valid_msg(user.model.rooms[0], "broken").into_bytes();
                let at = at.index(payload.len() + 1);
                payload.splice(at..at, BAD_UTF8[*bad].iter().copied());
                self.text(user, subject, &payload, None).await
            }
            Action::Oversized(extra) => {
                let mut payload = valid_msg(user.model.rooms[0], "too big").into_bytes();
                payload.resize(MAX_FRAME + extra, b' ');
                self.text(user, subject, &payload, None).await
            }
            Action::Fragmented(text, splits, ping) => {
                self.fragmented(user, subject, text, splits, *ping).await
            }
            Action::Mutated(template, tree_mutations, byte_mutations) => {
                let (payload, valid) = match template {
                    Template::Corpus(at) => (self.corpus[at.index(self.corpus.len())].clone(), None),
                    Template::Auth(since) => {
                        let token = self.login(user).await;
                        let mut frame = serde_json::json!({"type": "auth", "token": token});
                        if *since {
                            frame["since"] = "1970-01-01T00:00:00Z".into();
                        }
                        (frame.to_string().into_bytes(), Some(token))
                    }
                    Template::Msg(text) => (valid_msg(user.model.rooms[0], text).into_bytes(), None),
                };
                let mut payload = match serde_json::from_slice::<Tree>(&payload) {
                    Ok(mut tree) if !tree_mutations.is_empty() => {
                        tree_mutations.iter().for_each(|m| tree.mutate(m));
                        tree.compact().into_bytes()
                    }
                    _ => payload,
                };
                for mutation in byte_mutations {
                    mutation.apply(&mut payload, &self.corpus);
                }
                self.stats.mutated.fetch_add(1, Ordering::Relaxed);
                self.text(user, subject, &payload, valid).await
            }
        }
    }

    /// A valid `msg` in fragments, with a ping between the first two if `ping`.
    async fn fragmented(
        &self,
        user: &mut User,
        subject: &mut Subject,
        text: &str,
        splits: &[proptest::sample::Index],
        ping: bool,
    ) -> Result<(), String> {
        let payload = valid_msg(user.model.rooms[0], text).into_bytes();
        let mut cuts: Vec<usize> = splits.iter().map(|at| at.index(payload.len())).collect();
        cuts.retain(|cut| *cut > 0);
        cuts.sort_unstable();
        cuts.dedup();
        cuts.push(payload.len());
        let mut frames: Vec<(bool, u8, &[u8])> = Vec::new();
        let mut start = 0;
        for (i, cut) in cuts.iter().enumerate() {
            let code = if i == 0 {
                opcode::TEXT
            } else {
                opcode::CONTINUATION
            };
            frames.push((i + 1 == cuts.len(), code, &payload[start..*cut]));
            start = *cut;
            if ping && i == 0 && cuts.len() > 1 {
                frames.push((true, opcode::PING, b"between fragments"));
            }
        }
        self.open(user, subject).await;
        let expect = user.model.text(&payload, None);
        for (fin, code, part) in &frames {
            user.log
                .push(format!("   -> opcode {code:#x} fin {fin} {}", show(part)));
            self.stats.frames.fetch_add(1, Ordering::Relaxed);
            Self::ws(subject)?.send_fragment(*fin, *code, part).await;
        }
        if frames.iter().any(|(_, code, _)| *code == opcode::PING) {
            self.check(user, subject, Expect::Pong(b"between fragments".to_vec()))
                .await?;
        }
        self.check(user, subject, expect).await
    }

    /// The next event on the subject socket, answering server pings; every text frame must
    /// parse as a `ServerFrame`.
    async fn next(subject: &mut Subject) -> Result<Event, String> {
        let ws = Self::ws(subject)?;
        loop {
            let Some(frame) = ws.read_frame(WAIT).await else {
                return Ok(Event::Ended);
            };
            match frame.opcode {
                opcode::TEXT => {
                    let parsed = serde_json::from_slice::<ServerFrame>(&frame.payload).map_err(|err| {
                        format!("server frame {} is no ServerFrame: {err}", show(&frame.payload))
                    })?;
                    let value = serde_json::from_slice(&frame.payload).map_err(|err| err.to_string())?;
                    return Ok(Event::Frame(parsed, value));
                }
                opcode::CLOSE => {
                    return Ok(Event::Close(
                        close_code(&frame.payload),
                        close_reason(&frame.payload),
                    ))
                }
                opcode::PING => ws.send_frame(opcode::PONG, &frame.payload).await,
                opcode::PONG => return Ok(Event::Pong(frame.payload)),
                other => return Err(format!("unexpected opcode {other:#x} from the server")),
            }
        }
    }

    /// Reads the answer `expect` describes, failing on anything else.
    async fn check(&self, user: &mut User, subject: &mut Subject, expect: Expect) -> Result<(), String> {
        if expect == Expect::Nothing {
            return Ok(());
        }
        self.check_answer(user, subject, expect).await
    }

    async fn check_answer(
        &self,
        user: &mut User,
        subject: &mut Subject,
        expect: Expect,
    ) -> Result<(), String> {
        let event = Self::next(subject).await?;
        user.log.push(format!("   <- {}", describe(&event)));
        let wrong = |event: &Event| Err(format!("expected {expect:?}, got {event:?}"));
        match (&expect, &event) {
            (Expect::Error, Event::Frame(ServerFrame::Error { code: 3, msg }, value))
                if !msg.is_empty() && sorted_keys(value) == ["code", "msg", "type"] =>
            {
                self.stats.answer("error".into());
            }
            (Expect::Auth(want), Event::Frame(ServerFrame::Auth { code, msg }, _))
                if u8::from(*code) == *want && msg == code.message() =>
            {
                self.stats.answer(format!("auth {want}"));
            }
            (
                Expect::AuthOk(replay),
                Event::Frame(
                    ServerFrame::Auth {
                        code: AuthCode::Ok,
                        msg,
                    },
                    _,
                ),
            ) if msg.is_empty() => {
                self.stats.answer("auth 0".into());
                // Each room's replay in `sent` order; the rooms one after another, in any order.
                let mut left = replay.clone();
                while !left.is_empty() {
                    let event = Self::next(subject).await?;
                    user.log.push(format!("   <- {}", describe(&event)));
                    let Event::Frame(ServerFrame::Recv { data }, _) = &event else {
                        return Err(format!("expected the replay of one of {left:?}, got {event:?}"));
                    };
                    let Some(at) = left.iter().position(|stored| stored.room == data.room) else {
                        return Err(format!(
                            "a replay of room {} that was not due: {data:?}",
                            data.room
                        ));
                    };
                    let stored = left.remove(at);
                    if !same_message(data, &stored, user.model.user) {
                        return Err(format!("expected the replay of {stored:?}, got {data:?}"));
                    }
                    self.stats.answer("recv (since)".into());
                }
            }
            (
                Expect::AuthLastFailure,
                Event::Frame(
                    ServerFrame::Auth {
                        code: AuthCode::Expired,
                        ..
                    },
                    _,
                ),
            ) => {
                self.stats.answer("auth 1".into());
                let expect = Expect::Close(1008, Some("too many failed auth attempts"));
                return Box::pin(self.check_answer(user, subject, expect)).await;
            }
            (
                Expect::Send(want),
                Event::Frame(
                    ServerFrame::Send {
                        code,
                        msg,
                        uuid,
                        sent,
                    },
                    _,
                ),
            ) => {
                self.check_send(user, want, u8::from(*code), msg, uuid, *sent)
                    .map_err(|why| format!("{why}: expected {expect:?}, got {event:?}"))?;
                self.stats.answer(format!("send {}", want.code));
            }
            (Expect::Pong(want), Event::Pong(got)) if want == got => self.stats.answer("pong".into()),
            (Expect::Close(want, reason), Event::Close(code, got)) if want == code => {
                if reason.is_some_and(|reason| reason != got) {
                    return wrong(&event);
                }
                self.stats.answer(format!("close {want}"));
                // After its close frame the server sends nothing more and ends the connection.
                let after = Self::next(subject).await?;
                if !matches!(after, Event::Ended) {
                    return Err(format!("after close {code}, got {after:?}"));
                }
                subject.ws = None;
            }
            _ => return wrong(&event),
        }
        Ok(())
    }

    fn check_send(
        &self,
        user: &mut User,
        want: &SendExpect,
        code: u8,
        msg: &str,
        uuid: &str,
        sent: Timestamp,
    ) -> Result<(), String> {
        if code != want.code || uuid != want.uuid {
            return Err("wrong code or uuid".into());
        }
        let msg_ok = match code {
            0 => msg.is_empty(),
            1 => msg == "Please login first!",
            _ => !msg.is_empty(),
        };
        if !msg_ok {
            return Err("wrong msg".into());
        }
        if let Some(original) = want.sent {
            if sent.0 != original {
                return Err("a resent message must keep its original sent".into());
            }
            return Ok(());
        }
        let now = Timestamp::now().0;
        if (now - sent.0).abs() > 300_000_000_000 {
            return Err("sent is not the current time".into());
        }
        if let Some(new) = &want.new {
            let last = user
                .model
                .stored
                .iter()
                .filter(|m| m.room == new.room)
                .map(|m| m.sent)
                .max();
            if last.is_some_and(|last| sent.0 <= last) {
                return Err("sent must increase strictly within a room".into());
            }
            user.model.stored.push(Stored {
                sent: sent.0,
                ..new.clone()
            });
        }
        Ok(())
    }

    /// The end of a sequence: no stray frame on the subject, the twin got every new message
    /// exactly once in order, the bystanders still talk, the server is healthy.
    async fn finish(&self, user: &mut User, mut subject: Subject, twin: &mut Ws) -> Result<(), String> {
        if user.model.conn != Conn::Closed {
            user.log.push("   (probe)".into());
            self.text(user, &mut subject, b"probe", None).await?;
        }
        drop(subject);

        // One marker per room, from a third socket: the twin has everything before it.
        let token = self.login(user).await;
        let server = self.server.lock().await;
        let mut marker = Ws::authed(&server, &token).await;
        drop(server);
        let mut markers = BTreeMap::new();
        for &room in &user.model.rooms {
            let uuid = new_uuid();
            marker.send_ok(&uuid, room, "marker").await;
            markers.insert(uuid, room);
        }
        marker.close().await;
        let mut got: BTreeMap<u64, Vec<(String, String, i64)>> = BTreeMap::new();
        let mut seen = 0;
        while seen < markers.len() {
            let value = twin.next_json().await;
            let frame: ServerFrame = serde_json::from_value(value.clone())
                .map_err(|err| format!("twin got {value}, no ServerFrame: {err}"))?;
            let ServerFrame::Recv { data } = frame else {
                return Err(format!("twin got {value}, expected only recv"));
            };
            if data.sender != user.model.user {
                return Err(format!("twin got a message of another user: {value}"));
            }
            if markers.contains_key(&data.uuid) {
                seen += 1;
                continue;
            }
            let MessageContent::Text { text } = data.data;
            got.entry(data.room)
                .or_default()
                .push((data.uuid, text, data.sent.0));
        }
        twin_matches(&user.model, &got)?;

        // The bystanders are unaffected.
        let mut bystanders = self.bystanders.lock().await;
        let uuid = new_uuid();
        bystanders.speaker.send_ok(&uuid, self.stage, "still here").await;
        let heard = bystanders.listener.next_recv().await;
        if heard["uuid"] != uuid.as_str() {
            return Err(format!("the bystander heard {heard} instead of {uuid}"));
        }
        drop(bystanders);

        let health = self.api.get("/healthz", None).await;
        if health.status != 200 {
            return Err(format!("/healthz answered {health:?}"));
        }
        let mut server = self.server.lock().await;
        if !server.is_running() {
            return Err(format!("the server died; stderr:\n{}", server.stderr()));
        }
        Ok(())
    }

    /// Stops the bystanders and the server.
    pub(crate) async fn stop(self) {
        let bystanders = self.bystanders.into_inner();
        bystanders.speaker.close().await;
        bystanders.listener.close().await;
        let mut server = self.server.into_inner();
        let status = server.terminate(Duration::from_secs(15)).await;
        assert!(status.success(), "the fuzzed server exited with {status}");
    }
}

/// What the twin received in each room, against what the model stored there.
fn twin_matches(model: &Model, got: &BTreeMap<u64, Vec<(String, String, i64)>>) -> Result<(), String> {
    for &room in &model.rooms {
        let want: Vec<(String, String, i64)> = model
            .stored
            .iter()
            .filter(|m| m.room == room)
            .map(|m| (m.uuid.clone(), m.text.clone(), m.sent))
            .collect();
        let got = got.get(&room).cloned().unwrap_or_default();
        if got != want {
            return Err(format!(
                "the twin got {got:?} in room {room}, the model stored {want:?}"
            ));
        }
    }
    Ok(())
}

fn same_message(data: &chatoy_protocol::Message, stored: &Stored, user: u64) -> bool {
    data.uuid == stored.uuid
        && data.room == stored.room
        && data.sender == user
        && data.data
            == (MessageContent::Text {
                text: stored.text.clone(),
            })
        && data.sent.0 == stored.sent
        && !data.modified
}

fn describe(event: &Event) -> String {
    match event {
        Event::Frame(_, value) => show(value.to_string().as_bytes()),
        other => format!("{other:?}"),
    }
}
