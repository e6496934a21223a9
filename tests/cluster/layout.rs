//! Every gateway and router must use the same number of partitions (a gateway that disagreed
//! with the routers would send messages to partitions no router takes). The work stream records
//! the number it was laid out for; a process with another number stops at start, saying why,
//! and the cluster it tried to join goes on working.

use serde_json::json;

use chatoy_testkit::minicluster::{Cluster, Spec};
use chatoy_testkit::{alice_and_bob, new_uuid, two_sockets_at};

#[tokio::test]
async fn a_process_with_another_partition_count_stops_with_the_reason() {
    let cluster = Cluster::start(Spec::new(1, 1, &[])).await;
    for role in ["gateway", "router"] {
        let (status, output) = cluster.run_with_partitions(role, 8).await;
        assert!(
            !status.success(),
            "a {role} with 8 partitions in a cluster of 16 exited {status}:\n{output}"
        );
        assert!(
            output.contains("uses 8 partitions") && output.contains("laid out for 16"),
            "the {role} did not say why it stopped:\n{output}"
        );
    }

    let api = cluster.api();
    let (alice, bob, room) = alice_and_bob(&api, "still working").await;
    let (mut a, mut b) = two_sockets_at(&cluster.ws_url(1), &alice, &cluster.ws_url(1), &bob).await;
    let uuid = new_uuid();
    a.send_ok(&uuid, room, "after the misconfigured processes").await;
    assert_eq!(b.next_recv().await["uuid"], json!(uuid));
}
