-- Authenticated rows (see store/integrity.rs): every row that decides
-- access or what is served carries a MAC under the row key derived from
-- the master key. Rows of an upgraded database are MAC'd once, in this
-- migration's transaction, after the master key check passed (the
-- adoption); NULL is never accepted afterwards.
ALTER TABLE clients ADD COLUMN mac BLOB;
ALTER TABLE client_certs ADD COLUMN mac BLOB;
ALTER TABLE groups ADD COLUMN mac BLOB;
ALTER TABLE group_clients ADD COLUMN mac BLOB;
ALTER TABLE group_secrets ADD COLUMN mac BLOB;
ALTER TABLE secrets ADD COLUMN mac BLOB;
ALTER TABLE meta ADD COLUMN mac BLOB;
