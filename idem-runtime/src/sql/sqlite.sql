-- The table of idem's SQLite store. `SqliteStore::migrate` runs this file; it is safe to run
-- many times. Times are milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS idem_records (
    scope        TEXT    NOT NULL,           -- the handler's scope
    business_key TEXT    NOT NULL,           -- the business key (sha256:… when long)
    completed    INTEGER NOT NULL,           -- 0: in progress, 1: completed
    owner        TEXT    NOT NULL,           -- the current holder's token
    fence        INTEGER NOT NULL,           -- rises on every claim and takeover
    lease_until  INTEGER NOT NULL,           -- an in-progress claim can be taken over after this
    expires_at   INTEGER NOT NULL,           -- the record can be purged after this
    fingerprint  BLOB,                       -- SHA-256 of the payload, if checked
    result       BLOB,                       -- the serialized result once completed
    PRIMARY KEY (scope, business_key)
);
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
