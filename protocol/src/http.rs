//! Bodies of the HTTP API in PROTOCOL.md.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// `POST /users` and `POST /login` request body.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Credentials {
    /// 3–32 of `[A-Za-z0-9_.-]`.
    pub username: String,
    /// 8–128 bytes.
    pub password: String,
}

/// The `{"code","msg"}` body of most answers, and of every error.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CodeMsg {
    /// 0 on success; on an error, the HTTP status number.
    pub code: u16,
    /// Empty on success, else what went wrong.
    pub msg: String,
}

/// `POST /login` answer: `msg` carries the token, as in the original Chatoy API.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LoginReply {
    /// 0 on success.
    pub code: u16,
    /// The token on success, the reason otherwise.
    pub msg: String,
    /// The logged-in user, null on failure.
    pub user: Option<User>,
}

/// `POST /rooms` request body.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NewRoom {
    /// 1–100 characters.
    pub name: String,
    /// Optional, up to 1000 characters.
    #[serde(default)]
    pub description: String,
}

/// `POST /rooms` answer.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
pub struct RoomId {
    /// The new room's id.
    pub id: u64,
}

/// A user as the API shows it; never carries a password hash.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct User {
    /// 1 ..= 2^53-1.
    pub id: u64,
    /// The unique login name.
    pub username: String,
    /// Display name; the username until changed.
    pub nickname: String,
    /// Free text.
    pub slogan: String,
    /// Free text.
    pub status: String,
    /// When the account was created.
    pub registered: Timestamp,
}

/// A room as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Room {
    /// 1 ..= 2^53-1.
    pub id: u64,
    /// The room's name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// When the room was created.
    pub created: Timestamp,
}
