//! What PROTOCOL.md says a client frame is, decided without the parser under test: from a JSON
//! tree that keeps duplicate keys, so a frame whose known fields repeat counts as malformed.
//!
//! Two deviations the fuzzer once found are fixed (see docs/fuzzing.md, "Findings") and held
//! by the corpus: a JSON array is never a frame, and content is an object whose `type` is the
//! string "Text" (not a variant index, not the sequence form).

use std::collections::BTreeMap;

use chatoy_protocol::frame::FrameError;
use chatoy_protocol::{ClientFrame, MessageContent, Since, Timestamp, MAX_ID};

use chatoy_testkit::fuzz::json::Tree;

/// The answer class of a client frame.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Class {
    /// A well-formed frame, exactly this one.
    Frame(ClientFrame),
    /// `auth` with missing, repeated or mistyped fields: an `auth` answer with code 1 (or 2).
    BadAuth,
    /// `auth` with one `type`, one string `token` and one `since` that is not a valid `since`:
    /// an `error` frame that is not an authentication failure.
    BadSince,
    /// `msg` with missing, repeated or mistyped fields: `send` code 3 echoing this uuid.
    BadMsg(String),
    /// Not JSON, not an object, no or an unknown `type`: an `error` frame.
    Unreadable,
}

impl Class {
    /// Whether the parser's result is this class (and, for a frame, this very frame).
    pub(crate) fn matches(&self, got: &Result<ClientFrame, FrameError>) -> bool {
        match (self, got) {
            (Class::Frame(want), Ok(frame)) => want == frame,
            (Class::BadAuth, Err(FrameError::BadAuth)) => true,
            (Class::BadSince, Err(FrameError::BadSince(why))) => !why.is_empty(),
            (Class::BadMsg(want), Err(FrameError::BadMsg { uuid })) => want == uuid,
            (Class::Unreadable, Err(FrameError::Unreadable(why))) => !why.is_empty(),
            _ => false,
        }
    }
}

/// Classifies one text frame.
pub(crate) fn classify(bytes: &[u8]) -> Class {
    let Ok(tree) = serde_json::from_slice::<Tree>(bytes) else {
        return Class::Unreadable;
    };
    match &tree {
        Tree::Obj(_) => {}
        _ => return Class::Unreadable,
    }
    match tree.last("type").and_then(Tree::as_str) {
        Some("auth") => auth(&tree).unwrap_or_else(|| {
            let well_formed = tree.count("type") == 1
                && tree.unique("token").and_then(Tree::as_str).is_some()
                && tree.count("since") == 1;
            if well_formed {
                Class::BadSince
            } else {
                Class::BadAuth
            }
        }),
        Some("msg") => msg(&tree).map_or_else(
            || {
                Class::BadMsg(
                    tree.last("uuid")
                        .and_then(Tree::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                )
            },
            Class::Frame,
        ),
        _ => Class::Unreadable,
    }
}

/// A well-formed `auth`: one `type`, one string `token`, at most one `since` that is null, an
/// RFC 3339 time, or an object of at most 1000 rooms (keys: canonical decimal ids in
/// 1..=2^53-1; values: RFC 3339 times; a repeated key keeps its last value); other fields are
/// ignored. `Some(Class::Frame)` for a frame, `None` for anything malformed.
fn auth(tree: &Tree) -> Option<Class> {
    if tree.count("type") != 1 {
        return None;
    }
    let token = tree.unique("token")?.as_str()?.to_owned();
    let since = match (tree.count("since"), tree.last("since")) {
        (0, _) | (1, Some(Tree::Null)) => None,
        (1, Some(Tree::Str(text))) => Some(Since::All(timestamp(text)?)),
        (1, Some(Tree::Obj(pairs))) => {
            let mut rooms = BTreeMap::new();
            for (key, value) in pairs {
                let room = key
                    .parse::<u64>()
                    .ok()
                    .filter(|room| (1..=MAX_ID).contains(room) && room.to_string() == *key)?;
                let at = match value {
                    Tree::Str(text) => timestamp(text)?,
                    _ => return None,
                };
                rooms.insert(room, at);
                if rooms.len() > 1000 {
                    return None;
                }
            }
            Some(Since::Rooms(rooms))
        }
        _ => return None,
    };
    Some(Class::Frame(ClientFrame::Auth { token, since }))
}

/// A well-formed `msg`: one `type`, one string `uuid`, one `room` that is a JSON integer in
/// 0..=2^64-1, one `data` object with one `type` "Text" and one string `text`.
fn msg(tree: &Tree) -> Option<ClientFrame> {
    if tree.count("type") != 1 {
        return None;
    }
    let uuid = tree.unique("uuid")?.as_str()?.to_owned();
    let room = match tree.unique("room")? {
        Tree::Num(n) => n.as_u64()?,
        _ => return None,
    };
    let data = content(tree.unique("data")?)?;
    Some(ClientFrame::Msg { uuid, room, data })
}

/// Message content: an object with one `type` "Text" and one string `text`.
fn content(data: &Tree) -> Option<MessageContent> {
    let text = match data {
        Tree::Obj(_) if content_tag(data.unique("type")?) => data.unique("text")?.as_str()?,
        _ => return None,
    };
    Some(MessageContent::Text {
        text: text.to_owned(),
    })
}

/// The tag of `Text` content: the string "Text".
fn content_tag(tag: &Tree) -> bool {
    match tag {
        Tree::Str(name) => name == "Text",
        _ => false,
    }
}

/// An RFC 3339 time (any offset, surrounding whitespace allowed) as nanoseconds, clamped to
/// what an `i64` holds.
fn timestamp(text: &str) -> Option<Timestamp> {
    let at = chrono::DateTime::parse_from_rfc3339(text.trim()).ok()?;
    Some(Timestamp(
        at.timestamp_nanos_opt()
            .unwrap_or(if at.timestamp() > 0 { i64::MAX } else { i64::MIN }),
    ))
}
