//! Two routers sequence a few rooms written from several sockets on both gateways at once:
//! every member gets each of its rooms' messages in one order, the order of history, with
//! `sent` strictly increasing.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{finish, got_in, mesh, others_of, run_all};
use chatoy_testkit::minicluster::{Cluster, Spec};

/// Gateway flags of the load tests: no rate limit in the way, a short send timeout.
pub(crate) const LOAD_FLAGS: [&str; 8] = [
    "--send-timeout",
    "2s",
    "--msg-rate",
    "10000",
    "--msg-burst",
    "10000",
    "--since-limit",
    "5000",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_keep_every_room_in_order() {
    const ROOMS: usize = 4;
    const SENDERS: usize = 8;
    const PER_SENDER: usize = 40;
    let cluster = Cluster::start(Spec::new(2, 2, &LOAD_FLAGS)).await;
    let mesh = mesh(&cluster, ROOMS, SENDERS, PER_SENDER).await;

    let started = Instant::now();
    let acked = Arc::new(AtomicUsize::new(0));
    let mut peers = run_all(
        mesh.peers,
        4,
        acked,
        Arc::new(AtomicBool::new(false)),
        Duration::from_secs(120),
    )
    .await;
    let resends: usize = peers.iter().map(|p| p.resends).sum();
    eprintln!(
        "{} messages acknowledged in {:?} ({resends} resends)",
        SENDERS * PER_SENDER,
        started.elapsed()
    );

    let histories = finish(&cluster, &mesh.host, &mesh.rooms, &mut peers, &[]).await;
    for peer in &peers {
        for room in &peer.rooms {
            assert_eq!(
                got_in(peer, *room, false),
                others_of(peer, &histories[room]),
                "{}: room {room} did not arrive in history order, exactly once",
                peer.label
            );
        }
    }
}
