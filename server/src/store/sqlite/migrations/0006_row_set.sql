-- The row set (see store/integrity.rs, row_set_h): one sealed record of
-- the digest over every protected row, so a row put back, deleted or
-- added without the master key is detected even when its own MAC is good
-- (an old copy of a membership, grant, client or secrets row). Written in
-- the transaction of every change; computed once for the rows already
-- there in this migration's transaction, after the master key check.
CREATE TABLE row_set (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    sealed BLOB NOT NULL
);
