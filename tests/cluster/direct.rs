//! Writing to a mini-cluster's keyspace the way a router does, for the tests that leave in the
//! store what a router leaves when it dies or stalls between storing and publishing.

use chatoy_protocol::{partition_of, Timestamp};
use chatoy_store::{Content, CqlConfig, CqlStore, Fence, NewMessage, RoomBatch, Store};
use chatoy_testkit::minicluster::{Cluster, PARTITIONS};

/// The owner of one room's partition, outside the cluster's routers.
pub(crate) struct RoomWriter {
    store: CqlStore,
    fence: Fence,
    room: u64,
}

impl RoomWriter {
    /// Claims the room's partition as `owner` (which deposes the router that held it, as a
    /// takeover does) and opens the room.
    pub(crate) async fn claim(cluster: &Cluster, room: u64, owner: &str) -> RoomWriter {
        let (keyspace, nodes) = cluster.keyspace();
        let store = CqlStore::connect(&CqlConfig {
            nodes: nodes.split(',').map(str::to_owned).collect(),
            keyspace: keyspace.to_owned(),
            ..CqlConfig::default()
        })
        .await
        .expect("connect to the cluster's keyspace");
        let fence = store
            .claim(partition_of(room, PARTITIONS), owner)
            .await
            .expect("claim the room's partition");
        store.open_room(fence, room).await.expect("open the room");
        RoomWriter { store, fence, room }
    }

    /// Stores one Text message under the claim, as the room's sequencer would, and publishes
    /// nothing.
    pub(crate) async fn store(&self, uuid: uuid::Uuid, sender: u64, text: &str, sent: Timestamp) {
        let batch = vec![RoomBatch {
            room: self.room,
            messages: vec![NewMessage {
                uuid,
                sender,
                room: self.room,
                content: Content::Text(text.into()),
                sent,
            }],
        }];
        self.store
            .submit(self.fence, batch)
            .await
            .expect("submit the message")
            .await
            .expect("store the message");
    }
}
