//! End-to-end tests: each test starts a real `chatoy standalone` process on a fresh data
//! directory (or, with `CHATOY_E2E_MODE=cluster`, a private mini-cluster of a router and two
//! gateways behind HAProxy on the shared NATS and Cassandra) and talks to it only through HTTP
//! and WebSocket, checking PROTOCOL.md exactly. The fixtures are the `chatoy-testkit` crate's.

mod clients;
mod delivery;
mod http_api;
mod limits;
mod malformed;
mod per_user;
mod restart;
mod resume;
mod security;
mod websocket;
