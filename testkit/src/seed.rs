//! The example frames of the seed document (`seed/websocket-protocol.md`), verbatim: the
//! protocol's unit tests and the end-to-end tests check the same text.

/// The `auth` example.
pub const SEED_AUTH: &str = r#"{"type":"auth","token":"0123456789abcdef"}"#;
/// The `auth` answer example, authenticated.
pub const SEED_AUTH_OK: &str = r#"{"type":"auth","code":0,"msg":""}"#;
/// The `auth` answer example, refused.
pub const SEED_AUTH_EXPIRED: &str = r#"{"type":"auth","code":1,"msg":"Login status expired!"}"#;
/// The `msg` example, pretty-printed exactly as the seed shows it.
pub const SEED_MSG: &str = r#"{
  "type": "msg",
  "uuid": "67e55044-10b1-426f-9247-bb680e5fe0c8",
  "room": 1,
  "data": {
    "type": "Text",
    "text": "Hello, Chatoy!"
  }
}"#;
/// The `send` example.
pub const SEED_SEND: &str = r#"{
  "type": "send",
  "code": 0,
  "msg": "",
  "uuid": "67e55044-10b1-426f-9247-bb680e5fe0c8",
  "sent": "2022-12-22T14:33:59.579746716+08:00"
}"#;
/// The `recv` example.
pub const SEED_RECV: &str = r#"{
  "type": "recv",
  "data": {
    "uuid": "67e55044-10b1-426f-9247-bb680e5fe0c8",
    "sender": 1,
    "room": 1,
    "data": {
      "type": "Text",
      "text": "Hello, Chatoy!"
    },
    "sent": "2022-12-22T14:33:59.579746716+08:00",
    "modified": false
  }
}"#;
