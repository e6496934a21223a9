//! The `since` of a resuming `auth`: where the client left off, per room (what clients send)
//! or as one timestamp for every room (the compatibility form, exact only for one room).

use std::collections::BTreeMap;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::time::Timestamp;
use crate::validate;

/// Most rooms one per-room `since` may list.
pub const MAX_SINCE_ROOMS: usize = 1000;

/// Where a resuming client left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// `"since": "<ts>"`: that timestamp for every room of the user.
    All(Timestamp),
    /// `"since": {"<room id>": "<ts>", …}`: per listed room, the newest `sent` seen in it.
    Rooms(BTreeMap<u64, Timestamp>),
}

impl Since {
    /// Where to resume `room` from, if at all: rooms a per-room `since` does not list get no
    /// replay.
    pub fn for_room(&self, room: u64) -> Option<Timestamp> {
        match self {
            Since::All(at) => Some(*at),
            Since::Rooms(rooms) => rooms.get(&room).copied(),
        }
    }
}

impl Serialize for Since {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Since::All(at) => at.serialize(serializer),
            Since::Rooms(rooms) => {
                let mut map = serializer.serialize_map(Some(rooms.len()))?;
                for (room, at) in rooms {
                    map.serialize_entry(&room.to_string(), at)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Since {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SinceVisitor;
        impl<'de> Visitor<'de> for SinceVisitor {
            type Value = Since;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an RFC 3339 timestamp, or an object of room ids to RFC 3339 timestamps")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Since, E> {
                Timestamp::parse(text)
                    .map(Since::All)
                    .ok_or_else(|| E::custom("since must be an RFC 3339 timestamp"))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Since, A::Error> {
                let mut rooms = BTreeMap::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let room = key
                        .parse::<u64>()
                        .ok()
                        .filter(|room| validate::id(*room) && room.to_string() == key)
                        .ok_or_else(|| {
                            de::Error::custom(format!(
                                "since: {key:?} is not a room id (a decimal integer in 1..=2^53-1)"
                            ))
                        })?;
                    let at: Timestamp = map.next_value().map_err(|_| {
                        de::Error::custom(format!(
                            "since: the value of room {room} must be an RFC 3339 timestamp"
                        ))
                    })?;
                    rooms.insert(room, at);
                    if rooms.len() > MAX_SINCE_ROOMS {
                        return Err(de::Error::custom(format!(
                            "since lists more than {MAX_SINCE_ROOMS} rooms"
                        )));
                    }
                }
                Ok(Since::Rooms(rooms))
            }
        }
        deserializer.deserialize_any(SinceVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Since, String> {
        serde_json::from_str(json).map_err(|err| err.to_string())
    }

    #[test]
    fn both_forms_parse_and_round_trip() {
        let all = parse(r#""2022-12-22T14:33:59.579746716+08:00""#).unwrap();
        assert_eq!(all.for_room(7), Some(Timestamp(1_671_690_839_579_746_716)));
        let rooms = parse(r#"{"7":"1970-01-01T00:00:01Z","12":"1970-01-01T00:00:02Z"}"#).unwrap();
        assert_eq!(rooms.for_room(7), Some(Timestamp(1_000_000_000)));
        assert_eq!(rooms.for_room(12), Some(Timestamp(2_000_000_000)));
        assert_eq!(rooms.for_room(8), None, "unlisted rooms get no replay");
        for since in [all, rooms, Since::Rooms(BTreeMap::new())] {
            let json = serde_json::to_string(&since).unwrap();
            assert_eq!(parse(&json).unwrap(), since);
        }
    }

    #[test]
    fn bad_forms_are_refused_with_a_reason() {
        for (json, why) in [
            (r#""yesterday""#, "RFC 3339"),
            ("5", "an RFC 3339 timestamp, or an object"),
            (r#"{"abc":"1970-01-01T00:00:01Z"}"#, "not a room id"),
            (r#"{"0":"1970-01-01T00:00:01Z"}"#, "not a room id"),
            (r#"{"07":"1970-01-01T00:00:01Z"}"#, "not a room id"),
            (r#"{"9007199254740992":"1970-01-01T00:00:01Z"}"#, "not a room id"),
            (r#"{"7":"soon"}"#, "room 7 must be"),
            (r#"{"7":7}"#, "room 7 must be"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(why), "{json}: {err}");
        }
        let many: Vec<String> = (1..=1001)
            .map(|room| format!(r#""{room}":"1970-01-01T00:00:01Z""#))
            .collect();
        let err = parse(&format!("{{{}}}", many.join(","))).unwrap_err();
        assert!(err.contains("more than 1000 rooms"), "{err}");
        let enough: Vec<String> = (1..=1000)
            .map(|room| format!(r#""{room}":"1970-01-01T00:00:01Z""#))
            .collect();
        assert!(parse(&format!("{{{}}}", enough.join(","))).is_ok());
    }

    #[test]
    fn timestamps_beyond_2262_are_clamped() {
        assert_eq!(
            parse(r#""2999-01-01T00:00:00Z""#).unwrap(),
            Since::All(Timestamp(i64::MAX))
        );
        let rooms = parse(r#"{"3":"1500-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(rooms.for_room(3), Some(Timestamp(i64::MIN)));
    }
}
