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
    Migration {
        version: 6,
        name: "telemetry: metric series, points (partitioned by day on PostgreSQL), 1-minute and 1-hour rollups, events, log requests, job leases",
        // Values are REAL / DOUBLE PRECISION: the one departure from integers and text
        // (ARCHITECTURE.md). Points are keyed by (series, ts) so a resent batch changes nothing.
        sqlite: MIGRATION_6_SQLITE,
        postgres: MIGRATION_6_POSTGRES,
    },
    Migration {
        version: 7,
        name: "alerts: rules, per-key state, history, silences, notification channels and deliveries; device rule sets",
        sqlite: MIGRATION_7,
        postgres: MIGRATION_7,
    },
    Migration {
        version: 8,
        name: "remote access: sessions, terminal recordings, the organization's recording setting",
        sqlite: crate::remote::sessions::MIGRATION_8,
        postgres: crate::remote::sessions::MIGRATION_8,
    },
    Migration {
        version: 9,
        name: "telemetry: 15-minute rollups, filled from the 1-minute rollups already stored",
        // Steps of whole quarter hours (15m, 30m, 45m) read these instead of fifteen times as
        // many 1-minute rows (docs/telemetry-server.md).
        sqlite: crate::telemetry::store::MIGRATION_9_SQLITE,
        postgres: crate::telemetry::store::MIGRATION_9_POSTGRES,
    },
    Migration {
        version: 10,
        name: "remote access: when a session was last known alive, to end sessions whose droverd stopped",
        sqlite: crate::remote::sessions::MIGRATION_10,
        postgres: crate::remote::sessions::MIGRATION_10,
    },
    Migration {
        version: 11,
        name: "remote access: web UI sessions any replica can serve (their targets, last use and token hashes)",
        sqlite: crate::remote::links::MIGRATION_11,
        postgres: crate::remote::links::MIGRATION_11,
    },
    Migration {
        version: 12,
        name: "devices: operator-set names, display names (name, hostname, serial or id), capabilities from the hello",
        sqlite: MIGRATION_12_SQLITE,
        postgres: MIGRATION_12_POSTGRES,
    },
];

/// Display names (v12): kept in a column so that every listing can show, search and sort by
/// them; `devices::refresh_display_name` keeps it up to date.
const MIGRATION_12_SQLITE: &str = r#"
ALTER TABLE devices ADD COLUMN name TEXT;
ALTER TABLE devices ADD COLUMN display_name TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN capabilities TEXT;
UPDATE devices SET display_name = COALESCE(
    (SELECT NULLIF(a.value, '') FROM device_attributes a WHERE a.device_id = devices.id AND a.key = 'hostname'),
    NULLIF(json_extract(identity, '$.serial'), ''),
    id);
CREATE INDEX devices_org_display_name ON devices (org_id, display_name, id);
"#;

const MIGRATION_12_POSTGRES: &str = r#"
ALTER TABLE devices ADD COLUMN name TEXT;
ALTER TABLE devices ADD COLUMN display_name TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN capabilities TEXT;
UPDATE devices SET display_name = COALESCE(
    (SELECT NULLIF(a.value, '') FROM device_attributes a WHERE a.device_id = devices.id AND a.key = 'hostname'),
    NULLIF(identity::json->>'serial', ''),
    id);
CREATE INDEX devices_org_display_name ON devices (org_id, display_name, id);
"#;

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

/// Telemetry (v6) on SQLite: points and rollups are `WITHOUT ROWID` tables clustered by
/// series and time.
const MIGRATION_6_SQLITE: &str = r#"
CREATE TABLE metric_series (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    UNIQUE (device_id, name)
);
CREATE INDEX metric_series_name ON metric_series (name, device_id);
CREATE TABLE metric_points (
    series_id INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value REAL NOT NULL,
    late INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (series_id, ts)
) WITHOUT ROWID;
CREATE TABLE metric_rollup_1m (
    series_id INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
CREATE TABLE metric_rollup_1h (
    series_id INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
CREATE TABLE telemetry_events (
    device_id TEXT NOT NULL,
    id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    late INTEGER NOT NULL DEFAULT 0,
    name TEXT NOT NULL,
    severity TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (device_id, id)
);
CREATE INDEX telemetry_events_name_ts ON telemetry_events (name, ts);
CREATE INDEX telemetry_events_device_ts ON telemetry_events (device_id, ts);
CREATE TABLE telemetry_devices (
    device_id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL
);
CREATE TABLE log_requests (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    source TEXT NOT NULL,
    lines_wanted INTEGER NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    answered_at INTEGER,
    lines TEXT,
    truncated INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX log_requests_requested ON log_requests (requested_at);
CREATE TABLE job_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    last_run_at INTEGER
);
"#;

/// Telemetry (v6) on PostgreSQL: `metric_points` is range-partitioned by `ts`, one partition
/// per UTC day (`metric_points_dN`, N = days since 1970), made ahead by the ingest and the
/// maintenance job and dropped whole by retention.
const MIGRATION_6_POSTGRES: &str = r#"
CREATE TABLE metric_series (
    id BIGSERIAL PRIMARY KEY,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    UNIQUE (device_id, name)
);
CREATE INDEX metric_series_name ON metric_series (name, device_id);
CREATE TABLE metric_points (
    series_id BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    late BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (series_id, ts)
) PARTITION BY RANGE (ts);
CREATE TABLE metric_rollup_1m (
    series_id BIGINT NOT NULL,
    bucket BIGINT NOT NULL,
    count BIGINT NOT NULL,
    sum DOUBLE PRECISION NOT NULL,
    min DOUBLE PRECISION NOT NULL,
    max DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (series_id, bucket)
);
CREATE TABLE metric_rollup_1h (
    series_id BIGINT NOT NULL,
    bucket BIGINT NOT NULL,
    count BIGINT NOT NULL,
    sum DOUBLE PRECISION NOT NULL,
    min DOUBLE PRECISION NOT NULL,
    max DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (series_id, bucket)
);
CREATE TABLE telemetry_events (
    device_id TEXT NOT NULL,
    id TEXT NOT NULL,
    ts BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    late BIGINT NOT NULL DEFAULT 0,
    name TEXT NOT NULL,
    severity TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (device_id, id)
);
CREATE INDEX telemetry_events_name_ts ON telemetry_events (name, ts);
CREATE INDEX telemetry_events_device_ts ON telemetry_events (device_id, ts);
CREATE TABLE telemetry_devices (
    device_id TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL,
    dropped BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL
);
CREATE TABLE log_requests (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    source TEXT NOT NULL,
    lines_wanted BIGINT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    answered_at BIGINT,
    lines TEXT,
    truncated BIGINT NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX log_requests_requested ON log_requests (requested_at);
CREATE TABLE job_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    last_run_at BIGINT
);
"#;

/// Alerts and device rule sets (v7), the same on both engines.
const MIGRATION_7: &str = r#"
CREATE TABLE alert_rules (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    severity TEXT NOT NULL,
    filter TEXT,
    group_id TEXT,
    condition TEXT NOT NULL,
    pending_s BIGINT NOT NULL DEFAULT 0,
    flap_window_s BIGINT NOT NULL,
    flap_changes BIGINT NOT NULL,
    channels TEXT NOT NULL DEFAULT '[]',
    enabled BIGINT NOT NULL DEFAULT 1,
    event_cursor BIGINT NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (org_id, name)
);
CREATE TABLE alerts (
    rule_id TEXT NOT NULL,
    alert_key TEXT NOT NULL,
    org_id TEXT NOT NULL,
    state TEXT NOT NULL,
    since BIGINT NOT NULL,
    fired_at BIGINT,
    resolved_at BIGINT,
    value DOUBLE PRECISION,
    message TEXT NOT NULL DEFAULT '',
    transitions TEXT NOT NULL DEFAULT '[]',
    flapping BIGINT NOT NULL DEFAULT 0,
    notified_state TEXT NOT NULL DEFAULT '',
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (rule_id, alert_key)
);
CREATE INDEX alerts_org_state ON alerts (org_id, state);
CREATE TABLE alert_history (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    rule_name TEXT NOT NULL,
    alert_key TEXT NOT NULL,
    at BIGINT NOT NULL,
    event TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX alert_history_org_at ON alert_history (org_id, at, id);
CREATE TABLE alert_silences (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    rule_id TEXT,
    filter TEXT,
    starts_at BIGINT NOT NULL,
    ends_at BIGINT NOT NULL,
    reason TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX alert_silences_org_end ON alert_silences (org_id, ends_at);
CREATE TABLE notification_channels (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    secret TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (org_id, name)
);
CREATE TABLE notifications (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    channel_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    alert_key TEXT NOT NULL,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_at BIGINT NOT NULL,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    sent_at BIGINT
);
CREATE INDEX notifications_due ON notifications (status, next_at);
CREATE INDEX notifications_org_created ON notifications (org_id, created_at, id);
CREATE TABLE notification_attempts (
    notification_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    at BIGINT NOT NULL,
    ok BIGINT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (notification_id, attempt)
);
CREATE TABLE device_rule_sets (
    group_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    version BIGINT NOT NULL,
    rules TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE device_rule_delivery (
    device_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    digest TEXT NOT NULL DEFAULT '',
    version BIGINT NOT NULL DEFAULT 0,
    pending BIGINT NOT NULL DEFAULT 0,
    sent_at BIGINT
);
CREATE INDEX device_rule_delivery_pending ON device_rule_delivery (pending);
"#;
