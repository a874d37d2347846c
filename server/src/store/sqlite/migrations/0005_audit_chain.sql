-- The audit hash chain (issue 12): each entry's MAC under the audit key of
-- the key epoch that made it, over the entry and the previous entry's MAC.
-- Entries made before this migration are chained once, at the first open
-- after it (see sqlite/audit.rs: adopt).
ALTER TABLE audit ADD COLUMN epoch INTEGER;
ALTER TABLE audit ADD COLUMN chain BLOB;
-- The head of the chain: the last chained entry's id and MAC, with a MAC of
-- its own, updated in the transaction of every audit insert. A deleted
-- tail no longer reaches the head.
CREATE TABLE audit_head (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    last_id INTEGER NOT NULL,
    chain   BLOB NOT NULL,
    epoch   INTEGER NOT NULL,
    mac     BLOB NOT NULL
);
