//! Notifications: queued in `notifications` by the evaluator (in the transaction that changes
//! the alert), delivered by every replica's delivery loop, each row claimed first
//! (`UPDATE … WHERE status = 'pending' AND next_at <= now`) so one replica sends it.
//!
//! - webhook: `POST` of the JSON payload with `X-Drover-Timestamp` (Unix seconds) and
//!   `X-Drover-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`; a receiver
//!   recomputes it with the channel's secret and refuses old timestamps (replays).
//! - slack: `POST {"text": "…"}` to a Slack-compatible incoming webhook.
//! - email: one message to the channel's addresses over SMTP ([`super::smtp`]).
//!
//! A failed try is retried after 2, 4, 8, … seconds (at most 5 minutes apart) until
//! [`MAX_ATTEMPTS`]; each try is a row in `notification_attempts`. Errors are recorded
//! without URLs (a webhook's path is often its credential) and without secrets.

use std::sync::Arc;
use std::time::Duration;

use ring::hmac;
use tokio::sync::watch;

use super::AlertsConfig;
use crate::db::Db;
use crate::error::{AppError, AppResult};
use crate::ops::new_id;

pub const MAX_ATTEMPTS: i64 = 6;
/// How long a claimed notification is reserved for the replica sending it.
const CLAIM_MS: i64 = 60_000;
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Queues one notification per channel (within the caller's transaction).
#[allow(clippy::too_many_arguments)]
pub async fn enqueue(
    conn: &mut sqlx::AnyConnection,
    org: &str,
    channels: &[String],
    rule_id: &str,
    key: &str,
    event: &str,
    payload: &serde_json::Value,
    silenced: bool,
    now: i64,
) -> Result<(), sqlx::Error> {
    for c in channels {
        sqlx::query(
            "INSERT INTO notifications (id, org_id, channel_id, rule_id, alert_key, event, payload, status, attempts, \
             next_at, created_at) SELECT $1, $2, id, $3, $4, $5, $6, $7, 0, $8, $8 FROM notification_channels \
             WHERE id = $9 AND org_id = $2",
        )
        .bind(new_id())
        .bind(org.to_string())
        .bind(rule_id.to_string())
        .bind(key.to_string())
        .bind(event.to_string())
        .bind(payload.to_string())
        .bind(if silenced { "silenced" } else { "pending" })
        .bind(now)
        .bind(c.clone())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Sends notifications; shared by the delivery loop and the channel test.
pub struct Notifier {
    http: reqwest::Client,
    smtp_tls: Arc<rustls::ClientConfig>,
    config: AlertsConfig,
    allow: Arc<super::target::AllowList>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("smtp_server", &self.config.smtp_server).finish_non_exhaustive()
    }
}

fn extra_roots(config: &AlertsConfig) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    if config.notify_ca_file.is_empty() {
        return Ok(Vec::new());
    }
    let pem = std::fs::read(&config.notify_ca_file)
        .map_err(|e| format!("cannot read notify_ca_file {}: {e}", config.notify_ca_file))?;
    rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("notify_ca_file {}: {e}", config.notify_ca_file))
}

impl Notifier {
    pub fn new(config: AlertsConfig) -> Result<Notifier, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let extra = extra_roots(&config)?;
        let allow = Arc::new(super::target::AllowList::parse(&config.notify_allow_hosts)?);
        // Redirects are not followed (a redirect could lead anywhere), and the client connects
        // only to the addresses the resolver allowed.
        let mut http = reqwest::Client::builder()
            .timeout(SEND_TIMEOUT)
            .connect_timeout(SEND_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(super::target::CheckedResolver { allow: allow.clone() })
            .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")));
        for c in &extra {
            http = http.add_root_certificate(
                reqwest::Certificate::from_der(c.as_ref()).map_err(|e| format!("notify_ca_file: {e}"))?,
            );
        }
        let http = http.build().map_err(|e| format!("HTTP client: {e}"))?;
        let smtp_tls = super::smtp::tls_config(extra)?;
        Ok(Notifier { http, smtp_tls, config, allow })
    }

    /// The parsed `notify_allow_hosts`.
    pub fn allow_list(&self) -> &super::target::AllowList {
        &self.allow
    }

    /// Delivers one payload to one channel.
    pub async fn send(
        &self,
        kind: &str,
        target: &str,
        secret: &str,
        payload: &serde_json::Value,
    ) -> Result<(), String> {
        if matches!(kind, "webhook" | "slack") {
            super::target::check(target, &self.allow, false).await?;
        }
        match kind {
            "webhook" => {
                let body = payload.to_string();
                let ts = crate::time::now_ms() / 1000;
                let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
                let sig = hex::encode(hmac::sign(&key, format!("{ts}.{body}").as_bytes()).as_ref());
                let req = self
                    .http
                    .post(target)
                    .header("content-type", "application/json")
                    .header("x-drover-timestamp", ts.to_string())
                    .header("x-drover-signature", format!("v1={sig}"))
                    .body(body);
                http_result(req.send().await)
            }
            "slack" => {
                let body = serde_json::json!({ "text": text_of(payload) }).to_string();
                let req = self.http.post(target).header("content-type", "application/json").body(body);
                http_result(req.send().await)
            }
            "email" => {
                if self.config.smtp_server.is_empty() {
                    return Err("no SMTP server configured (smtp_server)".into());
                }
                let to = super::rules::email_addresses(target).map_err(|e| e.to_string())?;
                let subject = subject_of(payload);
                let body = format!("{}\n\n-- \nDrover alert notification\n", text_of(payload));
                super::smtp::send(&self.config, self.smtp_tls.clone(), &to, &subject, &body)
                    .await
                    .map_err(|e| e.to_string())
            }
            other => Err(format!("unknown channel kind {other:?}")),
        }
    }
}

fn http_result(r: Result<reqwest::Response, reqwest::Error>) -> Result<(), String> {
    match r {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(format!("the receiver answered HTTP {}", resp.status().as_u16())),
        // Without the URL: its path may be the credential. The source chain names a refused
        // address (the resolver's error).
        Err(e) => {
            let e = e.without_url();
            let mut m = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                let t = s.to_string();
                if !m.contains(&t) {
                    m = format!("{m}: {t}");
                }
                src = s.source();
            }
            Err(m)
        }
    }
}

fn subject_of(p: &serde_json::Value) -> String {
    let event = p["event"].as_str().unwrap_or("alert").to_uppercase();
    let rule = p["rule"]["name"].as_str().unwrap_or("");
    match p["device_id"].as_str() {
        Some(d) => format!("[Drover] {event}: {rule} on {d}"),
        None => format!("[Drover] {event}: {rule}"),
    }
}

/// One line for chat and mail: `[FIRING] High CPU on dev-1: avg(cpu.percent) = 95 > 90 …`.
pub fn text_of(p: &serde_json::Value) -> String {
    let event = p["event"].as_str().unwrap_or("alert").to_uppercase();
    let rule = p["rule"]["name"].as_str().unwrap_or("");
    let severity = p["rule"]["severity"].as_str().unwrap_or("");
    let on = p["device_id"].as_str().map(|d| format!(" on {d}")).unwrap_or_else(|| " (fleet)".into());
    let message = p["message"].as_str().unwrap_or("");
    let at = p["at"].as_str().unwrap_or("");
    format!("[{event}] {rule}{on} ({severity}): {message} at {at}")
}

fn backoff_ms(attempts: i64) -> i64 {
    (1000i64 << attempts.clamp(1, 9)).min(300_000)
}

type Due = (String, String, String, String, String, i64);

/// Sends what is due; the number of notifications tried.
pub async fn deliver_due(db: &Db, n: &Notifier, now: i64) -> AppResult<usize> {
    let due: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM notifications WHERE status = 'pending' AND next_at <= $1 ORDER BY next_at LIMIT 50",
    )
    .bind(now)
    .fetch_all(db.pool())
    .await?;
    let mut tried = 0;
    for (id,) in due {
        // Claim: only the replica whose update changes the row sends it.
        let mut tx = db.begin_write().await?;
        let claimed = sqlx::query(
            "UPDATE notifications SET next_at = $1, attempts = attempts + 1 WHERE id = $2 AND status = 'pending' \
             AND next_at <= $3",
        )
        .bind(now + CLAIM_MS)
        .bind(id.clone())
        .bind(now)
        .execute(tx.conn())
        .await?
        .rows_affected();
        tx.commit().await?;
        if claimed != 1 {
            continue;
        }
        let row: Option<Due> = sqlx::query_as(
            "SELECT c.kind, c.target, c.secret, n.payload, n.event, n.attempts FROM notifications n \
             JOIN notification_channels c ON c.id = n.channel_id WHERE n.id = $1",
        )
        .bind(id.clone())
        .fetch_optional(db.pool())
        .await?;
        let result = match &row {
            Some((kind, target, secret, payload, _, _)) => {
                let payload: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
                n.send(kind, target, secret, &payload).await
            }
            None => Err("the channel was deleted".into()),
        };
        let attempts = row.as_ref().map(|r| r.5).unwrap_or(MAX_ATTEMPTS);
        record(db, &id, attempts, result, crate::time::now_ms()).await?;
        tried += 1;
    }
    Ok(tried)
}

/// Writes the outcome of try number `attempt`.
async fn record(db: &Db, id: &str, attempt: i64, result: Result<(), String>, now: i64) -> AppResult<()> {
    let mut tx = db.begin_write().await?;
    match &result {
        Ok(()) => {
            sqlx::query("UPDATE notifications SET status = 'sent', sent_at = $1, last_error = NULL WHERE id = $2")
                .bind(now)
                .bind(id.to_string())
                .execute(tx.conn())
                .await?;
        }
        Err(e) => {
            let (status, next) =
                if attempt >= MAX_ATTEMPTS { ("failed", now) } else { ("pending", now + backoff_ms(attempt)) };
            sqlx::query("UPDATE notifications SET status = $1, next_at = $2, last_error = $3 WHERE id = $4")
                .bind(status)
                .bind(next)
                .bind(e.clone())
                .bind(id.to_string())
                .execute(tx.conn())
                .await?;
            tracing::warn!(notification = id, attempt, "notification not delivered: {e}");
        }
    }
    sqlx::query(
        "INSERT INTO notification_attempts (notification_id, attempt, at, ok, detail) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (notification_id, attempt) DO NOTHING",
    )
    .bind(id.to_string())
    .bind(attempt)
    .bind(now)
    .bind(i64::from(result.is_ok()))
    .bind(result.err().unwrap_or_else(|| "delivered".into()))
    .execute(tx.conn())
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The delivery loop of one replica, until `stop`.
pub async fn run(db: Db, notifier: Arc<Notifier>, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = deliver_due(&db, &notifier, crate::time::now_ms()).await {
            tracing::warn!("notification delivery: {e}");
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Sends a test message to a channel now, and logs it like any delivery.
pub async fn test_channel(
    db: &Db,
    notifier: &Notifier,
    p: &crate::auth::Principal,
    id: &str,
) -> AppResult<super::types::Delivery> {
    p.require(drover_proto::api::Role::Operator, "testing notification channels")?;
    let row: Option<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT id, name, kind, target, secret FROM notification_channels WHERE org_id = $1 AND (id = $2 OR name = $2)",
    )
    .bind(p.org().to_string())
    .bind(id.to_string())
    .fetch_optional(db.pool())
    .await?;
    let (cid, name, kind, target, secret) =
        row.ok_or_else(|| AppError::NotFound(format!("no notification channel {id:?}")))?;
    let now = crate::time::now_ms();
    let payload = serde_json::json!({
        "v": 1, "event": "test", "state": "test",
        "rule": {"id": "", "name": format!("test of channel {name}"), "severity": "info", "condition": ""},
        "device_id": null, "value": null,
        "message": format!("a test notification sent by {}", p.name),
        "since": crate::time::to_rfc3339(now), "at": crate::time::to_rfc3339(now),
    });
    let nid = new_id();
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "INSERT INTO notifications (id, org_id, channel_id, rule_id, alert_key, event, payload, status, attempts, \
         next_at, created_at) VALUES ($1, $2, $3, '', '', 'test', $4, 'sending', 1, $5, $5)",
    )
    .bind(nid.clone())
    .bind(p.org().to_string())
    .bind(cid.clone())
    .bind(payload.to_string())
    .bind(now)
    .execute(tx.conn())
    .await?;
    crate::audit::append(
        tx.conn(),
        crate::audit::Event {
            actor: p,
            action: "notification_channel.test",
            target_kind: "notification_channel",
            target_id: &cid,
            summary: format!("test notification to {kind} channel {name:?}"),
        },
    )
    .await?;
    tx.commit().await?;
    let result = notifier.send(&kind, &target, &secret, &payload).await;
    let ok = result.is_ok();
    let error = result.as_ref().err().cloned();
    let mut tx = db.begin_write().await?;
    sqlx::query("UPDATE notifications SET status = $1, sent_at = $2, last_error = $3 WHERE id = $4")
        .bind(if ok { "sent" } else { "failed" })
        .bind(ok.then(crate::time::now_ms))
        .bind(error.clone())
        .bind(nid.clone())
        .execute(tx.conn())
        .await?;
    sqlx::query(
        "INSERT INTO notification_attempts (notification_id, attempt, at, ok, detail) VALUES ($1, 1, $2, $3, $4)",
    )
    .bind(nid.clone())
    .bind(crate::time::now_ms())
    .bind(i64::from(ok))
    .bind(error.clone().unwrap_or_else(|| "delivered".into()))
    .execute(tx.conn())
    .await?;
    tx.commit().await?;
    Ok(super::types::Delivery {
        id: nid,
        channel_id: cid,
        channel_name: name,
        rule_id: String::new(),
        device_id: None,
        event: "test".into(),
        status: if ok { "sent".into() } else { "failed".into() },
        attempts: 1,
        last_error: error,
        created_at: crate::time::to_rfc3339(now),
        sent_at: None,
    })
}
