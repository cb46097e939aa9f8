-- MeshMQ store schema 1 (PostgreSQL). Applied inside one transaction, in the schema named by
-- SessionStore.Postgres.Schema (the search_path), by store/postgres.py. Never edit a released
-- migration: add the next NNN_*.sql.

-- One row per persistent session; the will is inlined (will_payload IS NULL: no will).
CREATE TABLE sessions (
    client_id    text PRIMARY KEY,
    expiry_s     bigint NOT NULL,
    online       boolean NOT NULL,
    node         text NOT NULL,
    epoch        bigint NOT NULL,
    updated_at   double precision NOT NULL,
    will_topic   text,
    will_payload bytea,
    will_qos     smallint,
    will_retain  boolean,
    will_props   bytea,
    will_delay_s bigint
);

-- A session's subscriptions, in the order the session record lists them (position).
CREATE TABLE subscriptions (
    client_id           text NOT NULL REFERENCES sessions (client_id) ON DELETE CASCADE,
    position            integer NOT NULL,
    key_filter          text NOT NULL,
    topic_filter        text NOT NULL,
    qos                 smallint NOT NULL,
    no_local            boolean NOT NULL,
    retain_as_published boolean NOT NULL,
    retain_handling     smallint NOT NULL,
    subscription_id     integer,
    share_group         text,
    PRIMARY KEY (client_id, position)
);

-- One row per message and subscriber. FIFO per subscriber is ORDER BY seq. The identity has no
-- CACHE on purpose: cached blocks are per connection, and a pool of connections would then hand
-- a later batch a smaller seq than an earlier one. No foreign key to sessions: an enqueue must
-- not pay a lookup per row, and DeleteSession deletes the rows itself.
CREATE TABLE queue (
    seq             bigint GENERATED ALWAYS AS IDENTITY,
    client_id       text NOT NULL,
    msg_id          bigint NOT NULL,
    qos             smallint NOT NULL,
    retain          boolean NOT NULL,
    sub_ids         integer[] NOT NULL,
    topic           text NOT NULL,
    payload         bytea NOT NULL,
    props           bytea,
    origin          text NOT NULL,
    expires_at      double precision,
    invisible_until double precision NOT NULL DEFAULT 0,  -- handed out until then (visibility timeout)
    PRIMARY KEY (client_id, seq)
);
CREATE INDEX queue_client_msg ON queue (client_id, msg_id);  -- Ack deletes by message id

CREATE TABLE retained (
    topic      text PRIMARY KEY,
    payload    bytea NOT NULL,
    qos        smallint NOT NULL,
    props      bytea,
    origin     text NOT NULL,
    expires_at double precision,
    updated_at double precision NOT NULL
);
