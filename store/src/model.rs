//! What the store keeps, in its own types: users, rooms and messages as rows, and a message's
//! content with the store's own column encoding.
//!
//! These are not the wire's types (`chatoy_protocol`): a change to a frame or an HTTP body is
//! not a schema change. `wire.rs` converts between the two, in one place.

use chatoy_protocol::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user as stored (without the password hash, see [`crate::UserWithHash`]).
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A room as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A message's content as stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Content {
    /// Plain text.
    Text(String),
}

/// The `content` column: a JSON object tagged by `type`. Its shape is the store's to keep (it
/// happens to match the first wire format, so older rows read as they are); a new kind of
/// content is a new variant here.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type")]
enum Column<T> {
    Text { text: T },
}

impl Content {
    /// The `content` column's value.
    pub(crate) fn encode(&self) -> String {
        let column = match self {
            Content::Text(text) => Column::Text { text: text.as_str() },
        };
        serde_json::to_string(&column).expect("a string-keyed object always serialises")
    }

    /// Reads a `content` column; the error says why it is unreadable.
    pub(crate) fn decode(column: &str) -> Result<Content, serde_json::Error> {
        Ok(match serde_json::from_str::<Column<String>>(column)? {
            Column::Text { text } => Content::Text(text),
        })
    }
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its identity within the room, chosen by the sender.
    pub uuid: Uuid,
    /// The sender.
    pub sender: u64,
    /// The room.
    pub room: u64,
    /// The content.
    pub content: Content,
    /// Its place in the room's sequence, strictly increasing within the room.
    pub sent: Timestamp,
    /// Whether it was edited.
    pub modified: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_keeps_the_first_format() {
        let content = Content::Text("hé \"x\"".into());
        assert_eq!(content.encode(), r#"{"type":"Text","text":"hé \"x\""}"#);
        assert_eq!(Content::decode(&content.encode()).unwrap(), content);
        // Rows written before the store had its own types.
        assert_eq!(
            Content::decode(r#"{"type":"Text","text":"old"}"#).unwrap(),
            Content::Text("old".into())
        );
        assert!(Content::decode(r#"{"type":"Image","url":"x"}"#).is_err());
    }
}
