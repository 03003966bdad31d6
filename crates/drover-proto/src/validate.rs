//! Validation rules shared by the server (which enforces them) and clients (which can check
//! early and give the same message).

/// Shortest password the server accepts.
pub const MIN_PASSWORD_LEN: usize = 10;
/// Longest password the server accepts (bounds the hashing work per request).
pub const MAX_PASSWORD_LEN: usize = 256;

/// A username: 2 to 64 characters of lowercase letters, digits, `.`, `_`, `-`, starting with
/// a letter or digit.
pub fn username(name: &str) -> Result<(), String> {
    let ok_len = (2..=64).contains(&name.len());
    let ok_first = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if ok_len && ok_first && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "invalid username {name:?}: use 2 to 64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
        ))
    }
}

pub fn password(pw: &str) -> Result<(), String> {
    let n = pw.chars().count();
    if n < MIN_PASSWORD_LEN {
        Err(format!("password too short: use at least {MIN_PASSWORD_LEN} characters"))
    } else if pw.len() > MAX_PASSWORD_LEN {
        Err(format!("password too long: use at most {MAX_PASSWORD_LEN} bytes"))
    } else {
        Ok(())
    }
}

/// A display name (token, organization): 1 to 100 printable characters.
pub fn display_name(what: &str, name: &str) -> Result<(), String> {
    let trimmed = name.trim();
    if trimmed.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        Err(format!("invalid {what} name: use 1 to 100 printable characters"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["admin", "jo", "ops.team-1", "9lives"] {
            assert!(username(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "Admin", "-x", "a b", "über", &"x".repeat(65)] {
            assert!(username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_and_names() {
        assert!(password("short").is_err());
        assert!(password("long enough pw").is_ok());
        assert!(password(&"x".repeat(300)).is_err());
        assert!(display_name("token", "ci pipeline").is_ok());
        assert!(display_name("token", "  ").is_err());
        assert!(display_name("token", "a\nb").is_err());
    }
}
