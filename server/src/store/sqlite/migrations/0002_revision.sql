-- A server-wide change counter, bumped in the same transaction as every
-- change, so Watch events can be ordered across restarts.
CREATE TABLE revision (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO revision (id, value) VALUES (1, 0);
