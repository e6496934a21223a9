//! End-to-end tests: each test starts a real `chatoy standalone` process on a fresh data
//! directory (or, with `CHATOY_E2E_MODE=cluster`, a private mini-cluster of a router and two
//! gateways behind HAProxy on the shared NATS and Cassandra) and talks to it only through HTTP
//! and WebSocket, checking PROTOCOL.md exactly. With `CHATOY_E2E_MODE=external` every test
//! talks to one deployment it did not start (`CHATOY_E2E_URL`, scripts/k8s-e2e's Kubernetes
//! Service); a test that needs other settings or its own processes fails there loudly. The fixtures
//! are the `chatoy-testkit` crate's.

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
