-- MeshMQ store schema 1 (SQLite). Applied inside one transaction by store/sqlite.py. Never edit
-- a released migration: add the next NNN_*.sql. Booleans are 0/1; sub_ids is a comma-separated
-- list of integers ('' for none).

-- One row per persistent session; the will is inlined (will_payload IS NULL: no will).
CREATE TABLE sessions (
    client_id    TEXT PRIMARY KEY,
    expiry_s     INTEGER NOT NULL,
    online       INTEGER NOT NULL,
    node         TEXT NOT NULL,
    epoch        INTEGER NOT NULL,
    updated_at   REAL NOT NULL,
    will_topic   TEXT,
    will_payload BLOB,
    will_qos     INTEGER,
    will_retain  INTEGER,
    will_props   BLOB,
    will_delay_s INTEGER
);

-- A session's subscriptions, in the order the session record lists them (position).
CREATE TABLE subscriptions (
    client_id           TEXT NOT NULL REFERENCES sessions (client_id) ON DELETE CASCADE,
    position            INTEGER NOT NULL,
    key_filter          TEXT NOT NULL,
    topic_filter        TEXT NOT NULL,
    qos                 INTEGER NOT NULL,
    no_local            INTEGER NOT NULL,
    retain_as_published INTEGER NOT NULL,
    retain_handling     INTEGER NOT NULL,
    subscription_id     INTEGER,
    share_group         TEXT,
    PRIMARY KEY (client_id, position)
);

-- One row per message and subscriber. FIFO per subscriber is ORDER BY seq; AUTOINCREMENT so
-- that a seq is never reused, even after the newest rows were deleted.
CREATE TABLE queue (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id       TEXT NOT NULL,
    msg_id          INTEGER NOT NULL,
    qos             INTEGER NOT NULL,
    retain          INTEGER NOT NULL,
    sub_ids         TEXT NOT NULL,
    topic           TEXT NOT NULL,
    payload         BLOB NOT NULL,
    props           BLOB,
    origin          TEXT NOT NULL,
    expires_at      REAL,
    invisible_until REAL NOT NULL DEFAULT 0  -- handed out until then (visibility timeout)
);
CREATE INDEX queue_client_seq ON queue (client_id, seq);
CREATE INDEX queue_client_msg ON queue (client_id, msg_id);  -- Ack deletes by message id

CREATE TABLE retained (
    topic      TEXT PRIMARY KEY,
    payload    BLOB NOT NULL,
    qos        INTEGER NOT NULL,
    props      BLOB,
    origin     TEXT NOT NULL,
    expires_at REAL,
    updated_at REAL NOT NULL
);
