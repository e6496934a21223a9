//! Malformed input at volume: ten thousand generated frames from several sockets, each checked
//! against its documented answer, while a bystander keeps receiving a steady stream intact and
//! the server survives without a panic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use chatoy_testkit::{
    assert_keys, opcode, parse_ts, seed, ts, two_sockets, within, Event, RawWs, Server, TestUser,
    UNLIMITED_CONNS, UNLIMITED_MSGS, WAIT,
};

const WORKERS: u64 = 4;
const CASES_PER_WORKER: usize = 2500;
const MAX_FRAME: usize = 64 * 1024;

/// Which of a worker's two sockets a case goes to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// The socket that has authenticated.
    Authed,
    /// A socket that has not authenticated (yet).
    Fresh,
}

/// The documented answer to a frame.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// `{"type":"error","code":3,...}`.
    Error,
    /// A `send` answer with this code, echoing this uuid.
    Send(u64, String),
    /// An `auth` answer with this code.
    Auth(u64),
    /// A close frame with this code.
    Close(u16),
}

impl Expect {
    /// The answer without the echoed uuid, for tallies.
    fn kind(&self) -> String {
        match self {
            Expect::Error => "Error".to_owned(),
            Expect::Send(code, _) => format!("Send({code})"),
            Expect::Auth(code) => format!("Auth({code})"),
            Expect::Close(code) => format!("Close({code})"),
        }
    }
}

/// One generated frame and what it must get.
#[derive(Debug)]
struct Case {
    what: String,
    target: Target,
    opcode: u8,
    payload: Vec<u8>,
    expect: Expect,
}

impl Case {
    fn new(what: impl Into<String>, target: Target, payload: impl Into<Vec<u8>>, expect: Expect) -> Case {
        Case {
            what: what.into(),
            target,
            opcode: opcode::TEXT,
            payload: payload.into(),
            expect,
        }
    }
}

/// What a generator needs to know about its worker.
struct Ctx {
    token: String,
    room: u64,
    foreign_room: u64,
}

fn random_uuid(rng: &mut StdRng) -> String {
    uuid::Uuid::from_u128(rng.random()).to_string()
}

fn random_text(rng: &mut StdRng, max: usize) -> String {
    const CHARS: &[char] = &[
        'a', 'Z', '0', ' ', 'é', '漢', '😀', '"', '\\', '\n', '\t', '/', '<',
    ];
    let len = rng.random_range(1..=max);
    (0..len).map(|_| *CHARS.choose(rng).unwrap_or(&'a')).collect()
}

/// Printable garbage that never contains `{`, so it can never be a JSON object.
fn garbage(rng: &mut StdRng, max: usize) -> String {
    const CHARS: &[u8] = b"abcxyz0123456789 ,:[]\"'\\truefalsenul-+.eE}";
    let len = rng.random_range(1..=max);
    (0..len)
        .map(|_| char::from(*CHARS.choose(rng).unwrap_or(&b'x')))
        .collect()
}

fn valid_msg(uuid: &str, room: u64, text: &str) -> Value {
    json!({"type": "msg", "uuid": uuid, "room": room, "data": {"type": "Text", "text": text}})
}

/// Replaces the JSON string `"__RAW__"` in `value`'s text with `raw` (for numbers serde_json
/// cannot hold).
fn with_raw(value: &Value, raw: &str) -> String {
    value.to_string().replace("\"__RAW__\"", raw)
}

fn gen_case(rng: &mut StdRng, ctx: &Ctx) -> Case {
    use Target::{Authed, Fresh};
    let any_target = |rng: &mut StdRng| if rng.random_bool(0.5) { Authed } else { Fresh };
    let roll = rng.random_range(0..1000);
    match roll {
        // Not JSON at all.
        0..=99 => {
            let text = garbage(rng, 200);
            Case::new("garbage", any_target(rng), text, Expect::Error)
        }
        100..=129 => Case::new("empty frame", any_target(rng), "", Expect::Error),
        130..=149 => {
            let frame = valid_msg(&random_uuid(rng), ctx.room, "cut short").to_string();
            let cut = rng.random_range(1..frame.len());
            Case::new("truncated JSON", Authed, &frame.as_bytes()[..cut], Expect::Error)
        }
        // JSON, but not an object.
        150..=219 => {
            let values = [
                "0",
                "-1",
                "1e308",
                "-1e308",
                "18446744073709551616",
                "-9223372036854775809",
                "1.5",
                "\"msg\"",
                "null",
                "true",
                "false",
                "[]",
                "[{\"type\":\"msg\"}]",
                "\"{\\\"type\\\":\\\"auth\\\"}\"",
            ];
            let text = *values.choose(rng).unwrap_or(&"0");
            Case::new(format!("non-object {text}"), any_target(rng), text, Expect::Error)
        }
        // Deep nesting, balanced or not.
        220..=249 => {
            let depth = 10_000;
            let text = match rng.random_range(0..4) {
                0 => "[".repeat(depth) + &"]".repeat(depth),
                1 => "[".repeat(depth),
                2 => "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth),
                _ => "[".repeat(depth) + "{\"type\":\"msg\"}" + &"]".repeat(depth),
            };
            Case::new("deep nesting", any_target(rng), text, Expect::Error)
        }
        // Objects without a known type.
        250..=319 => {
            let values = [
                json!({}),
                json!({"token": ctx.token}),
                json!({"uuid": random_uuid(rng), "room": ctx.room}),
                json!({"type": "nope"}),
                json!({"type": ""}),
                json!({"type": null}),
                json!({"type": 1}),
                json!({"type": ["msg"]}),
                json!({"type": {"msg": 1}}),
                json!({"type": "MSG", "uuid": random_uuid(rng)}),
                json!({"type": "Auth", "token": ctx.token}),
                json!({"type": "recv", "data": {}}),
                json!({"type": "send", "code": 0}),
                json!({"type": "error", "code": 3, "msg": "x"}),
            ];
            let value = values.choose(rng).cloned().unwrap_or_default();
            Case::new(
                format!("unknown type {value}"),
                any_target(rng),
                value.to_string(),
                Expect::Error,
            )
        }
        // msg frames with one field wrong.
        320..=499 => bad_msg(rng, ctx),
        // Valid msg, but not a member (foreign, absent, largest id).
        500..=539 => {
            let uuid = random_uuid(rng);
            let room = *[ctx.foreign_room, 987_654_321, (1u64 << 53) - 1]
                .choose(rng)
                .unwrap_or(&1);
            Case::new(
                format!("not a member of {room}"),
                Authed,
                valid_msg(&uuid, room, "hello").to_string(),
                Expect::Send(2, uuid),
            )
        }
        // Valid msg: plain, exactly 4000 characters, pretty-printed, escaped.
        540..=589 => {
            let uuid = random_uuid(rng);
            let (what, frame) = match rng.random_range(0..4) {
                0 => (
                    "valid msg",
                    valid_msg(&uuid, ctx.room, &random_text(rng, 50)).to_string(),
                ),
                1 => (
                    "4000 characters",
                    valid_msg(&uuid, ctx.room, &"é".repeat(4000)).to_string(),
                ),
                2 => (
                    "pretty-printed msg",
                    serde_json::to_string_pretty(&valid_msg(&uuid, ctx.room, "pretty")).unwrap_or_default(),
                ),
                _ => (
                    "escaped msg",
                    format!(
                        r#"{{"type":"msg","uuid":"{uuid}","room":{},"data":{{"type":"Text","text":"\u00e9\ud83d\ude00\n\"\\"}}}}"#,
                        ctx.room
                    ),
                ),
            };
            Case::new(what, Authed, frame, Expect::Send(0, uuid))
        }
        // Exactly 64 KiB: a padded valid msg, or padded garbage.
        590..=609 => {
            let uuid = random_uuid(rng);
            if rng.random_bool(0.5) {
                let mut frame = valid_msg(&uuid, ctx.room, "padded").to_string().into_bytes();
                frame.resize(MAX_FRAME, b' ');
                Case::new("64 KiB msg", Authed, frame, Expect::Send(0, uuid))
            } else {
                let mut frame = garbage(rng, 100).into_bytes();
                frame.resize(MAX_FRAME, b'x');
                Case::new("64 KiB garbage", any_target(rng), frame, Expect::Error)
            }
        }
        // msg before auth.
        610..=649 => {
            let uuid = random_uuid(rng);
            Case::new(
                "msg before auth",
                Fresh,
                valid_msg(&uuid, ctx.room, "early").to_string(),
                Expect::Send(1, uuid),
            )
        }
        // auth on an authenticated socket, well-formed or not.
        650..=709 => {
            let frame = auth_variant(rng, ctx, true);
            Case::new(format!("auth again {frame}"), Authed, frame, Expect::Auth(2))
        }
        // failed auth on a fresh socket; a malformed `since` is an error frame instead.
        710..=769 => {
            let frame = auth_variant(rng, ctx, false);
            let expect = if frame.contains(r#""since""#) {
                Expect::Error
            } else {
                Expect::Auth(1)
            };
            Case::new(format!("bad auth {frame}"), Fresh, frame, expect)
        }
        770..=779 => Case::new(
            "good auth",
            Fresh,
            json!({"type": "auth", "token": ctx.token}).to_string(),
            Expect::Auth(0),
        ),
        // Invalid UTF-8 in a text frame.
        780..=829 => {
            let mut frame = valid_msg(&random_uuid(rng), ctx.room, "broken")
                .to_string()
                .into_bytes();
            let at = rng.random_range(0..=frame.len());
            let bad = *chatoy_testkit::fuzz::BAD_UTF8
                .choose(rng)
                .unwrap_or(&&b"\xff"[..]);
            frame.splice(at..at, bad.iter().copied());
            Case::new("invalid UTF-8", any_target(rng), frame, Expect::Close(1007))
        }
        // Binary frames, whatever they hold.
        830..=879 => {
            let payload = if rng.random_bool(0.5) {
                valid_msg(&random_uuid(rng), ctx.room, "binary")
                    .to_string()
                    .into_bytes()
            } else {
                let len = rng.random_range(0..2000);
                (0..len).map(|_| rng.random()).collect()
            };
            let mut case = Case::new("binary", any_target(rng), payload, Expect::Close(1003));
            case.opcode = opcode::BINARY;
            case
        }
        // Over 64 KiB.
        880..=909 => {
            let len = if rng.random_bool(0.5) {
                MAX_FRAME + 1
            } else {
                rng.random_range(MAX_FRAME + 1..=MAX_FRAME + 5000)
            };
            let mut frame = valid_msg(&random_uuid(rng), ctx.room, "too big")
                .to_string()
                .into_bytes();
            frame.resize(len, b' ');
            Case::new(
                format!("{len} bytes"),
                any_target(rng),
                frame,
                Expect::Close(1009),
            )
        }
        // Huge and negative numbers where the uuid or type should be.
        _ => {
            let raw = *["1e308", "-1e308", "18446744073709551616", "-1", "0", "-0", "3.25"]
                .choose(rng)
                .unwrap_or(&"0");
            let value = json!({"type": "msg", "uuid": "__RAW__", "room": ctx.room,
                "data": {"type": "Text", "text": "x"}});
            Case::new(
                format!("uuid {raw}"),
                Authed,
                with_raw(&value, raw),
                Expect::Send(3, String::new()),
            )
        }
    }
}

/// An `auth` frame: on an authenticated socket anything goes (the answer is 2); otherwise only
/// frames that must fail (the answer is 1, or an `error` frame for a malformed `since`).
fn auth_variant(rng: &mut StdRng, ctx: &Ctx, include_valid: bool) -> String {
    let hex: String = (0..64)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect();
    let mut variants = vec![
        json!({"type": "auth", "token": hex}),
        json!({"type": "auth", "token": ""}),
        json!({"type": "auth", "token": 5}),
        json!({"type": "auth", "token": null}),
        json!({"type": "auth", "token": [ctx.token]}),
        json!({"type": "auth"}),
        json!({"type": "auth", "token": ctx.token, "since": "not a time"}),
        json!({"type": "auth", "token": ctx.token, "since": 5}),
        json!({"type": "auth", "token": format!("{}0", ctx.token)}),
    ];
    if include_valid {
        variants.push(json!({"type": "auth", "token": ctx.token}));
        variants.push(json!({"type": "auth", "token": ctx.token, "since": "2000-01-01T00:00:00Z"}));
    }
    variants.choose(rng).cloned().unwrap_or_default().to_string()
}

/// A `msg` with exactly one field wrong; the answer is send code 3 echoing the uuid if it is a
/// string.
fn bad_msg(rng: &mut StdRng, ctx: &Ctx) -> Case {
    let uuid = random_uuid(rng);
    let mut value = valid_msg(&uuid, ctx.room, "x");
    let mut echo = uuid.clone();
    let mut raw = None;
    let what;
    match rng.random_range(0..3) {
        0 => {
            let bad_strings = [
                String::new(),
                "x".into(),
                uuid[..35].to_owned(),
                format!("{uuid}0"),
                uuid.replace('-', ""),
                format!("{{{uuid}}}"),
                format!("urn:uuid:{uuid}"),
                format!("{}g{}", &uuid[..3], &uuid[4..]),
                format!("{}{}-", &uuid[..8], &uuid[9..]),
                random_text(rng, 40),
            ];
            match rng.random_range(0..3) {
                0 => {
                    let bad = bad_strings.choose(rng).cloned().unwrap_or_default();
                    what = format!("uuid {bad:?}");
                    echo = bad.clone();
                    value["uuid"] = json!(bad);
                }
                1 => {
                    let bad = [json!(7), json!(null), json!(true), json!([uuid]), json!({"u": 1})]
                        .choose(rng)
                        .cloned()
                        .unwrap_or_default();
                    what = format!("uuid {bad}");
                    echo = String::new();
                    value["uuid"] = bad;
                }
                _ => {
                    what = "no uuid".into();
                    echo = String::new();
                    value.as_object_mut().map(|o| o.remove("uuid"));
                }
            }
        }
        1 => {
            let bad = *[
                "0",
                "-1",
                "-0",
                "1.5",
                "9007199254740992",
                "18446744073709551616",
                "1e308",
                "-1e308",
                "\"1\"",
                "null",
                "[]",
                "{}",
                "true",
                "-9223372036854775808",
            ]
            .choose(rng)
            .unwrap_or(&"0");
            if rng.random_bool(0.1) {
                what = "no room".to_owned();
                value.as_object_mut().map(|o| o.remove("room"));
            } else {
                what = format!("room {bad}");
                value["room"] = json!("__RAW__");
                raw = Some(bad);
            }
        }
        _ => {
            let bad = [
                json!("x"),
                json!(1),
                json!(null),
                json!([]),
                json!({}),
                json!({"type": "Text"}),
                json!({"type": "Text", "text": 5}),
                json!({"type": "Text", "text": null}),
                json!({"type": "Text", "text": ""}),
                json!({"type": "Text", "text": "x".repeat(4001)}),
                json!({"type": "Text", "text": "😀".repeat(4001)}),
                json!({"type": "Image", "url": "x"}),
                json!({"type": "text", "text": "x"}),
                json!({"type": null, "text": "x"}),
                json!({"text": "x"}),
            ]
            .choose(rng)
            .cloned()
            .unwrap_or_default();
            if rng.random_bool(0.1) {
                what = "no data".to_owned();
                value.as_object_mut().map(|o| o.remove("data"));
            } else {
                let shown: String = bad.to_string().chars().take(60).collect();
                what = format!("data {shown}");
                value["data"] = bad;
            }
        }
    }
    let frame = match raw {
        Some(raw) => with_raw(&value, raw),
        None => value.to_string(),
    };
    Case::new(what, Target::Authed, frame, Expect::Send(3, echo))
}

/// Whether `event` is the documented answer `expect`.
fn check(expect: &Expect, event: &Event) -> Result<(), String> {
    let fail = || Err(format!("expected {expect:?}, got {event:?}"));
    match (expect, event) {
        (Expect::Close(want), Event::Close(got, _)) if want == got => Ok(()),
        (Expect::Error, Event::Json(v)) => {
            let ok = v.as_object().is_some_and(|o| o.len() == 3)
                && v["type"] == "error"
                && v["code"] == 3
                && v["msg"].as_str().is_some_and(|m| !m.is_empty());
            if ok {
                Ok(())
            } else {
                fail()
            }
        }
        (Expect::Auth(code), Event::Json(v)) => {
            let msg = ["", "Login status expired!", "Already authenticated!"][*code as usize];
            if *v == json!({"type": "auth", "code": code, "msg": msg}) {
                Ok(())
            } else {
                fail()
            }
        }
        (Expect::Send(code, uuid), Event::Json(v)) => {
            let msg_ok = match (*code, v["msg"].as_str()) {
                (0, Some(m)) => m.is_empty(),
                (1, Some(m)) => m == "Please login first!",
                (_, Some(m)) => !m.is_empty(),
                (_, None) => false,
            };
            let ok = v.as_object().is_some_and(|o| o.len() == 5)
                && v["type"] == "send"
                && v["code"] == *code
                && v["uuid"] == uuid.as_str()
                && msg_ok
                && v["sent"].as_str().and_then(parse_ts).is_some();
            if ok {
                Ok(())
            } else {
                fail()
            }
        }
        _ => fail(),
    }
}

/// One worker: its own user and room, an authenticated socket and a fresh one.
/// Runs a worker's cases; returns how many frames of each expected answer it sent.
async fn worker(
    server: &Server,
    index: u64,
    seed: u64,
    user: &TestUser,
    ctx: Ctx,
) -> BTreeMap<String, usize> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(index));
    let mut authed = RawWs::connect(server).await;
    authed.auth_ok(&user.token, None).await;
    let mut fresh = RawWs::connect(server).await;
    let mut fresh_failures = 0;
    let mut tally = BTreeMap::new();
    for i in 0..CASES_PER_WORKER {
        let case = gen_case(&mut rng, &ctx);
        let ws = match case.target {
            Target::Authed => &mut authed,
            Target::Fresh => &mut fresh,
        };
        ws.send_frame(case.opcode, &case.payload).await;
        *tally.entry(case.expect.kind()).or_insert(0) += 1;
        let event = ws.next_event(WAIT).await;
        if let Err(err) = check(&case.expect, &event) {
            panic!(
                "seed {seed}, worker {index}, case {i} ({}, {:?} socket, {} bytes): {err}",
                case.what,
                case.target,
                case.payload.len()
            );
        }
        match (case.target, &case.expect) {
            (Target::Authed, Expect::Close(_)) => {
                authed = RawWs::connect(server).await;
                authed.auth_ok(&user.token, None).await;
            }
            (Target::Fresh, Expect::Close(_) | Expect::Auth(0)) => {
                fresh = RawWs::connect(server).await;
                fresh_failures = 0;
            }
            (Target::Fresh, Expect::Auth(1)) => {
                fresh_failures += 1;
                // Stay under the five failures that close the socket.
                if fresh_failures == 4 {
                    fresh = RawWs::connect(server).await;
                    fresh_failures = 0;
                }
            }
            _ => {}
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_frames() {
    let seed = seed("ten_thousand_malformed_frames");
    // This test is not about limits: it reconnects after every closing frame, as fast as the
    // machine allows, so no connection or message rate may refuse it on a fast machine.
    let flags = [&UNLIMITED_MSGS[..], &UNLIMITED_CONNS, &["--auth-timeout", "120s"]].concat();
    let mut server = Server::start_with(&flags).await;
    let api = server.api();

    // The bystander room: one steady sender, one receiver.
    let speaker = api.new_user("speaker").await;
    let listener = api.new_user("listener").await;
    let stage = api.create_room(&speaker.token, "stage").await;
    api.join(&listener.token, stage).await;
    let (mut speaker_ws, mut listener_ws) = two_sockets(&server, &speaker, &listener).await;

    let outsider = api.new_user("outsider").await;
    let foreign_room = api.create_room(&outsider.token, "not yours").await;
    let mut users = Vec::new();
    let mut rooms = Vec::new();
    for i in 0..WORKERS {
        let user = api.new_user(&format!("fuzz{i}")).await;
        rooms.push(api.create_room(&user.token, &format!("fuzz {i}")).await);
        users.push(user);
    }

    let done = AtomicBool::new(false);
    let end_uuid = uuid::Uuid::new_v4().to_string();
    let speak = async {
        let mut spoken = Vec::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(5));
        while !done.load(Ordering::SeqCst) {
            ticker.tick().await;
            let uuid = uuid::Uuid::new_v4().to_string();
            let sent = speaker_ws
                .send_ok(&uuid, stage, &format!("line {}", spoken.len()))
                .await;
            spoken.push((uuid, ts(&sent)));
        }
        let sent = speaker_ws.send_ok(&end_uuid, stage, "the end").await;
        spoken.push((end_uuid.clone(), ts(&sent)));
        spoken
    };
    let listen = async {
        let got = listener_ws.recv_until(&end_uuid).await;
        got.iter()
            .map(|d| {
                assert_keys(d, &["uuid", "sender", "room", "data", "sent", "modified"]);
                (
                    d["uuid"].as_str().unwrap_or_default().to_owned(),
                    ts(d["sent"].as_str().unwrap_or_default()),
                )
            })
            .collect::<Vec<_>>()
    };
    let fuzz = async {
        let workers = users.iter().zip(&rooms).enumerate().map(|(i, (user, room))| {
            let ctx = Ctx {
                token: user.token.clone(),
                room: *room,
                foreign_room,
            };
            worker(&server, i as u64, seed, user, ctx)
        });
        let tallies = futures_util::future::join_all(workers).await;
        done.store(true, Ordering::SeqCst);
        let mut total: BTreeMap<String, usize> = BTreeMap::new();
        for (kind, count) in tallies.into_iter().flatten() {
            *total.entry(kind).or_insert(0) += count;
        }
        total
    };
    let (spoken, heard, frames) = within(Duration::from_secs(120), "the malformed-frame run", async {
        tokio::join!(speak, listen, fuzz)
    })
    .await;

    println!("frames sent, by expected answer: {frames:?}");
    let sent: usize = frames.values().sum();
    assert!(sent >= 10_000, "only {sent} frames were sent");
    for kind in [
        "Error",
        "Send(0)",
        "Send(1)",
        "Send(2)",
        "Send(3)",
        "Auth(0)",
        "Auth(1)",
        "Auth(2)",
        "Close(1003)",
        "Close(1007)",
        "Close(1009)",
    ] {
        assert!(
            frames.get(kind).is_some_and(|n| *n > 0),
            "no case expected {kind}: {frames:?}"
        );
    }
    assert!(spoken.len() > 10, "the bystander stream was not steady");
    assert_eq!(heard, spoken, "the bystander got every message, once, in order");

    assert!(server.is_running(), "the server died");
    assert_eq!(api.get("/healthz", None).await.status, 200);
    // The valid messages of each worker were stored (spot check: history answers).
    for (user, room) in users.iter().zip(&rooms) {
        api.history(&user.token, *room, None, Some(200)).await;
    }
    let stderr = server.stderr();
    assert!(
        !stderr.contains("panicked"),
        "the server panicked (seed {seed}):\n{stderr}"
    );
}
