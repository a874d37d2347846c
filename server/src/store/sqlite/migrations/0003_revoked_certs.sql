-- Serials of built-in-CA certificates whose client was removed: refused
-- forever, whatever client of that name exists later.
CREATE TABLE revoked_certs (
    serial     TEXT PRIMARY KEY,
    client     TEXT NOT NULL,
    revoked_at INTEGER NOT NULL
);
