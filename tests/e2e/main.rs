//! End-to-end tests: each test starts a real `chatoy standalone` process on a fresh data
//! directory and talks to it only through HTTP and WebSocket, checking PROTOCOL.md exactly.

mod delivery;
mod harness;
mod http_api;
mod limits;
mod malformed;
mod restart;
mod resume;
mod websocket;
