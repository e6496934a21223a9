-- Chatoy's SQLite schema, first file: applied once (user_version records it). Its statements
-- are idempotent, since a database created before the record re-runs it once.

CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY,
    username      TEXT    NOT NULL UNIQUE COLLATE NOCASE,
    nickname      TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    slogan        TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    registered    INTEGER NOT NULL
);

-- Tokens are never stored: only their SHA-256.
CREATE TABLE IF NOT EXISTS sessions (
    token_hash BLOB    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id),
    generated  INTEGER NOT NULL,
    expires    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS rooms (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    description TEXT    NOT NULL,
    created     INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS room_members (
    room_id INTEGER NOT NULL REFERENCES rooms (id),
    user_id INTEGER NOT NULL REFERENCES users (id),
    joined  INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS room_members_by_user ON room_members (user_id, joined);

-- `sent` is nanoseconds since the epoch, strictly increasing per room; (room_id, uuid) makes
-- retries idempotent.
CREATE TABLE IF NOT EXISTS messages (
    room_id  INTEGER NOT NULL,
    sent     INTEGER NOT NULL,
    uuid     BLOB    NOT NULL,
    sender   INTEGER NOT NULL,
    content  TEXT    NOT NULL,
    modified INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, sent)
) WITHOUT ROWID;

CREATE UNIQUE INDEX IF NOT EXISTS message_ids ON messages (room_id, uuid);

-- Who may write each partition's rooms: a claim raises the epoch, and every message write checks
-- the epoch it was sequenced under inside its transaction, so a deposed writer's write fails.
CREATE TABLE IF NOT EXISTS partition_owners (
    partition INTEGER PRIMARY KEY,
    epoch     INTEGER NOT NULL,
    owner     TEXT    NOT NULL,
    claimed   INTEGER NOT NULL
);
