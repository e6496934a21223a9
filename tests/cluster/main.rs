//! Cluster-only tests, each on a private mini-cluster (routers, gateways and an HAProxy as real
//! processes on a fresh keyspace and NATS prefix of the shared NATS and Cassandra): delivery
//! across gateways, room order with two routers, a router killed under load, a gateway added
//! under load, `chatoy migrate` twice, and a process with another partition count refused. (The
//! CQL node going away is `tests/cql_down`: it stops the shared node, so it runs alone.)

//!
//! The fixtures (processes, mini-clusters, clients, the resilient client and its checker) are
//! the `chatoy-testkit` crate's.

mod cross_gateway;
mod direct;
mod failover;
mod latency;
mod layout;
mod load;
mod ordering;
mod orphan;
mod resume_rooms;
mod scale_in;
mod scale_out;
mod schema;
