//! Schema migrations, one per engine, applied in order at start and recorded in
//! `schema_migrations`. A migration, once released, is never edited: add a new one.

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// SHA-256 of nothing in particular: the `prev_hash` of the first audit entry.
pub const AUDIT_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "organizations, users, tokens, sessions, audit log",
        sqlite: r#"
CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    last_login_at INTEGER
);
CREATE INDEX users_org_created ON users (org_id, created_at, id);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    secret_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    last_used_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX api_tokens_org_created ON api_tokens (org_id, created_at, id);
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY,
    org_id TEXT,
    at INTEGER NOT NULL,
    actor_kind TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    actor_name TEXT NOT NULL,
    action TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    source TEXT NOT NULL,
    summary TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_log_org_seq ON audit_log (org_id, seq);
CREATE INDEX audit_log_org_action ON audit_log (org_id, action, seq);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
"#,
        postgres: r#"
CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    disabled BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    last_login_at BIGINT
);
CREATE INDEX users_org_created ON users (org_id, created_at, id);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    secret_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_tokens_org_created ON api_tokens (org_id, created_at, id);
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    org_id TEXT,
    at BIGINT NOT NULL,
    actor_kind TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    actor_name TEXT NOT NULL,
    action TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    source TEXT NOT NULL,
    summary TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_log_org_seq ON audit_log (org_id, seq);
CREATE INDEX audit_log_org_action ON audit_log (org_id, action, seq);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
CREATE TABLE audit_head (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
"#,
    },
    Migration {
        version: 2,
        name: "devices, enrollment tokens, pre-authorizations",
        sqlite: r#"
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    status TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'rejected', 'decommissioned')),
    identity TEXT NOT NULL,
    identity_hash TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL UNIQUE,
    csr_pem TEXT NOT NULL,
    cert_pem TEXT,
    cert_serial TEXT,
    cert_not_after INTEGER,
    cert_revoked_at INTEGER,
    enrolled_via TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX devices_org_created ON devices (org_id, created_at, id);
CREATE INDEX devices_org_status ON devices (org_id, status, created_at, id);
CREATE INDEX devices_identity ON devices (org_id, identity_hash);
CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    max_uses INTEGER,
    uses INTEGER NOT NULL DEFAULT 0,
    tags TEXT NOT NULL DEFAULT '{}',
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX enrollment_tokens_org_created ON enrollment_tokens (org_id, created_at, id);
CREATE TABLE preauthorizations (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    identity TEXT NOT NULL,
    identity_hash TEXT NOT NULL UNIQUE,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
"#,
        postgres: r#"
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    status TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'rejected', 'decommissioned')),
    identity TEXT NOT NULL,
    identity_hash TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL UNIQUE,
    csr_pem TEXT NOT NULL,
    cert_pem TEXT,
    cert_serial TEXT,
    cert_not_after BIGINT,
    cert_revoked_at BIGINT,
    enrolled_via TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX devices_org_created ON devices (org_id, created_at, id);
CREATE INDEX devices_org_status ON devices (org_id, status, created_at, id);
CREATE INDEX devices_identity ON devices (org_id, identity_hash);
CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    max_uses BIGINT,
    uses BIGINT NOT NULL DEFAULT 0,
    tags TEXT NOT NULL DEFAULT '{}',
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX enrollment_tokens_org_created ON enrollment_tokens (org_id, created_at, id);
CREATE TABLE preauthorizations (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    identity TEXT NOT NULL,
    identity_hash TEXT NOT NULL UNIQUE,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
"#,
    },
    Migration {
        version: 3,
        name: "device presence, inventory attributes, tags, groups, events",
        sqlite: r#"
ALTER TABLE devices ADD COLUMN online INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN last_seen_at INTEGER;
ALTER TABLE devices ADD COLUMN connected_at INTEGER;
ALTER TABLE devices ADD COLUMN agent TEXT;
ALTER TABLE devices ADD COLUMN boot_id TEXT;
ALTER TABLE devices ADD COLUMN inventory_at INTEGER;
CREATE INDEX devices_org_online ON devices (org_id, online, last_seen_at);
CREATE INDEX devices_org_last_seen ON devices (org_id, last_seen_at, id);
CREATE TABLE device_attributes (
    device_id TEXT NOT NULL REFERENCES devices(id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
);
CREATE INDEX device_attributes_key_value ON device_attributes (key, value, device_id);
CREATE TABLE device_tags (
    device_id TEXT NOT NULL REFERENCES devices(id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
);
CREATE INDEX device_tags_key_value ON device_tags (key, value, device_id);
CREATE TABLE device_groups (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('static', 'dynamic')),
    filter TEXT,
    description TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (org_id, name)
);
CREATE INDEX device_groups_org_created ON device_groups (org_id, created_at, id);
CREATE TABLE device_group_members (
    group_id TEXT NOT NULL REFERENCES device_groups(id),
    device_id TEXT NOT NULL REFERENCES devices(id),
    added_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, device_id)
);
CREATE INDEX device_group_members_device ON device_group_members (device_id, group_id);
CREATE TABLE device_events (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX device_events_device_at ON device_events (device_id, at, id);
ALTER TABLE enrollment_tokens ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
INSERT INTO device_tags (device_id, key, value) SELECT d.id, j.key, j.value FROM devices d, json_each(d.tags) j;
"#,
        postgres: r#"
ALTER TABLE devices ADD COLUMN online INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN last_seen_at BIGINT;
ALTER TABLE devices ADD COLUMN connected_at BIGINT;
ALTER TABLE devices ADD COLUMN agent TEXT;
ALTER TABLE devices ADD COLUMN boot_id TEXT;
ALTER TABLE devices ADD COLUMN inventory_at BIGINT;
CREATE INDEX devices_org_online ON devices (org_id, online, last_seen_at);
CREATE INDEX devices_org_last_seen ON devices (org_id, last_seen_at, id);
CREATE TABLE device_attributes (
    device_id TEXT NOT NULL REFERENCES devices(id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
);
CREATE INDEX device_attributes_key_value ON device_attributes (key, value, device_id);
CREATE TABLE device_tags (
    device_id TEXT NOT NULL REFERENCES devices(id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
);
CREATE INDEX device_tags_key_value ON device_tags (key, value, device_id);
CREATE TABLE device_groups (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('static', 'dynamic')),
    filter TEXT,
    description TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (org_id, name)
);
CREATE INDEX device_groups_org_created ON device_groups (org_id, created_at, id);
CREATE TABLE device_group_members (
    group_id TEXT NOT NULL REFERENCES device_groups(id),
    device_id TEXT NOT NULL REFERENCES devices(id),
    added_at BIGINT NOT NULL,
    PRIMARY KEY (group_id, device_id)
);
CREATE INDEX device_group_members_device ON device_group_members (device_id, group_id);
CREATE TABLE device_events (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX device_events_device_at ON device_events (device_id, at, id);
ALTER TABLE enrollment_tokens ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
INSERT INTO device_tags (device_id, key, value) SELECT d.id, j.key, j.value FROM devices d, json_each_text(d.tags::json) j;
"#,
    },
    Migration {
        version: 4,
        name: "device listing indexes: by id, by update, by last seen (never seen = 0)",
        // Listings sort by `COALESCE(last_seen_at, 0)` so that never-seen devices sort the same
        // on both engines (NULLs sort first on SQLite, last on PostgreSQL); the index has the
        // same expression, replacing the plain one of v3.
        sqlite: r#"
CREATE INDEX devices_org_id ON devices (org_id, id);
CREATE INDEX devices_org_updated ON devices (org_id, updated_at, id);
DROP INDEX devices_org_last_seen;
CREATE INDEX devices_org_seen ON devices (org_id, COALESCE(last_seen_at, 0), id);
"#,
        postgres: r#"
CREATE INDEX devices_org_id ON devices (org_id, id);
CREATE INDEX devices_org_updated ON devices (org_id, updated_at, id);
DROP INDEX devices_org_last_seen;
CREATE INDEX devices_org_seen ON devices (org_id, (COALESCE(last_seen_at, 0)), id);
"#,
    },
    Migration {
        version: 5,
        name: "software updates: artifacts, deployments and their devices, device software, trust roots",
        // One text for both engines: BIGINT is an INTEGER on SQLite. Deployments copy the
        // artifact's name and version, so a finished deployment still reads well after its
        // artifact was deleted (which only unfinished deployments prevent: no foreign key).
        sqlite: MIGRATION_5,
        postgres: MIGRATION_5,
    },
];

/// Software updates (v5), the same on both engines.
const MIGRATION_5: &str = r#"
CREATE TABLE artifacts (
    org_id TEXT NOT NULL REFERENCES organizations(id),
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    device_types TEXT NOT NULL,
    payload_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    manifest TEXT NOT NULL,
    signed_by TEXT NOT NULL,
    source TEXT,
    source_commit TEXT,
    build_id TEXT,
    uploaded_at BIGINT NOT NULL,
    uploaded_by TEXT NOT NULL,
    PRIMARY KEY (org_id, id),
    UNIQUE (org_id, name, version)
);
CREATE INDEX artifacts_org_uploaded ON artifacts (org_id, uploaded_at, id);
CREATE INDEX artifacts_org_name_uploaded ON artifacts (org_id, name, uploaded_at, id);
CREATE INDEX artifacts_org_commit ON artifacts (org_id, source_commit);
CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    artifact_id TEXT NOT NULL,
    artifact_name TEXT NOT NULL,
    artifact_version TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'succeeded', 'failed', 'aborted')),
    total BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX deployments_org_created ON deployments (org_id, created_at, id);
CREATE INDEX deployments_org_status_created ON deployments (org_id, status, created_at, id);
CREATE INDEX deployments_org_artifact ON deployments (org_id, artifact_id, finished_at);
CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL REFERENCES deployments(id),
    device_id TEXT NOT NULL REFERENCES devices(id),
    created_at BIGINT NOT NULL,
    state TEXT NOT NULL,
    finished BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT,
    total BIGINT,
    message TEXT,
    log TEXT,
    sent_at BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX deployment_devices_device_queue ON deployment_devices (device_id, finished, created_at, deployment_id);
CREATE INDEX deployment_devices_state ON deployment_devices (deployment_id, state, device_id);
CREATE INDEX deployment_devices_unsent ON deployment_devices (finished, sent_at);
ALTER TABLE devices ADD COLUMN sw_artifact TEXT;
ALTER TABLE devices ADD COLUMN sw_name TEXT;
ALTER TABLE devices ADD COLUMN sw_version TEXT;
CREATE INDEX devices_org_sw_artifact ON devices (org_id, sw_artifact);
CREATE INDEX devices_org_sw_name ON devices (org_id, sw_name, sw_version);
CREATE TABLE trust_roots (
    org_id TEXT NOT NULL REFERENCES organizations(id),
    version BIGINT NOT NULL,
    json TEXT NOT NULL,
    uploaded_at BIGINT NOT NULL,
    uploaded_by TEXT NOT NULL,
    PRIMARY KEY (org_id, version)
);
"#;
