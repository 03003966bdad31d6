//! `droverd`, the Drover fleet server: REST API with OpenAPI, web UI, storage on SQLite or
//! PostgreSQL, organizations, users, roles and tokens, the hash-chained audit log, and
//! software updates (artifacts, deployments, the engine that drives them, downloads).
//!
//! Entry points: [`app::router`] builds the HTTP application from an [`app::AppState`];
//! [`app::serve`] runs it; [`cli`] is the `droverd` command line.

pub mod alerts;
pub mod api;
pub mod app;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod ca;
pub mod cli;
pub mod config;
pub mod db;
pub mod deployments;
pub mod device_rules;
pub mod devices;
pub mod devnet;
pub mod download;
pub mod engine;
pub mod error;
pub mod filter;
pub mod groups;
pub mod metrics;
pub mod migrations;
pub mod ops;
pub mod page;
pub mod preauth;
pub mod presence;
pub mod remote;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod ui;
