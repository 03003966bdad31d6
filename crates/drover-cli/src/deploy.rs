//! `drover deploy …`: software deployments to devices, and following them to the end.
//!
//! `create --wait` and `show --watch` poll the deployment about once a second. On a terminal the
//! progress is one line redrawn in place; anywhere else (a CI log, a pipe) it is a line each time
//! something changes, so logs stay readable. With `-o json` the progress goes to stderr and only
//! the final deployment to stdout.

use std::io::{IsTerminal as _, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Subcommand};
use drover_proto::api::Page;
use drover_proto::deploy::{
    Artifact, CreateDeployment, Deployment, DeploymentDevice, DeploymentDeviceLog, DeploymentStatus, UpdateState,
};

use crate::client::{CliError, Client, segment};
use crate::commands::{Paging, list, print_list};
use crate::fleet::check_filter;
use crate::output::{self, Format};

/// The deployment ended `failed`: at least one device failed, rolled back or was incompatible.
pub(crate) const EXIT_FAILED: u8 = 3;
/// The deployment was aborted.
pub(crate) const EXIT_ABORTED: u8 = 4;
/// `--timeout` passed while the deployment was still active (it goes on without us).
pub(crate) const EXIT_TIMEOUT: u8 = 5;

const EXIT_CODES: &str = "\
Exit codes with --wait / --watch:
  0  the deployment succeeded (every device installed it or already had it)
  1  an error (bad request, server unreachable, permission denied)
  2  a usage error
  3  the deployment failed (a device failed, rolled back or was incompatible)
  4  the deployment was aborted
  5  --timeout passed before the deployment finished (it goes on on the server)";

/// How often a followed deployment is read again.
const POLL: Duration = Duration::from_secs(1);
/// Consecutive unreachable polls tolerated (a server restarting) before giving up.
const MAX_MISSED_POLLS: u32 = 30;

#[derive(Subcommand, Debug)]
pub(crate) enum DeployCommand {
    /// Deploy an artifact to devices: a group, the devices matching a filter, or a list of ids.
    #[command(group(ArgGroup::new("target").required(true).args(["group", "filter", "devices"])))]
    #[command(after_help = EXIT_CODES)]
    Create {
        /// The artifact: its id (SHA-256) or NAME@VERSION.
        #[arg(long)]
        artifact: String,
        /// A static or dynamic group, by name.
        #[arg(long)]
        group: Option<String>,
        /// A filter expression, e.g. 'tag.region = "eu" and online'; the matching devices are
        /// fixed when the deployment is created.
        #[arg(long)]
        filter: Option<String>,
        /// Devices by id or name, comma-separated.
        #[arg(long, alias = "device", value_delimiter = ',', value_name = "DEVICE,DEVICE…")]
        devices: Option<Vec<String>>,
        /// A name for the deployment (default: NAME VERSION of the artifact).
        #[arg(long)]
        name: Option<String>,
        /// Follow the deployment until it finishes; the exit code says how it ended.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (seconds, or 90s, 10m, 2h) with exit code 5.
        #[arg(long, requires = "wait", value_name = "SECS")]
        timeout: Option<String>,
    },
    /// Deployments, newest first.
    List {
        /// active, succeeded, failed or aborted.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// One deployment with its counts per state; --watch follows it live until it finishes.
    #[command(after_help = EXIT_CODES)]
    Show {
        /// The deployment's id.
        id: String,
        /// Refresh the progress every second until the deployment finishes.
        #[arg(long)]
        watch: bool,
        /// With --watch: give up after this long (seconds, or 90s, 10m, 2h) with exit code 5.
        #[arg(long, requires = "watch", value_name = "SECS")]
        timeout: Option<String>,
    },
    /// The devices of a deployment: state, download progress, message.
    Devices {
        /// The deployment's id.
        id: String,
        /// Only devices in this state: pending, downloading, installing, rebooting, verifying,
        /// success, failure, rolled-back, already-installed, incompatible, aborted.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// The update log a device sent with its final state.
    Log {
        /// The deployment's id.
        id: String,
        /// The device: its id or its name.
        device: String,
    },
    /// Stop a deployment: devices that have not started installing are told to abort; those
    /// past that point finish (or roll back) and report as usual.
    Abort {
        /// The deployment's id.
        id: String,
    },
}

pub(crate) fn deploy(client: &Client, out: Format, cmd: DeployCommand) -> Result<ExitCode, CliError> {
    match cmd {
        DeployCommand::Create { artifact, group, filter, devices, name, wait, timeout } => {
            let timeout = timeout.as_deref().map(seconds).transpose()?;
            if let Some(f) = &filter {
                check_filter(f)?;
            }
            if let Some(ids) = &devices
                && ids.iter().any(|d| d.trim().is_empty())
            {
                return Err(CliError::Usage("--devices has an empty id: give them as ID,ID,…".into()));
            }
            let devices = devices
                .map(|ds| ds.iter().map(|d| crate::fleet::resolve_device_id(client, d)).collect::<Result<Vec<_>, _>>())
                .transpose()?;
            let req = CreateDeployment { artifact, name, devices, group, filter };
            let d: Deployment = client.send("POST", "/deployments", &req)?;
            if !wait {
                print_deployment(out, &d);
                return Ok(ExitCode::SUCCESS);
            }
            if out == Format::Table {
                print_deployment(out, &d);
                println!();
            }
            follow(client, out, d, timeout)
        }
        DeployCommand::List { status, paging } => {
            let mut query = Vec::new();
            if let Some(s) = status {
                query.push(("status", parse_status(&s)?.as_str().to_string()));
            }
            let items: Vec<Deployment> = list(client, "/deployments", query, &paging)?;
            print_list(out, &items, DEPLOYMENT_HEADERS, deployment_row);
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::Show { id, watch, timeout } => {
            let timeout = timeout.as_deref().map(seconds).transpose()?;
            let d = get(client, &id)?;
            if !watch {
                print_deployment(out, &d);
                return Ok(ExitCode::SUCCESS);
            }
            if out == Format::Table {
                print_deployment(out, &d);
                println!();
            }
            follow(client, out, d, timeout)
        }
        DeployCommand::Devices { id, state, paging } => {
            let mut query = Vec::new();
            if let Some(s) = state {
                query.push(("state", parse_state(&s)?.as_str().to_string()));
            }
            let path = format!("/deployments/{}/devices", segment(&id));
            let items: Vec<DeploymentDevice> = list(client, &path, query, &paging).map_err(no_deployment(&id))?;
            print_list(out, &items, DEVICE_HEADERS, device_row);
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::Log { id, device } => {
            let device = crate::fleet::resolve_device_id(client, &device)?;
            let path = format!("/deployments/{}/devices/{}/log", segment(&id), segment(&device));
            let log: DeploymentDeviceLog = client.get(&path, &[]).map_err(|e| match e {
                CliError::Api { status: 404, message, .. } => CliError::Usage(format!(
                    "{message}: `drover deploy devices {id}` shows its devices and which sent a log"
                )),
                other => other,
            })?;
            match out {
                Format::Json => print!("{}", output::json(&log)),
                Format::Table => {
                    print!("{}", log.log);
                    if !log.log.is_empty() && !log.log.ends_with('\n') {
                        println!();
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::Abort { id } => {
            let d: Deployment = client
                .send("POST", &format!("/deployments/{}/abort", segment(&id)), &serde_json::json!({}))
                .map_err(no_deployment(&id))?;
            print_deployment(out, &d);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The artifacts the server holds, under `drover artifact` beside the offline commands.
#[derive(Subcommand, Debug)]
pub(crate) enum ArtifactServerCommand {
    /// Artifacts uploaded to the server, newest first.
    List {
        /// Only artifacts of this name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// An uploaded artifact: manifest, payloads, provides/depends, provenance, signatures.
    Show {
        /// Its id (SHA-256) or NAME@VERSION.
        artifact: String,
    },
    /// Delete an uploaded artifact and its file (refused while an unfinished deployment uses it).
    Delete {
        /// Its id (SHA-256) or NAME@VERSION.
        artifact: String,
    },
}

const ARTIFACT_HEADERS: &[&str] =
    &["name", "version", "device types", "size", "signed by", "uploaded", "by", "in use", "id"];

fn artifact_row(a: &Artifact) -> Vec<String> {
    vec![
        a.name.clone(),
        a.version.clone(),
        a.device_types.join(","),
        size(a.size),
        if a.signed_by.is_empty() { "unsigned".into() } else { a.signed_by.join(",") },
        output::short_time(Some(&a.uploaded_at)),
        a.uploaded_by.clone(),
        if a.active_deployments == 0 { "-".into() } else { format!("{} deployments", a.active_deployments) },
        a.id.clone(),
    ]
}

fn print_artifact(a: &Artifact) {
    let prov = a.provenance.clone().unwrap_or_default();
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let rows: Vec<(&str, String)> = vec![
        ("id", a.id.clone()),
        ("artifact", format!("{} {}", a.name, a.version)),
        ("device types", a.device_types.join(", ")),
        ("update module", a.payload_type.clone()),
        ("size", format!("{} ({} bytes)", size(a.size), a.size)),
        ("signed by", if a.signed_by.is_empty() { "unsigned".into() } else { a.signed_by.join(", ") }),
        ("uploaded", format!("{} by {}", output::short_time(Some(&a.uploaded_at)), a.uploaded_by)),
        ("in use by", format!("{} unfinished deployment(s)", a.active_deployments)),
        ("source", dash(prov.source)),
        ("commit", dash(prov.commit)),
        ("build", dash(prov.build_id)),
    ];
    print!("{}", output::fields(&rows));
    println!("\npayloads:");
    let rows: Vec<Vec<String>> =
        a.payloads.iter().map(|p| vec![p.name.clone(), p.role.clone(), size(p.size), p.sha256.clone()]).collect();
    print!("{}", output::table(&["name", "role", "size", "sha256"], &rows));
    if !a.provides.is_empty() {
        println!("\nprovides:");
        let rows: Vec<Vec<String>> = a.provides.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
        print!("{}", output::table(&["key", "value"], &rows));
    }
    if !a.depends.is_empty() {
        println!("\ndepends on:");
        let rows: Vec<Vec<String>> = a.depends.iter().map(|(k, v)| vec![k.clone(), v.join(" | ")]).collect();
        print!("{}", output::table(&["key", "one of"], &rows));
    }
}

/// A 404 for an artifact says how to find the right one.
fn no_artifact(reference: &str) -> impl Fn(CliError) -> CliError + '_ {
    move |e| match e {
        CliError::Api { status: 404, .. } => CliError::Usage(format!(
            "no artifact {reference:?} on the server: `drover artifact list` shows them (id or NAME@VERSION)"
        )),
        other => other,
    }
}

pub(crate) fn artifact(client: &Client, out: Format, cmd: ArtifactServerCommand) -> Result<ExitCode, CliError> {
    match cmd {
        ArtifactServerCommand::List { name, paging } => {
            let query: Vec<(&str, String)> = name.into_iter().map(|n| ("name", n)).collect();
            let items: Vec<Artifact> = list(client, "/artifacts", query, &paging)?;
            print_list(out, &items, ARTIFACT_HEADERS, artifact_row);
        }
        ArtifactServerCommand::Show { artifact } => {
            let a: Artifact =
                client.get(&format!("/artifacts/{}", segment(&artifact)), &[]).map_err(no_artifact(&artifact))?;
            match out {
                Format::Json => print!("{}", output::json(&a)),
                Format::Table => print_artifact(&a),
            }
        }
        ArtifactServerCommand::Delete { artifact } => {
            let a: Artifact =
                client.get(&format!("/artifacts/{}", segment(&artifact)), &[]).map_err(no_artifact(&artifact))?;
            let _: serde_json::Value = client.delete(&format!("/artifacts/{}", segment(&a.id)))?;
            match out {
                Format::Json => print!("{}", output::json(&serde_json::json!({"deleted": a.id}))),
                Format::Table => println!("deleted artifact {} {} ({})", a.name, a.version, a.id),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn get(client: &Client, id: &str) -> Result<Deployment, CliError> {
    client.get(&format!("/deployments/{}", segment(id)), &[]).map_err(no_deployment(id))
}

/// A 404 for a deployment says how to find the right id.
fn no_deployment(id: &str) -> impl Fn(CliError) -> CliError + '_ {
    move |e| match e {
        CliError::Api { status: 404, .. } => {
            CliError::Usage(format!("no deployment with id {id:?}: `drover deploy list` shows them"))
        }
        other => other,
    }
}

fn parse_status(s: &str) -> Result<DeploymentStatus, CliError> {
    DeploymentStatus::parse(s).ok_or_else(|| {
        CliError::Usage(format!("unknown deployment status {s:?}: use active, succeeded, failed or aborted"))
    })
}

fn parse_state(s: &str) -> Result<UpdateState, CliError> {
    UpdateState::parse(s).ok_or_else(|| {
        let all: Vec<&str> = UpdateState::ALL.iter().map(|s| s.as_str()).collect();
        CliError::Usage(format!("unknown update state {s:?}: use one of {}", all.join(", ")))
    })
}

/// `600`, `90s`, `10m` or `2h`.
pub(crate) fn seconds(spec: &str) -> Result<Duration, CliError> {
    let bad = || CliError::Usage(format!("invalid timeout {spec:?}: give seconds, or e.g. 90s, 10m, 2h"));
    let s = spec.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
    .ok_or_else(bad)?;
    if secs == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

/// Devices in a final state, and of those how many failed.
fn tally(d: &Deployment) -> (u64, u64, u64) {
    let mut done = 0;
    let mut failed = 0;
    let mut aborted = 0;
    for (state, n) in &d.counts {
        if state.is_final() {
            done += n;
        }
        if state.is_failed() {
            failed += n;
        }
        if *state == UpdateState::Aborted {
            aborted += n;
        }
    }
    (done, failed, aborted)
}

/// `success 3, failure 1, pending 6`, in the order of the update's life.
fn state_counts(d: &Deployment) -> String {
    let parts: Vec<String> = UpdateState::ALL
        .iter()
        .filter_map(|s| d.counts.get(s).filter(|n| **n > 0).map(|n| format!("{s} {n}")))
        .collect();
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}

/// A bar of `width` cells: `#` devices done well, `!` failed or aborted, `.` not done.
fn bar(d: &Deployment, width: usize) -> String {
    let (done, failed, aborted) = tally(d);
    let bad = failed + aborted;
    let good = done - bad;
    let total = d.total.max(done);
    if total == 0 {
        return format!("[{}]", ".".repeat(width));
    }
    let cells = |n: u64| ((n as u128 * width as u128) / total as u128) as usize;
    // A failure is never rounded away: one failed device of thousands still shows.
    let bad_cells = if bad > 0 { cells(bad).max(1) } else { 0 };
    let good_cells = cells(good).min(width - bad_cells.min(width));
    let rest = width.saturating_sub(good_cells + bad_cells);
    format!("[{}{}{}]", "#".repeat(good_cells), "!".repeat(bad_cells.min(width)), ".".repeat(rest))
}

/// One line of progress: status, bar, devices done, counts per state.
pub(crate) fn progress_line(d: &Deployment) -> String {
    let (done, failed, aborted) = tally(d);
    let mut finished = format!("{done}/{} done", d.total);
    if failed > 0 || aborted > 0 {
        let mut parts = vec![format!("{} ok", done - failed - aborted)];
        if failed > 0 {
            parts.push(format!("{failed} failed"));
        }
        if aborted > 0 {
            parts.push(format!("{aborted} aborted"));
        }
        finished.push_str(&format!(" ({})", parts.join(", ")));
    }
    format!("{:<9} {} {finished} | {}", d.status.as_str(), bar(d, 30), state_counts(d))
}

const DEPLOYMENT_HEADERS: &[&str] = &["id", "name", "artifact", "target", "status", "done", "failed", "created", "by"];

fn deployment_row(d: &Deployment) -> Vec<String> {
    let (done, failed, _) = tally(d);
    vec![
        d.id.clone(),
        d.name.clone(),
        format!("{}@{}", d.artifact.name, d.artifact.version),
        d.target.clone(),
        d.status.as_str().into(),
        format!("{done}/{}", d.total),
        failed.to_string(),
        output::short_time(Some(&d.created_at)),
        d.created_by.clone(),
    ]
}

fn print_deployment(out: Format, d: &Deployment) {
    if out == Format::Json {
        print!("{}", output::json(d));
        return;
    }
    let rows: Vec<(&str, String)> = vec![
        ("id", d.id.clone()),
        ("name", d.name.clone()),
        ("artifact", format!("{} {} ({})", d.artifact.name, d.artifact.version, d.artifact.id)),
        ("target", d.target.clone()),
        ("status", d.status.as_str().into()),
        ("created", format!("{} by {}", output::short_time(Some(&d.created_at)), d.created_by)),
        ("finished", output::short_time(d.finished_at.as_deref())),
        ("devices", d.total.to_string()),
        ("states", state_counts(d)),
    ];
    print!("{}", output::fields(&rows));
}

const DEVICE_HEADERS: &[&str] = &["device", "state", "progress", "message", "log", "updated"];

fn device_row(d: &DeploymentDevice) -> Vec<String> {
    vec![
        d.device_id.clone(),
        d.state.as_str().into(),
        transfer(d.bytes, d.total),
        d.message.clone().unwrap_or_else(|| "-".into()),
        if d.has_log { "yes".into() } else { "-".into() },
        output::short_time(Some(&d.updated_at)),
    ]
}

/// `1.5 MiB/20.0 MiB (7%)`.
fn transfer(bytes: Option<u64>, total: Option<u64>) -> String {
    match (bytes, total) {
        (Some(b), Some(t)) if t > 0 => format!("{}/{} ({}%)", size(b), size(t), (b.min(t) as u128 * 100 / t as u128)),
        (Some(b), _) => size(b),
        (None, _) => "-".into(),
    }
}

/// Bytes for people: `512 B`, `1.5 KiB`, `20.0 MiB`.
pub(crate) fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Where progress goes: redrawn in place on a terminal, a line per change elsewhere.
struct Progress {
    out: Box<dyn Write>,
    tty: bool,
    last: Option<String>,
}

impl Progress {
    /// Progress on stdout, unless stdout carries JSON for a program: then on stderr.
    fn for_output(out: Format) -> Progress {
        if out == Format::Json {
            Progress { tty: std::io::stderr().is_terminal(), out: Box::new(std::io::stderr()), last: None }
        } else {
            Progress { tty: std::io::stdout().is_terminal(), out: Box::new(std::io::stdout()), last: None }
        }
    }

    fn show(&mut self, line: String) {
        if self.tty {
            // Carriage return and erase the line: the bar stays in one place.
            let _ = write!(self.out, "\r\x1b[2K{line}");
        } else if self.last.as_deref() != Some(line.as_str()) {
            let _ = writeln!(self.out, "{line}");
        }
        let _ = self.out.flush();
        self.last = Some(line);
    }

    fn note(&mut self, text: &str) {
        self.end_line();
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }

    /// Ends a redrawn line, so what follows starts on its own.
    fn end_line(&mut self) {
        if self.tty && self.last.take().is_some() {
            let _ = writeln!(self.out);
        }
    }
}

/// No device of the deployment will change any more. An aborted deployment is `aborted` at
/// once, but devices past the point of no return still finish (or roll back) after that.
fn ended(d: &Deployment) -> bool {
    match d.status {
        DeploymentStatus::Active => false,
        DeploymentStatus::Aborted => d.finished_at.is_some(),
        DeploymentStatus::Succeeded | DeploymentStatus::Failed => true,
    }
}

/// Polls the deployment until it finishes or `timeout` passes; the exit code says which.
fn follow(client: &Client, out: Format, mut d: Deployment, timeout: Option<Duration>) -> Result<ExitCode, CliError> {
    let mut progress = Progress::for_output(out);
    let started = Instant::now();
    let mut missed = 0;
    loop {
        progress.show(progress_line(&d));
        if ended(&d) {
            break;
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            if d.status.is_finished() {
                // Aborted, with devices still finishing: how it ended is known already.
                break;
            }
            progress.note(&format!(
                "timed out after {} s; the deployment goes on: `drover deploy show {} --watch` follows it",
                started.elapsed().as_secs(),
                d.id
            ));
            if out == Format::Json {
                print!("{}", output::json(&d));
            }
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        std::thread::sleep(match timeout {
            Some(t) => POLL.min(t.saturating_sub(started.elapsed())).max(Duration::from_millis(50)),
            None => POLL,
        });
        match get(client, &d.id) {
            Ok(next) => {
                d = next;
                missed = 0;
            }
            Err(CliError::Unreachable { url, cause }) => {
                missed += 1;
                if missed > MAX_MISSED_POLLS {
                    return Err(CliError::Unreachable { url, cause });
                }
                if missed == 1 {
                    progress.note(&format!("(server unreachable, retrying: {cause})"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    progress.end_line();
    let code = match d.status {
        DeploymentStatus::Succeeded => 0,
        DeploymentStatus::Failed => EXIT_FAILED,
        DeploymentStatus::Aborted => EXIT_ABORTED,
        DeploymentStatus::Active => unreachable!("the loop ends on a finished deployment"),
    };
    if code == EXIT_FAILED {
        report_failures(client, &mut progress, &d);
    }
    match out {
        Format::Json => print!("{}", output::json(&d)),
        Format::Table => {
            let finished = d.finished_at.as_deref().map(|t| format!(" at {}", output::short_time(Some(t))));
            progress.note(&format!("deployment {} {}{}", d.id, d.status.as_str(), finished.unwrap_or_default()));
        }
    }
    Ok(ExitCode::from(code))
}

/// The first failed devices with their messages, so a CI log says why without another command.
fn report_failures(client: &Client, progress: &mut Progress, d: &Deployment) {
    const SHOWN: u32 = 20;
    let mut rows = Vec::new();
    for state in UpdateState::ALL.into_iter().filter(|s| s.is_failed() && d.counts.get(s).is_some_and(|n| *n > 0)) {
        let query = [("state", state.as_str().to_string()), ("limit", SHOWN.to_string())];
        let path = format!("/deployments/{}/devices", segment(&d.id));
        if let Ok(page) = client.get::<Page<DeploymentDevice>>(&path, &query) {
            rows.extend(page.items.iter().map(device_row));
        }
    }
    if rows.is_empty() {
        return;
    }
    let (_, failed, _) = tally(d);
    let mut text = format!("failed devices ({failed}):\n");
    text.push_str(&output::table(DEVICE_HEADERS, &rows));
    if failed > rows.len() as u64 {
        text.push_str(&format!("… `drover deploy devices {} --state failure` lists them all\n", d.id));
    }
    text.push_str(&format!("(`drover deploy log {} DEVICE` shows a device's update log)", d.id));
    progress.note(&text);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use drover_proto::deploy::ArtifactRef;

    use super::*;

    fn deployment(status: DeploymentStatus, total: u64, counts: &[(UpdateState, u64)]) -> Deployment {
        Deployment {
            id: "d1".into(),
            name: "edge-app 1.4.2".into(),
            artifact: ArtifactRef { id: "ab".repeat(32), name: "edge-app".into(), version: "1.4.2".into() },
            target: "group:lab".into(),
            status,
            created_at: "2026-11-23T07:06:27.299Z".into(),
            created_by: "user:ann".into(),
            finished_at: None,
            total,
            counts: counts.iter().copied().collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn progress_counts_final_states_and_failures() {
        use UpdateState::*;
        let d = deployment(DeploymentStatus::Active, 10, &[(Success, 4), (Failure, 1), (Downloading, 2), (Pending, 3)]);
        assert_eq!(
            progress_line(&d),
            "active    [############!!!...............] 5/10 done (4 ok, 1 failed) \
             | pending 3, downloading 2, success 4, failure 1"
        );
        let d = deployment(DeploymentStatus::Succeeded, 2, &[(Success, 1), (AlreadyInstalled, 1)]);
        assert_eq!(
            progress_line(&d),
            format!("succeeded [{}] 2/2 done | success 1, already-installed 1", "#".repeat(30))
        );
        let d = deployment(DeploymentStatus::Aborted, 4, &[(Aborted, 3), (Success, 1)]);
        assert!(progress_line(&d).contains("4/4 done (1 ok, 3 aborted)"), "{}", progress_line(&d));
    }

    #[test]
    fn one_failure_in_thousands_still_shows() {
        let d = deployment(
            DeploymentStatus::Active,
            5000,
            &[(UpdateState::Success, 10), (UpdateState::RolledBack, 1), (UpdateState::Pending, 4989)],
        );
        assert_eq!(bar(&d, 10), "[!.........]");
        let empty = deployment(DeploymentStatus::Active, 0, &[]);
        assert_eq!(bar(&empty, 4), "[....]");
        assert!(progress_line(&empty).ends_with("0/0 done | -"));
    }

    #[test]
    fn timeouts_and_sizes() {
        assert_eq!(seconds("600").unwrap(), Duration::from_secs(600));
        assert_eq!(seconds("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(seconds("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(seconds("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["0", "1d", "m", "-5", "1.5h", ""] {
            assert!(seconds(bad).unwrap_err().to_string().contains("e.g. 90s, 10m, 2h"), "{bad}");
        }
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(20 * 1024 * 1024), "20.0 MiB");
        assert_eq!(transfer(Some(1024 * 1024), Some(20 * 1024 * 1024)), "1.0 MiB/20.0 MiB (5%)");
        assert_eq!(transfer(None, Some(10)), "-");
    }
}
