//! `drover alert …` (rules, current alerts, history, silences, notification channels) and
//! `drover rules …` (device rule sets of groups), over the REST API (docs/alerts.md).
//!
//! A threshold is written as on the server's pages: `--when 'cpu.percent > 90'` with
//! `--for 5m` and `--agg avg|min|max|every`.

use std::process::ExitCode;

use clap::{ArgGroup, Subcommand};
use serde_json::{Value, json};

use crate::client::{CliError, Client, segment};
use crate::deploy::seconds;
use crate::fleet::check_filter;
use crate::output::{self, Format};

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub(crate) enum AlertCommand {
    /// Alert rules.
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Current alerts (pending and firing; `--firing` for firing only).
    List {
        /// Only firing alerts, not pending ones.
        #[arg(long)]
        firing: bool,
        /// Only this rule (id or name).
        #[arg(long)]
        rule: Option<String>,
    },
    /// What happened: fired, resolved, flapping, late events, silenced notifications.
    History {
        /// Only this rule (id or name).
        #[arg(long)]
        rule: Option<String>,
        /// Only this device (id or name).
        #[arg(long)]
        device: Option<String>,
        /// How many entries, newest first.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Silences: mute notifications for a rule and/or devices for a while.
    #[command(subcommand)]
    Silence(SilenceCommand),
    /// Notification channels: webhook, slack, email.
    #[command(subcommand)]
    Channel(ChannelCommand),
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub(crate) enum RuleCommand {
    /// Create a rule. Exactly one of --when, --offline, --silent, --event, --fleet-offline,
    /// --fleet-when.
    #[command(group(ArgGroup::new("kind").required(true)
        .args(["when", "offline", "silent", "event", "fleet_offline", "fleet_when"])))]
    Create {
        /// The rule's name, shown in alerts and notifications.
        name: String,
        /// Per device: METRIC OP THRESHOLD, e.g. 'cpu.percent > 90'.
        #[arg(long)]
        when: Option<String>,
        /// Per device: offline longer than this (e.g. 10m).
        #[arg(long)]
        offline: Option<String>,
        /// Per device: no telemetry for longer than this.
        #[arg(long)]
        silent: Option<String>,
        /// Per device: an event name or glob (door.*).
        #[arg(long)]
        event: Option<String>,
        /// Fleet: more than this percentage of the devices offline.
        #[arg(long)]
        fleet_offline: Option<f64>,
        /// Fleet: METRIC OP THRESHOLD over every selected device's points.
        #[arg(long)]
        fleet_when: Option<String>,
        /// The window of --when / --fleet-when (default 5m).
        #[arg(long = "for", default_value = "5m")]
        window: String,
        /// avg (default), min, max, or every (every point of the window).
        #[arg(long, default_value = "avg")]
        agg: String,
        /// Which devices, e.g. 'tag.site = "berlin"'.
        #[arg(long)]
        filter: Option<String>,
        /// The devices of a group (id).
        #[arg(long)]
        group: Option<String>,
        /// info, warning or critical.
        #[arg(long, default_value = "warning")]
        severity: String,
        /// How long the condition must hold before it fires (e.g. 1m; default: at once).
        #[arg(long)]
        pending: Option<String>,
        /// Notification channel ids or names, comma-separated.
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
    },
    /// Alert rules.
    List,
    /// One rule with its condition, scope and channels.
    Show {
        /// The rule's id or name.
        rule: String,
    },
    /// Delete a rule; its alerts end.
    Delete {
        /// The rule's id or name.
        rule: String,
    },
    /// Evaluate a disabled rule again.
    Enable {
        /// The rule's id or name.
        rule: String,
    },
    /// Stop evaluating a rule (it stays, to be enabled again).
    Disable {
        /// The rule's id or name.
        rule: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum SilenceCommand {
    /// Mute notifications: of a rule (--rule), of devices (--filter), or both.
    Create {
        /// Mute this rule (id or name).
        #[arg(long)]
        rule: Option<String>,
        /// Mute the devices matching this filter, e.g. 'tag.site = "berlin"'.
        #[arg(long)]
        filter: Option<String>,
        /// How long (e.g. 2h).
        #[arg(long = "for")]
        duration: String,
        /// Why (required; shown to everyone).
        #[arg(long)]
        reason: String,
    },
    /// Silences, active and ended.
    List,
    /// End a silence now.
    Expire {
        /// The silence's id (`drover alert silence list`).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ChannelCommand {
    /// Create a channel; a webhook's signing secret is printed once.
    Create {
        /// The channel's name, used by `alert rule create --channels`.
        name: String,
        /// webhook, slack or email.
        #[arg(long)]
        kind: String,
        /// The URL, or comma-separated email addresses.
        #[arg(long)]
        target: String,
    },
    /// Notification channels.
    List,
    /// Delete a channel.
    Delete {
        /// The channel's id or name.
        channel: String,
    },
    /// Send a test notification now.
    Test {
        /// The channel's id or name.
        channel: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum RulesCommand {
    /// Set the device rule set of a group from a JSON file (`{"rules": […]}` or `[…]`; - for stdin).
    Set {
        /// The group, by name or id.
        group: String,
        /// The JSON file, or - for stdin.
        file: String,
    },
    /// A group's rule set, or with --device what a device gets and has applied.
    Show {
        /// The group, by name or id.
        group: Option<String>,
        /// A device (id or name) instead of a group.
        #[arg(long, conflicts_with = "group")]
        device: Option<String>,
    },
    /// Remove a group's device rule set.
    Delete {
        /// The group, by name or id.
        group: String,
    },
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print(out: Format, v: &Value, text: impl FnOnce(&Value) -> String) {
    match out {
        Format::Json => println!("{}", output::json(v)),
        Format::Table => print!("{}", text(v)),
    }
}

/// `METRIC OP THRESHOLD`.
fn comparison(spec: &str) -> Result<(String, String, f64), CliError> {
    let bad =
        || CliError::Usage(format!("invalid condition {spec:?}: write METRIC OP NUMBER, e.g. 'cpu.percent > 90'"));
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let [metric, op, n] = parts.as_slice() else { return Err(bad()) };
    if !["<", "<=", ">", ">=", "==", "!="].contains(op) {
        return Err(bad());
    }
    let n: f64 = n.parse().map_err(|_| bad())?;
    Ok((metric.to_string(), op.to_string(), n))
}

fn minutes(spec: &str) -> Result<u64, CliError> {
    let secs = seconds(spec)?.as_secs();
    if secs % 60 != 0 {
        return Err(CliError::Usage(format!("{spec:?}: give whole minutes, e.g. 10m")));
    }
    Ok(secs / 60)
}

/// Channel names become ids.
fn channel_ids(client: &Client, names: &[String]) -> Result<Vec<String>, CliError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let all: Value = client.get("/notification-channels", &[])?;
    names
        .iter()
        .map(|n| {
            all.as_array()
                .into_iter()
                .flatten()
                .find(|c| c["id"] == n.as_str() || c["name"] == n.as_str())
                .map(|c| s(&c["id"]))
                .ok_or_else(|| {
                    CliError::Usage(format!("no notification channel {n:?} (see drover alert channel list)"))
                })
        })
        .collect()
}

fn rule_text(r: &Value) -> String {
    output::fields(&[
        ("id", s(&r["id"])),
        ("name", s(&r["name"])),
        ("condition", s(&r["description"])),
        ("filter", s(&r["filter"])),
        ("group", s(&r["group"])),
        ("severity", s(&r["severity"])),
        ("enabled", s(&r["enabled"])),
        (
            "pending",
            r["pending_s"].as_i64().map(|p| output::duration_ms(p * 1000)).unwrap_or_else(|| s(&r["pending_s"])),
        ),
        (
            "channels",
            r["channels"].as_array().map(|c| c.iter().map(s).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
        ),
    ])
}

pub(crate) fn alert(client: &Client, out: Format, cmd: AlertCommand) -> Result<ExitCode, CliError> {
    match cmd {
        AlertCommand::Rule(cmd) => rule(client, out, cmd)?,
        AlertCommand::List { firing, rule } => {
            let mut q = Vec::new();
            if firing {
                q.push(("state", "firing".to_string()));
            }
            if let Some(r) = rule {
                q.push(("rule", r));
            }
            q.push(("limit", "500".to_string()));
            let page: Value = client.get("/alerts", &q)?;
            let v = page["items"].clone();
            print(out, &v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        let mut state = s(&a["state"]);
                        if a["flapping"] == true {
                            state.push_str(" (flapping)");
                        }
                        if a["silenced"] == true {
                            state.push_str(" (silenced)");
                        }
                        vec![
                            state,
                            s(&a["rule_name"]),
                            a["device_id"].as_str().unwrap_or("(fleet)").to_string(),
                            s(&a["severity"]),
                            output::short_time(a["since"].as_str()),
                            s(&a["message"]),
                        ]
                    })
                    .collect();
                output::table(&["STATE", "RULE", "DEVICE", "SEVERITY", "SINCE", "MESSAGE"], &rows)
            });
        }
        AlertCommand::History { rule, device, limit } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(r) = rule {
                q.push(("rule", r));
            }
            if let Some(d) = device {
                q.push(("device", crate::fleet::resolve_device_id(client, &d)?));
            }
            let v: Value = client.get("/alerts/history", &q)?;
            print(out, &v, |v| {
                let rows: Vec<Vec<String>> = v["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        vec![
                            output::short_time(e["at"].as_str()),
                            s(&e["event"]),
                            s(&e["rule_name"]),
                            e["device_id"].as_str().unwrap_or("(fleet)").to_string(),
                            s(&e["message"]),
                        ]
                    })
                    .collect();
                output::table(&["AT", "EVENT", "RULE", "DEVICE", "MESSAGE"], &rows)
            });
        }
        AlertCommand::Silence(cmd) => silence(client, out, cmd)?,
        AlertCommand::Channel(cmd) => channel(client, out, cmd)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn rule(client: &Client, out: Format, cmd: RuleCommand) -> Result<(), CliError> {
    match cmd {
        RuleCommand::Create {
            name,
            when,
            offline,
            silent,
            event,
            fleet_offline,
            fleet_when,
            window,
            agg,
            filter,
            group,
            severity,
            pending,
            channels,
        } => {
            if let Some(f) = &filter {
                check_filter(f)?;
            }
            let window_s = seconds(&window)?.as_secs();
            let condition = if let Some(w) = when.or(fleet_when.clone()) {
                let (metric, op, threshold) = comparison(&w)?;
                let kind = if fleet_when.is_some() { "fleet_metric" } else { "threshold" };
                json!({"kind": kind, "metric": metric, "op": op, "threshold": threshold, "window_s": window_s, "aggregate": agg})
            } else if let Some(m) = offline {
                json!({"kind": "absence", "mode": "offline", "minutes": minutes(&m)?})
            } else if let Some(m) = silent {
                json!({"kind": "absence", "mode": "silent", "minutes": minutes(&m)?})
            } else if let Some(e) = event {
                json!({"kind": "event", "name": e})
            } else {
                json!({"kind": "fleet_offline", "percent": fleet_offline.unwrap_or_default()})
            };
            let pending_s = match pending {
                Some(p) => seconds(&p)?.as_secs(),
                None => 0,
            };
            let body = json!({
                "name": name, "severity": severity, "filter": filter, "group": group, "condition": condition,
                "pending_s": pending_s, "channels": channel_ids(client, &channels)?,
            });
            let r: Value = client.send("POST", "/alert-rules", &body)?;
            print(out, &r, rule_text);
        }
        RuleCommand::List => {
            let v: Value = client.get("/alert-rules", &[])?;
            print(out, &v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        vec![
                            s(&r["name"]),
                            if r["enabled"] == true { "on".into() } else { "off".into() },
                            s(&r["severity"]),
                            s(&r["description"]),
                            s(&r["filter"]),
                            s(&r["id"]),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "ENABLED", "SEVERITY", "CONDITION", "FILTER", "ID"], &rows)
            });
        }
        RuleCommand::Show { rule } => {
            let r: Value = client.get(&format!("/alert-rules/{}", segment(&rule)), &[])?;
            print(out, &r, rule_text);
        }
        RuleCommand::Delete { rule } => {
            let _: Value = client.delete(&format!("/alert-rules/{}", segment(&rule)))?;
            if out == Format::Table {
                println!("deleted alert rule {rule}");
            }
        }
        RuleCommand::Enable { rule } => set_enabled(client, out, &rule, true)?,
        RuleCommand::Disable { rule } => set_enabled(client, out, &rule, false)?,
    }
    Ok(())
}

fn set_enabled(client: &Client, out: Format, rule: &str, on: bool) -> Result<(), CliError> {
    let r: Value = client.send("PATCH", &format!("/alert-rules/{}", segment(rule)), &json!({"enabled": on}))?;
    print(out, &r, rule_text);
    Ok(())
}

fn silence(client: &Client, out: Format, cmd: SilenceCommand) -> Result<(), CliError> {
    let silence_text = |v: &Value| {
        output::fields(&[
            ("id", s(&v["id"])),
            ("rule", s(&v["rule"])),
            ("filter", s(&v["filter"])),
            ("from", s(&v["starts_at"])),
            ("until", s(&v["ends_at"])),
            ("active", s(&v["active"])),
            ("by", s(&v["created_by"])),
            ("reason", s(&v["reason"])),
        ])
    };
    match cmd {
        SilenceCommand::Create { rule, filter, duration, reason } => {
            if let Some(f) = &filter {
                check_filter(f)?;
            }
            let body =
                json!({"rule": rule, "filter": filter, "duration_s": seconds(&duration)?.as_secs(), "reason": reason});
            let v: Value = client.send("POST", "/silences", &body)?;
            print(out, &v, silence_text);
        }
        SilenceCommand::List => {
            let v: Value = client.get("/silences", &[])?;
            print(out, &v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        vec![
                            s(&x["id"]),
                            if x["active"] == true { "active".into() } else { "ended".into() },
                            s(&x["rule"]),
                            s(&x["filter"]),
                            output::short_time(x["ends_at"].as_str()),
                            s(&x["reason"]),
                        ]
                    })
                    .collect();
                output::table(&["ID", "STATE", "RULE", "FILTER", "UNTIL", "REASON"], &rows)
            });
        }
        SilenceCommand::Expire { id } => {
            let v: Value = client.send("POST", &format!("/silences/{}/expire", segment(&id)), &json!({}))?;
            print(out, &v, silence_text);
        }
    }
    Ok(())
}

fn channel(client: &Client, out: Format, cmd: ChannelCommand) -> Result<(), CliError> {
    match cmd {
        ChannelCommand::Create { name, kind, target } => {
            let v: Value = client.send(
                "POST",
                "/notification-channels",
                &json!({"name": name, "kind": kind, "target": target}),
            )?;
            print(out, &v, |v| {
                let mut t = output::fields(&[
                    ("id", s(&v["id"])),
                    ("name", s(&v["name"])),
                    ("kind", s(&v["kind"])),
                    ("target", s(&v["target"])),
                ]);
                if let Some(sec) = v["secret"].as_str() {
                    t.push_str(&format!(
                        "secret: {sec}\n(shown once: receivers check X-Drover-Signature with it; see docs/alerts.md)\n"
                    ));
                }
                t
            });
        }
        ChannelCommand::List => {
            let v: Value = client.get("/notification-channels", &[])?;
            print(out, &v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| vec![s(&c["name"]), s(&c["kind"]), s(&c["target"]), s(&c["id"])])
                    .collect();
                output::table(&["NAME", "KIND", "TARGET", "ID"], &rows)
            });
        }
        ChannelCommand::Delete { channel } => {
            let _: Value = client.delete(&format!("/notification-channels/{}", segment(&channel)))?;
            if out == Format::Table {
                println!("deleted channel {channel}");
            }
        }
        ChannelCommand::Test { channel } => {
            let v: Value =
                client.send("POST", &format!("/notification-channels/{}/test", segment(&channel)), &json!({}))?;
            print(out, &v, |v| match v["status"].as_str() {
                Some("sent") => format!("test notification sent to {}\n", s(&v["channel_name"])),
                _ => format!("test notification to {} failed: {}\n", s(&v["channel_name"]), s(&v["last_error"])),
            });
            if v["status"] != "sent" {
                return Err(CliError::Usage(format!("delivery failed: {}", s(&v["last_error"]))));
            }
        }
    }
    Ok(())
}

pub(crate) fn rules(client: &Client, out: Format, cmd: RulesCommand) -> Result<ExitCode, CliError> {
    let set_text = |v: &Value| {
        let mut t = output::fields(&[
            ("group", s(&v["group_name"])),
            ("version", s(&v["version"])),
            ("updated", format!("{} by {}", s(&v["updated_at"]), s(&v["updated_by"]))),
        ]);
        t.push_str(&serde_json::to_string_pretty(&v["rules"]).unwrap_or_default());
        t.push('\n');
        t
    };
    match cmd {
        RulesCommand::Set { group, file } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| CliError::Usage(format!("cannot read the rule set from stdin: {e}")))?
            } else {
                std::fs::read_to_string(&file).map_err(|e| CliError::Usage(format!("cannot read {file}: {e}")))?
            };
            let parsed: Value =
                serde_json::from_str(&text).map_err(|e| CliError::Usage(format!("{file} is not JSON: {e}")))?;
            let rules = if parsed.is_array() { parsed } else { parsed["rules"].clone() };
            if !rules.is_array() {
                return Err(CliError::Usage(format!("{file}: give {{\"rules\": [...]}} or a list of rules")));
            }
            let v: Value =
                client.send("PUT", &format!("/device-rule-sets/{}", segment(&group)), &json!({"rules": rules}))?;
            print(out, &v, set_text);
        }
        RulesCommand::Show { group: Some(g), .. } => {
            let v: Value = client.get(&format!("/device-rule-sets/{}", segment(&g)), &[])?;
            print(out, &v, set_text);
        }
        RulesCommand::Show { device: Some(d), .. } => {
            let d = crate::fleet::resolve_device_id(client, &d)?;
            let v: Value = client.get(&format!("/devices/{}/rules", segment(&d)), &[])?;
            print(out, &v, |v| {
                let mut t = output::fields(&[
                    ("device", s(&v["device_id"])),
                    ("sent version", s(&v["version"])),
                    ("applied version", s(&v["applied_version"])),
                    ("applied at", s(&v["applied_at"])),
                    (
                        "from groups",
                        v["groups"]
                            .as_array()
                            .map(|g| g.iter().map(s).collect::<Vec<_>>().join(", "))
                            .unwrap_or_default(),
                    ),
                ]);
                for c in v["conflicts"].as_array().into_iter().flatten() {
                    t.push_str(&format!("conflict: {}\n", s(c)));
                }
                t.push_str(&serde_json::to_string_pretty(&v["rules"]).unwrap_or_default());
                t.push('\n');
                t
            });
        }
        RulesCommand::Show { .. } => {
            let v: Value = client.get("/device-rule-sets", &[])?;
            print(out, &v, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        vec![
                            s(&r["group_name"]),
                            s(&r["version"]),
                            r["rules"].as_array().map(|a| a.len()).unwrap_or(0).to_string(),
                            output::short_time(r["updated_at"].as_str()),
                        ]
                    })
                    .collect();
                output::table(&["GROUP", "VERSION", "RULES", "UPDATED"], &rows)
            });
        }
        RulesCommand::Delete { group } => {
            let _: Value = client.delete(&format!("/device-rule-sets/{}", segment(&group)))?;
            if out == Format::Table {
                println!("deleted the device rule set of {group}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
