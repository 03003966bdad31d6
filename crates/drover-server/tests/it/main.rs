//! droverd's integration tests: the API through the router on SQLite and PostgreSQL, the
//! real binary, and the web UI in a real headless Chromium.
//!
//! PostgreSQL is found through `DROVER_TEST_DATABASE_URL` (the README's test command sets
//! it); each test gets a schema of its own there.

mod agent_monitoring;
mod alerts;
mod api;
mod artifacts;
mod browser;
mod deployments;
mod devices;
mod e2e;
mod faults;
mod fleet;
mod groups;
mod hardening;
mod remote;
mod support;
mod telemetry;
mod ui;
mod ui_metrics;
mod ui_updates;
mod update_agents;
