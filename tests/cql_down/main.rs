//! The CQL node going away under a mini-cluster. It stops the shared Cassandra of the test
//! command, so it is a binary of its own that `scripts/test` runs alone, after every other test
//! that uses the node (no test order inside another binary is relied on).

// The end-to-end fixtures; this test uses only part of them.
#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../e2e/minicluster.rs"]
mod minicluster;

mod node_down;
