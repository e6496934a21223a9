//! WebSocket frames: what clients send (`auth`, `msg`) and what the server sends back
//! (`auth`, `send`, `recv`, `error`), spelt exactly as in the seed protocol document.

use serde::{Deserialize, Serialize};

use crate::codes::{AuthCode, SendCode};
use crate::since::Since;
use crate::time::Timestamp;

/// A frame from a client, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame {
    /// Authenticate this connection with a token from `POST /login`.
    Auth {
        /// The opaque token.
        token: String,
        /// Extension: replay stored messages newer than where the client left off (per room,
        /// or one timestamp for every room) before live traffic.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
    },
    /// Send a message to a room.
    Msg {
        /// The client-chosen identity of the message; retries reuse it.
        uuid: String,
        /// The room to send to.
        room: u64,
        /// The content.
        data: MessageContent,
    },
}

/// A frame from the server, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    /// The answer to `auth`.
    Auth {
        /// See [`AuthCode`].
        code: AuthCode,
        /// Empty on success.
        msg: String,
    },
    /// The answer to `msg`.
    Send {
        /// See [`SendCode`].
        code: SendCode,
        /// Empty on success.
        msg: String,
        /// The uuid of the `msg` this answers, exactly as the client sent it.
        uuid: String,
        /// The message's timestamp on success, the time of refusal otherwise.
        sent: Timestamp,
    },
    /// A message of one of the connection's rooms.
    Recv {
        /// The message.
        data: Message,
    },
    /// Extension: the frame could not be understood (not JSON, or an unknown `type`).
    Error {
        /// Always 3 today.
        code: u8,
        /// What was wrong.
        msg: String,
    },
}

/// The content of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum MessageContent {
    /// Plain text, 1 to 4000 characters.
    Text {
        /// The text.
        text: String,
    },
}

/// Only the object form, with `type` a string: serde's internally tagged enums would also take
/// a JSON array (`["Text","x"]`) or a variant index (`"type":0`), which PROTOCOL.md does not.
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(rename = "type")]
            kind: String,
            text: Option<String>,
        }
        struct ObjectOnly;
        impl<'de> serde::de::Visitor<'de> for ObjectOnly {
            type Value = MessageContent;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a content object with a string `type`")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<MessageContent, A::Error> {
                let fields = Fields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                match (fields.kind.as_str(), fields.text) {
                    ("Text", Some(text)) => Ok(MessageContent::Text { text }),
                    ("Text", None) => Err(serde::de::Error::missing_field("text")),
                    (other, _) => Err(serde::de::Error::unknown_variant(other, &["Text"])),
                }
            }
        }
        deserializer.deserialize_map(ObjectOnly)
    }
}

/// A stored message: the `data` of `recv` and an element of the history API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The uuid the sender chose, lower-case and hyphenated.
    pub uuid: String,
    /// The sender's user id.
    pub sender: u64,
    /// The room id.
    pub room: u64,
    /// The content.
    pub data: MessageContent,
    /// The server's timestamp, strictly increasing within the room.
    pub sent: Timestamp,
    /// Whether the message was edited (always false today).
    pub modified: bool,
}

/// Why a client frame could not be parsed, and so which answer it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not JSON, not an object, no `type`, or an unknown `type`: an `error` frame, code 3.
    Unreadable(String),
    /// An `auth` frame with missing or mistyped fields: an `auth` answer with code 1.
    BadAuth,
    /// An `auth` frame whose token is a string but whose `since` is not valid: an `error`
    /// frame, code 3, that does not count as a failed authentication.
    BadSince(String),
    /// A `msg` frame with missing or mistyped fields: a `send` answer with code 3.
    BadMsg {
        /// The frame's `uuid` if it was a string, else empty.
        uuid: String,
    },
}

impl ClientFrame {
    /// Parses one text frame. The common case costs one pass; only a frame that fails is looked
    /// at again to decide which answer it deserves.
    pub fn parse(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
        // A frame is a JSON object: serde would also take the array form of a tagged enum.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            let err = serde_json::from_slice::<serde_json::Value>(bytes).err();
            return Err(match err {
                Some(err) => FrameError::Unreadable(format!("invalid JSON: {err}")),
                None => FrameError::Unreadable("a frame must be a JSON object".into()),
            });
        }
        match serde_json::from_slice::<ClientFrame>(bytes) {
            Ok(frame) => Ok(frame),
            Err(err) => Err(classify(bytes, err)),
        }
    }
}

fn classify(bytes: &[u8], err: serde_json::Error) -> FrameError {
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(_) => return FrameError::Unreadable(format!("invalid JSON: {err}")),
    };
    let Some(object) = value.as_object() else {
        return FrameError::Unreadable("a frame must be a JSON object".into());
    };
    match object.get("type").and_then(|t| t.as_str()) {
        Some("auth") => bad_since(bytes).map_or(FrameError::BadAuth, FrameError::BadSince),
        Some("msg") => FrameError::BadMsg {
            uuid: object
                .get("uuid")
                .and_then(|u| u.as_str())
                .unwrap_or_default()
                .to_owned(),
        },
        Some(other) => FrameError::Unreadable(format!("unknown frame type {other:?}")),
        None => FrameError::Unreadable("missing frame type".into()),
    }
}

/// Why the `since` of an otherwise well-formed `auth` (one `type`, one string `token`, one
/// `since`) is invalid, if that is what is wrong with it.
fn bad_since(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Auth<'a> {
        #[serde(rename = "type")]
        _kind: String,
        #[serde(rename = "token")]
        _token: String,
        /// As written: a repeated room inside it must be seen as the direct parse sees it.
        #[serde(borrow)]
        since: &'a serde_json::value::RawValue,
    }
    let auth: Auth<'_> = serde_json::from_slice(bytes).ok()?;
    if auth.since.get() == "null" {
        return None;
    }
    serde_json::from_str::<Since>(auth.since.get())
        .err()
        .map(|err| format!("invalid since: {err}"))
}

impl ServerFrame {
    /// An `auth` answer with the code's standard message.
    pub fn auth(code: AuthCode) -> ServerFrame {
        ServerFrame::Auth {
            code,
            msg: code.message().to_owned(),
        }
    }

    /// A `send` answer.
    pub fn send(
        code: SendCode,
        msg: impl Into<String>,
        uuid: impl Into<String>,
        sent: Timestamp,
    ) -> ServerFrame {
        ServerFrame::Send {
            code,
            msg: msg.into(),
            uuid: uuid.into(),
            sent,
        }
    }

    /// The frame as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising these types cannot fail: every map key is a string and no value is a float.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The `recv` frame of a message (the one place it is built: live fan-out and `since` replay
/// send the same bytes).
pub fn recv_frame(message: Message) -> bytes::Bytes {
    bytes::Bytes::from(ServerFrame::Recv { data: message }.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    use chatoy_testkit::seed::{SEED_AUTH, SEED_AUTH_EXPIRED, SEED_AUTH_OK, SEED_MSG, SEED_RECV, SEED_SEND};

    /// Removes the pretty-printing whitespace (outside strings) of a seed example, keeping key order.
    fn compact(json: &str) -> String {
        let mut out = String::new();
        let mut in_string = false;
        let mut escaped = false;
        for c in json.chars() {
            if in_string {
                out.push(c);
                match (escaped, c) {
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => escaped = false,
                }
            } else if c == '"' {
                in_string = true;
                out.push(c);
            } else if !c.is_whitespace() {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn client_examples_parse_and_round_trip() {
        for example in [SEED_AUTH, SEED_MSG] {
            let frame = ClientFrame::parse(example.as_bytes()).unwrap();
            assert_eq!(serde_json::to_string(&frame).unwrap(), compact(example));
        }
        assert_eq!(
            ClientFrame::parse(SEED_MSG.as_bytes()).unwrap(),
            ClientFrame::Msg {
                uuid: "67e55044-10b1-426f-9247-bb680e5fe0c8".into(),
                room: 1,
                data: MessageContent::Text {
                    text: "Hello, Chatoy!".into()
                },
            }
        );
    }

    #[test]
    fn server_examples_parse_and_round_trip() {
        for example in [SEED_AUTH_OK, SEED_AUTH_EXPIRED] {
            let frame: ServerFrame = serde_json::from_str(example).unwrap();
            assert_eq!(String::from_utf8(frame.to_json()).unwrap(), example);
        }
        assert_eq!(
            String::from_utf8(ServerFrame::auth(AuthCode::Expired).to_json()).unwrap(),
            SEED_AUTH_EXPIRED
        );
        // `sent` comes back normalised to UTC, the same instant.
        for example in [SEED_SEND, SEED_RECV] {
            let frame: ServerFrame = serde_json::from_str(example).unwrap();
            let utc = compact(example).replace(
                "2022-12-22T14:33:59.579746716+08:00",
                "2022-12-22T06:33:59.579746716+00:00",
            );
            assert_eq!(String::from_utf8(frame.to_json()).unwrap(), utc);
        }
    }

    #[test]
    fn since_extension_parses() {
        let frame = ClientFrame::parse(
            br#"{"type":"auth","token":"t","since":"2022-12-22T14:33:59.579746716+08:00"}"#,
        )
        .unwrap();
        let ClientFrame::Auth {
            since: Some(Since::All(since)),
            ..
        } = frame
        else {
            panic!("expected auth with since");
        };
        assert_eq!(since.to_string(), "2022-12-22T06:33:59.579746716+00:00");
        let frame =
            ClientFrame::parse(br#"{"type":"auth","token":"t","since":{"4":"1970-01-01T00:00:01Z"}}"#)
                .unwrap();
        let ClientFrame::Auth {
            since: Some(since), ..
        } = frame
        else {
            panic!("expected auth with since");
        };
        assert_eq!(since.for_room(4), Some(Timestamp(1_000_000_000)));
    }

    #[test]
    fn bad_frames_are_classified() {
        let cases: &[(&[u8], FrameError)] = &[
            (b"not json", FrameError::Unreadable(String::new())),
            (b"[1,2]", FrameError::Unreadable(String::new())),
            (br#"{"type":"nope"}"#, FrameError::Unreadable(String::new())),
            (br#"{"token":"x"}"#, FrameError::Unreadable(String::new())),
            (br#"{"type":"auth","token":5}"#, FrameError::BadAuth),
            (
                br#"{"type":"auth","token":5,"since":"nope"}"#,
                FrameError::BadAuth,
            ),
            (
                br#"{"type":"auth","token":"t","since":{"x":"1970-01-01T00:00:01Z"}}"#,
                FrameError::BadSince(String::new()),
            ),
            (
                br#"{"type":"auth","token":"t","since":"yesterday"}"#,
                FrameError::BadSince(String::new()),
            ),
            (
                br#"{"type":"msg","uuid":"u","room":-1,"data":{"type":"Text","text":"x"}}"#,
                FrameError::BadMsg { uuid: "u".into() },
            ),
            (
                br#"{"type":"msg","uuid":"u","room":1,"data":{"type":"Image","url":"x"}}"#,
                FrameError::BadMsg { uuid: "u".into() },
            ),
            (
                br#"{"type":"msg","uuid":7}"#,
                FrameError::BadMsg { uuid: String::new() },
            ),
        ];
        for (input, expected) in cases {
            let got = ClientFrame::parse(input).unwrap_err();
            match (&got, expected) {
                (FrameError::Unreadable(_), FrameError::Unreadable(_)) => {}
                (FrameError::BadSince(why), FrameError::BadSince(_)) => {
                    assert!(why.contains("since"), "{why}")
                }
                _ => assert_eq!(&got, expected, "{}", String::from_utf8_lossy(input)),
            }
        }
    }
}
