//! A blocking client of the REST API that turns each failure into an error saying what to do.

use std::time::Duration;

use drover_proto::api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Percent-encodes one path segment, so an id or name typed by someone stays one segment
/// (`a b`, `x/../me`).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("not logged in: run `drover login --url URL --token TOKEN`, or set DROVER_URL and DROVER_TOKEN")]
    NotLoggedIn,
    #[error(
        "cannot reach the Drover server at {url}: {cause}; check the address with `drover login --url URL` or DROVER_URL"
    )]
    Unreachable { url: String, cause: String },
    #[error(
        "the server rejected the token ({message}); run `drover login` with a valid token — `drover token create` or `droverd token create` makes one"
    )]
    Unauthorized { message: String },
    #[error("{message}")]
    Forbidden { message: String },
    /// A refusal with the API's error code; `status` is 0 when it did not come as an HTTP
    /// answer (the device refused a remote session), and then only the code is shown.
    #[error("{message} [{}]", api_tag(code, *status))]
    Api { status: u16, code: String, message: String },
    #[error("unexpected answer from the server (HTTP {status}): {detail}")]
    Protocol { status: u16, detail: String },
    #[error("config file {path}: {message}")]
    Config { path: String, message: String },
    #[error("{0}")]
    Usage(String),
}

/// `code, HTTP 404`, or the code alone without an HTTP status.
fn api_tag(code: &str, status: u16) -> String {
    if status == 0 { code.to_string() } else { format!("{code}, HTTP {status}") }
}

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the server at `base`, which must be an `http://` or `https://` address.
    pub fn new(base: &str, token: Option<String>) -> Result<Client, CliError> {
        let base = base.trim().trim_end_matches('/');
        let rest = base.strip_prefix("http://").or_else(|| base.strip_prefix("https://"));
        if rest.is_none_or(|host| host.is_empty()) {
            return Err(CliError::Usage(format!(
                "invalid server address {base:?}: give it as http://HOST:PORT or https://HOST"
            )));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(60)))
            .user_agent(concat!("drover-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Client { base: base.to_string(), token, agent })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The API token, for connections the client does not make itself (remote sessions).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> Result<T, CliError> {
        let mut req = self.agent.get(&self.url(path));
        for (k, v) in query {
            req = req.query(k, v);
        }
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        self.finish(req.call())
    }

    pub fn send<B: Serialize, T: DeserializeOwned>(&self, method: &str, path: &str, body: &B) -> Result<T, CliError> {
        let url = self.url(path);
        let mut req = match method {
            "POST" => self.agent.post(&url),
            "PATCH" => self.agent.patch(&url),
            "PUT" => self.agent.put(&url),
            other => return Err(CliError::Usage(format!("unsupported method {other}"))),
        };
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        self.finish(req.send_json(body))
    }

    /// Sends a body that is not JSON (a CSV file) with its content type.
    pub fn send_text<T: DeserializeOwned>(&self, path: &str, content_type: &str, body: String) -> Result<T, CliError> {
        let mut req = self.agent.post(&self.url(path)).header("Content-Type", content_type);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        self.finish(req.send(body))
    }

    /// PUTs a body as it is (a signed `root.json`, whose bytes must not be re-encoded).
    pub fn put_bytes<T: DeserializeOwned>(&self, path: &str, content_type: &str, body: Vec<u8>) -> Result<T, CliError> {
        let mut req = self.agent.put(&self.url(path)).header("Content-Type", content_type);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        self.finish(req.send(body))
    }

    /// POSTs `len` bytes read from `body` (a file: streamed, never held in memory). No overall
    /// timeout: a large upload takes as long as it takes.
    pub fn send_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: &mut dyn std::io::Read,
        len: u64,
    ) -> Result<T, CliError> {
        let mut req = self
            .agent
            .post(&self.url(path))
            .header("Content-Type", content_type)
            .header("Content-Length", &len.to_string())
            .config()
            .timeout_global(None)
            .build();
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        self.finish(req.send(ureq::SendBody::from_reader(body)))
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let mut req = self.agent.delete(&self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        self.finish(req.call())
    }

    fn finish<T: DeserializeOwned>(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, CliError> {
        let mut resp = result.map_err(|e| CliError::Unreachable { url: self.base.clone(), cause: e.to_string() })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| CliError::Unreachable { url: self.base.clone(), cause: e.to_string() })?;
        if (200..300).contains(&status) {
            // 204 No Content decodes as JSON null.
            let text = if text.is_empty() { "null" } else { &text };
            return serde_json::from_str(text).map_err(|e| CliError::Protocol { status, detail: e.to_string() });
        }
        let Ok(err) = serde_json::from_str::<ErrorBody>(&text) else {
            let detail: String = text.chars().take(200).collect();
            return Err(CliError::Protocol { status, detail: format!("{detail} (is {} a Drover server?)", self.base) });
        };
        let message = err.error.message;
        Err(match status {
            401 => CliError::Unauthorized { message },
            403 if message.starts_with("permission denied") => CliError::Forbidden { message },
            403 => CliError::Forbidden { message: format!("permission denied: {message}") },
            _ => CliError::Api { status, code: err.error.code, message },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_a_scheme() {
        assert_eq!(Client::new("http://h:8080/ ", None).unwrap().base(), "http://h:8080");
        assert_eq!(Client::new("https://h", None).unwrap().base(), "https://h");
        for bad in ["h:8080", "127.0.0.1:8080", "http://", "ftp://h"] {
            let err = Client::new(bad, None).err().unwrap().to_string();
            assert!(err.contains("give it as http://HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn errors_name_the_http_status_only_when_there_is_one() {
        let from_device = CliError::Api { status: 0, code: "path-not-allowed".into(), message: "no".into() };
        assert_eq!(from_device.to_string(), "no [path-not-allowed]");
        let from_server = CliError::Api { status: 404, code: "not_found".into(), message: "gone".into() };
        assert_eq!(from_server.to_string(), "gone [not_found, HTTP 404]");
    }

    #[test]
    fn segments_stay_one_segment() {
        assert_eq!(segment("01a2-b_c~"), "01a2-b_c~");
        assert_eq!(segment("x/../me"), "x%2F%2E%2E%2Fme");
        assert_eq!(segment("a b"), "a%20b");
        assert_eq!(segment("é"), "%C3%A9");
    }
}
