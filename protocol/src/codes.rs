//! The status codes of `auth` and `send` responses, as PROTOCOL.md tabulates them.

use serde::{Deserialize, Serialize};

/// The `code` of an `auth` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum AuthCode {
    /// Authenticated.
    Ok = 0,
    /// The token is unknown, expired or revoked.
    Expired = 1,
    /// This connection is already authenticated.
    AlreadyAuthenticated = 2,
}

impl AuthCode {
    /// The human-readable `msg` that goes with the code.
    pub fn message(self) -> &'static str {
        match self {
            AuthCode::Ok => "",
            AuthCode::Expired => "Login status expired!",
            AuthCode::AlreadyAuthenticated => "Already authenticated!",
        }
    }
}

/// The `code` of a `send` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum SendCode {
    /// Stored and being delivered.
    Ok = 0,
    /// The connection has not authenticated.
    NotAuthenticated = 1,
    /// The sender is not a member of the room, or the room does not exist.
    NotMember = 2,
    /// The message is invalid (uuid, content type, text length, or uuid reused for other content).
    Invalid = 3,
    /// Too many messages: slow down and resend the same uuid.
    RateLimited = 4,
    /// Temporarily unavailable: resend the same uuid.
    Unavailable = 5,
}

impl SendCode {
    /// Every code, in order.
    pub const ALL: [SendCode; 6] = [
        SendCode::Ok,
        SendCode::NotAuthenticated,
        SendCode::NotMember,
        SendCode::Invalid,
        SendCode::RateLimited,
        SendCode::Unavailable,
    ];

    /// The default human-readable `msg` that goes with the code.
    pub fn message(self) -> &'static str {
        match self {
            SendCode::Ok => "",
            SendCode::NotAuthenticated => "Please login first!",
            SendCode::NotMember => "Not a member of this room!",
            SendCode::Invalid => "Invalid message!",
            SendCode::RateLimited => "Rate limited, resend later!",
            SendCode::Unavailable => "Temporarily unavailable, resend later!",
        }
    }

    /// The code as a metric label.
    pub fn label(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5"][self as usize]
    }
}

macro_rules! u8_conversions {
    ($ty:ident, $($variant:ident = $value:literal),+) => {
        impl From<$ty> for u8 {
            fn from(code: $ty) -> u8 {
                code as u8
            }
        }

        impl TryFrom<u8> for $ty {
            type Error = String;

            fn try_from(value: u8) -> Result<Self, String> {
                match value {
                    $($value => Ok($ty::$variant),)+
                    other => Err(format!("unknown code {other}")),
                }
            }
        }
    };
}

u8_conversions!(AuthCode, Ok = 0, Expired = 1, AlreadyAuthenticated = 2);
u8_conversions!(
    SendCode,
    Ok = 0,
    NotAuthenticated = 1,
    NotMember = 2,
    Invalid = 3,
    RateLimited = 4,
    Unavailable = 5
);
