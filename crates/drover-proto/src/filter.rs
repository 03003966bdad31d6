//! The device filter language, used by device listings (`filter=`) and dynamic groups, e.g.
//!
//! ```text
//! tag.region = "eu" and attr.arch = "aarch64" and online
//! ```
//!
//! Parsing is pure so that clients (the CLI, the web UI's preview) give the same errors as the
//! server, which compiles the parsed [`Expr`] to SQL with bound parameters. The grammar, for
//! people, is in `docs/filters.md`:
//!
//! ```text
//! filter    := or
//! or        := and ( "or" and )*
//! and       := unary ( "and" unary )*
//! unary     := "not" unary | "(" or ")" | condition
//! condition := "online"
//!            | "online" "=" ( "true" | "false" )
//!            | field ( "=" | "!=" | "~" ) value
//!            | field [ "not" ] "in" "(" value ( "," value )* ")"
//!            | field [ "not" ] "exists"            (tag.KEY and attr.KEY only)
//! field     := "id" | "status" | "group" | "tag." KEY | "attr." KEY
//!            | "artifact.id" | "artifact.name" | "artifact.version" | "artifact.commit"
//! value     := "double-quoted, with \" and \\ escapes" | bare word
//! ```
//!
//! A bare word is letters, digits and `_ . : / * + @ -`, and not a keyword (`and`, `or`,
//! `not`, `in`, `exists`); anything else must be quoted. `~` matches a glob where `*` stands
//! for any run of characters. Keywords are case-insensitive.

use std::fmt;

/// Longest filter accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 4096;
/// Deepest nesting of parentheses and `not`.
pub const MAX_DEPTH: usize = 16;
/// Most conditions in one filter.
pub const MAX_CONDITIONS: usize = 64;
/// Most values in one `in (…)` list.
pub const MAX_IN_VALUES: usize = 256;
/// Longest value, in bytes (an attribute value's limit).
pub const MAX_VALUE_LEN: usize = 1024;
/// Longest tag or attribute key.
pub const MAX_KEY_LEN: usize = 64;

/// A parsed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    Cond(Cond),
}

/// What a condition looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// The device id.
    Id,
    /// `pending`, `accepted`, `rejected` or `decommissioned`.
    Status,
    /// Membership of a static group, by name.
    Group,
    /// An operator-set tag.
    Tag(String),
    /// An inventory attribute the device reported.
    Attr(String),
    /// What Drover installed on the device (its `software`), or the source commit of that
    /// artifact's build.
    Artifact(ArtifactField),
}

/// The part of a device's installed artifact a filter looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactField {
    /// The artifact's id (SHA-256).
    Id,
    Name,
    Version,
    /// The source commit in the artifact's provenance.
    Commit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    /// Glob: `*` is any run of characters.
    Glob,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// Whether the device is connected now.
    Online(bool),
    Compare {
        field: Field,
        op: Op,
        value: String,
    },
    In {
        field: Field,
        values: Vec<String>,
    },
    /// The tag or attribute is set (to anything).
    Exists(Field),
}

/// A filter that does not parse: what is wrong, and where (1-based character column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    pub column: usize,
    pub message: String,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at column {}", self.message, self.column)
    }
}

impl std::error::Error for FilterError {}

/// The device statuses a filter may name.
pub const STATUSES: [&str; 4] = ["pending", "accepted", "rejected", "decommissioned"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Str(String),
    Eq,
    Ne,
    Tilde,
    LParen,
    RParen,
    Comma,
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("'{w}'"),
            Tok::Str(s) => format!("\"{s}\""),
            Tok::Eq => "'='".into(),
            Tok::Ne => "'!='".into(),
            Tok::Tilde => "'~'".into(),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::Comma => "','".into(),
            Tok::End => "the end of the filter".into(),
        }
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(self, Tok::Word(w) if w.eq_ignore_ascii_case(kw))
    }
}

const KEYWORDS: [&str; 5] = ["and", "or", "not", "in", "exists"];

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '*' | '+' | '@' | '-')
}

fn err<T>(column: usize, message: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError { column, message: message.into() })
}

/// Tokens with their 1-based column.
fn lex(input: &str) -> Result<Vec<(Tok, usize)>, FilterError> {
    let chars: Vec<char> = input.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '=' => {
                // `==` is a common slip; say so rather than fail later.
                if chars.get(i + 1) == Some(&'=') {
                    return err(col, "use '=' to compare, not '=='");
                }
                out.push((Tok::Eq, col));
                i += 1;
            }
            '!' => {
                if chars.get(i + 1) != Some(&'=') {
                    return err(col, "expected '!=' (use 'not' to negate)");
                }
                out.push((Tok::Ne, col));
                i += 2;
            }
            '~' => {
                out.push((Tok::Tilde, col));
                i += 1;
            }
            '(' => {
                out.push((Tok::LParen, col));
                i += 1;
            }
            ')' => {
                out.push((Tok::RParen, col));
                i += 1;
            }
            ',' => {
                out.push((Tok::Comma, col));
                i += 1;
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return err(col, "unterminated string: add the closing '\"'"),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => match chars.get(i + 1) {
                            Some(e @ ('"' | '\\')) => {
                                s.push(*e);
                                i += 2;
                            }
                            _ => return err(i + 1, "unknown escape in a string: use \\\" or \\\\"),
                        },
                        Some(c) if c.is_control() => return err(i + 1, "control character in a string"),
                        Some(c) => {
                            s.push(*c);
                            i += 1;
                        }
                    }
                }
                if s.len() > MAX_VALUE_LEN {
                    return err(col, format!("string longer than {MAX_VALUE_LEN} bytes"));
                }
                out.push((Tok::Str(s), col));
            }
            c if is_word_char(c) => {
                let start = i;
                while i < chars.len() && is_word_char(chars[i]) {
                    i += 1;
                }
                let w: String = chars[start..i].iter().collect();
                if w.len() > MAX_VALUE_LEN {
                    return err(col, format!("word longer than {MAX_VALUE_LEN} bytes"));
                }
                out.push((Tok::Word(w), col));
            }
            '\'' => return err(col, "use double quotes for strings"),
            other => return err(col, format!("unexpected character '{other}'")),
        }
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    conditions: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos].0
    }

    fn col(&self) -> usize {
        self.toks[self.pos].1
    }

    fn next(&mut self) -> (Tok, usize) {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn or(&mut self, depth: usize) -> Result<Expr, FilterError> {
        let mut parts = vec![self.and(depth)?];
        while self.peek().keyword("or") {
            self.next();
            parts.push(self.and(depth)?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Expr::Or(parts) })
    }

    fn and(&mut self, depth: usize) -> Result<Expr, FilterError> {
        let mut parts = vec![self.unary(depth)?];
        while self.peek().keyword("and") {
            self.next();
            parts.push(self.unary(depth)?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Expr::And(parts) })
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, FilterError> {
        if depth >= MAX_DEPTH {
            return err(self.col(), format!("nested deeper than {MAX_DEPTH} levels"));
        }
        if self.peek().keyword("not") {
            self.next();
            return Ok(Expr::Not(Box::new(self.unary(depth + 1)?)));
        }
        if *self.peek() == Tok::LParen {
            let (_, open) = self.next();
            let e = self.or(depth + 1)?;
            if *self.peek() != Tok::RParen {
                return err(
                    self.col(),
                    format!("expected ')' to close the '(' at column {open}, found {}", self.peek().describe()),
                );
            }
            self.next();
            return Ok(e);
        }
        self.conditions += 1;
        if self.conditions > MAX_CONDITIONS {
            return err(self.col(), format!("more than {MAX_CONDITIONS} conditions"));
        }
        self.condition()
    }

    fn field(&mut self) -> Result<Option<Field>, FilterError> {
        let (tok, col) = self.next();
        let Tok::Word(w) = tok else {
            return err(
                col,
                format!(
                    "expected a condition (online, id, status, group, tag.KEY, attr.KEY or artifact.FIELD), found {}",
                    tok.describe()
                ),
            );
        };
        let key = |k: &str, kind: &str| -> Result<String, FilterError> {
            let ok = !k.is_empty()
                && k.len() <= MAX_KEY_LEN
                && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if ok {
                Ok(k.to_string())
            } else {
                err(col, format!("invalid {kind} key {k:?}: use 1 to {MAX_KEY_LEN} letters, digits, '_', '.' or '-'"))
            }
        };
        Ok(Some(match w.as_str() {
            "online" => return Ok(None),
            "id" => Field::Id,
            "status" => Field::Status,
            "group" => Field::Group,
            "artifact.id" => Field::Artifact(ArtifactField::Id),
            "artifact.name" => Field::Artifact(ArtifactField::Name),
            "artifact.version" => Field::Artifact(ArtifactField::Version),
            "artifact.commit" => Field::Artifact(ArtifactField::Commit),
            _ if w.starts_with("artifact.") => {
                return err(
                    col,
                    format!("unknown field '{w}': use artifact.id, artifact.name, artifact.version or artifact.commit"),
                );
            }
            _ => {
                if let Some(k) = w.strip_prefix("tag.") {
                    Field::Tag(key(k, "tag")?)
                } else if let Some(k) = w.strip_prefix("attr.") {
                    Field::Attr(key(k, "attribute")?)
                } else {
                    return err(
                        col,
                        format!(
                            "unknown field '{w}': use online, id, status, group, tag.KEY, attr.KEY or artifact.FIELD"
                        ),
                    );
                }
            }
        }))
    }

    fn value(&mut self, after: &str) -> Result<String, FilterError> {
        let (tok, col) = self.next();
        match tok {
            Tok::Str(s) => Ok(s),
            Tok::Word(w) if !KEYWORDS.iter().any(|k| w.eq_ignore_ascii_case(k)) => Ok(w),
            Tok::Word(w) => err(col, format!("expected a value after {after}, found the keyword '{w}' (quote it)")),
            Tok::End => err(col, format!("expected a value after {after}")),
            other => err(col, format!("expected a value after {after}, found {}", other.describe())),
        }
    }

    fn condition(&mut self) -> Result<Expr, FilterError> {
        let field_col = self.col();
        let Some(field) = self.field()? else {
            // `online`, or `online = true|false`.
            if *self.peek() != Tok::Eq {
                return Ok(Expr::Cond(Cond::Online(true)));
            }
            self.next();
            let col = self.col();
            let v = self.value("'='")?;
            return match v.as_str() {
                "true" => Ok(Expr::Cond(Cond::Online(true))),
                "false" => Ok(Expr::Cond(Cond::Online(false))),
                _ => err(col, "online is true or false (or write 'online' / 'not online')"),
            };
        };
        let is_kv = matches!(field, Field::Tag(_) | Field::Attr(_));
        let negated = self.peek().keyword("not");
        if negated {
            self.next();
            if !(self.peek().keyword("in") || self.peek().keyword("exists")) {
                return err(
                    self.col(),
                    format!("expected 'in' or 'exists' after 'not', found {}", self.peek().describe()),
                );
            }
        }
        let (tok, col) = self.next();
        let cond = match tok {
            Tok::Eq | Tok::Ne | Tok::Tilde => {
                let (op, sym) = match tok {
                    Tok::Eq => (Op::Eq, "'='"),
                    Tok::Ne => (Op::Ne, "'!='"),
                    _ => (Op::Glob, "'~'"),
                };
                let vcol = self.col();
                let value = self.value(sym)?;
                if op == Op::Glob && matches!(field, Field::Status | Field::Group) {
                    return err(col, "'~' works on id, tag.KEY, attr.KEY and artifact.FIELD only");
                }
                check_value(&field, &value, vcol)?;
                Cond::Compare { field, op, value }
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("in") => {
                if *self.peek() != Tok::LParen {
                    return err(self.col(), format!("expected '(' after 'in', found {}", self.peek().describe()));
                }
                self.next();
                let mut values = Vec::new();
                loop {
                    let vcol = self.col();
                    let v = self.value(if values.is_empty() { "'in ('" } else { "','" })?;
                    check_value(&field, &v, vcol)?;
                    values.push(v);
                    if values.len() > MAX_IN_VALUES {
                        return err(vcol, format!("more than {MAX_IN_VALUES} values in one 'in' list"));
                    }
                    match self.next() {
                        (Tok::Comma, _) => continue,
                        (Tok::RParen, _) => break,
                        (t, c) => {
                            return err(c, format!("expected ',' or ')' in the 'in' list, found {}", t.describe()));
                        }
                    }
                }
                Cond::In { field, values }
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("exists") => {
                if !is_kv {
                    return err(col, "'exists' works on tag.KEY and attr.KEY only");
                }
                Cond::Exists(field)
            }
            other => {
                return err(
                    col,
                    format!(
                        "expected '=', '!=', '~', 'in' or 'exists' after the field at column {field_col}, found {}",
                        other.describe()
                    ),
                );
            }
        };
        let e = Expr::Cond(cond);
        Ok(if negated { Expr::Not(Box::new(e)) } else { e })
    }
}

fn check_value(field: &Field, value: &str, col: usize) -> Result<(), FilterError> {
    if *field == Field::Status && !STATUSES.contains(&value) {
        return err(col, format!("unknown status {value:?}: use pending, accepted, rejected or decommissioned"));
    }
    if *field == Field::Group && value.is_empty() {
        return err(col, "a group name cannot be empty");
    }
    Ok(())
}

/// Parses a filter. An empty or blank filter is an error: callers treat "no filter" apart.
pub fn parse(input: &str) -> Result<Expr, FilterError> {
    if input.len() > MAX_FILTER_LEN {
        return err(1, format!("the filter is longer than {MAX_FILTER_LEN} bytes"));
    }
    let toks = lex(input)?;
    if toks.len() == 1 {
        return err(1, "the filter is empty");
    }
    let mut p = Parser { toks, pos: 0, conditions: 0 };
    let e = p.or(0)?;
    if *p.peek() != Tok::End {
        let what = p.peek().describe();
        return err(p.col(), format!("expected 'and', 'or' or the end of the filter, found {what}"));
    }
    Ok(e)
}

impl Expr {
    /// Names of the groups the filter refers to (`group = "…"`).
    pub fn group_names(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.walk(&mut |c| match c {
            Cond::Compare { field: Field::Group, value, .. } => out.push(value.as_str()),
            Cond::In { field: Field::Group, values } => out.extend(values.iter().map(String::as_str)),
            _ => {}
        });
        out
    }

    fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Cond)) {
        match self {
            Expr::And(v) | Expr::Or(v) => v.iter().for_each(|e| e.walk(f)),
            Expr::Not(e) => e.walk(f),
            Expr::Cond(c) => f(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(k: &str, v: &str) -> Expr {
        Expr::Cond(Cond::Compare { field: Field::Tag(k.into()), op: Op::Eq, value: v.into() })
    }

    #[test]
    fn artifact_fields() {
        assert_eq!(
            parse("artifact.name = edge-app and artifact.commit ~ \"abc1234*\"").unwrap(),
            Expr::And(vec![
                Expr::Cond(Cond::Compare {
                    field: Field::Artifact(ArtifactField::Name),
                    op: Op::Eq,
                    value: "edge-app".into()
                }),
                Expr::Cond(Cond::Compare {
                    field: Field::Artifact(ArtifactField::Commit),
                    op: Op::Glob,
                    value: "abc1234*".into()
                }),
            ])
        );
        assert!(parse("artifact.version in (1.0, 2.0)").is_ok());
        let e = parse("artifact.colour = red").unwrap_err();
        assert!(e.message.contains("artifact.name"), "{e}");
        assert!(parse("artifact.name exists").is_err(), "exists is for tags and attributes");
    }

    #[test]
    fn parses_the_documented_example() {
        let e = parse(r#"tag.region = "eu" and attr.arch = "aarch64" and online"#).unwrap();
        assert_eq!(
            e,
            Expr::And(vec![
                tag("region", "eu"),
                Expr::Cond(Cond::Compare { field: Field::Attr("arch".into()), op: Op::Eq, value: "aarch64".into() }),
                Expr::Cond(Cond::Online(true)),
            ])
        );
    }

    #[test]
    fn precedence_not_and_or_parentheses() {
        // `and` binds tighter than `or`.
        let e = parse("tag.a = x or tag.b = y and tag.c = z").unwrap();
        assert_eq!(e, Expr::Or(vec![tag("a", "x"), Expr::And(vec![tag("b", "y"), tag("c", "z")])]));
        let e = parse("(tag.a = x or tag.b = y) and not online").unwrap();
        assert_eq!(
            e,
            Expr::And(vec![
                Expr::Or(vec![tag("a", "x"), tag("b", "y")]),
                Expr::Not(Box::new(Expr::Cond(Cond::Online(true)))),
            ])
        );
        assert_eq!(parse("online = false").unwrap(), Expr::Cond(Cond::Online(false)));
        assert_eq!(parse("NOT online").unwrap(), parse("not online").unwrap());
    }

    #[test]
    fn operators_and_values() {
        assert_eq!(
            parse(r#"id ~ "dev-*""#).unwrap(),
            Expr::Cond(Cond::Compare { field: Field::Id, op: Op::Glob, value: "dev-*".into() })
        );
        assert_eq!(
            parse(r#"status in (accepted, "pending")"#).unwrap(),
            Expr::Cond(Cond::In { field: Field::Status, values: vec!["accepted".into(), "pending".into()] })
        );
        assert_eq!(parse("tag.site exists").unwrap(), Expr::Cond(Cond::Exists(Field::Tag("site".into()))));
        assert_eq!(
            parse("tag.site not exists").unwrap(),
            Expr::Not(Box::new(Expr::Cond(Cond::Exists(Field::Tag("site".into())))))
        );
        assert_eq!(
            parse(r#"group not in ("a b", c)"#).unwrap(),
            Expr::Not(Box::new(Expr::Cond(Cond::In { field: Field::Group, values: vec!["a b".into(), "c".into()] })))
        );
        assert_eq!(
            parse(r#"tag.note != "say \"hi\" \\ bye""#).unwrap(),
            Expr::Cond(Cond::Compare {
                field: Field::Tag("note".into()),
                op: Op::Ne,
                value: r#"say "hi" \ bye"#.into()
            })
        );
        // Quoting makes keywords values; unicode counts columns in characters.
        assert_eq!(parse(r#"tag.x = "and""#).unwrap(), tag("x", "and"));
        assert_eq!(parse("tag.city = \"Zürich\"").unwrap(), tag("city", "Zürich"));
        assert_eq!(parse(r#"group = ops or group in (a, b)"#).unwrap().group_names(), ["ops", "a", "b"]);
    }

    /// Tried: a missing value, a missing operator, an unknown field, '==', a lone '!',
    /// single quotes, an unclosed string and parenthesis, a bad escape, a keyword as a value,
    /// a trailing word, exists on id, ~ on status, an unknown status, a bad key, empty input.
    #[test]
    fn errors_name_the_column() {
        let cases: &[(&str, &str)] = &[
            (r#"tag.region = "eu" and attr.arch ="#, "expected a value after '=' at column 34"),
            ("tag.region = ", "expected a value after '=' at column 14"),
            (
                "tag.region eu",
                "expected '=', '!=', '~', 'in' or 'exists' after the field at column 1, found 'eu' at column 12",
            ),
            (
                "colour = red",
                "unknown field 'colour': use online, id, status, group, tag.KEY, attr.KEY or artifact.FIELD at column 1",
            ),
            ("id == x", "use '=' to compare, not '==' at column 4"),
            ("! online", "expected '!=' (use 'not' to negate) at column 1"),
            ("tag.a = 'x'", "use double quotes for strings at column 9"),
            (r#"tag.a = "x"#, "unterminated string: add the closing '\"' at column 9"),
            ("(online", "expected ')' to close the '(' at column 1, found the end of the filter at column 8"),
            (r#"tag.a = "\n""#, "unknown escape in a string: use \\\" or \\\\ at column 10"),
            ("tag.a = and", "expected a value after '=', found the keyword 'and' (quote it) at column 9"),
            ("online online", "expected 'and', 'or' or the end of the filter, found 'online' at column 8"),
            ("id exists", "'exists' works on tag.KEY and attr.KEY only at column 4"),
            ("status ~ acc*", "'~' works on id, tag.KEY, attr.KEY and artifact.FIELD only at column 8"),
            (
                "status = gone",
                "unknown status \"gone\": use pending, accepted, rejected or decommissioned at column 10",
            ),
            ("tag. = x", "invalid tag key \"\": use 1 to 64 letters, digits, '_', '.' or '-' at column 1"),
            ("   ", "the filter is empty at column 1"),
            ("tag.a in x", "expected '(' after 'in', found 'x' at column 10"),
            ("tag.a in (x y)", "expected ',' or ')' in the 'in' list, found 'y' at column 13"),
            ("online = maybe", "online is true or false (or write 'online' / 'not online') at column 10"),
            ("tag.a not = b", "expected 'in' or 'exists' after 'not', found '=' at column 11"),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(input, want)| {
                let got = parse(input).unwrap_err().to_string();
                (got != *want).then(|| format!("{input:?}: got {got:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// Tried: input over the length limit, nesting past the depth limit, too many conditions,
    /// too many values in a list.
    #[test]
    fn limits() {
        assert!(parse(&format!("tag.a = \"{}\"", "x".repeat(MAX_FILTER_LEN))).unwrap_err().message.contains("longer"));
        let deep = format!("{}online{}", "(".repeat(MAX_DEPTH + 1), ")".repeat(MAX_DEPTH + 1));
        assert!(parse(&deep).unwrap_err().message.contains("nested deeper"));
        let nots = format!("{}online", "not ".repeat(MAX_DEPTH + 1));
        assert!(parse(&nots).unwrap_err().message.contains("nested deeper"));
        let ok = format!("{}online{}", "(".repeat(MAX_DEPTH - 1), ")".repeat(MAX_DEPTH - 1));
        assert!(parse(&ok).is_ok());
        let many = vec!["online"; MAX_CONDITIONS + 1].join(" or ");
        assert!(parse(&many).unwrap_err().message.contains("more than 64 conditions"));
        let list = (0..=MAX_IN_VALUES).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert!(parse(&format!("tag.a in ({list})")).unwrap_err().message.contains("values in one 'in' list"));
    }
}
