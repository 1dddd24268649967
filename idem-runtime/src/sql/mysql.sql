-- The table of idem's MySQL / MariaDB store. `MySqlStore::migrate` runs this file; it is safe
-- to run many times and from many processes at once. Times are milliseconds since the Unix
-- epoch, by the clock of the process that calls the store. Scope and key are VARBINARY so that
-- they compare byte for byte: a case-insensitive, accent-insensitive or space-padding collation
-- would make `A-1`, `a-1` and `a-1 ` one key. (Keys longer than 128 bytes are stored as
-- `sha256:` and 64 hex digits, so 255 bytes always fit.)
CREATE TABLE IF NOT EXISTS idem_records (
    scope        VARBINARY(255) NOT NULL,    -- the handler's scope
    business_key VARBINARY(255) NOT NULL,    -- the business key (sha256:… when long)
    completed    TINYINT        NOT NULL,    -- 0: in progress, 1: completed
    owner        VARBINARY(64)  NOT NULL,    -- the current holder's token
    fence        BIGINT         NOT NULL,    -- rises on every claim and takeover
    lease_until  BIGINT         NOT NULL,    -- an in-progress claim can be taken over after this
    expires_at   BIGINT         NOT NULL,    -- the record can be purged after this
    fingerprint  VARBINARY(32)  NULL,        -- SHA-256 of the payload, if checked
    result       LONGBLOB       NULL,        -- the serialized result once completed
    PRIMARY KEY (scope, business_key),
    KEY idem_records_expires_at (expires_at)
) ENGINE = InnoDB;
