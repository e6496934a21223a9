//! Where the store's types meet the wire's (`chatoy_protocol`): the gateway and the router
//! convert with these, so the rest of the store never sees a frame or an HTTP body.

use chatoy_protocol::{http, Message, MessageContent};

use crate::{Content, Room, StoredMessage, User};

impl From<User> for http::User {
    fn from(user: User) -> http::User {
        http::User {
            id: user.id,
            username: user.username,
            nickname: user.nickname,
            slogan: user.slogan,
            status: user.status,
            registered: user.registered,
        }
    }
}

impl From<Room> for http::Room {
    fn from(room: Room) -> http::Room {
        http::Room {
            id: room.id,
            name: room.name,
            description: room.description,
            created: room.created,
        }
    }
}

impl From<MessageContent> for Content {
    fn from(content: MessageContent) -> Content {
        match content {
            MessageContent::Text { text } => Content::Text(text),
        }
    }
}

impl From<Content> for MessageContent {
    fn from(content: Content) -> MessageContent {
        match content {
            Content::Text(text) => MessageContent::Text { text },
        }
    }
}

impl From<StoredMessage> for Message {
    fn from(message: StoredMessage) -> Message {
        Message {
            uuid: message.uuid.hyphenated().to_string(),
            sender: message.sender,
            room: message.room,
            data: message.content.into(),
            sent: message.sent,
            modified: message.modified,
        }
    }
}
