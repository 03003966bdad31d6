//! A small SMTP client for alert mail: one message per connection, EHLO, STARTTLS (or TLS
//! from the first byte, or plain for a local relay), AUTH PLAIN when a username is
//! configured, MAIL/RCPT/DATA with dot-stuffing, QUIT. The server's certificate is checked
//! against the platform's roots plus `notify_ca_file`. Credentials never reach a log line or
//! an error message.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::AlertsConfig;

const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("SMTP server {server}: {message}")]
    Protocol { server: String, message: String },
    #[error("SMTP server {server}: {source}")]
    Io { server: String, source: std::io::Error },
    #[error("SMTP server {server}: no answer within {TIMEOUT:?}")]
    Timeout { server: String },
    #[error("invalid smtp_security {0:?}: starttls, tls or none")]
    Security(String),
}

/// TLS for SMTP: the platform's roots plus `extra`.
pub fn tls_config(extra: Vec<CertificateDer<'static>>) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
        .map_err(|e| format!("TLS verifier: {e}"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

struct Session<S> {
    io: BufReader<S>,
    server: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn err(&self, message: impl Into<String>) -> SmtpError {
        SmtpError::Protocol { server: self.server.clone(), message: message.into() }
    }

    fn io_err(&self, source: std::io::Error) -> SmtpError {
        SmtpError::Io { server: self.server.clone(), source }
    }

    /// Reads one reply (all its lines): its code and text.
    async fn reply(&mut self) -> Result<(u16, String), SmtpError> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(TIMEOUT, self.io.read_line(&mut line))
                .await
                .map_err(|_| SmtpError::Timeout { server: self.server.clone() })?
                .map_err(|e| self.io_err(e))?;
            if n == 0 {
                return Err(self.err("the connection closed"));
            }
            let line = line.trim_end();
            if line.len() < 3 || line.len() > 1000 {
                return Err(self.err(format!("malformed reply {line:?}")));
            }
            let code: u16 = line[..3].parse().map_err(|_| self.err(format!("malformed reply {line:?}")))?;
            text.push_str(line.get(4..).unwrap_or_default());
            text.push('\n');
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, text));
            }
        }
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), SmtpError> {
        let w = async {
            self.io.get_mut().write_all(data).await?;
            self.io.get_mut().flush().await
        };
        tokio::time::timeout(TIMEOUT, w)
            .await
            .map_err(|_| SmtpError::Timeout { server: self.server.clone() })?
            .map_err(|e| SmtpError::Io { server: self.server.clone(), source: e })
    }

    /// Sends a command and expects one of `ok`. `shown` is what an error repeats of it.
    async fn command(&mut self, line: &str, shown: &str, ok: &[u16]) -> Result<String, SmtpError> {
        self.write(format!("{line}\r\n").as_bytes()).await?;
        let (code, text) = self.reply().await?;
        if ok.contains(&code) { Ok(text) } else { Err(self.err(format!("{shown} refused: {code} {}", text.trim()))) }
    }

    async fn greeting_and_ehlo(&mut self, greet: bool) -> Result<String, SmtpError> {
        if greet {
            let (code, text) = self.reply().await?;
            if code != 220 {
                return Err(self.err(format!("greeting {code} {}", text.trim())));
            }
        }
        self.command("EHLO drover", "EHLO", &[250]).await
    }

    /// AUTH (when configured), then the message.
    async fn deliver(
        &mut self,
        cfg: &AlertsConfig,
        caps: &str,
        to: &[String],
        message: &[u8],
    ) -> Result<(), SmtpError> {
        if !cfg.smtp_username.is_empty() {
            if !caps
                .lines()
                .any(|l| l.to_ascii_uppercase().starts_with("AUTH") && l.to_ascii_uppercase().contains("PLAIN"))
            {
                return Err(self.err("the server does not offer AUTH PLAIN"));
            }
            let token = STANDARD.encode(format!("\0{}\0{}", cfg.smtp_username, cfg.smtp_password));
            self.command(&format!("AUTH PLAIN {token}"), "AUTH PLAIN", &[235]).await?;
        }
        self.command(&format!("MAIL FROM:<{}>", cfg.smtp_from), "MAIL FROM", &[250]).await?;
        for rcpt in to {
            self.command(&format!("RCPT TO:<{rcpt}>"), &format!("RCPT TO {rcpt}"), &[250, 251]).await?;
        }
        self.command("DATA", "DATA", &[354]).await?;
        self.write(message).await?;
        self.command(".", "the message", &[250]).await?;
        let _ = self.command("QUIT", "QUIT", &[221]).await;
        Ok(())
    }
}

/// The message: headers, then the body with CRLF line ends and leading dots doubled.
fn message(cfg: &AlertsConfig, to: &[String], subject: &str, body: &str) -> Vec<u8> {
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    let date =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc2822).unwrap_or_default();
    let mut out = format!(
        "From: {}\r\nTo: {}\r\nSubject: {}\r\nDate: {date}\r\nMessage-ID: <{}@drover>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        clean(&cfg.smtp_from),
        clean(&to.join(", ")),
        clean(subject),
        uuid::Uuid::now_v7().simple()
    );
    for line in body.lines() {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.into_bytes()
}

/// Sends one message to `to` through the configured server.
pub async fn send(
    cfg: &AlertsConfig,
    tls: Arc<rustls::ClientConfig>,
    to: &[String],
    subject: &str,
    body: &str,
) -> Result<(), SmtpError> {
    let server = cfg.smtp_server.clone();
    let host = server.rsplit_once(':').map(|(h, _)| h).unwrap_or(&server).trim_matches(['[', ']']).to_string();
    let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(&server))
        .await
        .map_err(|_| SmtpError::Timeout { server: server.clone() })?
        .map_err(|e| SmtpError::Io { server: server.clone(), source: e })?;
    let msg = message(cfg, to, subject, body);
    let name = ServerName::try_from(host.clone())
        .map_err(|_| SmtpError::Protocol { server: server.clone(), message: format!("invalid host name {host:?}") })?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    match cfg.smtp_security.as_str() {
        "none" => {
            let mut s = Session { io: BufReader::new(tcp), server };
            let caps = s.greeting_and_ehlo(true).await?;
            s.deliver(cfg, &caps, to, &msg).await
        }
        "tls" => {
            let stream =
                connector.connect(name, tcp).await.map_err(|e| SmtpError::Io { server: server.clone(), source: e })?;
            let mut s = Session { io: BufReader::new(stream), server };
            let caps = s.greeting_and_ehlo(true).await?;
            s.deliver(cfg, &caps, to, &msg).await
        }
        "starttls" => {
            let mut s = Session { io: BufReader::new(tcp), server: server.clone() };
            let caps = s.greeting_and_ehlo(true).await?;
            if !caps.lines().any(|l| l.trim().eq_ignore_ascii_case("STARTTLS")) {
                return Err(
                    s.err("the server does not offer STARTTLS (set smtp_security = \"none\" for a local relay)")
                );
            }
            s.command("STARTTLS", "STARTTLS", &[220]).await?;
            let tcp = s.io.into_inner();
            let stream =
                connector.connect(name, tcp).await.map_err(|e| SmtpError::Io { server: server.clone(), source: e })?;
            let mut s = Session { io: BufReader::new(stream), server };
            let caps = s.greeting_and_ehlo(false).await?;
            s.deliver(cfg, &caps, to, &msg).await
        }
        other => Err(SmtpError::Security(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_stuff_dots_and_keep_headers_on_one_line() {
        let cfg = AlertsConfig { smtp_from: "drover@example.com".into(), ..Default::default() };
        let m = String::from_utf8(message(&cfg, &["a@example.com".into()], "x\r\nBcc: evil@example.com", ".dot\nline"))
            .unwrap();
        assert!(m.contains("Subject: x  Bcc: evil@example.com\r\n"), "{m}");
        assert!(m.ends_with("\r\n\r\n..dot\r\nline\r\n"), "{m}");
    }
}
