-- MeshMQ store schema 2 (PostgreSQL): users and ACL rules (broker/ACCESS.md). Applied inside one
-- transaction by store/postgres.py. Never edit a released migration: add the next NNN_*.sql.

-- password_hash is the self-describing scrypt string of store/passwords.py, never a password.
CREATE TABLE users (
    username      text PRIMARY KEY,
    password_hash text NOT NULL,
    admin         boolean NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Checked in id order (store rules before the config file's). user: a username, '$anonymous'
-- or '*'; no foreign key to users: a rule may name a user that does not exist (yet), and the
-- store deletes a user's rules itself when it deletes the user.
CREATE TABLE acl_rules (
    id       bigserial PRIMARY KEY,
    username text NOT NULL,
    topic    text NOT NULL,
    access   text NOT NULL CHECK (access IN ('PUB', 'SUB', 'BOTH', 'DENY'))
);
CREATE INDEX acl_rules_username ON acl_rules (username);

-- One row, bumped in the transaction of every change of users or acl_rules: the store process
-- of each node polls it (cluster mode) and broadcasts the table when it grew.
CREATE TABLE auth_version (
    id      integer PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL
);
INSERT INTO auth_version (id, version) VALUES (1, 0);
