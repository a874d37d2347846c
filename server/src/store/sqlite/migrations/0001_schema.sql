CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
-- AUTOINCREMENT: a deleted secret's id is never reused, because the id is
-- part of every ciphertext's associated data.
CREATE TABLE secrets (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT NOT NULL UNIQUE,
    description     TEXT NOT NULL DEFAULT '',
    labels          TEXT NOT NULL DEFAULT '{}',
    mode            INTEGER NOT NULL DEFAULT 0,
    owner           INTEGER,
    grp             INTEGER,
    expires_at      INTEGER,
    current_version INTEGER NOT NULL,
    version_count   INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE TABLE secret_versions (
    secret_id   INTEGER NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    wrapped_key BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    size        INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    PRIMARY KEY (secret_id, version)
);
CREATE TABLE clients (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    admin      INTEGER NOT NULL,
    enabled    INTEGER NOT NULL DEFAULT 1,
    pinned     INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE client_certs (
    client_id INTEGER NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
    serial    TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    issued_at INTEGER NOT NULL,
    PRIMARY KEY (client_id, serial)
);
CREATE TABLE groups (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);
CREATE TABLE group_clients (
    group_id  INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    client_id INTEGER NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, client_id)
);
CREATE INDEX group_clients_by_client ON group_clients(client_id);
CREATE TABLE group_secrets (
    group_id  INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    secret_id INTEGER NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, secret_id)
);
CREATE INDEX group_secrets_by_secret ON group_secrets(secret_id);
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    secret  TEXT,
    client  TEXT,
    grp     TEXT,
    version INTEGER,
    allowed INTEGER NOT NULL,
    detail  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_by_time ON audit(at_ms);
CREATE INDEX audit_by_secret ON audit(secret, at_ms);
CREATE INDEX audit_by_actor ON audit(actor, at_ms);
CREATE INDEX audit_by_client ON audit(client, at_ms);
