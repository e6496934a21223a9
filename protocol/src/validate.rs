//! Stateless validation rules of PROTOCOL.md: names, passwords, ids, uuids, message content.

use uuid::Uuid;

use crate::frame::MessageContent;
use crate::MAX_ID;

/// Longest text of a `Text` message, in characters.
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest room name, in characters.
pub const MAX_ROOM_NAME_CHARS: usize = 100;
/// Longest room description, in characters.
pub const MAX_ROOM_DESCRIPTION_CHARS: usize = 1000;

/// A username is 3–32 characters of `[A-Za-z0-9_.-]`.
pub fn username(name: &str) -> Result<(), &'static str> {
    let ok_len = (3..=32).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err("username must be 3-32 characters of A-Z a-z 0-9 _ . -")
    }
}

/// A password is 8–128 bytes.
pub fn password(password: &str) -> Result<(), &'static str> {
    if (8..=128).contains(&password.len()) {
        Ok(())
    } else {
        Err("password must be 8-128 bytes")
    }
}

/// A user or room id is in 1 ..= 2^53-1.
pub fn id(id: u64) -> bool {
    (1..=MAX_ID).contains(&id)
}

/// A message uuid is a hyphenated UUID (any case); returns it parsed.
pub fn message_uuid(text: &str) -> Result<Uuid, &'static str> {
    if text.len() != 36 {
        return Err("uuid must be a hyphenated UUID");
    }
    Uuid::try_parse(text).map_err(|_| "uuid must be a hyphenated UUID")
}

/// Content rules: `Text` with 1–4000 characters.
pub fn content(content: &MessageContent) -> Result<(), &'static str> {
    match content {
        MessageContent::Text { text } => {
            // Counting characters is linear; bound by bytes first so huge texts fail fast.
            if text.is_empty() {
                Err("text must not be empty")
            } else if text.len() > MAX_TEXT_CHARS * 4 || text.chars().count() > MAX_TEXT_CHARS {
                Err("text must be at most 4000 characters")
            } else {
                Ok(())
            }
        }
    }
}

/// Room names are 1–100 characters, descriptions up to 1000.
pub fn room(name: &str, description: &str) -> Result<(), &'static str> {
    let name_chars = name.chars().count();
    if name.trim().is_empty() || name_chars > MAX_ROOM_NAME_CHARS {
        Err("room name must be 1-100 characters")
    } else if description.chars().count() > MAX_ROOM_DESCRIPTION_CHARS {
        Err("room description must be at most 1000 characters")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(username("bob").is_ok());
        assert!(username("a.b-c_9").is_ok());
        assert!(username("ab").is_err());
        assert!(username(&"x".repeat(33)).is_err());
        assert!(username("bob smith").is_err());
        assert!(username("bøb").is_err());
    }

    #[test]
    fn texts() {
        let text = |t: &str| MessageContent::Text { text: t.into() };
        assert!(content(&text("")).is_err());
        assert!(content(&text(&"é".repeat(4000))).is_ok());
        assert!(content(&text(&"é".repeat(4001))).is_err());
    }

    #[test]
    fn uuids_and_ids() {
        assert!(message_uuid("67e55044-10b1-426f-9247-bb680e5fe0c8").is_ok());
        assert!(message_uuid("67E55044-10B1-426F-9247-BB680E5FE0C8").is_ok());
        assert!(message_uuid("67e5504410b1426f9247bb680e5fe0c8").is_err());
        assert!(message_uuid("not-a-uuid").is_err());
        assert!(!id(0));
        assert!(id(MAX_ID));
        assert!(!id(MAX_ID + 1));
    }
}
