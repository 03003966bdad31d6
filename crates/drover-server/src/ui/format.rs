//! How pages show times and devices, the same everywhere: one absolute format with its time
//! zone (`2026-12-07 00:29:31 UTC`), relative times where people scan (`3 min ago`, the
//! absolute time in the `title`), and a device by its display name linking to its page, its
//! id in the tooltip and small beside it.

use minijinja::{Environment, HtmlEscape, Value};

use crate::time;

/// `2026-12-07 00:29:31 UTC`.
pub fn absolute(ms: i64) -> String {
    let s = time::to_rfc3339(ms);
    // `YYYY-MM-DDTHH:MM:SS[.mmm]Z`
    let base = s.get(..19).unwrap_or(&s).replace('T', " ");
    format!("{base} UTC")
}

/// `just now`, `42 s ago`, `3 min ago`, `5 h ago`, `2 days ago`, `in 4 min`; past a month
/// the date.
pub fn relative(ms: i64, now: i64) -> String {
    let d = (now - ms) / 1000;
    let (n, future) = if d < 0 { (-d, true) } else { (d, false) };
    let text = match n {
        0..5 => return "just now".into(),
        5..60 => format!("{n} s"),
        60..3600 => format!("{} min", n / 60),
        3600..86_400 => format!("{} h", n / 3600),
        86_400..2_592_000 => {
            let days = n / 86_400;
            format!("{days} day{}", if days == 1 { "" } else { "s" })
        }
        _ => return absolute(ms).get(..10).unwrap_or_default().to_string(),
    };
    if future { format!("in {text}") } else { format!("{text} ago") }
}

fn parse(v: &Value) -> Option<(String, i64)> {
    let s = v.as_str()?;
    Some((s.to_string(), time::parse(s)?))
}

/// `{{ t | when }}`: the absolute time in a `<time>` element.
fn when(v: Value) -> Value {
    match parse(&v) {
        Some((raw, ms)) => Value::from_safe_string(format!(
            r#"<time datetime="{}">{}</time>"#,
            HtmlEscape(&raw),
            HtmlEscape(&absolute(ms))
        )),
        None => v,
    }
}

/// `{{ t | ago }}`: how long ago, the absolute time in the tooltip.
fn ago(v: Value) -> Value {
    match parse(&v) {
        Some((raw, ms)) => Value::from_safe_string(format!(
            r#"<time datetime="{}" title="{}">{}</time>"#,
            HtmlEscape(&raw),
            HtmlEscape(&absolute(ms)),
            HtmlEscape(&relative(ms, time::now_ms()))
        )),
        None => v,
    }
}

/// `{{ t | date }}`: the day alone, the absolute time in the tooltip.
fn date(v: Value) -> Value {
    match parse(&v) {
        Some((raw, ms)) => {
            let abs = absolute(ms);
            Value::from_safe_string(format!(
                r#"<time datetime="{}" title="{}">{}</time>"#,
                HtmlEscape(&raw),
                HtmlEscape(&abs),
                HtmlEscape(abs.get(..10).unwrap_or_default())
            ))
        }
        None => v,
    }
}

/// `{{ device(id, name) }}`: a link to the device's page showing its name, the id in the
/// tooltip and its end small beside it (ids are UUIDv7, whose start is the time they were
/// made: devices enrolled together share it), unless the name is the id. `name` may be
/// undefined (a device no longer there): the id shows.
fn device(id: Value, name: Option<Value>) -> Value {
    let id = id.as_str().map(str::to_string).unwrap_or_else(|| id.to_string());
    let name = name.and_then(|n| n.as_str().map(str::to_string)).filter(|n| !n.is_empty());
    let id_e = HtmlEscape(&id).to_string();
    let html = match name {
        Some(n) if n != id => format!(
            r#"<a href="/devices/{id_e}" class="device-name" title="{id_e}">{}</a> <span class="muted mono device-id">{}</span>"#,
            HtmlEscape(&n),
            HtmlEscape(&id_tail(&id))
        ),
        _ => format!(r#"<a href="/devices/{id_e}" class="device-name mono" title="{id_e}">{id_e}</a>"#),
    };
    Value::from_safe_string(html)
}

/// The last 8 characters of an id, after an ellipsis: `…3f2799c0`.
fn id_tail(id: &str) -> String {
    let n = id.chars().count();
    if n <= 8 { id.to_string() } else { format!("…{}", id.chars().skip(n - 8).collect::<String>()) }
}

pub fn register(env: &mut Environment<'static>) {
    env.add_filter("when", when);
    env.add_filter("ago", ago);
    env.add_filter("date", date);
    env.add_function("device", device);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_the_same_everywhere() {
        let t = time::parse("2026-12-07T00:29:31.250Z").unwrap();
        assert_eq!(absolute(t), "2026-12-07 00:29:31 UTC");
        assert_eq!(relative(t, t + 2_000), "just now");
        assert_eq!(relative(t, t + 42_000), "42 s ago");
        assert_eq!(relative(t, t + 3 * 60_000 + 10_000), "3 min ago");
        assert_eq!(relative(t, t + 5 * 3_600_000), "5 h ago");
        assert_eq!(relative(t, t + 86_400_000), "1 day ago");
        assert_eq!(relative(t, t - 4 * 60_000), "in 4 min");
        assert_eq!(relative(t, t + 90 * 86_400_000), "2026-12-07");
    }

    #[test]
    fn a_device_shows_by_name_with_its_id() {
        let html = device(Value::from("0123456789abcdef"), Some(Value::from("gw-<7>"))).to_string();
        assert!(html.contains(">gw-&lt;7&gt;</a>"), "{html}");
        assert!(html.contains(r#"title="0123456789abcdef""#), "{html}");
        assert!(html.contains(">…89abcdef</span>"), "{html}");
        let bare = device(Value::from("0123456789abcdef"), None).to_string();
        assert!(bare.contains(">0123456789abcdef</a>") && !bare.contains("span"), "{bare}");
    }
}
