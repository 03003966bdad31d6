//! Cursor pagination and sorting for list endpoints (keyset pagination: a page costs the same
//! however deep it is, and rows added meanwhile neither repeat nor vanish).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::db::{Bind, Filter};
use crate::error::{AppError, AppResult};

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 500;

/// A sortable field of a listing: its public name, column, and whether it is an integer.
#[derive(Debug, Clone, Copy)]
pub struct SortField {
    pub name: &'static str,
    pub column: &'static str,
    pub int: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Sort {
    pub field: SortField,
    pub desc: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum CursorValue {
    Int(i64),
    Text(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CursorData {
    /// Sort the cursor was made for, e.g. `-created_at`.
    s: String,
    v: CursorValue,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

/// What a list request asked for, validated.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub limit: u32,
    pub sort: Sort,
    after: Option<CursorData>,
}

impl Sort {
    fn spec(&self) -> String {
        format!("{}{}", if self.desc { "-" } else { "" }, self.field.name)
    }
}

impl PageRequest {
    pub fn parse(
        limit: Option<u32>,
        cursor: Option<&str>,
        sort: Option<&str>,
        fields: &[SortField],
        default_sort: &str,
    ) -> AppResult<PageRequest> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(AppError::BadRequest(format!("limit must be between 1 and {MAX_LIMIT}")));
        }
        let spec = sort.filter(|s| !s.is_empty()).unwrap_or(default_sort);
        let (desc, name) = match spec.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, spec),
        };
        let field = fields.iter().copied().find(|f| f.name == name).ok_or_else(|| {
            let names: Vec<_> = fields.iter().map(|f| f.name).collect();
            AppError::BadRequest(format!(
                "cannot sort by {name:?}: use one of {} (prefix '-' for descending)",
                names.join(", ")
            ))
        })?;
        let sort = Sort { field, desc };
        let after = match cursor.filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => {
                let bad = || {
                    AppError::InvalidCursor(
                        "invalid pagination cursor: pass back next_cursor unchanged, or omit it to start over".into(),
                    )
                };
                let raw = URL_SAFE_NO_PAD.decode(c).map_err(|_| bad())?;
                let data: CursorData = serde_json::from_slice(&raw).map_err(|_| bad())?;
                if data.s != sort.spec() {
                    return Err(AppError::InvalidCursor(format!(
                        "the cursor belongs to sort {:?}, not {:?}: keep the sort while paging",
                        data.s,
                        sort.spec()
                    )));
                }
                let type_ok =
                    matches!((&data.v, field.int), (CursorValue::Int(_), true) | (CursorValue::Text(_), false));
                if !type_ok {
                    return Err(bad());
                }
                Some(data)
            }
        };
        Ok(PageRequest { limit, sort, after })
    }

    /// Adds the keyset condition to `filter`; `id_col` breaks ties (None when the sort
    /// column is unique).
    pub fn apply(&self, filter: &mut Filter, id_col: Option<&str>) {
        let Some(after) = &self.after else { return };
        let col = self.sort.field.column;
        let op = if self.sort.desc { "<" } else { ">" };
        let v = match &after.v {
            CursorValue::Int(i) => Bind::Int(*i),
            CursorValue::Text(s) => Bind::Text(s.clone()),
        };
        match (id_col, &after.id) {
            (Some(id_col), Some(id)) => {
                // The redundant `col <= v` gives both engines an index range: the keyset
                // condition alone makes a deep page scan every row before it (14 ms → under
                // 1 ms at 50,000 devices deep, BENCHMARKS.md).
                let op_eq = if self.sort.desc { "<=" } else { ">=" };
                filter.and(
                    &format!("{col} {op_eq} ? AND ({col} {op} ? OR ({col} = ? AND {id_col} {op} ?))"),
                    [v.clone(), v.clone(), v, Bind::Text(id.clone())],
                );
            }
            _ => {
                filter.and(&format!("{col} {op} ?"), [v]);
            }
        }
    }

    /// `ORDER BY … LIMIT …` fetching one row more than the page, to know if another follows.
    pub fn order_limit(&self, id_col: Option<&str>) -> String {
        let dir = if self.sort.desc { "DESC" } else { "ASC" };
        let col = self.sort.field.column;
        match id_col {
            Some(id) => format!(" ORDER BY {col} {dir}, {id} {dir} LIMIT {}", self.limit + 1),
            None => format!(" ORDER BY {col} {dir} LIMIT {}", self.limit + 1),
        }
    }

    /// Cuts the extra row and makes the cursor of the next page from the last item kept.
    pub fn finish<T>(
        &self,
        mut rows: Vec<T>,
        key: impl Fn(&T) -> (CursorValue, Option<String>),
    ) -> (Vec<T>, Option<String>) {
        if rows.len() <= self.limit as usize {
            return (rows, None);
        }
        rows.truncate(self.limit as usize);
        let next = rows.last().map(|last| {
            let (v, id) = key(last);
            let data = CursorData { s: self.sort.spec(), v, id };
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&data).unwrap_or_default())
        });
        (rows, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &[SortField] = &[
        SortField { name: "username", column: "username", int: false },
        SortField { name: "created_at", column: "created_at", int: true },
    ];

    #[test]
    fn rejects_bad_limits_sorts_and_cursors() {
        assert!(PageRequest::parse(Some(0), None, None, FIELDS, "username").is_err());
        assert!(PageRequest::parse(Some(501), None, None, FIELDS, "username").is_err());
        assert!(PageRequest::parse(None, None, Some("password_hash"), FIELDS, "username").is_err());
        let e = PageRequest::parse(None, Some("!!!"), None, FIELDS, "username").unwrap_err();
        assert_eq!(e.code(), "invalid_cursor");
    }

    #[test]
    fn cursor_round_trip_and_sort_binding() {
        let req = PageRequest::parse(Some(2), None, Some("-created_at"), FIELDS, "username").unwrap();
        let (rows, next) =
            req.finish(vec![(30, "c"), (20, "b"), (10, "a")], |r| (CursorValue::Int(r.0), Some(r.1.to_string())));
        assert_eq!(rows.len(), 2);
        let next = next.unwrap();
        let again = PageRequest::parse(Some(2), Some(&next), Some("-created_at"), FIELDS, "username").unwrap();
        let mut f = Filter::default();
        again.apply(&mut f, Some("id"));
        assert_eq!(f.sql(), " WHERE created_at <= $1 AND (created_at < $2 OR (created_at = $3 AND id < $4))");
        assert_eq!(f.binds, vec![Bind::Int(20), Bind::Int(20), Bind::Int(20), Bind::Text("b".into())]);
        let e = PageRequest::parse(Some(2), Some(&next), Some("username"), FIELDS, "username").unwrap_err();
        assert_eq!(e.code(), "invalid_cursor");
    }
}
