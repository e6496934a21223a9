//! Chatoy's end-to-end test fixtures, shared by every test binary of the `chatoy` package (e2e,
//! cluster, cql_down, faults, fuzz), and the fuzzers' shared parts (also the protocol crate's). They speak only the public protocol (HTTP and WebSocket) to
//! real processes, and fail the test loudly on anything they cannot do.
//!
//! By concern:
//! - `process`: the `chatoy` binary and the repository's scripts, a restartable process,
//!   commands run to their end, temporary directories, `/proc`;
//! - `server`: the server under test, a standalone process or (`CHATOY_E2E_MODE=cluster`) a
//!   mini-cluster; `minicluster`: routers, gateways and an HAProxy on the shared NATS and
//!   Cassandra, and what they give back when dropped; `services`: which NATS and Cassandra they
//!   run on, and the guard of the shared Cassandra node for tests that stop it;
//! - `arrange`: what most tests begin with (alice and bob in a room, a socket each);
//! - `api`: the HTTP API; `ws`: a tungstenite WebSocket client; `raw_ws` and `raw_http`:
//!   hand-rolled clients that can put any bytes on the wire;
//! - `shape`: the exact shapes of PROTOCOL.md, asserted, and the frames a test sends; `seed`:
//!   the seed document's example frames;
//! - `resilient`: a client that reconnects, resumes and resends as a real one does, many of them
//!   at once, and the check of what they saw against the rooms' histories;
//! - `fuzz`: what the frame parser's and the live connection's fuzzers share (a JSON tree that
//!   keeps what `serde_json` loses, its mutations);
//! - `util`: the bound on any wait, random names, seeds, polling.
//!
//! The items tests use most are re-exported here.

pub mod api;
pub mod arrange;
pub mod fuzz;
pub mod minicluster;
pub mod process;
pub mod raw_http;
pub mod raw_ws;
pub mod resilient;
pub mod seed;
pub mod server;
pub mod services;
pub mod shape;
pub mod util;
pub mod ws;

pub use api::{metric_value, padded_registration, percent_encode, Api, Reply, TestUser, PASSWORD};
pub use arrange::{alice_and_bob, two_sockets, two_sockets_at};
pub use process::{
    chatoy_binary, pid_listening_on, repo_root, rss_kib, run_checked, run_command, script, scrub_env,
    wait_exit, PeakRss, Process, TempDir,
};
pub use raw_http::{RawHttp, RawResponse, UPGRADE_HEADERS};
pub use raw_ws::{close_code, close_reason, opcode, RawFrame, RawWs};
pub use server::{mode, test_flags, Mode, Server, UNLIMITED_CONNS, UNLIMITED_MSGS};
pub use shape::{
    assert_auth, assert_error_frame, assert_id, assert_keys, assert_message, assert_recent, assert_send,
    assert_token, assert_user, auth_frame, msg_frame, parse_ts, recv_data, ts, uuids, uuids_by_room,
};
pub use util::{new_uuid, random_hex, seed, wait_until, within, WAIT};
pub use ws::{Event, Stream, Ws};
