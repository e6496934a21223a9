//! A small bounded run through the cluster (two routers, two gateways): ten clients, each in its
//! own room, send a thousand messages each with one unanswered at a time. Prints the ack
//! latency percentiles (not an assertion); asserts that every message was acknowledged and
//! stored once.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{checked_histories, percentile, run_all, users, Peer};
use crate::ordering::LOAD_FLAGS;
use chatoy_testkit::minicluster::{Cluster, Spec};
use chatoy_testkit::Ws;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_latency_ten_clients_window_one() {
    const CLIENTS: usize = 10;
    const PER_CLIENT: usize = 1000;
    let cluster = Cluster::start(Spec::new(2, 2, &LOAD_FLAGS)).await;
    let api = cluster.api();
    let host = api.new_user("host").await;
    let mut rooms = Vec::new();
    let mut peers = Vec::new();
    for (i, user) in users(&api, "client", CLIENTS).await.into_iter().enumerate() {
        let room = api.create_room(&host.token, &format!("room {i}")).await;
        api.join(&user.token, room).await;
        let gateway = i % 2 + 1;
        let ws = Ws::authed_url(&cluster.ws_url(gateway), &user.token).await;
        peers.push(Peer::new(
            format!("client {i} (gateway {gateway})"),
            user,
            vec![room],
            gateway,
            ws,
            PER_CLIENT,
        ));
        rooms.push(room);
    }

    let started = Instant::now();
    let peers = run_all(
        peers,
        1,
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
        Duration::from_secs(300),
    )
    .await;
    let elapsed = started.elapsed();
    let mut latencies: Vec<Duration> = peers.iter().flat_map(|p| p.latencies.iter().copied()).collect();
    latencies.sort();
    let resends: usize = peers.iter().map(|p| p.resends).sum();
    eprintln!(
        "send ack latency over {} messages ({CLIENTS} clients x {PER_CLIENT}, window 1): p50 {:?}, p99 {:?}, \
         max {:?}; {:.0} messages/s; {resends} resends",
        latencies.len(),
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies[latencies.len() - 1],
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
    checked_histories(&api, &host.token, &rooms, &peers, &Default::default()).await;
}
