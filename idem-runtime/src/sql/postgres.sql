-- The table of idem's PostgreSQL store. `PostgresStore::migrate` runs this file (under an
-- advisory lock, so that many processes may run it at once); it is safe to run many times.
-- Times are milliseconds since the Unix epoch, by the clock of the process that calls the store.
CREATE TABLE IF NOT EXISTS idem_records (
    scope        TEXT     NOT NULL,          -- the handler's scope
    business_key TEXT     NOT NULL,          -- the business key (sha256:… when long)
    completed    BOOLEAN  NOT NULL,          -- false: in progress, true: completed
    owner        TEXT     NOT NULL,          -- the current holder's token
    fence        BIGINT   NOT NULL,          -- rises on every claim and takeover
    lease_until  BIGINT   NOT NULL,          -- an in-progress claim can be taken over after this
    expires_at   BIGINT   NOT NULL,          -- the record can be purged after this
    fingerprint  BYTEA,                      -- SHA-256 of the payload, if checked
    result       BYTEA,                      -- the serialized result once completed
    PRIMARY KEY (scope, business_key)
);
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
