//! How to reach the cluster: contact points, keyspace, consistency, datacenter and bucket
//! width, checked before anything is substituted into CQL.

use std::fmt;
use std::str::FromStr;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::{Consistency, SerialConsistency};

/// Ten days, the default width of a message bucket.
pub const DEFAULT_BUCKET_WIDTH_NANOS: i64 = 10 * 24 * 3600 * 1_000_000_000;
/// The consistency level of ordinary reads and writes.
///
/// Lightweight transactions use `LOCAL_SERIAL` when this is a local level and `SERIAL`
/// otherwise, except claims that must be unique across the whole cluster (usernames and id
/// blocks), which always use `SERIAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CqlConsistency {
    /// `ONE`.
    One,
    /// `LOCAL_ONE`.
    LocalOne,
    /// `QUORUM`.
    Quorum,
    /// `LOCAL_QUORUM`, the default.
    #[default]
    LocalQuorum,
    /// `EACH_QUORUM`.
    EachQuorum,
    /// `ALL`.
    All,
}

impl CqlConsistency {
    pub(super) fn driver(self) -> Consistency {
        match self {
            CqlConsistency::One => Consistency::One,
            CqlConsistency::LocalOne => Consistency::LocalOne,
            CqlConsistency::Quorum => Consistency::Quorum,
            CqlConsistency::LocalQuorum => Consistency::LocalQuorum,
            CqlConsistency::EachQuorum => Consistency::EachQuorum,
            CqlConsistency::All => Consistency::All,
        }
    }

    pub(super) fn serial(self) -> SerialConsistency {
        match self {
            CqlConsistency::LocalOne | CqlConsistency::LocalQuorum => SerialConsistency::LocalSerial,
            _ => SerialConsistency::Serial,
        }
    }

    const NAMES: [(&'static str, CqlConsistency); 6] = [
        ("one", CqlConsistency::One),
        ("local_one", CqlConsistency::LocalOne),
        ("quorum", CqlConsistency::Quorum),
        ("local_quorum", CqlConsistency::LocalQuorum),
        ("each_quorum", CqlConsistency::EachQuorum),
        ("all", CqlConsistency::All),
    ];
}

impl FromStr for CqlConsistency {
    type Err = String;

    /// Parses `local_quorum`, `LOCAL_QUORUM`, `local-quorum` and the like.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let wanted = text.trim().to_ascii_lowercase().replace('-', "_");
        CqlConsistency::NAMES
            .iter()
            .find(|(name, _)| *name == wanted)
            .map(|(_, level)| *level)
            .ok_or_else(|| {
                let names: Vec<&str> = CqlConsistency::NAMES.iter().map(|(name, _)| *name).collect();
                format!(
                    "unknown consistency {text:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for CqlConsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = CqlConsistency::NAMES
            .iter()
            .find(|(_, level)| level == self)
            .map_or("local_quorum", |(name, _)| *name);
        f.write_str(name)
    }
}

/// Where the cluster is and how to use it.
#[derive(Debug, Clone)]
pub struct CqlConfig {
    /// Contact points, `host:port` (at least one).
    pub nodes: Vec<String>,
    /// The keyspace; letters, digits and `_`, at most 48 characters.
    pub keyspace: String,
    /// The consistency of ordinary reads and writes.
    pub consistency: CqlConsistency,
    /// Replicas per datacenter when [`migrate`] creates the keyspace.
    pub replication_factor: u32,
    /// The local datacenter: the keyspace's replication names it, and requests prefer its nodes.
    pub datacenter: String,
    /// The width of a message bucket in nanoseconds (> 0). It is part of the data layout: every
    /// process of a cluster must use the same width, and changing it orphans stored messages.
    pub bucket_width_nanos: i64,
}

impl Default for CqlConfig {
    /// One local node (`127.0.0.1:9042`), keyspace `chatoy`, `LOCAL_QUORUM`, RF 1 in
    /// `datacenter1`, ten-day buckets: what a laptop runs. Production raises the RF.
    fn default() -> Self {
        CqlConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "chatoy".into(),
            consistency: CqlConsistency::LocalQuorum,
            replication_factor: 1,
            datacenter: "datacenter1".into(),
            bucket_width_nanos: DEFAULT_BUCKET_WIDTH_NANOS,
        }
    }
}

impl CqlConfig {
    /// Checks what is substituted into CQL text or divides.
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("no CQL contact points given".into());
        }
        let identifier = |text: &str| {
            !text.is_empty()
                && text.len() <= 48
                && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !identifier(&self.keyspace) {
            return Err(format!(
                "invalid keyspace {:?}: use 1 to 48 letters, digits or underscores",
                self.keyspace
            ));
        }
        if self.datacenter.is_empty() || self.datacenter.contains('\'') {
            return Err(format!("invalid datacenter name {:?}", self.datacenter));
        }
        if self.replication_factor == 0 {
            return Err("the replication factor must be at least 1".into());
        }
        if self.bucket_width_nanos <= 0 {
            return Err(format!(
                "the bucket width must be positive, not {}",
                self.bucket_width_nanos
            ));
        }
        Ok(())
    }

    /// A session builder with the contact points, consistency and datacenter preference.
    pub(super) fn session_builder(&self) -> SessionBuilder {
        let policy = DefaultPolicy::builder()
            .prefer_datacenter(self.datacenter.clone())
            .token_aware(true)
            .build();
        let profile = ExecutionProfile::builder()
            .consistency(self.consistency.driver())
            .serial_consistency(Some(self.consistency.serial()))
            .load_balancing_policy(policy)
            .build();
        SessionBuilder::new()
            .known_nodes(&self.nodes)
            .default_execution_profile_handle(profile.into_handle())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_names_round_trip() {
        for (name, level) in CqlConsistency::NAMES {
            assert_eq!(name.parse::<CqlConsistency>(), Ok(level));
            assert_eq!(level.to_string(), name);
        }
        assert_eq!("LOCAL-QUORUM".parse(), Ok(CqlConsistency::LocalQuorum));
        assert!("twice".parse::<CqlConsistency>().is_err());
    }

    #[test]
    fn config_is_checked() {
        assert!(CqlConfig::default().validate().is_ok());
        let bad_keyspace = CqlConfig {
            keyspace: "x; DROP".into(),
            ..CqlConfig::default()
        };
        assert!(bad_keyspace.validate().is_err());
        let bad_width = CqlConfig {
            bucket_width_nanos: 0,
            ..CqlConfig::default()
        };
        assert!(bad_width.validate().is_err());
    }
}
