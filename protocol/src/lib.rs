//! Chatoy's wire types, shared by every crate: WebSocket frames, HTTP bodies, bus envelopes.
//!
//! This crate knows no transport and no storage. It defines what travels, how it is spelt on the
//! wire (field names and `type` tags exactly as in the seed protocol document), and the
//! validation rules of PROTOCOL.md that do not need any state.

pub mod backoff;
pub mod bus;
pub mod codes;
pub mod frame;
pub mod http;
pub mod since;
pub mod time;
pub mod validate;

pub use codes::{AuthCode, SendCode};
pub use frame::{ClientFrame, Message, MessageContent, ServerFrame};
pub use since::Since;
pub use time::Timestamp;

/// The partition a room belongs to when rooms are spread over `partitions` sequencers (at least
/// one): every process of a deployment must use the same count.
pub fn partition_of(room: u64, partitions: u32) -> u32 {
    (room % u64::from(partitions.max(1))) as u32
}

/// The largest id a user or a room may have: 2^53 - 1, the largest integer JavaScript holds exactly.
pub const MAX_ID: u64 = (1 << 53) - 1;
