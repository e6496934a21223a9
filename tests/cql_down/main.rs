//! The CQL node going away under a mini-cluster. It stops the shared Cassandra of the test
//! command, so it is a binary of its own that `scripts/test` runs alone, after every other test
//! that uses the node (no test order inside another binary is relied on).

//! The fixtures are the `chatoy-testkit` crate's.

mod node_down;
