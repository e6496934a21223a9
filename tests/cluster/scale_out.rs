//! A third gateway started under load (and added to the HAProxy with a soft reload) serves new
//! sockets at once, while the sockets already open on the first two carry on undisturbed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{finish, got_in, mesh, next_recv_of, others_of, run_all};
use crate::ordering::LOAD_FLAGS;
use chatoy_testkit::minicluster::{Cluster, Spec};
use chatoy_testkit::{assert_auth, within, Api, Ws};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_gateway_serves_new_sockets_at_once() {
    // Two rooms, four senders: enough messages to add a gateway while they are sent.
    const PER_SENDER: usize = 400;
    let mut cluster = Cluster::start(Spec::new(1, 2, &LOAD_FLAGS)).await;
    let api = cluster.api();
    let mesh = mesh(&cluster, 2, 4, PER_SENDER).await;
    let newcomer = api.new_user("newcomer").await;
    for room in &mesh.rooms {
        api.join(&newcomer.token, *room).await;
    }

    let acked = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(run_all(
        mesh.peers,
        2,
        acked.clone(),
        Arc::new(AtomicBool::new(false)),
        Duration::from_secs(180),
    ));
    crate::load::until_count(&acked, 50, "the load to get going").await;

    let adding = Instant::now();
    let third = cluster.add_gateway().await;
    eprintln!("gateway {third} started and routable in {:?}", adding.elapsed());
    assert!(
        acked.load(Ordering::SeqCst) < 4 * PER_SENDER,
        "the load ended before the third gateway was up; it proves nothing"
    );

    // A new socket on the new gateway: authenticated and receiving the rooms' traffic at once.
    let at_once = Duration::from_secs(2);
    let started = Instant::now();
    let mut ws = within(at_once, "a socket on the new gateway", async {
        let mut ws = Ws::connect_url(&cluster.ws_url(third)).await;
        let answer = ws.auth(&newcomer.token, None).await;
        assert_auth(&answer, 0);
        ws
    })
    .await;
    let authed = started.elapsed();
    let first = within(at_once, "a recv on the new gateway", ws.next_recv()).await;
    let received = started.elapsed();
    assert!(mesh.rooms.contains(&first["room"].as_u64().expect("room")));
    eprintln!("on gateway {third}: authenticated after {authed:?}, first recv after {received:?}");
    let on_third = Api::new(cluster.gateway_url(third), vec![cluster.gateway_url(third)]);
    assert_eq!(on_third.metric("chatoy_sockets_open").await, Some(1.0));

    // It can send too: acknowledged, and delivered to the old gateways' sockets.
    let mut peers = load.await.expect("the load panicked");
    let hello = chatoy_testkit::new_uuid();
    ws.send_ok(&hello, mesh.rooms[0], "hello from the new gateway")
        .await;
    for peer in peers.iter_mut().filter(|p| p.rooms.contains(&mesh.rooms[0])) {
        next_recv_of(peer, |uuid| uuid == hello).await;
    }

    // The sockets opened before the reload lost nothing and kept every room's order.
    let histories = finish(&cluster, &mesh.host, &mesh.rooms, &mut peers, &[hello]).await;
    for peer in &peers {
        for room in &peer.rooms {
            assert_eq!(
                got_in(peer, *room, false),
                others_of(peer, &histories[room]),
                "{}: room {room}",
                peer.label
            );
        }
    }
}
