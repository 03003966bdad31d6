//! `GET /device/v1/artifacts/{id}` on the device endpoint: a device downloads the artifact of
//! a deployment it is in, with its client certificate, resuming with `Range`.
//!
//! Only a device with an unfinished row in a deployment of this artifact gets it (403
//! otherwise); the body streams from the store in chunks of at most
//! [`crate::store::READ_CHUNK`] and is never held whole. `ETag` is the artifact id, which
//! never changes for its bytes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;

use crate::app::{ApiPath, AppState};
use crate::error::{AppError, AppResult};

/// The device id of the connection's verified client certificate (set by
/// `devnet::device_router`).
#[derive(Clone, Debug)]
pub struct PeerDevice(pub Arc<str>);

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    /// No range (or one this endpoint serves whole: several ranges, another unit, bad syntax).
    Whole,
    /// `start..end` (end exclusive).
    Part(u64, u64),
    /// Nothing of the file: 416.
    Unsatisfiable,
}

/// Parses `bytes=N-`, `bytes=N-M` and `bytes=-N` (the last N bytes). Anything else is served
/// whole, as RFC 9110 allows.
pub fn parse_range(value: Option<&str>, size: u64) -> Wanted {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else { return Wanted::Whole };
    if spec.contains(',') {
        return Wanted::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return Wanted::Whole };
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Wanted::Whole,
        (true, false) => match b.parse::<u64>() {
            Ok(0) => Wanted::Unsatisfiable,
            Ok(_) if size == 0 => Wanted::Unsatisfiable,
            Ok(n) => Wanted::Part(size.saturating_sub(n), size),
            Err(_) => Wanted::Whole,
        },
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else { return Wanted::Whole };
            let end = if b.is_empty() {
                size
            } else {
                match b.parse::<u64>() {
                    Ok(last) if last >= start => last.saturating_add(1).min(size),
                    _ => return Wanted::Whole,
                }
            };
            if start >= size { Wanted::Unsatisfiable } else { Wanted::Part(start, end) }
        }
    }
}

/// Whether `device_id` may download artifact `id`, and its size.
async fn authorize(s: &AppState, device_id: &str, id: &str) -> AppResult<u64> {
    let row: Option<(i64,)> = sqlx::query_as(
        "SELECT a.size FROM deployment_devices dd JOIN deployments dep ON dep.id = dd.deployment_id \
         JOIN artifacts a ON a.org_id = dep.org_id AND a.id = dep.artifact_id \
         JOIN devices d ON d.id = dd.device_id \
         WHERE dd.device_id = $1 AND dep.artifact_id = $2 AND dd.finished = 0 \
         AND d.status = 'accepted' AND d.cert_revoked_at IS NULL LIMIT 1",
    )
    .bind(device_id.to_string())
    .bind(id.to_string())
    .fetch_optional(s.db.pool())
    .await?;
    if let Some((size,)) = row {
        return Ok(u64::try_from(size).unwrap_or(0));
    }
    let known: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM artifacts WHERE id = $1 LIMIT 1")
        .bind(id.to_string())
        .fetch_optional(s.db.pool())
        .await?;
    Err(match known {
        Some(_) => AppError::Forbidden(format!(
            "artifact {id} is not deployed to device {device_id} (or its deployment has ended for it)"
        )),
        None => AppError::NotFound(format!("no artifact {id}")),
    })
}

/// See the module documentation.
pub async fn artifact(
    State(s): State<AppState>,
    peer: Option<axum::Extension<PeerDevice>>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> AppResult<Response> {
    let Some(axum::Extension(PeerDevice(device))) = peer else {
        return Err(AppError::Unauthorized(
            "downloads need the device's client certificate (the one it uses for MQTT)".into(),
        ));
    };
    if !drover_proto::update::is_sha256_hex(&id) {
        return Err(AppError::NotFound(format!("no artifact {id:?}")));
    }
    let size = authorize(&s, &device, &id).await?;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match parse_range(range, size) {
        Wanted::Whole => (StatusCode::OK, 0, size),
        Wanted::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b),
        Wanted::Unsatisfiable => {
            let mut resp = AppError::RangeNotSatisfiable(format!(
                "the range {} is outside the artifact's {size} bytes",
                range.unwrap_or_default()
            ))
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let stream = s.store.read_range(&id, start, end).await?;
    let state = s.clone();
    let counted = stream.inspect(move |chunk| {
        if let Ok(c) = chunk {
            state.metrics.artifact_bytes_served.fetch_add(c.len() as u64, Ordering::Relaxed);
        }
    });
    let mut resp = Response::new(Body::from_stream(counted));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{id}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 100), Wanted::Whole);
        assert_eq!(parse_range(Some("bytes=10-"), 100), Wanted::Part(10, 100));
        assert_eq!(parse_range(Some("bytes=10-19"), 100), Wanted::Part(10, 20));
        assert_eq!(parse_range(Some("bytes=90-500"), 100), Wanted::Part(90, 100));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Wanted::Part(90, 100));
        assert_eq!(parse_range(Some("bytes=-500"), 100), Wanted::Part(0, 100));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Wanted::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=150-160"), 100), Wanted::Unsatisfiable);
        // Served whole: several ranges, another unit, nonsense, an inverted range.
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Wanted::Whole);
        assert_eq!(parse_range(Some("items=0-1"), 100), Wanted::Whole);
        assert_eq!(parse_range(Some("bytes=x-"), 100), Wanted::Whole);
        assert_eq!(parse_range(Some("bytes=20-10"), 100), Wanted::Whole);
    }
}
