//! The frame parser fuzzer: property tests that feed `ClientFrame::parse` arbitrary bytes,
//! strings and JSON trees, and structured mutations of the corpus in `fuzz/corpus`, and check
//! that it never panics, that every answer is the one PROTOCOL.md documents (as decided by an
//! independent oracle), that whatever it accepts round-trips, and that every `ServerFrame`
//! round-trips too.
//!
//! `CHATOY_FUZZ_CASES` sets the cases per property (default [`DEFAULT_CASES`]); each property
//! prints how many inputs it tried. Failures proptest finds are kept in `fuzz/regressions` and
//! replayed first by every later run. See docs/fuzzing.md.

mod oracle;

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chatoy_protocol::frame::FrameError;
use chatoy_protocol::{validate, AuthCode, ClientFrame, Message, MessageContent, SendCode, ServerFrame};
use chatoy_protocol::{Timestamp, MAX_ID};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

use chatoy_testkit::fuzz::json::{StringEdit, Tree, TreeMutation};
use chatoy_testkit::fuzz::{self, byte_mutation, cases, is_hyphenated_uuid, sorted_keys};

/// Cases per property when `CHATOY_FUZZ_CASES` is unset: a few seconds in the dev profile.
const DEFAULT_CASES: u32 = 3000;

/// The regressions file of one property, in the repository's `fuzz/regressions`.
macro_rules! regressions {
    ($name:literal) => {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/regressions/frames-",
            $name,
            ".txt"
        )
    };
}

/// How many inputs a property tried, by the answer they got.
#[derive(Default)]
struct Inputs {
    /// Every input, including those checked by other rules than the parser's.
    total: AtomicU64,
    /// Parsed into a frame.
    accepted: AtomicU64,
    /// Refused as a malformed `auth` or `msg`.
    malformed: AtomicU64,
    /// Refused as unreadable.
    unreadable: AtomicU64,
}

impl Inputs {
    fn count(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }
}

/// Runs one property for [`cases`] cases and prints how many inputs it tried; `test` counts
/// its inputs in the [`Inputs`] it is given.
fn fuzz<S: Strategy>(
    name: &str,
    regressions: &'static str,
    strategy: S,
    test: impl Fn(&Inputs, S::Value) -> Result<(), TestCaseError>,
) {
    let cases = cases(DEFAULT_CASES);
    let persistence = Some(FileFailurePersistence::Direct(regressions));
    let config = Config {
        cases,
        failure_persistence: persistence.map(|p| Box::new(p) as _),
        ..Config::default()
    };
    let inputs = Inputs::default();
    let started = Instant::now();
    let result = TestRunner::new(config).run(&strategy, |value| test(&inputs, value));
    let secs = started.elapsed().as_secs_f64();
    let total = inputs.total.load(Ordering::Relaxed);
    if let Err(err) = result {
        panic!("fuzz_frames {name}: failed after {total} inputs ({secs:.1} s): {err}");
    }
    println!(
        "fuzz_frames {name}: {total} inputs ({} parsed, {} malformed auth/msg, {} unreadable), \
         {cases} cases, {secs:.1} s, 0 crashes",
        inputs.accepted.load(Ordering::Relaxed),
        inputs.malformed.load(Ordering::Relaxed),
        inputs.unreadable.load(Ordering::Relaxed),
    );
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

/// The core check on one input: `parse` must give exactly the oracle's answer, and an accepted
/// frame must re-serialise (compact and pretty) to text that parses to the same frame.
fn check_frame(inputs: &Inputs, bytes: &[u8]) -> Result<(), TestCaseError> {
    inputs.count(1);
    let got = ClientFrame::parse(bytes);
    let class = match &got {
        Ok(_) => &inputs.accepted,
        Err(FrameError::BadAuth | FrameError::BadSince(_) | FrameError::BadMsg { .. }) => &inputs.malformed,
        Err(FrameError::Unreadable(_)) => &inputs.unreadable,
    };
    class.fetch_add(1, Ordering::Relaxed);
    let want = oracle::classify(bytes);
    prop_assert!(
        want.matches(&got),
        "parse({:?}) = {got:?}, but PROTOCOL.md says {want:?}",
        String::from_utf8_lossy(bytes)
    );
    if let Ok(frame) = &got {
        let compact = serde_json::to_vec(frame).map_err(fail)?;
        prop_assert_eq!(
            &ClientFrame::parse(&compact),
            &Ok(frame.clone()),
            "compact round trip"
        );
        let pretty = serde_json::to_vec_pretty(frame).map_err(fail)?;
        prop_assert_eq!(
            &ClientFrame::parse(&pretty),
            &Ok(frame.clone()),
            "pretty round trip"
        );
    }
    Ok(())
}

/// One corpus file: its name (`<class>--<what>.json`), bytes, and tree if it is JSON.
struct CorpusFrame {
    name: String,
    bytes: Vec<u8>,
    tree: Option<Tree>,
}

fn corpus() -> Vec<CorpusFrame> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus"));
    let mut frames: Vec<CorpusFrame> = fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read the corpus {}: {err}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let bytes = fs::read(&path).expect("read corpus file");
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let tree = serde_json::from_slice(&bytes).ok();
            CorpusFrame { name, bytes, tree }
        })
        .collect();
    frames.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(frames.len() >= 50, "the corpus in {} is missing", dir.display());
    frames
}

/// Keys that frames use, and a few that they do not.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "type", "token", "since", "uuid", "room", "data", "text", "code", "msg", "sent",
        ])
        .prop_map(String::from),
        1 => prop::sample::select(vec!["", "Type", "TYPE", "type ", "\u{0}", "typé", "données"])
            .prop_map(String::from),
        1 => any::<String>(),
    ]
}

/// Strings that are frame values, edge cases of unicode, or anything.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "auth", "msg", "Text", "Image", "send", "recv", "error", "AUTH", "Msg",
            "0123456789abcdef", "67e55044-10b1-426f-9247-bb680e5fe0c8",
            "67E55044-10B1-426F-9247-BB680E5FE0C8", "67e5504410b1426f9247bb680e5fe0c8",
            "2022-12-22T14:33:59.579746716+08:00", "2022-12-22T14:33:59Z", "1677-09-21T00:12:43.145224192Z",
            "2262-04-11T23:47:16.854775808Z", "9999-12-31T23:59:59.999999999Z", " 2022-12-22T14:33:59Z",
        ])
        .prop_map(String::from),
        2 => prop::sample::select(UNICODE_EDGES.to_vec()).prop_map(String::from),
        2 => any::<String>(),
    ]
}

/// Strings that stress text handling: NUL, BOM, zero-width and bidi controls, combining marks,
/// noncharacters, the last code point, astral characters.
const UNICODE_EDGES: &[&str] = &[
    "",
    "\u{0}",
    "\u{1f}",
    "\u{7f}",
    "\u{feff}",
    "\u{200b}",
    "\u{202e}",
    "\u{2028}",
    "e\u{301}",
    "\u{fffe}",
    "\u{ffff}",
    "\u{10ffff}",
    "😀",
    "👩‍👩‍👧",
    "漢字",
    "\\",
    "\"",
    "\n",
    "\r\n",
    "\t",
];

/// Number literals at and past the edges: beyond u64 and f64, negative zero, exponents, and
/// spellings JSON does not allow.
const RAW_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "1.0",
    "1e2",
    "1E+2",
    "0.5e-3",
    "9007199254740991",
    "9007199254740992",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "1e308",
    "1e309",
    "-1e400",
    "1e-400",
    "123456789012345678901234567890",
    "01",
    "1.",
    ".5",
    "+1",
    "0x10",
    "NaN",
    "Infinity",
    "-",
    "1e",
    "--1",
];

/// String literal bodies that are not plain strings: escapes, lone surrogates, bad escapes.
const RAW_STRINGS: &[&str] = &[
    "\\u0000",
    "\\ud800",
    "\\udc00",
    "\\ud83d\\ude00",
    "\\ud83d",
    "\\u00e9",
    "\\/",
    "\\x41",
    "\\u12",
    "\\uZZZZ",
    "\u{1}",
    "\\",
    "a\\nb",
    "\\U0001F600",
];

fn leaf() -> impl Strategy<Value = Tree> {
    prop_oneof![
        1 => Just(Tree::Null),
        1 => any::<bool>().prop_map(Tree::Bool),
        2 => any::<u64>().prop_map(|n| Tree::Num(n.into())),
        1 => any::<i64>().prop_map(|n| Tree::Num(n.into())),
        1 => any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Tree::Num)),
        2 => prop::sample::select(RAW_NUMBERS.to_vec()).prop_map(|raw| Tree::Raw(raw.into())),
        1 => prop::sample::select(RAW_STRINGS.to_vec()).prop_map(|raw| Tree::Raw(format!("\"{raw}\""))),
        4 => string().prop_map(Tree::Str),
    ]
}

fn tree() -> impl Strategy<Value = Tree> {
    leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Tree::Arr),
            prop::collection::vec((key(), inner), 0..6).prop_map(Tree::Obj),
        ]
    })
}

/// A plausible value for a frame field, or anything.
fn field(key: &'static str) -> BoxedStrategy<Tree> {
    let plausible: BoxedStrategy<Tree> = match key {
        "type" => prop_oneof![
            4 => prop::sample::select(vec!["auth", "msg"]).prop_map(|t| Tree::Str(t.into())),
            1 => string().prop_map(Tree::Str),
            1 => (0u64..3).prop_map(|n| Tree::Num(n.into())),
        ]
        .boxed(),
        "token" => string().prop_map(Tree::Str).boxed(),
        "since" => prop_oneof![
            timestamp().prop_map(|t| Tree::Str(t.to_string())),
            Just(Tree::Null),
            string().prop_map(Tree::Str),
        ]
        .boxed(),
        "uuid" => uuid_like().prop_map(Tree::Str).boxed(),
        "room" => prop_oneof![
            any::<u64>().prop_map(|n| Tree::Num(n.into())),
            (0u64..4).prop_map(|n| Tree::Num(n.into())),
            prop::sample::select(RAW_NUMBERS.to_vec()).prop_map(|raw| Tree::Raw(raw.into())),
        ]
        .boxed(),
        _ => {
            let tag = prop_oneof![
                4 => Just(Tree::Str("Text".into())),
                1 => (0u64..2).prop_map(|n| Tree::Num(n.into())),
                1 => string().prop_map(Tree::Str),
            ];
            let body = prop_oneof![3 => text().prop_map(Tree::Str), 1 => leaf()];
            (tag, body, any::<bool>(), any::<u8>())
                .prop_map(|(tag, body, sequence, drop)| {
                    if sequence {
                        Tree::Arr(vec![tag, body])
                    } else {
                        let pairs = vec![("type".to_owned(), tag), ("text".to_owned(), body)];
                        Tree::Obj(
                            pairs
                                .into_iter()
                                .enumerate()
                                .filter(|(i, _)| drop % 7 != *i as u8 + 1)
                                .map(|(_, p)| p)
                                .collect(),
                        )
                    }
                })
                .boxed()
        }
    };
    prop_oneof![6 => plausible, 1 => leaf(), 1 => tree()].boxed()
}

/// Objects (and sequences) shaped like frames: a `type` and that type's fields with plausible
/// values, each sometimes missing, repeated or replaced, in any order, among other fields.
fn frame_tree() -> impl Strategy<Value = Tree> {
    let auth = (field("type"), field("token"), field("since")).prop_map(|(t, a, b)| vec![t, a, b]);
    let msg = (field("type"), field("uuid"), field("room"), field("data"))
        .prop_map(|(t, a, b, c)| vec![t, a, b, c]);
    (
        prop_oneof![
            auth.prop_map(|v| (v, ["type", "token", "since", ""])),
            msg.prop_map(|v| (v, ["type", "uuid", "room", "data"]))
        ],
        any::<u32>(),
        prop::collection::vec((key(), tree()), 0..3),
        any::<usize>(),
        0u8..8,
    )
        .prop_map(|((values, keys), mask, extra, rotate, shape)| {
            let mut pairs: Vec<(String, Tree)> = keys
                .iter()
                .zip(values)
                .enumerate()
                // Mostly every field; now and then one is missing (the mask's low bits) or twice.
                .filter(|(i, (key, _))| !key.is_empty() && (mask >> (i * 3)) & 7 != 0)
                .flat_map(|(i, (key, value))| {
                    let times = if (mask >> (12 + i * 3)) & 7 == 0 { 2 } else { 1 };
                    std::iter::repeat_n((key.to_string(), value), times)
                })
                .collect();
            if shape == 0 {
                // The sequence form: values in declaration order, the tag first.
                return Tree::Arr(pairs.into_iter().map(|(_, v)| v).collect());
            }
            pairs.extend(extra);
            let n = pairs.len().max(1);
            pairs.rotate_left(rotate % n);
            Tree::Obj(pairs)
        })
}

fn string_edit() -> impl Strategy<Value = StringEdit> {
    fuzz::string_edit(
        string(),
        prop::sample::select(UNICODE_EDGES.to_vec()).prop_map(String::from),
        vec![0, 2, 3, 111, 1000],
        RAW_STRINGS.to_vec(),
    )
}

fn tree_mutation() -> impl Strategy<Value = TreeMutation> {
    let huge = prop::sample::select(RAW_NUMBERS.to_vec()).prop_map(|raw| Tree::Raw(raw.into()));
    prop_oneof![
        2 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| TreeMutation::DeleteField(a, b)),
        2 => (any::<usize>(), any::<usize>(), prop::option::of(leaf()))
            .prop_map(|(a, b, v)| TreeMutation::DuplicateField(a, b, v)),
        1 => (any::<usize>(), key(), leaf()).prop_map(|(a, k, v)| TreeMutation::AddField(a, k, v)),
        1 => (any::<usize>(), any::<usize>(), string_edit())
            .prop_map(|(a, b, e)| TreeMutation::RenameField(a, b, e)),
        3 => (any::<usize>(), prop_oneof![leaf(), huge, tree()])
            .prop_map(|(a, v)| TreeMutation::Replace(a, v)),
        1 => (any::<usize>(), 1usize..200, any::<bool>()).prop_map(|(a, d, arr)| TreeMutation::Nest(a, d, arr)),
        3 => (any::<usize>(), string_edit()).prop_map(|(a, e)| TreeMutation::EditString(a, e)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| TreeMutation::Shuffle(a, b)),
    ]
}

/// JSON-ish fragments whose concatenations are often almost frames.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    " ",
    "\n",
    "\"type\"",
    "\"auth\"",
    "\"msg\"",
    "\"token\"",
    "\"since\"",
    "\"uuid\"",
    "\"room\"",
    "\"data\"",
    "\"Text\"",
    "\"text\"",
    "\"x\"",
    "\"\"",
    "\"67e55044-10b1-426f-9247-bb680e5fe0c8\"",
    "\"2022-12-22T14:33:59.579746716+08:00\"",
    "0",
    "1",
    "-1",
    "1e400",
    "18446744073709551616",
    "null",
    "true",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"é\"",
    "\\",
];

#[test]
fn arbitrary_bytes() {
    fuzz(
        "arbitrary_bytes",
        regressions!("arbitrary-bytes"),
        prop::collection::vec(any::<u8>(), 0..256),
        |inputs, bytes| check_frame(inputs, &bytes),
    );
}

#[test]
fn arbitrary_strings() {
    let soup = prop::collection::vec(prop::sample::select(TOKENS.to_vec()), 0..32).prop_map(|t| t.concat());
    fuzz(
        "arbitrary_strings",
        regressions!("arbitrary-strings"),
        prop_oneof![any::<String>(), soup],
        |inputs, text| check_frame(inputs, text.as_bytes()),
    );
}

#[test]
fn arbitrary_json() {
    let shapes = prop_oneof![3 => frame_tree(), 1 => tree()];
    fuzz(
        "arbitrary_json",
        regressions!("arbitrary-json"),
        (shapes, prop::option::of(0usize..5)),
        |inputs, (tree, indent)| {
            let text = match indent {
                Some(width) => tree.pretty(width),
                None => tree.compact(),
            };
            check_frame(inputs, text.as_bytes())
        },
    );
}

#[test]
fn mutated_corpus() {
    let corpus = corpus();
    let others: Vec<Vec<u8>> = corpus.iter().map(|frame| frame.bytes.clone()).collect();
    let strategy = (
        any::<prop::sample::Index>(),
        prop::collection::vec(tree_mutation(), 0..4),
        prop::option::of(0usize..5),
        prop::collection::vec(byte_mutation(), 0..3),
    );
    fuzz(
        "mutated_corpus",
        regressions!("mutated-corpus"),
        strategy,
        |inputs, (pick, tree_mutations, indent, byte_mutations)| {
            let frame = &corpus[pick.index(corpus.len())];
            let mut bytes = match &frame.tree {
                Some(tree) => {
                    let mut tree = tree.clone();
                    // Each structured mutation is an input of its own.
                    for mutation in &tree_mutations {
                        tree.mutate(mutation);
                        check_frame(inputs, tree.compact().as_bytes())?;
                    }
                    match indent {
                        Some(width) => tree.pretty(width).into_bytes(),
                        None => tree.compact().into_bytes(),
                    }
                }
                None => frame.bytes.clone(),
            };
            check_frame(inputs, &bytes)?;
            for mutation in &byte_mutations {
                mutation.apply(&mut bytes, &others);
                check_frame(inputs, &bytes)?;
            }
            Ok(())
        },
    );
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        any::<i64>().prop_map(Timestamp),
        Just(Timestamp(i64::MIN)),
        Just(Timestamp(i64::MAX)),
        (1_600_000_000_000_000_000i64..1_900_000_000_000_000_000).prop_map(Timestamp),
    ]
}

fn since() -> impl Strategy<Value = chatoy_protocol::Since> {
    prop_oneof![
        timestamp().prop_map(chatoy_protocol::Since::All),
        prop::collection::btree_map(1u64..=chatoy_protocol::MAX_ID, timestamp(), 0..5)
            .prop_map(chatoy_protocol::Since::Rooms),
    ]
}

/// Strings that are uuids, almost uuids, or anything.
fn uuid_like() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).hyphenated().to_string()),
        2 => (any::<u128>(), any::<prop::sample::Index>(), any::<char>()).prop_map(|(n, at, c)| {
            let mut chars: Vec<char> = uuid::Uuid::from_u128(n).hyphenated().to_string().chars().collect();
            let at = at.index(chars.len());
            chars[at] = c;
            chars.into_iter().collect()
        }),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).hyphenated().to_string().to_uppercase()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).simple().to_string()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).braced().to_string()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).urn().to_string()),
        2 => "[0-9a-fA-F-]{34,38}",
        1 => any::<String>(),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<String>(),
        1 => (3995usize..=4005, prop::sample::select(vec!['a', 'é', '漢', '😀', '\u{0}', '\u{301}']))
            .prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
    ]
}

fn content() -> impl Strategy<Value = MessageContent> {
    text().prop_map(|text| MessageContent::Text { text })
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (any::<String>(), prop::option::of(since()))
            .prop_map(|(token, since)| ClientFrame::Auth { token, since }),
        (uuid_like(), any::<u64>(), content()).prop_map(|(uuid, room, data)| ClientFrame::Msg {
            uuid,
            room,
            data
        }),
    ]
}

#[test]
fn client_frames_round_trip() {
    fuzz(
        "client_frames_round_trip",
        regressions!("client-round-trip"),
        client_frame(),
        |inputs, frame| {
            for bytes in [
                serde_json::to_vec(&frame).map_err(fail)?,
                serde_json::to_vec_pretty(&frame).map_err(fail)?,
            ] {
                check_frame(inputs, &bytes)?;
                prop_assert_eq!(ClientFrame::parse(&bytes), Ok(frame.clone()));
            }
            Ok(())
        },
    );
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    let auth_code = prop::sample::select(vec![
        AuthCode::Ok,
        AuthCode::Expired,
        AuthCode::AlreadyAuthenticated,
    ]);
    let send_code = prop::sample::select(SendCode::ALL.to_vec());
    let message = (
        uuid_like(),
        any::<u64>(),
        any::<u64>(),
        content(),
        timestamp(),
        any::<bool>(),
    )
        .prop_map(|(uuid, sender, room, data, sent, modified)| Message {
            uuid,
            sender,
            room,
            data,
            sent,
            modified,
        });
    prop_oneof![
        (auth_code, any::<String>()).prop_map(|(code, msg)| ServerFrame::Auth { code, msg }),
        (send_code, any::<String>(), uuid_like(), timestamp()).prop_map(|(code, msg, uuid, sent)| {
            ServerFrame::Send {
                code,
                msg,
                uuid,
                sent,
            }
        }),
        message.prop_map(|data| ServerFrame::Recv { data }),
        (any::<u8>(), any::<String>()).prop_map(|(code, msg)| ServerFrame::Error { code, msg }),
    ]
}

/// Whether a server timestamp has the wire form: UTC, nine fractional digits.
fn wire_timestamp(value: &serde_json::Value) -> bool {
    let Some(text) = value.as_str() else { return false };
    let b = text.as_bytes();
    b.len() == 35
        && text.ends_with("+00:00")
        && b[10] == b'T'
        && b[19] == b'.'
        && b[20..29].iter().all(u8::is_ascii_digit)
}

/// The documented keys of a server frame, by `type`.
fn server_keys(ty: &str) -> &'static [&'static str] {
    match ty {
        "auth" | "error" => &["code", "msg", "type"],
        "send" => &["code", "msg", "sent", "type", "uuid"],
        "recv" => &["data", "type"],
        _ => &[],
    }
}

#[test]
fn server_frames_round_trip() {
    fuzz(
        "server_frames_round_trip",
        regressions!("server-round-trip"),
        server_frame(),
        |inputs, frame| {
            inputs.count(1);
            let bytes = frame.to_json();
            let back: ServerFrame = serde_json::from_slice(&bytes).map_err(fail)?;
            prop_assert_eq!(&back, &frame);
            let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(fail)?;
            let ty = value["type"].as_str().unwrap_or_default();
            let keys = sorted_keys(&value);
            prop_assert_eq!(keys.as_slice(), server_keys(ty), "keys of {}", value);
            let sent = match ty {
                "send" => Some(&value["sent"]),
                "recv" => Some(&value["data"]["sent"]),
                _ => None,
            };
            if let Some(sent) = sent {
                prop_assert!(wire_timestamp(sent), "sent {} is not UTC with nine digits", sent);
            }
            // A server frame sent back by a confused client gets a documented answer too.
            check_frame(inputs, &bytes)
        },
    );
}

#[test]
fn validation_rules() {
    let strategy = (
        uuid_like(),
        text(),
        prop_oneof![any::<u64>(), (MAX_ID - 2)..=(MAX_ID + 2), 0u64..3],
    );
    fuzz(
        "validation_rules",
        regressions!("validation"),
        strategy,
        |inputs, (uuid, text, id)| {
            inputs.count(3);
            let parsed = validate::message_uuid(&uuid);
            prop_assert_eq!(parsed.is_ok(), is_hyphenated_uuid(&uuid), "uuid {:?}", uuid);
            if let Ok(parsed) = parsed {
                prop_assert_eq!(parsed.hyphenated().to_string(), uuid.to_lowercase());
            }
            let chars = text.chars().count();
            let valid = validate::content(&MessageContent::Text { text }).is_ok();
            prop_assert_eq!(valid, (1..=4000).contains(&chars), "text of {} characters", chars);
            prop_assert_eq!(validate::id(id), (1..=MAX_ID).contains(&id), "id {}", id);
            Ok(())
        },
    );
}

/// Every corpus frame gets the answer its file name promises (`auth--`, `msg--`, `bad-auth--`,
/// `bad-msg--`, `unreadable--`; `server--` frames are server frames and round-trip), and the
/// oracle agrees with the parser on every one.
#[test]
fn corpus_frames_parse_as_named() {
    let corpus = corpus();
    let inputs = Inputs::default();
    let mut classes = std::collections::BTreeSet::new();
    for frame in &corpus {
        let (class, _) = frame
            .name
            .split_once("--")
            .unwrap_or_else(|| panic!("corpus file {} is not named <class>--<what>.json", frame.name));
        classes.insert(class.to_owned());
        let got = ClientFrame::parse(&frame.bytes);
        let ok = match class {
            "auth" => matches!(got, Ok(ClientFrame::Auth { .. })),
            "msg" => matches!(got, Ok(ClientFrame::Msg { .. })),
            "bad-auth" => got == Err(FrameError::BadAuth),
            "bad-since" => matches!(got, Err(FrameError::BadSince(_))),
            "bad-msg" => matches!(got, Err(FrameError::BadMsg { .. })),
            "unreadable" => matches!(got, Err(FrameError::Unreadable(_))),
            "server" => {
                let parsed: ServerFrame = serde_json::from_slice(&frame.bytes)
                    .unwrap_or_else(|err| panic!("{} is not a server frame: {err}", frame.name));
                let back: ServerFrame = serde_json::from_slice(&parsed.to_json()).expect("re-parse");
                back == parsed
            }
            other => panic!("corpus file {} has an unknown class {other}", frame.name),
        };
        assert!(ok, "{}: parse gave {got:?}", frame.name);
        if let Err(err) = check_frame(&inputs, &frame.bytes) {
            panic!("{}: {err}", frame.name);
        }
    }
    let want: std::collections::BTreeSet<String> = [
        "auth",
        "bad-auth",
        "bad-msg",
        "bad-since",
        "msg",
        "server",
        "unreadable",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(classes, want, "the corpus covers every class");
    // The oracle is not vacuous: it tells the classes apart on the corpus.
    let distinct: std::collections::BTreeSet<String> = corpus
        .iter()
        .map(|frame| format!("{:?}", std::mem::discriminant(&oracle::classify(&frame.bytes))))
        .collect();
    assert_eq!(distinct.len(), 5, "the oracle finds every class in the corpus");
}
