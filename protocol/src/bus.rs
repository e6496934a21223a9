//! Envelopes that travel on the bus between gateways and routers, and their byte encodings.
//!
//! The in-process bus passes these values as they are; the NATS bus sends the encodings below.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::codes::SendCode;
use crate::frame::{recv_frame, Message, MessageContent};
use crate::time::Timestamp;

/// Which connection on which gateway a message came from, so that its `recv` skips that socket
/// and its answer reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The gateway process's random id.
    pub gateway: u64,
    /// The connection's id within that gateway.
    pub conn: u64,
}

/// Gateway → router: one validated `msg` to sequence and store (subject `msg.<room>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MsgRequest {
    /// The message's identity, lower-case hyphenated.
    pub uuid: uuid::Uuid,
    /// The authenticated sender.
    pub sender: u64,
    /// The target room.
    pub room: u64,
    /// The validated content.
    pub content: MessageContent,
    /// Where it came from.
    pub origin: Origin,
}

/// Router → gateway: the answer to one [`MsgRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MsgReply {
    /// The `send` code.
    pub code: SendCode,
    /// The `send` message (empty on success).
    pub msg: String,
    /// The message's `sent` on success, the refusal time otherwise.
    pub sent: Timestamp,
}

/// Router → gateways: a stored message, ready to forward (subject `room.<room>`).
#[derive(Debug, Clone, PartialEq)]
pub struct RoomEvent {
    /// The room.
    pub room: u64,
    /// The message's `sent`, for de-duplication at the `since` seam.
    pub sent: Timestamp,
    /// The `sent` of the message the sequencer published before this one in the room (0 before
    /// the room's first), or `None` when it cannot say (a duplicate published again). A
    /// subscriber whose last event does not match has missed something — a router that died
    /// between storing and publishing — and fills the hole from the store.
    pub prev: Option<Timestamp>,
    /// The sending connection, which does not receive its own message.
    pub origin: Origin,
    /// The complete `recv` frame as JSON, serialised once by the router.
    pub frame: Bytes,
}

const ROOM_EVENT_HEADER: usize = 40;
/// `prev` on the wire when it is `None`.
const NO_PREV: i64 = i64::MIN;

impl RoomEvent {
    /// The event of a stored message, with its `recv` frame: serialised here once for every
    /// gateway and socket.
    pub fn new(message: Message, prev: Option<Timestamp>, origin: Origin) -> RoomEvent {
        RoomEvent {
            room: message.room,
            sent: message.sent,
            prev,
            origin,
            frame: recv_frame(message),
        }
    }

    /// Encodes as a 40-byte little-endian header (room, sent, prev, gateway, conn) then the frame.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(ROOM_EVENT_HEADER + self.frame.len());
        out.put_u64_le(self.room);
        out.put_i64_le(self.sent.0);
        out.put_i64_le(self.prev.map_or(NO_PREV, |prev| prev.0));
        out.put_u64_le(self.origin.gateway);
        out.put_u64_le(self.origin.conn);
        out.put_slice(&self.frame);
        out.freeze()
    }

    /// Decodes [`RoomEvent::encode`]'s output without copying the frame.
    pub fn decode(mut bytes: Bytes) -> Option<RoomEvent> {
        if bytes.len() < ROOM_EVENT_HEADER {
            return None;
        }
        let room = bytes.get_u64_le();
        let sent = Timestamp(bytes.get_i64_le());
        let prev = Some(bytes.get_i64_le())
            .filter(|prev| *prev != NO_PREV)
            .map(Timestamp);
        let gateway = bytes.get_u64_le();
        let conn = bytes.get_u64_le();
        Some(RoomEvent {
            room,
            sent,
            prev,
            origin: Origin { gateway, conn },
            frame: bytes,
        })
    }
}

/// HTTP API → gateways: something changed for a user (subject `user.<user>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum UserEvent {
    /// The user joined a room: their open sockets start receiving it at once.
    Joined {
        /// The room.
        room: u64,
    },
    /// A token was revoked: sockets authenticated with it close with 1008.
    Revoked {
        /// The first eight bytes of the token's hash, as sockets remember it.
        session: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_event_round_trips() {
        let event = RoomEvent {
            room: 7,
            sent: Timestamp(-5),
            prev: Some(Timestamp(-9)),
            origin: Origin { gateway: 1, conn: 2 },
            frame: Bytes::from_static(b"{\"type\":\"recv\"}"),
        };
        assert_eq!(RoomEvent::decode(event.encode()), Some(event.clone()));
        let unknown = RoomEvent { prev: None, ..event };
        assert_eq!(RoomEvent::decode(unknown.encode()), Some(unknown));
        assert_eq!(RoomEvent::decode(Bytes::from_static(b"short")), None);
    }

    #[test]
    fn user_events_are_json() {
        let event = UserEvent::Joined { room: 3 };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(json, r#"{"event":"joined","room":3}"#);
        assert_eq!(serde_json::from_str::<UserEvent>(&json).unwrap(), event);
    }
}
