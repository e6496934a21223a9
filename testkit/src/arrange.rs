//! The arrangement most tests begin with: alice and bob, registered and logged in, in a room
//! alice created and bob joined, and an authenticated socket for each of two users.

use crate::api::{Api, TestUser};
use crate::server::Server;
use crate::ws::Ws;

/// Registers alice, then bob; alice creates the room `name` and bob joins it. Returns alice, bob
/// and the room.
pub async fn alice_and_bob(api: &Api, name: &str) -> (TestUser, TestUser, u64) {
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let room = api.create_room(&alice.token, name).await;
    api.join(&bob.token, room).await;
    (alice, bob, room)
}

/// Opens a socket of `first`'s, then one of `second`'s, through the server's entry point (in
/// cluster mode the gateways take turns, so the two are on different gateways), and
/// authenticates each.
pub async fn two_sockets(server: &Server, first: &TestUser, second: &TestUser) -> (Ws, Ws) {
    let one = Ws::authed(server, &first.token).await;
    let other = Ws::authed(server, &second.token).await;
    (one, other)
}

/// Opens a socket of `first`'s at `first_url`, then one of `second`'s at `second_url` (a
/// mini-cluster's gateways), and authenticates each.
pub async fn two_sockets_at(
    first_url: &str,
    first: &TestUser,
    second_url: &str,
    second: &TestUser,
) -> (Ws, Ws) {
    let one = Ws::authed_url(first_url, &first.token).await;
    let other = Ws::authed_url(second_url, &second.token).await;
    (one, other)
}
