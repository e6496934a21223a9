//! What a fuzzed client does, one step at a time, and the proptest strategies that generate
//! sequences of such steps.

use proptest::prelude::*;
use proptest::sample::Index;

use chatoy_testkit::fuzz::json::{ByteMutation, StringEdit, Tree, TreeMutation};
use chatoy_testkit::fuzz::{self, byte_mutation, BAD_UTF8};

/// One client step. Each one that puts a frame on the wire expects exactly one answer (or
/// none, or a close) before the next step runs, so answers are never ambiguous.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// `auth` with a token of this kind, optionally with `since`.
    Auth(TokenKind, Option<SinceKind>),
    /// An `auth` frame with missing or mistyped fields (an index into [`MALFORMED_AUTH`]).
    MalformedAuth(usize),
    /// A `msg`.
    Msg(MsgKind),
    /// Any text at all.
    Text(String),
    /// A binary frame (closes with 1003).
    Binary(Vec<u8>),
    /// A ping (at most 125 bytes): a pong with the same payload comes back.
    Ping(Vec<u8>),
    /// An unsolicited pong: no answer.
    Pong(Vec<u8>),
    /// A WebSocket protocol violation (closes with 1002).
    Violation(Violation),
    /// A close frame from the client.
    Close(CloseKind),
    /// `POST /logout` of the token the socket authenticated with (closes it with 1008).
    Logout,
    /// Drops the connection without a close frame and opens a new one.
    Reconnect,
    /// Drops the connection and authenticates a new one with a fresh token and `since`.
    Resume(SinceKind),
    /// `POST /rooms`: the user creates (and so joins) another room.
    CreateRoom,
    /// A valid `msg` with an invalid UTF-8 sequence inserted (closes with 1007).
    InvalidUtf8(Index, usize),
    /// A padded valid `msg` this many bytes over the frame limit (closes with 1009).
    Oversized(usize),
    /// A valid `msg` with this text, sent in fragments split at these points, with a ping
    /// between the first two if the flag is set.
    Fragmented(String, Vec<Index>, bool),
    /// A valid frame or corpus frame, mutated: the live fuzzer proper.
    Mutated(Template, Vec<TreeMutation>, Vec<ByteMutation>),
}

/// Which token an `auth` carries.
#[derive(Debug, Clone)]
pub(crate) enum TokenKind {
    /// One from a login just now.
    Fresh,
    /// One whose lifetime (`--token-ttl`) has passed.
    Expired,
    /// One revoked by `POST /logout`.
    Revoked,
    /// 64 hex characters nobody was issued.
    Unknown(u128, u128),
    /// A fresh token, then edited.
    Edited(StringEdit),
}

/// The `since` of an `auth`.
#[derive(Debug, Clone)]
pub(crate) enum SinceKind {
    /// 1970: everything stored is replayed.
    Epoch,
    /// Far in the future: nothing is.
    Future,
    /// The `sent` of a stored message (picked by index), shifted by this many nanoseconds,
    /// written with a +08:00 offset if the flag is set.
    Stored(Index, i64, bool),
    /// Per room (what clients send): for each of the user's rooms with stored messages, the
    /// `sent` of one of them (picked by index), shifted; the user's first room left out if the
    /// flag is set.
    PerRoom(Index, i64, bool),
}

/// What kind of `msg`.
#[derive(Debug, Clone)]
pub(crate) enum MsgKind {
    /// A new message.
    New(UuidKind, RoomKind, TextKind),
    /// A message already stored (picked by index), sent again.
    Resend(Index, ResendKind),
    /// A `data` that is not valid content (an index into [`BAD_DATA`]).
    BadData(usize),
}

/// The `uuid` of a new `msg`.
#[derive(Debug, Clone)]
pub(crate) enum UuidKind {
    /// A fresh v4 uuid.
    Fresh,
    /// A fresh uuid in upper case.
    Upper,
    /// A string that is not a hyphenated uuid (an index into [`BAD_UUIDS`]).
    Bad(usize),
    /// Not a string, or absent (an index into [`NON_STRING_UUIDS`]).
    NotString(usize),
}

/// The `room` of a new `msg`.
#[derive(Debug, Clone)]
pub(crate) enum RoomKind {
    /// One of the user's rooms.
    Own(Index),
    /// A room of another user.
    Foreign,
    /// A room that does not exist, or an id out of range, or not an integer (an index into
    /// [`ROOM_LITERALS`]).
    Literal(usize),
}

/// The text of a new `msg`.
#[derive(Debug, Clone)]
pub(crate) enum TextKind {
    /// Any string (empty is refused with code 3).
    Any(String),
    /// Exactly 4000 of this character (accepted).
    Max(char),
    /// 4001 of this character (refused with code 3).
    Over(char),
}

/// How a stored message is sent again.
#[derive(Debug, Clone)]
pub(crate) enum ResendKind {
    /// Unchanged: code 0 with the original `sent`.
    Same,
    /// With its uuid in upper case: the same message.
    Upper,
    /// With other text: code 3.
    OtherText(String),
    /// To another of the user's rooms: a new message there.
    OtherRoom(Index),
}

/// A WebSocket protocol violation.
#[derive(Debug, Clone)]
pub(crate) enum Violation {
    /// A reserved opcode.
    ReservedOpcode(u8),
    /// A text frame with reserved bits set.
    ReservedBits(u8),
    /// A ping with more than 125 bytes.
    LongControl(usize),
    /// A ping without FIN.
    FragmentedControl,
    /// A continuation frame with no message started.
    OrphanContinuation,
    /// A new text frame while a fragmented one is unfinished.
    TextInsideText,
}

/// A close frame from the client.
#[derive(Debug, Clone)]
pub(crate) enum CloseKind {
    /// With this status code (echoed if allowed, else 1002).
    Code(u16),
    /// With no payload (echoed empty).
    Empty,
    /// With a one-byte payload (1002).
    OneByte,
    /// With code 1000 and a reason that is not UTF-8 (1007).
    BadReason,
}

/// The frame a mutation starts from.
#[derive(Debug, Clone)]
pub(crate) enum Template {
    /// A corpus frame (picked by index), as it is.
    Corpus(Index),
    /// A valid `auth` with a fresh token, with `since` 1970 if the flag is set.
    Auth(bool),
    /// A valid `msg` to the user's first room with a fresh uuid and this text.
    Msg(String),
}

/// `auth` frames with missing or mistyped fields; `TOKEN` stands for a fresh token.
pub(crate) const MALFORMED_AUTH: &[&str] = &[
    r#"{"type":"auth"}"#,
    r#"{"type":"auth","token":5}"#,
    r#"{"type":"auth","token":null}"#,
    r#"{"type":"auth","token":["TOKEN"]}"#,
    r#"{"type":"auth","token":"TOKEN","since":"not a time"}"#,
    r#"{"type":"auth","token":"TOKEN","since":5}"#,
    r#"{"type":"auth","token":"TOKEN","token":"TOKEN"}"#,
    r#"{"type":"auth","token":"TOKEN","since":"99999-01-01T00:00:00Z"}"#,
];

/// `uuid` strings that are not 36-character hyphenated uuids; `UUID` stands for a fresh one.
pub(crate) const BAD_UUIDS: &[&str] = &[
    "",
    "x",
    "not-a-uuid",
    "UUID0",
    "{UUID}",
    "urn:uuid:UUID",
    "67e5504410b1426f9247bb680e5fe0c8",
    "67e55044-10b1-426f-9247-bb680e5fe0cg",
    "67e55044_10b1_426f_9247_bb680e5fe0c8",
    "67e55044-10b1-426f-9247-bb680e5fe0c",
    "67e55044-10b1-426f-9247-bb680e5fé0c",
    " 67e55044-10b1-426f-9247-bb680e5fe0c",
];

/// JSON for a `uuid` that is not a string; an empty entry means the field is absent.
pub(crate) const NON_STRING_UUIDS: &[&str] = &["7", "null", "true", "[]", "{}", "1e400", ""];

/// JSON for a `room` that is absent, out of range or not an integer; an empty entry means the
/// field is absent.
pub(crate) const ROOM_LITERALS: &[&str] = &[
    "987654321",
    "9007199254740991",
    "0",
    "9007199254740992",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "-0",
    "1.5",
    "1e2",
    "\"1\"",
    "null",
    "",
];

/// JSON for a `data` that is not valid content.
pub(crate) const BAD_DATA: &[&str] = &[
    r#""x""#,
    "1",
    "null",
    "[]",
    "{}",
    r#"{"type":"Text"}"#,
    r#"{"type":"Text","text":5}"#,
    r#"{"type":"Text","text":null}"#,
    r#"{"type":"Image","url":"x"}"#,
    r#"{"type":"text","text":"x"}"#,
    r#"{"type":null,"text":"x"}"#,
    r#"{"text":"x"}"#,
    r#"{"type":"Text","text":"a","text":"b"}"#,
];

fn token_kind() -> impl Strategy<Value = TokenKind> {
    prop_oneof![
        6 => Just(TokenKind::Fresh),
        1 => Just(TokenKind::Expired),
        1 => Just(TokenKind::Revoked),
        1 => (any::<u128>(), any::<u128>()).prop_map(|(a, b)| TokenKind::Unknown(a, b)),
        1 => prop_oneof![
            Just(StringEdit::Upper),
            Just(StringEdit::Empty),
            (0usize..64).prop_map(StringEdit::Truncate),
            Just(StringEdit::Append("0".into())),
            Just(StringEdit::Prepend(" ".into())),
            Just(StringEdit::Repeat(2)),
        ]
        .prop_map(TokenKind::Edited),
    ]
}

fn since_kind() -> impl Strategy<Value = SinceKind> {
    prop_oneof![
        Just(SinceKind::Epoch),
        Just(SinceKind::Future),
        (
            any::<Index>(),
            prop::sample::select(vec![-1i64, 0, 1]),
            any::<bool>()
        )
            .prop_map(|(i, shift, offset)| SinceKind::Stored(i, shift, offset)),
        (
            any::<Index>(),
            prop::sample::select(vec![-1i64, 0, 1]),
            any::<bool>()
        )
            .prop_map(|(i, shift, skip)| SinceKind::PerRoom(i, shift, skip)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 ]{1,20}",
        2 => any::<String>(),
        1 => prop::sample::select(vec!["\u{0}", "\u{feff}", "\u{202e}x", "e\u{301}", "\u{10ffff}", "😀", "\\", "\""])
            .prop_map(String::from),
    ]
}

fn wide_char() -> impl Strategy<Value = char> {
    prop::sample::select(vec!['a', 'é', '漢', '😀'])
}

fn msg_kind() -> impl Strategy<Value = MsgKind> {
    let uuid = prop_oneof![
        6 => Just(UuidKind::Fresh),
        1 => Just(UuidKind::Upper),
        2 => (0..BAD_UUIDS.len()).prop_map(UuidKind::Bad),
        1 => (0..NON_STRING_UUIDS.len()).prop_map(UuidKind::NotString),
    ];
    let room = prop_oneof![
        6 => any::<Index>().prop_map(RoomKind::Own),
        1 => Just(RoomKind::Foreign),
        2 => (0..ROOM_LITERALS.len()).prop_map(RoomKind::Literal),
    ];
    let text_kind = prop_oneof![
        8 => text().prop_map(TextKind::Any),
        1 => Just(TextKind::Any(String::new())),
        1 => wide_char().prop_map(TextKind::Max),
        1 => wide_char().prop_map(TextKind::Over),
    ];
    let resend = prop_oneof![
        2 => Just(ResendKind::Same),
        1 => Just(ResendKind::Upper),
        1 => text().prop_map(ResendKind::OtherText),
        1 => any::<Index>().prop_map(ResendKind::OtherRoom),
    ];
    prop_oneof![
        6 => (uuid, room, text_kind).prop_map(|(u, r, t)| MsgKind::New(u, r, t)),
        2 => (any::<Index>(), resend).prop_map(|(i, r)| MsgKind::Resend(i, r)),
        1 => (0..BAD_DATA.len()).prop_map(MsgKind::BadData),
    ]
}

fn violation() -> impl Strategy<Value = Violation> {
    prop_oneof![
        prop::sample::select(vec![3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf])
            .prop_map(Violation::ReservedOpcode),
        (1u8..8).prop_map(Violation::ReservedBits),
        (126usize..300).prop_map(Violation::LongControl),
        Just(Violation::FragmentedControl),
        Just(Violation::OrphanContinuation),
        Just(Violation::TextInsideText),
    ]
}

fn close_kind() -> impl Strategy<Value = CloseKind> {
    prop_oneof![
        4 => prop::sample::select(vec![1000u16, 1001, 1003, 1008, 3000, 4999, 0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
            .prop_map(CloseKind::Code),
        1 => Just(CloseKind::Empty),
        1 => Just(CloseKind::OneByte),
        1 => Just(CloseKind::BadReason),
    ]
}

/// Leaves and small values for structured mutations: type changes, huge numbers, bad strings.
fn leaf() -> impl Strategy<Value = Tree> {
    prop_oneof![
        Just(Tree::Null),
        any::<bool>().prop_map(Tree::Bool),
        any::<u64>().prop_map(|n| Tree::Num(n.into())),
        any::<i64>().prop_map(|n| Tree::Num(n.into())),
        prop::sample::select(vec!["1e400", "18446744073709551616", "-0", "1.5", "01", "NaN"])
            .prop_map(|raw| Tree::Raw(raw.into())),
        prop::sample::select(vec!["\"\\ud800\"", "\"\\u0000\"", "\"\\x\""])
            .prop_map(|raw| Tree::Raw(raw.into())),
        text().prop_map(Tree::Str),
        Just(Tree::Arr(Vec::new())),
        Just(Tree::Obj(Vec::new())),
    ]
}

fn string_edit() -> impl Strategy<Value = StringEdit> {
    fuzz::string_edit(
        text(),
        text(),
        vec![2, 3, 1000],
        vec!["\\ud800", "\\u0000", "\\x41"],
    )
}

fn tree_mutation() -> impl Strategy<Value = TreeMutation> {
    let key = prop::sample::select(vec![
        "type", "token", "since", "uuid", "room", "data", "text", "x",
    ])
    .prop_map(String::from);
    prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| TreeMutation::DeleteField(a, b)),
        (any::<usize>(), any::<usize>(), prop::option::of(leaf()))
            .prop_map(|(a, b, v)| TreeMutation::DuplicateField(a, b, v)),
        (any::<usize>(), key, leaf()).prop_map(|(a, k, v)| TreeMutation::AddField(a, k, v)),
        (any::<usize>(), any::<usize>(), string_edit())
            .prop_map(|(a, b, e)| TreeMutation::RenameField(a, b, e)),
        (any::<usize>(), leaf()).prop_map(|(a, v)| TreeMutation::Replace(a, v)),
        (any::<usize>(), 1usize..160, any::<bool>()).prop_map(|(a, d, arr)| TreeMutation::Nest(a, d, arr)),
        (any::<usize>(), string_edit()).prop_map(|(a, e)| TreeMutation::EditString(a, e)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| TreeMutation::Shuffle(a, b)),
    ]
}

fn template() -> impl Strategy<Value = Template> {
    prop_oneof![
        2 => any::<Index>().prop_map(Template::Corpus),
        1 => any::<bool>().prop_map(Template::Auth),
        2 => text().prop_map(Template::Msg),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        5 => (token_kind(), prop::option::weighted(0.3, since_kind())).prop_map(|(t, s)| Action::Auth(t, s)),
        2 => since_kind().prop_map(Action::Resume),
        1 => (0..MALFORMED_AUTH.len()).prop_map(Action::MalformedAuth),
        16 => msg_kind().prop_map(Action::Msg),
        1 => any::<String>().prop_map(Action::Text),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Action::Binary),
        1 => prop::collection::vec(any::<u8>(), 0..=125).prop_map(Action::Ping),
        1 => prop::collection::vec(any::<u8>(), 0..16).prop_map(Action::Pong),
        1 => violation().prop_map(Action::Violation),
        1 => close_kind().prop_map(Action::Close),
        1 => Just(Action::Logout),
        1 => Just(Action::Reconnect),
        1 => Just(Action::CreateRoom),
        1 => (any::<Index>(), 0..BAD_UTF8.len()).prop_map(|(i, b)| Action::InvalidUtf8(i, b)),
        1 => (1usize..5000).prop_map(Action::Oversized),
        1 => (text(), prop::collection::vec(any::<Index>(), 1..4), any::<bool>())
            .prop_map(|(t, s, p)| Action::Fragmented(t, s, p)),
        8 => (
            template(),
            prop::collection::vec(tree_mutation(), 0..3),
            prop::collection::vec(byte_mutation(), 0..3),
        )
            .prop_map(|(t, m, b)| Action::Mutated(t, m, b)),
    ]
}

/// Whether a step always ends the connection.
fn closes(action: &Action) -> bool {
    matches!(
        action,
        Action::Binary(_)
            | Action::Violation(_)
            | Action::Close(_)
            | Action::Logout
            | Action::Reconnect
            | Action::InvalidUtf8(..)
            | Action::Oversized(_)
    )
}

/// A sequence of steps on one user's connections. Most sequences authenticate first and again
/// after each step that ends the connection, so that most steps exercise the authenticated
/// state; the others stay unauthenticated until a step authenticates.
pub(crate) fn sequence() -> impl Strategy<Value = Vec<Action>> {
    (prop::bool::weighted(0.75), prop::collection::vec(action(), 1..32)).prop_map(|(authed, actions)| {
        let auth = || Action::Auth(TokenKind::Fresh, None);
        let mut sequence = Vec::with_capacity(actions.len() * 2);
        if authed {
            sequence.push(auth());
        }
        for action in actions {
            let reauth = authed && closes(&action);
            sequence.push(action);
            if reauth {
                sequence.push(auth());
            }
        }
        sequence
    })
}
