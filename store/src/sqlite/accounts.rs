//! Accounts and rooms: users, sessions (by token hash), rooms and their members. Each function
//! is the [`Store`](crate::Store) method of the same name.

use chatoy_protocol::Timestamp;
use rusqlite::{params, OptionalExtension, Row};

use super::{unavailable, SqliteStore};
use crate::{Room, RoomDraft, Session, StoreError, StoreResult, User, UserWithHash};

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: row.get::<_, i64>("id")? as u64,
        username: row.get("username")?,
        nickname: row.get("nickname")?,
        slogan: row.get("slogan")?,
        status: row.get("status")?,
        registered: Timestamp(row.get("registered")?),
    })
}

fn room_from_row(row: &Row<'_>) -> rusqlite::Result<Room> {
    Ok(Room {
        id: row.get::<_, i64>("id")? as u64,
        name: row.get("name")?,
        description: row.get("description")?,
        created: Timestamp(row.get("created")?),
    })
}

pub(super) async fn create_user(
    store: &SqliteStore,
    username: &str,
    password_hash: &str,
    now: Timestamp,
) -> StoreResult<User> {
    let (username, hash) = (username.to_owned(), password_hash.to_owned());
    store
        .write(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO users (username, nickname, password_hash, slogan, status, registered)
                     VALUES (?1, ?1, ?2, '', '', ?3) ON CONFLICT (username) DO NOTHING",
                )
                .and_then(|mut stmt| stmt.execute(params![username, hash, now.0]))
                .map_err(unavailable)?;
            if inserted == 0 {
                return Err(StoreError::Conflict);
            }
            Ok(User {
                id: conn.last_insert_rowid() as u64,
                nickname: username.clone(),
                username,
                slogan: String::new(),
                status: String::new(),
                registered: now,
            })
        })
        .await
}

pub(super) async fn user_by_name(store: &SqliteStore, username: &str) -> StoreResult<Option<UserWithHash>> {
    let username = username.to_owned();
    store
        .read(move |conn| {
            conn.prepare_cached("SELECT * FROM users WHERE username = ?1")?
                .query_row([username], |row| {
                    Ok(UserWithHash {
                        user: user_from_row(row)?,
                        password_hash: row.get("password_hash")?,
                    })
                })
                .optional()
        })
        .await
}

pub(super) async fn user(store: &SqliteStore, id: u64) -> StoreResult<Option<User>> {
    store
        .read(move |conn| {
            conn.prepare_cached("SELECT * FROM users WHERE id = ?1")?
                .query_row([id as i64], user_from_row)
                .optional()
        })
        .await
}

pub(super) async fn create_session(
    store: &SqliteStore,
    token_hash: &[u8; 32],
    session: Session,
) -> StoreResult<()> {
    let hash = *token_hash;
    store
        .write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO sessions (token_hash, user_id, generated, expires) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    &hash[..],
                    session.user_id as i64,
                    Timestamp::now().0,
                    session.expires.0
                ])
            })
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
}

pub(super) async fn session(
    store: &SqliteStore,
    token_hash: &[u8; 32],
    now: Timestamp,
) -> StoreResult<Option<Session>> {
    let hash = *token_hash;
    store
        .read(move |conn| {
            conn.prepare_cached(
                "SELECT user_id, expires FROM sessions WHERE token_hash = ?1 AND expires > ?2",
            )?
            .query_row(params![&hash[..], now.0], |row| {
                Ok(Session {
                    user_id: row.get::<_, i64>(0)? as u64,
                    expires: Timestamp(row.get(1)?),
                })
            })
            .optional()
        })
        .await
}

pub(super) async fn revoke_session(store: &SqliteStore, token_hash: &[u8; 32]) -> StoreResult<bool> {
    let hash = *token_hash;
    store
        .write(move |conn| {
            conn.prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")
                .and_then(|mut stmt| stmt.execute([&hash[..]]))
                .map(|deleted| deleted > 0)
                .map_err(unavailable)
        })
        .await
}

pub(super) async fn create_room(
    store: &SqliteStore,
    draft: RoomDraft<'_>,
    now: Timestamp,
) -> StoreResult<Room> {
    let (name, description, creator) = (draft.name.to_owned(), draft.description.to_owned(), draft.creator);
    store
        .write(move |conn| {
            let created = (|| {
                conn.prepare_cached("INSERT INTO rooms (name, description, created) VALUES (?1, ?2, ?3)")?
                    .execute(params![name, description, now.0])?;
                let id = conn.last_insert_rowid();
                conn.prepare_cached(
                    "INSERT INTO room_members (room_id, user_id, joined) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![id, creator as i64, now.0])?;
                Ok(id as u64)
            })();
            let id = created.map_err(unavailable)?;
            Ok(Room {
                id,
                name,
                description,
                created: now,
            })
        })
        .await
}

pub(super) async fn room(store: &SqliteStore, id: u64) -> StoreResult<Option<Room>> {
    store
        .read(move |conn| {
            conn.prepare_cached("SELECT * FROM rooms WHERE id = ?1")?
                .query_row([id as i64], room_from_row)
                .optional()
        })
        .await
}

pub(super) async fn join_room(store: &SqliteStore, room: u64, user: u64, now: Timestamp) -> StoreResult<()> {
    store
        .write(move |conn| {
            let exists = conn
                .prepare_cached("SELECT 1 FROM rooms WHERE id = ?1")
                .and_then(|mut stmt| stmt.exists([room as i64]))
                .map_err(unavailable)?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            conn.prepare_cached(
                "INSERT INTO room_members (room_id, user_id, joined) VALUES (?1, ?2, ?3)
                 ON CONFLICT (room_id, user_id) DO NOTHING",
            )
            .and_then(|mut stmt| stmt.execute(params![room as i64, user as i64, now.0]))
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
}

pub(super) async fn is_member(store: &SqliteStore, room: u64, user: u64) -> StoreResult<bool> {
    store
        .read(move |conn| {
            conn.prepare_cached("SELECT 1 FROM room_members WHERE room_id = ?1 AND user_id = ?2")?
                .exists([room as i64, user as i64])
        })
        .await
}

pub(super) async fn user_rooms(store: &SqliteStore, user: u64) -> StoreResult<Vec<Room>> {
    store
        .read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT r.* FROM room_members m JOIN rooms r ON r.id = m.room_id
                 WHERE m.user_id = ?1 ORDER BY m.joined, m.room_id",
            )?;
            let rooms = stmt.query_map([user as i64], room_from_row)?;
            rooms.collect()
        })
        .await
}

pub(super) async fn room_count(store: &SqliteStore, user: u64) -> StoreResult<usize> {
    store
        .read(move |conn| {
            conn.prepare_cached("SELECT count(*) FROM room_members WHERE user_id = ?1")?
                .query_row([user as i64], |row| row.get::<_, i64>(0))
                .map(|count| count as usize)
        })
        .await
}
