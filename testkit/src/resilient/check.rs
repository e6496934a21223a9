//! The checker: every acknowledged message is stored once, with the `sent` it was acknowledged
//! with; history's `sent` strictly increases; every member got every stored message of its rooms
//! (its own excepted), with its stored `sent`, first arrivals in `sent` order; and nothing else.

use std::collections::{HashMap, HashSet};

use super::crowd::acked_by_room;
use super::{rfc3339, Member};
use crate::api::Api;

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Messages answered code 0.
    pub acked: usize,
    /// Messages stored that no member saw answered code 0 (their answer was lost): allowed.
    pub stored_unacked: usize,
    /// Acknowledged messages not stored, plus stored messages a member never got.
    pub lost: usize,
    /// uuids stored twice, or received with another `sent` than stored.
    pub duplicates: usize,
    /// Member rooms whose first arrivals are not in `sent` order.
    pub disorder: usize,
    /// Connections after each member's first.
    pub reconnects: usize,
    /// Messages sent again with the same uuid.
    pub resends: usize,
    /// Refusals and close codes seen, `code×count`, sorted.
    pub codes: String,
    /// Everything wrong, in words (the members' own findings included).
    pub violations: Vec<String>,
}

impl Verdict {
    /// Nothing lost, duplicated or out of order, and nothing else wrong.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.disorder == 0 && self.violations.is_empty()
    }
}

/// Compares what every member saw with what the senders saw acknowledged and with the rooms'
/// histories (read with `token`, a member of every room).
pub async fn check(api: &Api, token: &str, rooms: &[u64], members: &[Member]) -> Verdict {
    let mut violations = Vec::new();
    let acked = acked_by_room(members);
    let mut duplicates = 0;
    let mut lost = 0;
    let mut disorder = 0;
    let mut stored_unacked = 0;
    let mut histories: HashMap<u64, Vec<(String, i64)>> = HashMap::new();
    for &room in rooms {
        let history = api.full_history(token, room).await;
        let mut stored: HashMap<&str, i64> = HashMap::new();
        for (uuid, sent) in &history {
            if stored.insert(uuid, *sent).is_some() {
                duplicates += 1;
            }
        }
        for pair in history.windows(2) {
            if pair[0].1 >= pair[1].1 {
                violations.push(format!("room {room}: history sent does not increase"));
            }
        }
        let want = acked.get(&room).cloned().unwrap_or_default();
        for (uuid, sent) in &want {
            match stored.get(uuid.as_str()) {
                None => {
                    lost += 1;
                    violations.push(format!("room {room}: acked {uuid} is not in history"));
                }
                Some(s) if s != sent => violations.push(format!(
                    "room {room}: {uuid} acked and stored with different sent"
                )),
                Some(_) => {}
            }
        }
        stored_unacked += history
            .iter()
            .filter(|(uuid, _)| !want.contains_key(uuid))
            .count();
        histories.insert(room, history);
    }
    let mut reconnects = 0;
    let mut resends = 0;
    let mut codes: HashMap<String, usize> = HashMap::new();
    for member in members {
        let seen = member.seen.lock().expect("seen");
        reconnects += seen.connects.saturating_sub(1);
        resends += seen.resends;
        for (code, n) in &seen.codes {
            *codes.entry(code.clone()).or_default() += n;
        }
        violations.extend(seen.violations.iter().cloned());
        for room in &member.spec.rooms {
            let history = &histories[room];
            let sent_of: HashMap<&str, i64> = history.iter().map(|(u, s)| (u.as_str(), *s)).collect();
            // The member's view: first arrival of each uuid, in arrival order (its own messages
            // it knew of when they were acknowledged, and may get back later through `since`).
            let mut firsts = Vec::new();
            let mut once = HashSet::new();
            for (uuid, r, sent) in &seen.received {
                if r != room || seen.acked.contains_key(uuid) {
                    continue;
                }
                match sent_of.get(uuid.as_str()) {
                    Some(stored) if stored != sent => {
                        duplicates += 1;
                        violations.push(format!(
                            "{}: {uuid} received with another sent",
                            member.spec.label
                        ));
                    }
                    None => violations.push(format!(
                        "{}: received {uuid}, which is not stored",
                        member.spec.label
                    )),
                    _ => {}
                }
                if once.insert(uuid.as_str()) {
                    firsts.push(*sent);
                }
            }
            if firsts.windows(2).any(|pair| pair[0] >= pair[1]) {
                disorder += 1;
                violations.push(format!(
                    "{}: room {room} arrived out of sent order",
                    member.spec.label
                ));
            }
            for (at, (uuid, sent)) in history.iter().enumerate() {
                if !once.contains(uuid.as_str()) && !seen.acked.contains_key(uuid) {
                    lost += 1;
                    if lost <= 20 {
                        // Where the hole is in what the member got: the arrivals around it.
                        let after = seen
                            .received
                            .iter()
                            .position(|(_, r, s)| r == room && s > sent)
                            .map_or("nothing later".to_owned(), |i| {
                                format!(
                                    "the next later one arrived as frame {i} of {}",
                                    seen.received.len()
                                )
                            });
                        violations.push(format!(
                            "{}: room {room}: never got {uuid} (sent {}, {} of {} in the room; {after}; {} connects)",
                            member.spec.label,
                            rfc3339(*sent),
                            at + 1,
                            history.len(),
                            seen.connects,
                        ));
                        violations.push(format!(
                            "{}: connections (frames before, since): {:?}",
                            member.spec.label, seen.connected_at
                        ));
                    }
                }
            }
        }
    }
    let acked_count: usize = acked.values().map(HashMap::len).sum();
    let mut codes: Vec<String> = codes.into_iter().map(|(code, n)| format!("{code}×{n}")).collect();
    codes.sort();
    Verdict {
        acked: acked_count,
        stored_unacked,
        lost,
        duplicates,
        disorder,
        reconnects,
        resends,
        codes: codes.join(" "),
        violations,
    }
}
