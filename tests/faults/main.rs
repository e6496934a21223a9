//! The fault suite (issue 4): every acknowledged message reaches every member across killed
//! gateways and routers, a NATS restart, a gateway cut from NATS, a rolling restart and a
//! Cassandra outage. Needs the shared Cassandra of the test command (`CHATOY_CQL_NODES`,
//! `CHATOY_SERVICES_RUN_DIR`); starts its own nats-server. See `suite.rs`.
//!
//! The HA pass (issue 13, `ha.rs`): the same load and checker on three NATS servers and three
//! CQL nodes of its own, losing one (or one of each) at a time.

//!
//! The clients that reconnect and resume as PROTOCOL.md says, and the checker, are the
//! `chatoy-testkit` crate's (`resilient`), shared with the cluster tests.

mod ha;
mod proxy;
mod suite;
