//! Output for people (aligned tables) or for programs (`-o json`).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people (`text` is the same).
    #[value(alias = "text")]
    Table,
    Json,
}

/// Formats rows as columns padded to the widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// One record as `label: value` lines, labels aligned.
pub fn fields(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0) + 1;
    rows.iter().map(|(k, v)| format!("{:<w$} {v}\n", format!("{k}:"))).collect()
}

pub fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

/// A timestamp shortened for a table: `2026-11-23 07:06`.
pub fn short_time(ts: Option<&str>) -> String {
    match ts {
        Some(t) => t.replace('T', " ").chars().take(16).collect(),
        None => "-".into(),
    }
}

/// Milliseconds as the largest whole unit: `30s`, `5m`, `1h`, `2d`, `250ms`.
pub fn duration_ms(ms: i64) -> String {
    for (unit, n) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms != 0 && ms % n == 0 {
            return format!("{}{unit}", ms / n);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let t = table(
            &["name", "role"],
            &[vec!["ann".into(), "admin".into()], vec!["bartholomew".into(), "viewer".into()]],
        );
        assert_eq!(t, "NAME         ROLE\nann          admin\nbartholomew  viewer\n");
        assert_eq!(short_time(Some("2026-11-23T07:06:27.299Z")), "2026-11-23 07:06");
    }
}
