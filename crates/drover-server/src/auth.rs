//! Who is calling: API tokens (bearer), web sessions (cookie), and droverd's own command
//! line. Secrets are random, shown once, and stored only as hashes: SHA-256 for the
//! high-entropy tokens and session ids, argon2 for the passwords people choose.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use drover_proto::api::{PrincipalKind, Role};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{AppError, AppResult};

/// Prefix of every API token, so that secret scanners and people recognise one.
pub const TOKEN_PREFIX: &str = "drv_";
pub const SESSION_COOKIE: &str = "drover_session";
pub const LOGIN_CSRF_COOKIE: &str = "drover_login_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The caller of an operation, as the audit log records it.
#[derive(Debug, Clone)]
pub struct Principal {
    pub kind: PrincipalKind,
    pub id: String,
    pub name: String,
    pub role: Role,
    /// None only for server-wide system actions.
    pub org_id: Option<String>,
    /// Client address, `cli` or `system`.
    pub source: String,
    /// The CSRF token of the web session the request came with.
    pub session_csrf: Option<String>,
}

impl Principal {
    /// droverd's own command line (`droverd token create`), acting for an organization.
    pub fn cli(org_id: &str) -> Principal {
        Principal {
            kind: PrincipalKind::System,
            id: "droverd".into(),
            name: "droverd command line".into(),
            role: Role::Admin,
            org_id: Some(org_id.to_string()),
            source: "cli".into(),
            session_csrf: None,
        }
    }

    pub fn system(org_id: Option<&str>) -> Principal {
        Principal {
            kind: PrincipalKind::System,
            id: "droverd".into(),
            name: "droverd".into(),
            role: Role::Admin,
            org_id: org_id.map(str::to_string),
            source: "system".into(),
            session_csrf: None,
        }
    }

    pub fn org(&self) -> &str {
        self.org_id.as_deref().unwrap_or_default()
    }

    /// Refuses the call unless the caller's role is at least `role`.
    pub fn require(&self, role: Role, doing: &str) -> AppResult<()> {
        if self.role >= role {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "permission denied: {doing} needs the {role} role; this {} has the {} role",
                self.kind.as_str(),
                self.role
            )))
        }
    }
}

/// True when `sent` is the expected CSRF token, compared in constant time.
pub fn csrf_matches(expected: Option<&str>, sent: Option<&str>) -> bool {
    match (expected, sent) {
        (Some(e), Some(s)) if !e.is_empty() => {
            e.len() == s.len() && e.bytes().zip(s.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        }
        _ => false,
    }
}

pub fn random_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A new API token secret.
pub fn new_token_secret() -> String {
    format!("{TOKEN_PREFIX}{}", random_secret(32))
}

/// A password for a person to type once and then change: 20 characters from an alphabet
/// without look-alikes.
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut buf = [0u8; 20];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    buf.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

/// argon2id with the crate's default (OWASP-recommended) cost; runs on a blocking thread.
pub async fn hash_password(password: String) -> AppResult<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string())
    })
    .await
    .map_err(AppError::internal)?
    .map_err(AppError::internal)
}

/// Checks a password against a stored hash. With no stored hash (unknown user) it still
/// spends the same work, so that timing does not reveal which usernames exist.
pub async fn verify_password(password: String, stored: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let dummy = DUMMY.get_or_init(|| {
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            Argon2::default().hash_password(b"no such user", &salt).map(|h| h.to_string()).unwrap_or_default()
        });
        let hash_str = stored.as_deref().unwrap_or(dummy);
        let Ok(parsed) = PasswordHash::new(hash_str) else { return false };
        let ok = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
        ok && stored.is_some()
    })
    .await
    .unwrap_or(false)
}

/// Slows down password guessing without letting anyone lock a real user out.
///
/// * One client address guessing one user's password: after [`LoginLimiter::FREE_FAILURES`]
///   failures, each further attempt from that address at that user must wait twice as long
///   as the last (up to 15 minutes); attempts in the wait are refused with 429.
/// * One client address guessing many users' passwords: the same, counted per address.
/// * Many addresses guessing one user's password: after [`LoginLimiter::USER_SLOW_AFTER`]
///   failures at that user from anywhere, every attempt at it is delayed before its password
///   is checked (doubling from 250 ms up to [`LoginLimiter::USER_MAX_DELAY`]) but never
///   refused, so the real user, from an address that has not failed, still signs in.
///
/// A success clears the failures of that user, and of that user from that address.
pub struct LoginLimiter {
    entries: Mutex<HashMap<String, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter { entries: Mutex::new(HashMap::new()) }
    }
}

impl LoginLimiter {
    pub const FREE_FAILURES: u32 = 5;
    /// Failures at one user name, from any address, before its attempts are slowed down.
    pub const USER_SLOW_AFTER: u32 = 10;
    /// The longest delay of an attempt at a user name others are guessing.
    pub const USER_MAX_DELAY: Duration = Duration::from_secs(2);
    const MAX_WAIT: Duration = Duration::from_secs(15 * 60);
    /// A record this old is forgotten.
    const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);

    /// The keys that refuse: this address at this user, and this address at anyone. Without
    /// a known address (a local caller) the first is the user alone.
    fn refusing_keys(username: &str, ip: Option<IpAddr>) -> Vec<String> {
        match ip {
            Some(ip) => vec![format!("pair:{ip}/{username}"), format!("ip:{ip}")],
            None => vec![format!("pair:-/{username}")],
        }
    }

    fn user_key(username: &str) -> String {
        format!("user:{username}")
    }

    fn wait_for(f: &Failures) -> Duration {
        if f.count < Self::FREE_FAILURES {
            return Duration::ZERO;
        }
        let exp = (f.count - Self::FREE_FAILURES).min(10);
        Duration::from_secs(1u64 << exp).min(Self::MAX_WAIT)
    }

    fn user_delay(f: &Failures) -> Duration {
        if f.count < Self::USER_SLOW_AFTER {
            return Duration::ZERO;
        }
        let exp = (f.count - Self::USER_SLOW_AFTER).min(10);
        (Duration::from_millis(250) * (1u32 << exp)).min(Self::USER_MAX_DELAY)
    }

    /// `Err(seconds to wait)` when this attempt must be refused without checking the
    /// password; otherwise `Ok(delay)`, how long to hold it before checking the password.
    pub fn check(&self, username: &str, ip: Option<IpAddr>, now: Instant) -> Result<Duration, u64> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut wait = Duration::ZERO;
        for key in Self::refusing_keys(username, ip) {
            if let Some(f) = entries.get(&key) {
                let until = f.last + Self::wait_for(f);
                if until > now {
                    wait = wait.max(until - now);
                }
            }
        }
        if !wait.is_zero() {
            return Err(wait.as_secs().max(1));
        }
        Ok(entries
            .get(&Self::user_key(username))
            .filter(|f| now.duration_since(f.last) < Self::FORGET_AFTER)
            .map(Self::user_delay)
            .unwrap_or_default())
    }

    pub fn failed(&self, username: &str, ip: Option<IpAddr>, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, f| now.duration_since(f.last) < Self::FORGET_AFTER);
        for key in Self::refusing_keys(username, ip).into_iter().chain([Self::user_key(username)]) {
            let f = entries.entry(key).or_insert(Failures { count: 0, last: now });
            f.count += 1;
            f.last = now;
        }
    }

    pub fn succeeded(&self, username: &str, ip: Option<IpAddr>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&Self::user_key(username));
        entries.remove(&Self::refusing_keys(username, ip)[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_backs_off_after_free_failures_and_forgives_on_success() {
        let l = LoginLimiter::default();
        let t0 = Instant::now();
        for _ in 0..LoginLimiter::FREE_FAILURES - 1 {
            assert!(l.check("ann", None, t0).is_ok());
            l.failed("ann", None, t0);
        }
        assert!(l.check("ann", None, t0).is_ok());
        l.failed("ann", None, t0);
        assert_eq!(l.check("ann", None, t0), Err(1));
        l.failed("ann", None, t0);
        assert_eq!(l.check("ann", None, t0), Err(2));
        assert!(l.check("ann", None, t0 + Duration::from_secs(3)).is_ok());
        assert!(l.check("bob", None, t0).is_ok(), "other users are not affected");
        l.succeeded("ann", None);
        assert!(l.check("ann", None, t0).is_ok());
    }

    #[test]
    fn limiter_counts_per_address_too() {
        let l = LoginLimiter::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..LoginLimiter::FREE_FAILURES {
            l.failed(&format!("user{i}"), Some(ip), t0);
        }
        assert!(l.check("someone-else", Some(ip), t0).is_err());
        assert!(l.check("someone-else", None, t0).is_ok());
    }

    #[test]
    fn an_attacker_address_never_locks_the_user_out_elsewhere() {
        let l = LoginLimiter::default();
        let attacker: IpAddr = "198.51.100.1".parse().unwrap();
        let user: IpAddr = "203.0.113.9".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..50 {
            l.failed("ann", Some(attacker), t0);
        }
        assert!(l.check("ann", Some(attacker), t0).is_err(), "the attacker's address is refused");
        let delay = l.check("ann", Some(user), t0).expect("the user's own address is not refused");
        assert!(delay <= LoginLimiter::USER_MAX_DELAY);
    }

    #[test]
    fn distributed_guessing_slows_a_user_down_but_never_refuses() {
        let l = LoginLimiter::default();
        let t0 = Instant::now();
        for i in 0..LoginLimiter::USER_SLOW_AFTER - 1 {
            l.failed("ann", Some(IpAddr::from([198, 51, 100, i as u8])), t0);
        }
        assert_eq!(l.check("ann", Some("203.0.113.9".parse().unwrap()), t0), Ok(Duration::ZERO));
        for i in 0..200u32 {
            l.failed("ann", Some(IpAddr::from([198, 51, 101, i as u8])), t0);
        }
        let fresh = Some("203.0.113.9".parse().unwrap());
        assert_eq!(l.check("ann", fresh, t0), Ok(LoginLimiter::USER_MAX_DELAY));
        l.succeeded("ann", fresh);
        assert_eq!(l.check("ann", fresh, t0), Ok(Duration::ZERO));
    }

    #[test]
    fn csrf_tokens_must_be_present_and_equal() {
        assert!(csrf_matches(Some("abc"), Some("abc")));
        assert!(!csrf_matches(Some("abc"), Some("abd")));
        assert!(!csrf_matches(Some("abc"), Some("ab")));
        assert!(!csrf_matches(Some("abc"), None));
        assert!(!csrf_matches(None, Some("")));
        assert!(!csrf_matches(Some(""), Some("")));
    }

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery".into(), Some(h.clone())).await);
        assert!(!verify_password("wrong horse battery".into(), Some(h)).await);
        assert!(!verify_password("anything at all".into(), None).await);
    }
}
