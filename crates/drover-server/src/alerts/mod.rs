//! Alerts (`docs/alerts.md`): rules over the fleet's telemetry and presence, an evaluation
//! engine that one replica at a time runs, per-key state with de-duplication and flap
//! suppression, silences, history, and notifications by webhook (HMAC-signed JSON),
//! Slack-compatible webhook and email.
//!
//! - [`types`] — the API's request and response types.
//! - [`rules`] — operations on rules, silences, channels and the read side (alerts, history,
//!   deliveries); each change checks the role and is audited in its transaction.
//! - [`engine`] — the evaluator: a lease row in `job_leases` makes one replica evaluate;
//!   each tick takes the time as an input ([`engine::tick`]) so tests can move it.
//! - [`notify`] — the delivery queue (`notifications`): claimed per row, so any replica may
//!   send; retries with exponential backoff; one `notification_attempts` row per try.
//! - [`target`] — where webhook and Slack channels may send: internal addresses are refused
//!   after DNS resolution unless `notify_allow_hosts` allows them.
//! - [`smtp`] — a small SMTP client (STARTTLS, AUTH PLAIN) on tokio and rustls.
//! - [`api`] — the REST handlers and their OpenAPI document.

pub mod api;
pub mod engine;
pub mod notify;
pub mod rules;
pub mod smtp;
pub mod target;
pub mod types;

/// Alert settings (`drover.toml`, `DROVER_*`). `Debug` leaves the SMTP password out.
#[derive(Clone, PartialEq)]
pub struct AlertsConfig {
    /// Seconds between two evaluations.
    pub interval_secs: u64,
    /// `host:port` of the SMTP server for email channels; empty: email is off.
    pub smtp_server: String,
    /// `starttls` (default: the server must offer it), `none` (plain, for a local relay) or
    /// `tls` (TLS from the first byte, port 465).
    pub smtp_security: String,
    pub smtp_from: String,
    pub smtp_username: String,
    /// Never logged; best given as `DROVER_SMTP_PASSWORD`.
    pub smtp_password: String,
    /// A PEM file of extra CA certificates to trust for SMTP and webhooks (empty: none).
    pub notify_ca_file: String,
    /// Webhook and Slack targets allowed although internal ([`target`]): host names, addresses,
    /// CIDR blocks.
    pub notify_allow_hosts: Vec<String>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            interval_secs: 5,
            smtp_server: String::new(),
            smtp_security: "starttls".into(),
            smtp_from: String::new(),
            smtp_username: String::new(),
            smtp_password: String::new(),
            notify_ca_file: String::new(),
            notify_allow_hosts: Vec::new(),
        }
    }
}

impl std::fmt::Debug for AlertsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertsConfig")
            .field("interval_secs", &self.interval_secs)
            .field("smtp_server", &self.smtp_server)
            .field("smtp_security", &self.smtp_security)
            .field("smtp_from", &self.smtp_from)
            .field("smtp_username", &self.smtp_username)
            .field("smtp_password", &if self.smtp_password.is_empty() { "" } else { "***" })
            .field("notify_ca_file", &self.notify_ca_file)
            .field("notify_allow_hosts", &self.notify_allow_hosts)
            .finish()
    }
}
