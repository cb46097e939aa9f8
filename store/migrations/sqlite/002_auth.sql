-- MeshMQ store schema 2 (SQLite): users and ACL rules (broker/ACCESS.md). Applied inside one
-- transaction by store/sqlite.py. Never edit a released migration: add the next NNN_*.sql.
-- Booleans are 0/1.

-- password_hash is the self-describing scrypt string of store/passwords.py, never a password.
CREATE TABLE users (
    username      TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    admin         BOOLEAN NOT NULL,
    updated_at    TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Checked in id order (store rules before the config file's). user: a username, '$anonymous'
-- or '*'; no foreign key to users: a rule may name a user that does not exist (yet), and the
-- store deletes a user's rules itself when it deletes the user. AUTOINCREMENT: an id is never
-- reused, so a deleted rule's id never comes back as another rule.
CREATE TABLE acl_rules (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL,
    topic    TEXT NOT NULL,
    access   TEXT NOT NULL CHECK (access IN ('PUB', 'SUB', 'BOTH', 'DENY'))
);
CREATE INDEX acl_rules_username ON acl_rules (username);

-- One row, bumped in the transaction of every change of users or acl_rules.
CREATE TABLE auth_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO auth_version (id, version) VALUES (1, 0);
