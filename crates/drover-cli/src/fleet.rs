//! The fleet commands of `drover`: devices, enrollment tokens and pre-authorization.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Subcommand;
use drover_proto::api::{
    AddGroupDevices, BulkPreauthorized, CreateEnrollmentToken, CreateGroup, CreatedEnrollmentToken, Device,
    DeviceDetail, DevicePatch, DeviceStatus, EnrollmentToken, Group, GroupDevicesAdded, GroupKind, GroupPreview,
    PatchTags, Preauthorization, Preauthorize, Preauthorized,
};

use crate::client::{CliError, Client, segment};
use crate::commands::{Paging, list, print_list, print_one};
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub(crate) enum DeviceCommand {
    /// Devices, newest first.
    List {
        /// pending, accepted, rejected or decommissioned.
        #[arg(long)]
        status: Option<String>,
        /// A filter expression, e.g. 'tag.region = "eu" and online'.
        #[arg(long)]
        filter: Option<String>,
        /// Only devices connected now.
        #[arg(long, conflicts_with = "offline")]
        online: bool,
        /// Only devices not connected now.
        #[arg(long)]
        offline: bool,
        /// Part of the display name, the id or an identity value.
        #[arg(long = "search", alias = "q", value_name = "TEXT")]
        search: Option<String>,
        /// created_at, updated_at, last_seen_at, id; prefix - for descending (default -created_at).
        #[arg(long)]
        sort: Option<String>,
        /// Only devices running this artifact: its id, NAME or NAME@VERSION.
        #[arg(long)]
        artifact: Option<String>,
        /// Only devices running a build of this source commit (full hash or a prefix of 7 or more).
        #[arg(long)]
        commit: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// One device: identity, status, presence, software, certificate, inventory, tags, groups,
    /// events.
    Show {
        /// The device: its id or its name.
        device: String,
    },
    /// Accept a pending device: its certificate is issued.
    Accept {
        /// The device: its id or its name.
        device: String,
    },
    /// Refuse a pending device for good.
    Reject {
        /// The device: its id or its name.
        device: String,
    },
    /// Retire a device: its certificate is revoked at once (needs --yes).
    Decommission {
        /// The device: its id or its name.
        device: String,
        /// Confirm: the device cannot connect again with its key.
        #[arg(long)]
        yes: bool,
    },
    /// Set tags on a device (other tags stay).
    Tag {
        /// The device: its id or its name.
        device: String,
        /// Tags to set, e.g. region=eu.
        #[arg(required = true, value_name = "KEY=VALUE")]
        tags: Vec<String>,
    },
    /// Remove tags from a device, by key.
    Untag {
        /// The device: its id or its name.
        device: String,
        /// Keys of the tags to remove.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Give a device a name (shown first, accepted wherever a device is), or --clear it.
    Rename {
        /// The device: its id or its name.
        device: String,
        /// The new name.
        #[arg(required_unless_present = "clear", conflicts_with = "clear")]
        name: Option<String>,
        /// Remove the operator's name: the device is shown by its hostname, serial or id again.
        #[arg(long)]
        clear: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum GroupCommand {
    /// Groups, by name.
    List {
        /// static or dynamic.
        #[arg(long)]
        kind: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// One group, by name or id, with how many members it has.
    Show {
        /// The group's name or id.
        group: String,
    },
    /// A static group (members added by hand), or with --filter a dynamic one.
    Create {
        /// The group's name.
        name: String,
        /// Makes the group dynamic: every device matching the filter is a member.
        #[arg(long)]
        filter: Option<String>,
        /// What the group is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete a group (its devices stay).
    Delete {
        /// The group's name or id.
        group: String,
    },
    /// Add devices to a static group.
    Add {
        /// The group's name or id.
        group: String,
        /// Devices by id or name.
        #[arg(required = true, value_name = "DEVICE")]
        devices: Vec<String>,
    },
    /// Remove devices from a static group.
    Remove {
        /// The group's name or id.
        group: String,
        /// Devices by id or name.
        #[arg(required = true, value_name = "DEVICE")]
        devices: Vec<String>,
    },
    /// The devices in a group.
    Members {
        /// The group's name or id.
        group: String,
        #[command(flatten)]
        paging: Paging,
    },
    /// What a filter matches now, before making a dynamic group of it.
    Preview {
        /// A filter expression, e.g. 'tag.region = "eu" and online'.
        #[arg(long)]
        filter: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum EnrollTokenCommand {
    /// Create a token for zero-touch enrollment; its secret is printed once, alone on stdout.
    Create {
        /// What the token is for, e.g. line 3.
        #[arg(long)]
        name: String,
        /// How many devices may enroll with it (default: no limit).
        #[arg(long)]
        max_uses: Option<u32>,
        /// How long it stays valid: 30d, 2w (default: no expiry).
        #[arg(long)]
        expires_in: Option<String>,
        /// A tag every device enrolled with it starts with (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// A static group every device enrolled with it joins (repeatable).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// Enrollment tokens (never their secrets).
    List,
    /// Revoke an enrollment token: no device enrolls with it any more.
    Revoke {
        /// The token's id (`drover enroll-token list`).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PreauthCommand {
    /// Vouch for one device by its identity (serial=…, mac=…), as it will send it.
    Add {
        /// The device's identity attributes, e.g. serial=SN-1 mac=02:00:00:00:00:01.
        #[arg(required = true, value_name = "KEY=VALUE")]
        identity: Vec<String>,
        /// How many enrollments it admits (default 1: the device itself; more for hardware
        /// re-imaged in place).
        #[arg(long)]
        max_uses: Option<u32>,
        /// How long it stays usable: 30d, 2w (default: until used or revoked).
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// Pre-authorizations, newest first: identity, state (active, used, expired, revoked), uses.
    List {
        /// Only those in this state: active, used, expired or revoked.
        #[arg(long)]
        state: Option<String>,
        /// Only identities containing this text (a serial, a MAC…).
        #[arg(long)]
        search: Option<String>,
        #[command(flatten)]
        paging: crate::commands::Paging,
    },
    /// Revoke a pre-authorization: no device is accepted on its strength any more (devices it
    /// admitted stay).
    Revoke {
        /// The pre-authorization's id (`drover preauth list`).
        id: String,
    },
    /// Vouch for many devices: a CSV file whose header names the identity keys.
    Import {
        /// The CSV file, e.g. `serial,mac` then one device a line.
        file: std::path::PathBuf,
    },
}

/// `k=v` arguments as a map; a repeated key is an error rather than a silent overwrite.
pub(crate) fn key_values(what: &str, args: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    let mut out = BTreeMap::new();
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            return Err(CliError::Usage(format!("{what} {a:?}: write it as KEY=VALUE")));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(CliError::Usage(format!("{what} {a:?}: the key is empty")));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(CliError::Usage(format!("{what} key {k:?} is given twice")));
        }
    }
    Ok(out)
}

/// `30d` or `2w` as days: the server counts expiry in whole days.
pub(crate) fn days(spec: &str) -> Result<u32, CliError> {
    let bad = || CliError::Usage(format!("invalid duration {spec:?}: give whole days or weeks, e.g. 30d or 2w"));
    let s = spec.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u32 = n.parse().map_err(|_| bad())?;
    let days = match unit {
        "d" | "" => n,
        "w" => n.checked_mul(7).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if days == 0 {
        return Err(bad());
    }
    Ok(days)
}

/// Checks a filter here, so a mistake is shown under the text that has it, before any request.
pub(crate) fn check_filter(filter: &str) -> Result<(), CliError> {
    drover_proto::filter::parse(filter).map(|_| ()).map_err(|e| {
        let pad = " ".repeat(e.column.saturating_sub(1));
        CliError::Usage(format!(
            "invalid filter: {e}\n  {filter}\n  {pad}^\n(write it like: tag.region = \"eu\" and attr.arch = \"aarch64\" and online)"
        ))
    })
}

fn pairs(m: &BTreeMap<String, String>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn parse_status(s: &str) -> Result<DeviceStatus, CliError> {
    DeviceStatus::parse(s).ok_or_else(|| {
        CliError::Usage(format!("unknown status {s:?}: use pending, accepted, rejected or decommissioned"))
    })
}

const DEVICE_HEADERS: &[&str] = &[
    "name",
    "id",
    "status",
    "online",
    "last seen",
    "identity",
    "tags",
    "software",
    "enrolled via",
    "created",
    "cert expires",
];

fn device_row(d: &Device) -> Vec<String> {
    vec![
        if d.display_name.is_empty() { d.id.clone() } else { d.display_name.clone() },
        d.id.clone(),
        d.status.as_str().into(),
        if d.online { "online".into() } else { "offline".into() },
        output::short_time(d.last_seen_at.as_deref()),
        pairs(&d.identity),
        pairs(&d.tags),
        d.software.as_ref().map(|s| format!("{}@{}", s.name, s.version)).unwrap_or_else(|| "-".into()),
        d.enrolled_via.clone(),
        output::short_time(Some(&d.created_at)),
        output::short_time(d.certificate_expires_at.as_deref()),
    ]
}

/// Whether `s` is shaped like a device id (a UUID: 8-4-4-4-12 hex digits): such an argument
/// is used as the id, anything else is a device's display name.
pub(crate) fn is_device_id(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The one device among `found` (the server's matches for a search) whose display name is
/// `name` exactly: its id; none or several is an error naming the candidates.
pub(crate) fn pick_by_name(name: &str, found: &[Device]) -> Result<String, CliError> {
    let exact: Vec<&Device> = found.iter().filter(|d| d.display_name == name).collect();
    match exact.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => Err(CliError::Usage(format!(
            "no device named {name:?}: `drover device list --search TEXT` shows names and ids"
        ))),
        several => {
            let list: Vec<String> = several.iter().map(|d| format!("  {}  {}", d.id, d.display_name)).collect();
            Err(CliError::Usage(format!(
                "{} devices are named {name:?}; give one by its id:\n{}",
                several.len(),
                list.join("\n")
            )))
        }
    }
}

/// A device argument as an id: a device id as given, else the device whose display name it
/// is (found with `GET /api/v1/devices?q=NAME`). Every command taking a device uses this.
pub(crate) fn resolve_device_id(client: &Client, arg: &str) -> Result<String, CliError> {
    if is_device_id(arg) {
        return Ok(arg.to_string());
    }
    if arg.trim().is_empty() {
        return Err(CliError::Usage("the device is empty: give its id or its name".into()));
    }
    let paging = Paging { limit: Some(500), all: true };
    let found: Vec<Device> = list(client, "/devices", vec![("q", arg.to_string())], &paging)?;
    pick_by_name(arg, &found)
}

/// A 404 for a device says how to find the right id.
fn no_device(id: &str) -> impl Fn(CliError) -> CliError + '_ {
    move |e| match e {
        CliError::Api { status: 404, .. } => {
            CliError::Usage(format!("no device with id {id:?}: `drover device list` shows the ids"))
        }
        other => other,
    }
}

fn print_device(out: Format, detail: &DeviceDetail) {
    if out == Format::Json {
        print!("{}", output::json(detail));
        return;
    }
    let d = &detail.device;
    let presence = match (&d.online, &d.last_seen_at) {
        (true, _) => "online".to_string(),
        (false, Some(t)) => format!("offline, last seen {}", output::short_time(Some(t))),
        (false, None) => "offline, never seen".to_string(),
    };
    let groups: Vec<String> = detail.groups.iter().map(|g| format!("{} ({})", g.name, g.kind.as_str())).collect();
    let rows: Vec<(&str, String)> = vec![
        ("name", if d.display_name.is_empty() { d.id.clone() } else { d.display_name.clone() }),
        ("id", d.id.clone()),
        ("status", d.status.as_str().into()),
        ("identity", pairs(&d.identity)),
        ("presence", presence),
        ("agent", d.agent.clone().unwrap_or_else(|| "-".into())),
        ("software", software(detail)),
        ("enrolled via", d.enrolled_via.clone()),
        ("created", output::short_time(Some(&d.created_at))),
        ("updated", output::short_time(Some(&d.updated_at))),
        ("certificate expires", output::short_time(d.certificate_expires_at.as_deref())),
        ("tags", pairs(&d.tags)),
        ("groups", if groups.is_empty() { "-".into() } else { groups.join(", ") }),
    ];
    print!("{}", output::fields(&rows));
    if let Some(p) = detail.artifact.as_ref().and_then(|a| a.provenance.as_ref()) {
        let rows: Vec<(&str, String)> = [("source", &p.source), ("commit", &p.commit), ("build", &p.build_id)]
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
            .collect();
        if !rows.is_empty() {
            println!("\nprovenance:");
            print!("{}", output::fields(&rows));
        }
    }
    if !detail.attributes.is_empty() {
        println!("\ninventory:");
        let rows: Vec<Vec<String>> = detail.attributes.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
        print!("{}", output::table(&["attribute", "value"], &rows));
    }
    if !detail.recent_events.is_empty() {
        println!("\nrecent events:");
        let rows: Vec<Vec<String>> = detail
            .recent_events
            .iter()
            .map(|e| vec![output::short_time(Some(&e.at)), e.kind.clone(), e.detail.clone()])
            .collect();
        print!("{}", output::table(&["when", "event", "detail"], &rows));
    }
}

/// `edge-app 1.4.2 (artifact 9f86d0818…)`, or what the device reported when the server does not
/// hold the artifact.
fn software(detail: &DeviceDetail) -> String {
    match (&detail.artifact, &detail.device.software) {
        (Some(a), _) => format!("{} {} (artifact {})", a.name, a.version, a.id),
        (None, Some(s)) => match &s.artifact {
            Some(id) => format!("{} {} (artifact {id}, not on this server)", s.name, s.version),
            None => format!("{} {}", s.name, s.version),
        },
        (None, None) => "-".into(),
    }
}

fn show_device(client: &Client, out: Format, id: &str) -> Result<(), CliError> {
    let d: DeviceDetail = client.get(&format!("/devices/{}", segment(id)), &[]).map_err(no_device(id))?;
    print_device(out, &d);
    Ok(())
}

pub(crate) fn device(client: &Client, out: Format, cmd: DeviceCommand) -> Result<ExitCode, CliError> {
    match cmd {
        DeviceCommand::List { status, filter, online, offline, search, sort, artifact, commit, paging } => {
            let mut query = Vec::new();
            if let Some(s) = status {
                query.push(("status", parse_status(&s)?.as_str().to_string()));
            }
            if online || offline {
                query.push(("online", online.to_string()));
            }
            if let Some(f) = &filter {
                check_filter(f)?;
            }
            for (k, v) in
                [("filter", filter), ("q", search), ("sort", sort), ("artifact", artifact), ("commit", commit)]
            {
                if let Some(v) = v {
                    query.push((k, v));
                }
            }
            let devices: Vec<Device> = list(client, "/devices", query, &paging)?;
            print_list(out, &devices, DEVICE_HEADERS, device_row);
        }
        DeviceCommand::Show { device } => show_device(client, out, &resolve_device_id(client, &device)?)?,
        DeviceCommand::Tag { device, tags } => {
            let set = key_values("tag", &tags)?;
            let id = resolve_device_id(client, &device)?;
            let _: serde_json::Value = client
                .send("PATCH", &format!("/devices/{}/tags", segment(&id)), &PatchTags { set, remove: vec![] })
                .map_err(no_device(&id))?;
            show_device(client, out, &id)?;
        }
        DeviceCommand::Untag { device, keys } => {
            let id = resolve_device_id(client, &device)?;
            let _: serde_json::Value = client
                .send(
                    "PATCH",
                    &format!("/devices/{}/tags", segment(&id)),
                    &PatchTags { set: BTreeMap::new(), remove: keys },
                )
                .map_err(no_device(&id))?;
            show_device(client, out, &id)?;
        }
        DeviceCommand::Accept { device } => decide(client, out, &resolve_device_id(client, &device)?, "accept")?,
        DeviceCommand::Reject { device } => decide(client, out, &resolve_device_id(client, &device)?, "reject")?,
        DeviceCommand::Decommission { device, yes } => {
            if !yes {
                return Err(CliError::Usage(format!(
                    "decommissioning revokes the certificate of {device} for good: run again with --yes to confirm"
                )));
            }
            decide(client, out, &resolve_device_id(client, &device)?, "decommission")?
        }
        DeviceCommand::Rename { device, name, clear } => {
            let id = resolve_device_id(client, &device)?;
            let name = if clear { None } else { name };
            let _: serde_json::Value = client
                .send("PATCH", &format!("/devices/{}", segment(&id)), &DevicePatch { name })
                .map_err(no_device(&id))?;
            show_device(client, out, &id)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn decide(client: &Client, out: Format, id: &str, verb: &str) -> Result<(), CliError> {
    let d: Device = client
        .send("POST", &format!("/devices/{}/{verb}", segment(id)), &serde_json::json!({}))
        .map_err(no_device(id))?;
    print_one(out, &d, DEVICE_HEADERS, device_row);
    Ok(())
}

const ENROLL_TOKEN_HEADERS: &[&str] =
    &["name", "groups", "prefix", "uses", "tags", "created", "by", "expires", "status", "id"];

fn enroll_token_row(t: &EnrollmentToken) -> Vec<String> {
    vec![
        t.name.clone(),
        if t.groups.is_empty() { "-".into() } else { t.groups.join(",") },
        format!("{}…", t.prefix),
        match t.max_uses {
            Some(m) => format!("{}/{m}", t.uses),
            None => t.uses.to_string(),
        },
        pairs(&t.tags),
        output::short_time(Some(&t.created_at)),
        t.created_by.clone(),
        output::short_time(t.expires_at.as_deref()),
        if t.revoked_at.is_some() { "revoked".into() } else { "active".into() },
        t.id.clone(),
    ]
}

pub(crate) fn enroll_token(client: &Client, out: Format, cmd: EnrollTokenCommand) -> Result<ExitCode, CliError> {
    match cmd {
        EnrollTokenCommand::Create { name, max_uses, expires_in, tags, groups } => {
            let expires_in_days = expires_in.as_deref().map(days).transpose()?;
            let tags = key_values("tag", &tags)?;
            let req = CreateEnrollmentToken { name, max_uses, expires_in_days, tags, groups };
            let created: CreatedEnrollmentToken = client.send("POST", "/enrollment-tokens", &req)?;
            match out {
                Format::Json => print!("{}", output::json(&created)),
                Format::Table => {
                    println!("{}", created.secret);
                    eprintln!(
                        "created enrollment token {:?} (id {}); the secret above is shown once",
                        created.token.name, created.token.id
                    );
                }
            }
        }
        EnrollTokenCommand::List => {
            let every = crate::commands::Paging { limit: Some(500), all: true };
            let tokens: Vec<EnrollmentToken> = crate::commands::list(client, "/enrollment-tokens", Vec::new(), &every)?;
            print_list(out, &tokens, ENROLL_TOKEN_HEADERS, enroll_token_row);
        }
        EnrollTokenCommand::Revoke { id } => {
            let t: EnrollmentToken =
                client.delete(&format!("/enrollment-tokens/{}", segment(&id))).map_err(|e| match e {
                    CliError::Api { status: 404, .. } => CliError::Usage(format!(
                        "no enrollment token with id {id:?}: `drover enroll-token list` shows the ids"
                    )),
                    other => other,
                })?;
            print_one(out, &t, ENROLL_TOKEN_HEADERS, enroll_token_row);
        }
    }
    Ok(ExitCode::SUCCESS)
}

const PREAUTH_HEADERS: &[&str] = &["identity", "state", "uses", "created", "by", "expires", "id"];

fn preauth_row(p: &Preauthorization) -> Vec<String> {
    vec![
        pairs(&p.identity),
        p.state.as_str().to_string(),
        format!("{}/{}", p.uses, p.max_uses),
        output::short_time(Some(&p.created_at)),
        p.created_by.clone(),
        output::short_time(p.expires_at.as_deref()),
        p.id.clone(),
    ]
}

fn print_preauthorized(out: Format, p: &Preauthorized) {
    match out {
        Format::Json => print!("{}", output::json(p)),
        Format::Table => println!("{} pre-authorized, {} already were", p.added, p.already),
    }
}

pub(crate) fn preauth(client: &Client, out: Format, cmd: PreauthCommand) -> Result<ExitCode, CliError> {
    match cmd {
        PreauthCommand::Add { identity, max_uses, expires_in } => {
            let identity = key_values("identity attribute", &identity)?;
            let expires_in_days = expires_in.as_deref().map(days).transpose()?;
            let p: Preauthorized = client.send(
                "POST",
                "/devices/preauthorize",
                &Preauthorize { identities: vec![identity], max_uses, expires_in_days },
            )?;
            print_preauthorized(out, &p);
        }
        PreauthCommand::List { state, search, paging } => {
            let mut q = Vec::new();
            if let Some(s) = state {
                q.push(("state", s));
            }
            if let Some(t) = search {
                q.push(("q", t));
            }
            let items: Vec<Preauthorization> = crate::commands::list(client, "/preauthorizations", q, &paging)?;
            print_list(out, &items, PREAUTH_HEADERS, preauth_row);
        }
        PreauthCommand::Revoke { id } => {
            let p: Preauthorization =
                client.delete(&format!("/preauthorizations/{}", segment(&id))).map_err(|e| match e {
                    CliError::Api { status: 404, .. } => CliError::Usage(format!(
                        "no pre-authorization with id {id:?}: `drover preauth list` shows the ids"
                    )),
                    other => other,
                })?;
            print_one(out, &p, PREAUTH_HEADERS, preauth_row);
        }
        PreauthCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let p: BulkPreauthorized = client.send_text("/devices/preauthorize/bulk", "text/csv", text)?;
            match out {
                Format::Json => print!("{}", output::json(&p)),
                Format::Table => println!("{} device identities pre-authorized from {}", p.created, file.display()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

const GROUP_HEADERS: &[&str] = &["name", "kind", "filter", "description", "created", "by", "id"];

fn group_row(g: &Group) -> Vec<String> {
    vec![
        g.name.clone(),
        g.kind.as_str().into(),
        g.filter.clone().unwrap_or_else(|| "-".into()),
        g.description.clone(),
        output::short_time(Some(&g.created_at)),
        g.created_by.clone(),
        g.id.clone(),
    ]
}

/// Finds a group by exact name, else by id.
fn resolve_group(client: &Client, group: &str) -> Result<Group, CliError> {
    let paging = Paging { limit: Some(500), all: true };
    let groups: Vec<Group> = list(client, "/groups", vec![], &paging)?;
    if let Some(g) = groups.into_iter().find(|g| g.name == group) {
        return Ok(g);
    }
    client.get(&format!("/groups/{}", segment(group)), &[]).map_err(|e| match e {
        CliError::Api { status: 404, .. } => {
            CliError::Usage(format!("no group named or with id {group:?}: `drover group list` shows them"))
        }
        other => other,
    })
}

pub(crate) fn group(client: &Client, out: Format, cmd: GroupCommand) -> Result<ExitCode, CliError> {
    match cmd {
        GroupCommand::List { kind, paging } => {
            let mut query = Vec::new();
            if let Some(k) = kind {
                let k = GroupKind::parse(&k)
                    .ok_or_else(|| CliError::Usage(format!("unknown group kind {k:?}: use static or dynamic")))?;
                query.push(("kind", k.as_str().to_string()));
            }
            let groups: Vec<Group> = list(client, "/groups", query, &paging)?;
            print_list(out, &groups, GROUP_HEADERS, group_row);
        }
        GroupCommand::Show { group } => {
            let g = resolve_group(client, &group)?;
            // The listing leaves out the member count; the group itself has it.
            let g: Group = client.get(&format!("/groups/{}", segment(&g.id)), &[])?;
            match out {
                Format::Json => print!("{}", output::json(&g)),
                Format::Table => {
                    let rows: Vec<(&str, String)> = vec![
                        ("name", g.name.clone()),
                        ("kind", g.kind.as_str().into()),
                        ("filter", g.filter.clone().unwrap_or_else(|| "-".into())),
                        ("description", g.description.clone()),
                        ("devices", g.device_count.map(|n| n.to_string()).unwrap_or_else(|| "-".into())),
                        ("created", format!("{} by {}", output::short_time(Some(&g.created_at)), g.created_by)),
                        ("id", g.id.clone()),
                    ];
                    print!("{}", output::fields(&rows));
                }
            }
        }
        GroupCommand::Create { name, filter, description } => {
            if let Some(f) = &filter {
                check_filter(f)?;
            }
            let kind = if filter.is_some() { GroupKind::Dynamic } else { GroupKind::Static };
            let g: Group = client.send("POST", "/groups", &CreateGroup { name, kind, filter, description })?;
            print_one(out, &g, GROUP_HEADERS, group_row);
        }
        GroupCommand::Delete { group } => {
            let g = resolve_group(client, &group)?;
            let _: serde_json::Value = client.delete(&format!("/groups/{}", segment(&g.id)))?;
            println!("deleted group {}", g.name);
        }
        GroupCommand::Add { group, devices } => {
            let g = resolve_group(client, &group)?;
            let devices = devices.iter().map(|d| resolve_device_id(client, d)).collect::<Result<Vec<_>, _>>()?;
            let r: GroupDevicesAdded =
                client.send("POST", &format!("/groups/{}/devices", segment(&g.id)), &AddGroupDevices { devices })?;
            match out {
                Format::Json => print!("{}", output::json(&r)),
                Format::Table => println!("{} added to {}, {} were members already", r.added, g.name, r.already),
            }
        }
        GroupCommand::Remove { group, devices } => {
            let g = resolve_group(client, &group)?;
            let devices = devices.iter().map(|d| resolve_device_id(client, d)).collect::<Result<Vec<_>, _>>()?;
            for d in &devices {
                let _: serde_json::Value =
                    client.delete(&format!("/groups/{}/devices/{}", segment(&g.id), segment(d)))?;
            }
            if out == Format::Table {
                println!("{} removed from {}", devices.len(), g.name);
            } else {
                print!("{}", output::json(&serde_json::json!({"removed": devices.len()})));
            }
        }
        GroupCommand::Members { group, paging } => {
            let g = resolve_group(client, &group)?;
            let devices: Vec<Device> = list(client, &format!("/groups/{}/devices", segment(&g.id)), vec![], &paging)?;
            print_list(out, &devices, DEVICE_HEADERS, device_row);
        }
        GroupCommand::Preview { filter } => {
            check_filter(&filter)?;
            let p: GroupPreview = client.get("/groups/preview", &[("filter", filter)])?;
            match out {
                Format::Json => print!("{}", output::json(&p)),
                Format::Table => {
                    print!("{}", output::table(DEVICE_HEADERS, &p.devices.iter().map(device_row).collect::<Vec<_>>()));
                    println!("{} devices match", p.count);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, display_name: &str) -> Device {
        serde_json::from_value(serde_json::json!({
            "id": id, "display_name": display_name, "status": "accepted", "identity": {}, "tags": {},
            "enrolled_via": "preauthorized", "created_at": "2026-12-01T00:00:00Z",
            "updated_at": "2026-12-01T00:00:00Z",
        }))
        .unwrap()
    }

    #[test]
    fn device_ids_are_uuid_shaped() {
        assert!(is_device_id("0190c0de-1234-7abc-8def-0123456789ab"));
        assert!(is_device_id("0190C0DE-1234-7ABC-8DEF-0123456789AB"));
        for name in ["gateway-7", "no-such-device", "0190c0de-1234-7abc-8def-0123456789a", "", "a-b-c-d-e"] {
            assert!(!is_device_id(name), "{name}");
        }
        assert!(!is_device_id("0190c0de-1234-7abc-8def-0123456789ag"), "hex digits only");
    }

    #[test]
    fn a_name_resolves_to_the_one_device_with_exactly_that_display_name() {
        // The search matches parts of names: only the exact one counts.
        let found = [device("id-1", "gateway-7"), device("id-2", "gateway-70"), device("id-3", "Gateway-7")];
        assert_eq!(pick_by_name("gateway-7", &found).unwrap(), "id-1");

        let err = pick_by_name("gateway", &found).unwrap_err().to_string();
        assert!(err.starts_with("no device named \"gateway\""), "{err}");
        let err = pick_by_name("x", &[]).unwrap_err().to_string();
        assert!(err.starts_with("no device named \"x\""), "{err}");

        let twins = [device("id-1", "pump"), device("id-2", "pump-2"), device("id-3", "pump")];
        let err = pick_by_name("pump", &twins).unwrap_err().to_string();
        assert!(err.starts_with("2 devices are named \"pump\"; give one by its id"), "{err}");
        assert!(err.contains("  id-1  pump\n") && err.ends_with("  id-3  pump") && !err.contains("id-2"), "{err}");
    }

    #[test]
    fn durations_are_whole_days() {
        assert_eq!(days("30d").unwrap(), 30);
        assert_eq!(days("2w").unwrap(), 14);
        assert_eq!(days("7").unwrap(), 7);
        for bad in ["0d", "12h", "d", "-1d", "1.5d"] {
            assert!(days(bad).unwrap_err().to_string().contains("e.g. 30d or 2w"), "{bad}");
        }
    }

    #[test]
    fn a_bad_filter_is_shown_with_a_caret() {
        assert!(check_filter(r#"tag.region = "eu" and online"#).is_ok());
        let err = check_filter("tag.region = ").unwrap_err().to_string();
        assert!(err.starts_with("invalid filter: ") && err.contains("at column"), "{err}");
        assert!(err.contains("\n  tag.region = \n"), "{err}");
    }

    #[test]
    fn key_values_are_strict() {
        let m = key_values("tag", &["region=eu".into(), "note=a=b".into()]).unwrap();
        assert_eq!(m["note"], "a=b");
        assert!(key_values("tag", &["region".into()]).unwrap_err().to_string().contains("KEY=VALUE"));
        assert!(key_values("tag", &["a=1".into(), "a=2".into()]).unwrap_err().to_string().contains("twice"));
    }
}
