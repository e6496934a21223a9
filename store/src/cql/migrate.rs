//! `chatoy migrate`: the schema files of `store/schema/`, applied in order.

use std::time::Duration;

use super::CqlConfig;
use crate::OpenError;

/// The schema files, applied in this order by [`migrate`]. The first creates the keyspace and
/// has `${keyspace}`, `${datacenter}` and `${replication_factor}` substituted; the others run
/// inside the keyspace.
const SCHEMA: &[(&str, &str)] = &[
    ("001_keyspace.cql", include_str!("../../schema/001_keyspace.cql")),
    ("002_users.cql", include_str!("../../schema/002_users.cql")),
    ("003_sessions.cql", include_str!("../../schema/003_sessions.cql")),
    ("004_rooms.cql", include_str!("../../schema/004_rooms.cql")),
    ("005_messages.cql", include_str!("../../schema/005_messages.cql")),
    (
        "006_id_blocks.cql",
        include_str!("../../schema/006_id_blocks.cql"),
    ),
    (
        "007_room_heads.cql",
        include_str!("../../schema/007_room_heads.cql"),
    ),
    (
        "008_fenced_sequencer.cql",
        include_str!("../../schema/008_fenced_sequencer.cql"),
    ),
];

/// Splits a schema file into statements: `--` comments dropped, `;` separated.
fn statements_of(file: &str) -> Vec<String> {
    let text: String = file
        .lines()
        .map(|line| line.split_once("--").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Creates the keyspace and applies every schema file in order. Every statement is
/// `IF NOT EXISTS`, so running it again is harmless; an existing keyspace keeps its replication
/// settings. Run it from one process at a time (a deploy step, `chatoy migrate`): Cassandra can
/// end up with conflicting table ids when two nodes create the same table concurrently.
pub async fn migrate(config: &CqlConfig) -> Result<(), OpenError> {
    config.validate().map_err(OpenError::Config)?;
    // Schema changes wait for schema agreement after each statement; poll for it often, and
    // skip refreshing this short-lived session's metadata after every change.
    let session = config
        .session_builder()
        .schema_agreement_interval(Duration::from_millis(20))
        .refresh_metadata_on_auto_schema_agreement(false)
        .build()
        .await
        .map_err(|err| OpenError::Connect {
            nodes: config.nodes.join(","),
            keyspace: None,
            source: Box::new(err),
        })?;
    for (index, (file, text)) in SCHEMA.iter().enumerate() {
        let text = text
            .replace("${keyspace}", &config.keyspace)
            .replace("${datacenter}", &config.datacenter)
            .replace("${replication_factor}", &config.replication_factor.to_string());
        for statement in statements_of(&text) {
            session
                .query_unpaged(statement, ())
                .await
                .map_err(|err| OpenError::Schema {
                    file,
                    source: Box::new(err),
                })?;
        }
        if index == 0 {
            session
                .use_keyspace(&config.keyspace, false)
                .await
                .map_err(|err| OpenError::UseKeyspace {
                    keyspace: config.keyspace.clone(),
                    source: Box::new(err),
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_files_split_into_statements() {
        let statements =
            statements_of("-- a; comment\nCREATE TABLE a (x int); -- trailing\n\nCREATE TABLE b (y int);\n");
        assert_eq!(
            statements,
            vec!["CREATE TABLE a (x int)", "CREATE TABLE b (y int)"]
        );
        for (file, text) in SCHEMA {
            assert!(!statements_of(text).is_empty(), "{file} has no statement");
            for statement in statements_of(text) {
                assert!(
                    statement.contains("IF NOT EXISTS"),
                    "{file}: not idempotent: {statement}"
                );
            }
        }
    }
}
