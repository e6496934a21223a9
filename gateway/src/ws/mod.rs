//! The WebSocket endpoint: upgrade, authenticate, then one task per socket that reads client
//! frames and writes everything queued in the socket's mailbox.

mod conn;
mod feed;
pub(crate) mod mailbox;
pub(crate) mod registry;
pub(crate) mod wire;

pub(crate) use conn::upgrade;
