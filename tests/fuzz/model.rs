//! The connection state machine as PROTOCOL.md and docs/PROTOCOL.md describe it: given what a
//! socket has seen so far, the one answer the server owes to the next frame.

use chatoy_protocol::frame::FrameError;
use chatoy_protocol::{ClientFrame, MessageContent, Since};
use chatoy_testkit::fuzz::is_hyphenated_uuid;

/// The largest frame the server reads (`--max-frame-size`, 64 KiB).
pub(crate) const MAX_FRAME: usize = 64 * 1024;

/// Failed `auth` attempts that close the socket.
const MAX_AUTH_FAILURES: u32 = 5;

/// The largest room id.
const MAX_ID: u64 = (1 << 53) - 1;

/// Where the subject socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Conn {
    /// No socket (never opened, or closed): the next frame opens one.
    Closed,
    /// Open, not authenticated, after this many failed attempts.
    Fresh(u32),
    /// Authenticated.
    Authed,
}

/// A message the model knows is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) room: u64,
    /// Lower-case and hyphenated, as the server stores it.
    pub(crate) uuid: String,
    pub(crate) text: String,
    /// The server's `sent`, in nanoseconds.
    pub(crate) sent: i64,
}

/// What the server must answer to a frame.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expect {
    /// Nothing (a pong from the client).
    Nothing,
    /// `{"type":"error","code":3,...}`.
    Error,
    /// An `auth` answer with this code.
    Auth(u8),
    /// `auth` code 0, then these stored messages as `recv`, oldest first.
    AuthOk(Vec<Stored>),
    /// `auth` code 1, then a close 1008: the last allowed failure.
    AuthLastFailure,
    /// A `send` answer.
    Send(SendExpect),
    /// A pong with this payload.
    Pong(Vec<u8>),
    /// A close frame with this code (and this reason, when the server chose it).
    Close(u16, Option<&'static str>),
}

/// A `send` answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SendExpect {
    pub(crate) code: u8,
    /// Exactly as the client sent it.
    pub(crate) uuid: String,
    /// For a resent message: the original `sent`.
    pub(crate) sent: Option<i64>,
    /// For a new message: what gets stored (its `sent` comes from the answer).
    pub(crate) new: Option<Stored>,
}

impl SendExpect {
    fn refused(code: u8, uuid: String) -> Expect {
        Expect::Send(SendExpect {
            code,
            uuid,
            sent: None,
            new: None,
        })
    }
}

/// What the model knows of one user and its subject socket.
#[derive(Debug)]
pub(crate) struct Model {
    pub(crate) user: u64,
    /// The rooms the user is a member of, oldest first.
    pub(crate) rooms: Vec<u64>,
    /// Every message the user stored in this sequence, in acknowledgement order.
    pub(crate) stored: Vec<Stored>,
    pub(crate) conn: Conn,
}

impl Model {
    /// A user with one room and no socket yet.
    pub(crate) fn new(user: u64, room: u64) -> Model {
        Model {
            user,
            rooms: vec![room],
            stored: Vec::new(),
            conn: Conn::Closed,
        }
    }

    /// The answer to a text frame with this payload; `valid_token` is the only token that may
    /// authenticate (one issued for this very frame). Updates the connection state.
    pub(crate) fn text(&mut self, payload: &[u8], valid_token: Option<&str>) -> Expect {
        if payload.len() > MAX_FRAME {
            return self.close(1009, Some("frame too large"));
        }
        if std::str::from_utf8(payload).is_err() {
            return self.close(1007, Some("invalid UTF-8"));
        }
        let parsed = ClientFrame::parse(payload);
        match (self.conn, parsed) {
            (Conn::Closed, _) => unreachable!("frames go to an open socket"),
            (_, Err(FrameError::Unreadable(_))) => Expect::Error,
            // A bad `since` is not a failed authentication: an error frame, still unauthenticated.
            (Conn::Fresh(_), Err(FrameError::BadSince(_))) => Expect::Error,
            (Conn::Fresh(_), Ok(ClientFrame::Msg { uuid, .. }) | Err(FrameError::BadMsg { uuid })) => {
                SendExpect::refused(1, uuid)
            }
            (Conn::Fresh(failures), Err(FrameError::BadAuth)) => self.auth_failed(failures),
            (Conn::Fresh(failures), Ok(ClientFrame::Auth { token, since })) => {
                if Some(token.as_str()) == valid_token {
                    self.conn = Conn::Authed;
                    Expect::AuthOk(self.replay(since))
                } else {
                    self.auth_failed(failures)
                }
            }
            (
                Conn::Authed,
                Ok(ClientFrame::Auth { .. }) | Err(FrameError::BadAuth | FrameError::BadSince(_)),
            ) => Expect::Auth(2),
            (Conn::Authed, Err(FrameError::BadMsg { uuid })) => SendExpect::refused(3, uuid),
            (Conn::Authed, Ok(ClientFrame::Msg { uuid, room, data })) => self.msg(uuid, room, data),
        }
    }

    /// The socket gets this close frame and is gone.
    pub(crate) fn close(&mut self, code: u16, reason: Option<&'static str>) -> Expect {
        self.conn = Conn::Closed;
        Expect::Close(code, reason)
    }

    fn auth_failed(&mut self, failures: u32) -> Expect {
        let failures = failures + 1;
        if failures >= MAX_AUTH_FAILURES {
            self.conn = Conn::Closed;
            Expect::AuthLastFailure
        } else {
            self.conn = Conn::Fresh(failures);
            Expect::Auth(1)
        }
    }

    /// Stored messages of the user's rooms after `since` (per room), in `sent` order within
    /// each room; the rooms may come in any order.
    fn replay(&self, since: Option<Since>) -> Vec<Stored> {
        let Some(since) = since else { return Vec::new() };
        let mut replay: Vec<Stored> = self
            .stored
            .iter()
            .filter(|m| self.rooms.contains(&m.room))
            .filter(|m| since.for_room(m.room).is_some_and(|at| m.sent > at.0))
            .cloned()
            .collect();
        replay.sort_by_key(|m| (m.room, m.sent));
        replay
    }

    /// docs/PROTOCOL.md's `msg` checks, in order (the rate limit is set out of reach).
    fn msg(&mut self, uuid: String, room: u64, data: MessageContent) -> Expect {
        let MessageContent::Text { text } = data;
        let chars = text.chars().count();
        if !is_hyphenated_uuid(&uuid) || !(1..=MAX_ID).contains(&room) || !(1..=4000).contains(&chars) {
            return SendExpect::refused(3, uuid);
        }
        if !self.rooms.contains(&room) {
            return SendExpect::refused(2, uuid);
        }
        let key = uuid.to_ascii_lowercase();
        match self.stored.iter().find(|m| m.room == room && m.uuid == key) {
            Some(m) if m.text == text => Expect::Send(SendExpect {
                code: 0,
                uuid,
                sent: Some(m.sent),
                new: None,
            }),
            Some(_) => SendExpect::refused(3, uuid),
            None => Expect::Send(SendExpect {
                code: 0,
                uuid,
                sent: None,
                new: Some(Stored {
                    room,
                    uuid: key,
                    text,
                    sent: 0,
                }),
            }),
        }
    }
}

/// The answer to a close frame from the client (RFC 6455 section 5.5.1: the server echoes the
/// status code if it is one a peer may send, and fails the connection with 1002 otherwise).
pub(crate) fn close_reply(payload: &[u8]) -> (u16, Option<&'static str>) {
    match payload {
        [] => (1005, None),
        [_] => (1002, Some("protocol error")),
        _ if payload.len() > 125 => (1002, Some("protocol error")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999);
            if !allowed {
                (1002, Some("Protocol violation"))
            } else if std::str::from_utf8(reason).is_err() {
                (1007, Some("invalid UTF-8"))
            } else {
                (code, Some(""))
            }
        }
    }
}
