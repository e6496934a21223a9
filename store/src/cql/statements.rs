//! Every CQL statement the backend runs, prepared once when it connects.
//!
//! The statements name tables without a keyspace: the session is bound to the configured one.
//! Reads and plain writes (upserts) are marked idempotent, so that the driver retries them on
//! another node when a node's connection breaks under them (a node that dies); lightweight
//! transactions are not.

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};

use super::exec::CqlResult;

/// Rows per page for reads that may be long (bucket lists, a user's rooms).
const PAGE_SIZE: i32 = 1000;
/// Buckets per page when walking a room's buckets: usually only the newest few are needed.
const BUCKET_PAGE_SIZE: i32 = 32;

/// The prepared statements, by purpose.
pub(crate) struct Statements {
    pub(crate) ping: PreparedStatement,

    pub(crate) user_insert: PreparedStatement,
    pub(crate) user_delete: PreparedStatement,
    pub(crate) user_read: PreparedStatement,
    pub(crate) name_claim: PreparedStatement,
    pub(crate) name_read: PreparedStatement,

    pub(crate) session_insert: PreparedStatement,
    pub(crate) session_read: PreparedStatement,
    pub(crate) session_delete: PreparedStatement,

    pub(crate) room_insert: PreparedStatement,
    pub(crate) room_read: PreparedStatement,
    pub(crate) member_insert: PreparedStatement,
    pub(crate) member_read: PreparedStatement,
    pub(crate) user_room_insert: PreparedStatement,
    pub(crate) user_rooms_read: PreparedStatement,
    pub(crate) user_room_count: PreparedStatement,

    pub(crate) message_insert: PreparedStatement,
    pub(crate) messages_between: PreparedStatement,
    pub(crate) head_read: PreparedStatement,
    pub(crate) messages_after_delete: PreparedStatement,
    pub(crate) message_at: PreparedStatement,
    pub(crate) uuid_insert: PreparedStatement,
    pub(crate) uuids_read: PreparedStatement,
    pub(crate) owner_read: PreparedStatement,
    pub(crate) owner_serial_read: PreparedStatement,
    pub(crate) owner_create: PreparedStatement,
    pub(crate) owner_take: PreparedStatement,
    pub(crate) sequence_read: PreparedStatement,
    pub(crate) sequence_epoch_write: PreparedStatement,
    pub(crate) sequence_write: PreparedStatement,
    pub(crate) messages_before: PreparedStatement,
    pub(crate) newest_sent: PreparedStatement,
    pub(crate) bucket_insert: PreparedStatement,
    pub(crate) buckets_at_most: PreparedStatement,
    pub(crate) buckets_between: PreparedStatement,
    pub(crate) sents_between: PreparedStatement,
    pub(crate) messages_after_ascending: PreparedStatement,

    pub(crate) id_block_create: PreparedStatement,
    pub(crate) id_block_take: PreparedStatement,
    pub(crate) id_block_read: PreparedStatement,
}

/// The columns of a message row, in the order `message_from_row` reads them.
const MESSAGE_COLUMNS: &str = "sent, uuid, sender, content, modified";

/// How a statement is run.
#[derive(Clone, Copy)]
enum Kind {
    /// A read at the session's consistency.
    Read,
    /// A read that must see the outcome of lightweight transactions (a serial read).
    SerialRead(Consistency),
    /// An idempotent upsert or delete.
    Write,
    /// A lightweight transaction with this serial consistency.
    Lwt(SerialConsistency),
}

impl Statements {
    /// Prepares everything. `local_serial` is the serial consistency for per-room and per-session
    /// transactions; claims that must be unique cluster-wide (usernames, id blocks) always use
    /// `SERIAL`, so that two datacenters can never both win them.
    pub(crate) async fn prepare(session: &Session, local_serial: SerialConsistency) -> CqlResult<Self> {
        let global = SerialConsistency::Serial;
        let prepare = |cql: String, kind: Kind| async move {
            let mut statement = session.prepare(cql).await?;
            match kind {
                Kind::Read => {
                    statement.set_page_size(PAGE_SIZE);
                    statement.set_is_idempotent(true);
                }
                Kind::SerialRead(consistency) => {
                    statement.set_consistency(consistency);
                    statement.set_is_idempotent(true);
                }
                Kind::Write => statement.set_is_idempotent(true),
                Kind::Lwt(serial) => statement.set_serial_consistency(Some(serial)),
            }
            CqlResult::Ok(statement)
        };
        let s = |text: &str| text.to_owned();
        let mut buckets_at_most = prepare(
            s("SELECT bucket FROM message_buckets WHERE room_id = ? AND bucket <= ?"),
            Kind::Read,
        )
        .await?;
        buckets_at_most.set_page_size(BUCKET_PAGE_SIZE);
        let mut buckets_between = prepare(
            s(
                "SELECT bucket FROM message_buckets WHERE room_id = ? AND bucket >= ? AND bucket <= ?
               ORDER BY bucket ASC",
            ),
            Kind::Read,
        )
        .await?;
        buckets_between.set_page_size(BUCKET_PAGE_SIZE);
        Ok(Statements {
            ping: prepare(
                s("SELECT release_version FROM system.local WHERE key = 'local'"),
                Kind::Read,
            )
            .await?,

            user_insert: prepare(
                s(
                    "INSERT INTO users (id, username, nickname, password_hash, slogan, status, registered)
                   VALUES (?, ?, ?, ?, ?, ?, ?)",
                ),
                Kind::Write,
            )
            .await?,
            user_delete: prepare(s("DELETE FROM users WHERE id = ?"), Kind::Write).await?,
            user_read: prepare(
                s(
                    "SELECT id, username, nickname, slogan, status, registered, password_hash
                   FROM users WHERE id = ?",
                ),
                Kind::Read,
            )
            .await?,
            name_claim: prepare(
                s("INSERT INTO users_by_name (username, id) VALUES (?, ?) IF NOT EXISTS"),
                Kind::Lwt(global),
            )
            .await?,
            name_read: prepare(s("SELECT id FROM users_by_name WHERE username = ?"), Kind::Read).await?,

            session_insert: prepare(
                s(
                    "INSERT INTO sessions (token_hash, user_id, generated, expires) VALUES (?, ?, ?, ?)
                   USING TTL ?",
                ),
                Kind::Write,
            )
            .await?,
            session_read: prepare(
                s("SELECT user_id, expires FROM sessions WHERE token_hash = ?"),
                Kind::Read,
            )
            .await?,
            session_delete: prepare(
                s("DELETE FROM sessions WHERE token_hash = ? IF EXISTS"),
                Kind::Lwt(local_serial),
            )
            .await?,

            room_insert: prepare(
                s("INSERT INTO rooms (id, name, description, created) VALUES (?, ?, ?, ?)"),
                Kind::Write,
            )
            .await?,
            room_read: prepare(
                s("SELECT id, name, description, created FROM rooms WHERE id = ?"),
                Kind::Read,
            )
            .await?,
            member_insert: prepare(
                s("INSERT INTO room_members (room_id, user_id, joined) VALUES (?, ?, ?)"),
                Kind::Write,
            )
            .await?,
            member_read: prepare(
                s("SELECT joined FROM room_members WHERE room_id = ? AND user_id = ?"),
                Kind::Read,
            )
            .await?,
            user_room_insert: prepare(
                s("INSERT INTO user_rooms (user_id, room_id, joined) VALUES (?, ?, ?)"),
                Kind::Write,
            )
            .await?,
            user_rooms_read: prepare(
                s("SELECT room_id, joined FROM user_rooms WHERE user_id = ?"),
                Kind::Read,
            )
            .await?,

            user_room_count: prepare(
                s("SELECT count(*) FROM user_rooms WHERE user_id = ?"),
                Kind::Read,
            )
            .await?,
            message_insert: prepare(
                s(
                    "INSERT INTO messages (room_id, bucket, sent, uuid, sender, content, modified)
                   VALUES (?, ?, ?, ?, ?, ?, false) USING TIMESTAMP ?",
                ),
                Kind::Write,
            )
            .await?,
            messages_between: prepare(
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages
                     WHERE room_id = ? AND bucket = ? AND sent > ? AND sent <= ? LIMIT ?"
                ),
                Kind::Read,
            )
            .await?,
            head_read: prepare(s("SELECT sent FROM room_heads WHERE room_id = ?"), Kind::Read).await?,
            messages_after_delete: prepare(
                s("DELETE FROM messages USING TIMESTAMP ? WHERE room_id = ? AND bucket = ? AND sent > ?"),
                Kind::Write,
            )
            .await?,
            uuid_insert: prepare(
                s("INSERT INTO message_uuids (room_id, uuid, sent) VALUES (?, ?, ?) USING TIMESTAMP ?"),
                Kind::Write,
            )
            .await?,
            uuids_read: prepare(
                s("SELECT uuid, sent FROM message_uuids WHERE room_id = ? AND uuid IN ?"),
                Kind::Read,
            )
            .await?,
            owner_read: prepare(s("SELECT epoch FROM partition_owners WHERE partition = ?"), Kind::Read).await?,
            owner_serial_read: prepare(
                s("SELECT epoch FROM partition_owners WHERE partition = ?"),
                Kind::SerialRead(Consistency::Serial),
            )
            .await?,
            owner_create: prepare(
                s("INSERT INTO partition_owners (partition, epoch, owner, claimed) VALUES (?, 1, ?, ?) IF NOT EXISTS"),
                Kind::Lwt(global),
            )
            .await?,
            owner_take: prepare(
                s("UPDATE partition_owners SET epoch = ?, owner = ?, claimed = ? WHERE partition = ? IF epoch = ?"),
                Kind::Lwt(global),
            )
            .await?,
            sequence_read: prepare(
                s("SELECT sent, epoch, WRITETIME(sent), WRITETIME(epoch) FROM room_sequences WHERE room_id = ?"),
                Kind::Read,
            )
            .await?,
            sequence_epoch_write: prepare(
                s("UPDATE room_sequences USING TIMESTAMP ? SET epoch = ? WHERE room_id = ?"),
                Kind::Write,
            )
            .await?,
            sequence_write: prepare(
                s("UPDATE room_sequences USING TIMESTAMP ? SET sent = ?, epoch = ? WHERE room_id = ?"),
                Kind::Write,
            )
            .await?,
            message_at: prepare(
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ? AND bucket = ? AND sent = ?"
                ),
                Kind::Read,
            )
            .await?,
            messages_before: prepare(
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages
                     WHERE room_id = ? AND bucket = ? AND sent < ? LIMIT ?"
                ),
                Kind::Read,
            )
            .await?,
            newest_sent: prepare(
                s("SELECT sent FROM messages WHERE room_id = ? AND bucket = ? LIMIT 1"),
                Kind::Read,
            )
            .await?,
            bucket_insert: prepare(
                s("INSERT INTO message_buckets (room_id, bucket) VALUES (?, ?)"),
                Kind::Write,
            )
            .await?,
            buckets_at_most,
            buckets_between,
            sents_between: prepare(
                s("SELECT sent FROM messages WHERE room_id = ? AND bucket = ? AND sent > ? AND sent <= ? LIMIT ?"),
                Kind::Read,
            )
            .await?,
            messages_after_ascending: prepare(
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages
                     WHERE room_id = ? AND bucket = ? AND sent > ? AND sent <= ? ORDER BY sent ASC LIMIT ?"
                ),
                Kind::Read,
            )
            .await?,

            id_block_create: prepare(
                s("INSERT INTO id_blocks (name, next) VALUES (?, ?) IF NOT EXISTS"),
                Kind::Lwt(global),
            )
            .await?,
            id_block_take: prepare(
                s("UPDATE id_blocks SET next = ? WHERE name = ? IF next = ?"),
                Kind::Lwt(global),
            )
            .await?,
            id_block_read: prepare(
                s("SELECT next FROM id_blocks WHERE name = ?"),
                Kind::SerialRead(Consistency::Serial),
            )
            .await?,
        })
    }
}
