//! `chatoy migrate`: the schema files of `store/schema/`, applied in order.

use std::collections::HashSet;
use std::time::Duration;

use scylla::client::session::Session;

use super::CqlConfig;
use crate::{BoxError, OpenError};

/// The schema files, applied in this order by [`migrate`], each once. Add a file at the end;
/// never edit or reorder one that was released (a keyspace that recorded it will not run it
/// again). The first creates the keyspace and
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

/// The files of [`SCHEMA`] that existed before applied files were recorded. Every statement of
/// them is idempotent: a keyspace migrated before the record existed runs each of them once more
/// to seed the record.
#[cfg(test)]
const BEFORE_RECORD: usize = 8;

/// The record of applied files, inside the keyspace.
const RECORD_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS schema_migrations (file text PRIMARY KEY, applied timestamp)";

/// Splits a schema file into statements at the `;` that end them. `--` and `//` comments run to
/// the end of the line and `/* */` comments to their end; both are dropped. A `;` inside a
/// quoted string or name ('...', "...", with doubled quotes as escapes) or a `$$...$$` string
/// is text, not an end.
fn statements_of(file: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = file.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek().copied()) {
            ('-', Some('-')) | ('/', Some('/')) => {
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        current.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut previous = ' ';
                for skipped in chars.by_ref() {
                    if previous == '*' && skipped == '/' {
                        break;
                    }
                    previous = skipped;
                }
                current.push(' ');
            }
            ('\'' | '"', _) => {
                // A doubled quote closes the string and opens it again: copied as it is.
                current.push(c);
                for quoted in chars.by_ref() {
                    current.push(quoted);
                    if quoted == c {
                        break;
                    }
                }
            }
            ('$', Some('$')) => {
                chars.next();
                current.push_str("$$");
                let mut previous = ' ';
                for quoted in chars.by_ref() {
                    current.push(quoted);
                    if previous == '$' && quoted == '$' {
                        break;
                    }
                    previous = quoted;
                }
            }
            (';', _) => {
                let statement = current.trim();
                if !statement.is_empty() {
                    statements.push(statement.to_owned());
                }
                current.clear();
            }
            _ => current.push(c),
        }
    }
    let statement = current.trim();
    if !statement.is_empty() {
        statements.push(statement.to_owned());
    }
    statements
}

/// Creates the keyspace and applies the schema files in order, each once: the keyspace's
/// `schema_migrations` table records the files applied. The first file (the keyspace itself,
/// `IF NOT EXISTS`) runs every time, since the record lives inside it; an existing keyspace keeps
/// its replication settings. A keyspace migrated before the record existed has an empty record
/// and re-runs the files of then once, which their `IF NOT EXISTS` makes harmless. Run it from
/// one process at a time (a deploy step, `chatoy migrate`): Cassandra can end up with
/// conflicting table ids when two nodes create the same table concurrently.
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
    let (keyspace_file, keyspace_text) = SCHEMA[0];
    apply(&session, keyspace_file, &substitute(keyspace_text, config)).await?;
    session
        .use_keyspace(&config.keyspace, false)
        .await
        .map_err(|err| OpenError::UseKeyspace {
            keyspace: config.keyspace.clone(),
            source: Box::new(err),
        })?;
    let applied = applied_files(&session).await.map_err(OpenError::Record)?;
    for &(file, text) in SCHEMA {
        if applied.contains(file) {
            continue;
        }
        if file != keyspace_file {
            apply(&session, file, &substitute(text, config)).await?;
        }
        session
            .query_unpaged(
                "INSERT INTO schema_migrations (file, applied) VALUES (?, toTimestamp(now()))",
                (file,),
            )
            .await
            .map_err(|err| OpenError::Record(Box::new(err)))?;
    }
    Ok(())
}

/// A schema file's text with the keyspace's settings substituted.
fn substitute(text: &str, config: &CqlConfig) -> String {
    text.replace("${keyspace}", &config.keyspace)
        .replace("${datacenter}", &config.datacenter)
        .replace("${replication_factor}", &config.replication_factor.to_string())
}

/// Runs every statement of one schema file.
async fn apply(session: &Session, file: &'static str, text: &str) -> Result<(), OpenError> {
    for statement in statements_of(text) {
        session
            .query_unpaged(statement, ())
            .await
            .map_err(|err| OpenError::Schema {
                file,
                source: Box::new(err),
            })?;
    }
    Ok(())
}

/// The files recorded as applied (creating the record if it is missing).
async fn applied_files(session: &Session) -> Result<HashSet<String>, BoxError> {
    session.query_unpaged(RECORD_TABLE, ()).await?;
    let rows = session
        .query_unpaged("SELECT file FROM schema_migrations", ())
        .await?
        .into_rows_result()?;
    let mut applied = HashSet::new();
    for row in rows.rows::<(String,)>()? {
        applied.insert(row?.0);
    }
    Ok(applied)
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
        }
        for (file, text) in &SCHEMA[..BEFORE_RECORD] {
            for statement in statements_of(text) {
                assert!(
                    statement.contains("IF NOT EXISTS"),
                    "{file}: not idempotent, but keyspaces without a record re-run it: {statement}"
                );
            }
        }
    }

    #[test]
    fn a_semicolon_in_a_string_or_comment_does_not_end_a_statement() {
        let text = "INSERT INTO t (a) VALUES ('x; -- y''s; z'); /* one; two */ \
                    // three; four\n\
                    CREATE FUNCTION f() RETURNS text LANGUAGE java AS $$ return \"a;b\"; $$; \
                    SELECT \"odd;name\" FROM t";
        assert_eq!(
            statements_of(text),
            vec![
                "INSERT INTO t (a) VALUES ('x; -- y''s; z')",
                "CREATE FUNCTION f() RETURNS text LANGUAGE java AS $$ return \"a;b\"; $$",
                "SELECT \"odd;name\" FROM t",
            ]
        );
    }
}
