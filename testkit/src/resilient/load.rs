//! Who makes a load: a host and the rooms it creates, senders that each send in two
//! neighbouring rooms, and a listener per gateway in every room, spread over the gateways.

use crate::api::{Api, TestUser};

use super::MemberSpec;

/// A load: `senders` members that each send in two neighbouring rooms of `rooms`
/// (at `rate` messages a second, at most `window` unanswered), and one listener per gateway,
/// of `gateways`, in every room.
#[derive(Debug, Clone, Copy)]
pub struct LoadPlan {
    pub rooms: usize,
    pub senders: usize,
    pub gateways: usize,
    /// Messages per second per sender.
    pub rate: f64,
    /// Most unanswered messages per sender.
    pub window: usize,
}

/// A load's members, registered: the host of its rooms, the rooms, and a spec per member
/// (the senders first, then the listeners).
pub struct Registered {
    pub host: TestUser,
    pub rooms: Vec<u64>,
    pub specs: Vec<MemberSpec>,
}

impl LoadPlan {
    /// Registers a host, who creates the rooms, and the members, who join theirs. Sender `i`
    /// first connects to `first_url(i % gateways + 1)`, listener `g` (from 1) to `first_url(g)`;
    /// every later connection goes to `balanced`.
    pub async fn register(
        &self,
        api: &Api,
        balanced: &str,
        first_url: impl Fn(usize) -> String,
    ) -> Registered {
        let host = api.new_user("host").await;
        let mut rooms = Vec::new();
        for r in 0..self.rooms {
            rooms.push(api.create_room(&host.token, &format!("room {r}")).await);
        }
        let start = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let mut specs = Vec::new();
        for i in 0..self.senders {
            let user = api.new_user(&format!("sender{i}")).await;
            let mine = vec![rooms[i % self.rooms], rooms[(i + 1) % self.rooms]];
            for room in &mine {
                api.join(&user.token, *room).await;
            }
            specs.push(MemberSpec {
                label: format!("sender {i}"),
                token: user.token,
                rooms: mine,
                first_url: first_url(i % self.gateways + 1),
                url: balanced.to_owned(),
                rate: self.rate,
                window: self.window,
                start,
            });
        }
        for g in 1..=self.gateways {
            let user = api.new_user(&format!("listener{g}")).await;
            for room in &rooms {
                api.join(&user.token, *room).await;
            }
            specs.push(MemberSpec {
                label: format!("listener {g}"),
                token: user.token,
                rooms: rooms.clone(),
                first_url: first_url(g),
                url: balanced.to_owned(),
                rate: 0.0,
                window: 0,
                start,
            });
        }
        Registered { host, rooms, specs }
    }
}
