//! Cluster-only tests, each on a private mini-cluster (routers, gateways and an HAProxy as real
//! processes on a fresh keyspace and NATS prefix of the shared NATS and Cassandra): delivery
//! across gateways, room order with two routers, a router killed under load, a gateway added
//! under load, `chatoy migrate` twice, a process with another partition count refused, and the
//! CQL node going away (last: it stops the shared Cassandra, so run this binary with
//! `--test-threads=1`, which runs tests in name order).

// The end-to-end fixtures; these tests use only part of them.
#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../e2e/minicluster.rs"]
mod minicluster;

mod cross_gateway;
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
mod zz_cql_node_down;
