//! The commands of `drover`.

use std::ffi::OsString;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use drover_proto::api::{
    ApiToken, AuditEntry, AuditVerification, CreateToken, CreateUser, CreatedToken, CreatedUser, Me, Page, Role,
    SetPassword, UpdateUser, User,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::artifact::{self, ArtifactCommand};
use crate::client::{CliError, Client, segment};
use crate::config;
use crate::deploy::{self, DeployCommand};
use crate::fleet::{self, DeviceCommand, EnrollTokenCommand, GroupCommand, PreauthCommand};
use crate::output::{self, Format};
use crate::remote;

#[derive(Parser, Debug)]
#[command(name = "drover", version, about = "Manage a Drover fleet from the command line")]
struct Cli {
    /// Output format, also accepted before the command (`drover -o json user list`); each
    /// command that prints records lists `-o` itself (`output_arg`).
    #[arg(short = 'o', long = "output", value_enum, hide = true)]
    output: Option<Format>,
    #[command(subcommand)]
    command: Command,
}

/// Commands whose output has no JSON form: they take no `-o`.
const NO_OUTPUT: &[&str] =
    &["logout", "term", "cp", "forward", "user reset-password", "user delete", "group delete", "rules delete"];

/// `-o/--output` as a command that prints records takes it.
fn output_arg() -> clap::Arg {
    clap::Arg::new("output")
        .short('o')
        .long("output")
        .value_parser(clap::builder::EnumValueParser::<Format>::new())
        .help("Output format: table (for people; `text` is the same) or json (for programs)")
}

/// Adds `-o` to every command under `cmd` (named `path`) that prints records.
fn with_output(cmd: clap::Command, path: &str) -> clap::Command {
    let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
    if names.is_empty() {
        return if NO_OUTPUT.contains(&path) { cmd } else { cmd.arg(output_arg()) };
    }
    names.iter().fold(cmd, |cmd, name| {
        let sub_path = if path.is_empty() { name.clone() } else { format!("{path} {name}") };
        cmd.mut_subcommand(name, |sub| with_output(sub, &sub_path))
    })
}

/// The whole command line: `Cli` with `-o` on the commands that take it.
fn cli_command() -> clap::Command {
    use clap::CommandFactory as _;
    with_output(Cli::command(), "")
}

/// Parses the arguments: the command, and the output format (`-o` after the command, else
/// before it, else table). `-o` before a command that has no use for it is an error.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<(Cli, Format), clap::Error> {
    use clap::FromArgMatches as _;
    let mut cmd = cli_command();
    let matches = cmd.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let mut leaf = &matches;
    let mut path = Vec::new();
    while let Some((name, sub)) = leaf.subcommand() {
        path.push(name.to_string());
        leaf = sub;
    }
    let after = leaf.try_get_one::<Format>("output").ok().flatten().copied();
    if cli.output.is_some() && NO_OUTPUT.contains(&path.join(" ").as_str()) {
        return Err(cmd.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!("-o/--output has no effect on `drover {}`", path.join(" ")),
        ));
    }
    let out = after.or(cli.output).unwrap_or(Format::Table);
    Ok((cli, out))
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Save the server address and an API token (read from stdin without --token).
    Login {
        /// The server's address, e.g. https://drover.example.com or http://127.0.0.1:8080.
        #[arg(long)]
        url: String,
        /// The API token (`drover token create`); without it, it is read from stdin.
        #[arg(long)]
        token: Option<String>,
    },
    /// Forget the saved token.
    Logout,
    /// Who the token belongs to.
    Whoami,
    /// People who sign in, with a role each.
    #[command(subcommand)]
    User(UserCommand),
    /// API tokens for scripts and pipelines.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Devices: list, inspect, accept, reject, decommission, tag, rename.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Enrollment tokens for zero-touch provisioning.
    #[command(subcommand)]
    EnrollToken(EnrollTokenCommand),
    /// Groups of devices: static (by hand) or dynamic (by filter).
    #[command(subcommand)]
    Group(GroupCommand),
    /// Devices vouched for before they ask to enroll.
    #[command(subcommand)]
    Preauth(PreauthCommand),
    /// Update artifacts and trust roots: keys, build, sign, verify, inspect, upload.
    #[command(subcommand)]
    Artifact(ArtifactCommand),
    /// Software deployments: create, follow (--wait, --watch), list, devices, logs, abort.
    #[command(subcommand)]
    Deploy(DeployCommand),
    /// Alerts: rules, current alerts, history, silences, notification channels.
    #[command(subcommand)]
    Alert(crate::alerts::AlertCommand),
    /// Device rule sets of groups (evaluated on the devices themselves).
    #[command(subcommand)]
    Rules(crate::alerts::RulesCommand),
    /// Telemetry: a device's metrics, fleet aggregates, top devices, logs on demand.
    #[command(subcommand)]
    Metrics(crate::metrics::MetricsCommand),
    /// The trust root devices verify artifacts with: upload (set) and show it.
    #[command(subcommand)]
    TrustRoot(crate::trust::TrustRootCommand),
    /// A shell on a device (raw mode, resize); exits with the shell's status.
    Term {
        /// The device: its id or its name.
        device: String,
    },
    /// Copy a file to or from a device: `drover cp FILE DEVICE:/path` or `drover cp DEVICE:/path FILE`.
    ///
    /// A device path ending in `/` is a directory: the file keeps its name in it, as with scp;
    /// so does a download into a local directory (`drover cp DEVICE:/etc/hosts .`).
    Cp {
        /// What to copy: a local file, or DEVICE:/absolute/path (DEVICE by id or name).
        src: String,
        /// Where to: DEVICE:/absolute/path or DEVICE:/dir/, or a local file or directory.
        dst: String,
    },
    /// Forward a local port to HOST:PORT as seen from the device, until Ctrl-C.
    Forward {
        /// The device: its id or its name.
        device: String,
        /// LOCAL_PORT:HOST:PORT, e.g. 8080:127.0.0.1:80.
        spec: String,
    },
}

#[derive(Args, Debug, Clone)]
pub(crate) struct Paging {
    /// Items per page (1-500).
    #[arg(long)]
    pub(crate) limit: Option<u32>,
    /// Follow every page instead of printing the first.
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Users, with role and status.
    List {
        /// Only users with this role.
        #[arg(long)]
        role: Option<Role>,
        /// Part of the username.
        #[arg(long = "search", alias = "q", value_name = "TEXT")]
        search: Option<String>,
        /// username, created_at; prefix - for descending.
        #[arg(long)]
        sort: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Add a user; without --password-stdin the server generates a password and shows it once.
    Create {
        /// The name they sign in with.
        username: String,
        /// What they may do: viewer, operator or admin.
        #[arg(long)]
        role: Role,
        /// Read the password from stdin instead of having the server generate one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// One user.
    Show {
        /// Username or id.
        user: String,
    },
    /// Change a user's role.
    SetRole {
        /// Username or id.
        user: String,
        /// The new role: viewer, operator or admin.
        role: Role,
    },
    /// Stop a user from signing in; their sessions end.
    Disable {
        /// Username or id.
        user: String,
    },
    /// Let a disabled user sign in again.
    Enable {
        /// Username or id.
        user: String,
    },
    /// Set a user's password to one read from stdin; their sessions end.
    ResetPassword {
        /// Username or id.
        user: String,
    },
    /// Delete a user for good.
    Delete {
        /// Username or id.
        user: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// API tokens (never their secrets).
    List {
        /// Show revoked tokens too.
        #[arg(long)]
        include_revoked: bool,
        /// Only tokens with this role.
        #[arg(long)]
        role: Option<Role>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Create a token; its secret is printed once, alone on stdout.
    Create {
        /// What the token is for, e.g. ci-pipeline.
        #[arg(long)]
        name: String,
        /// What it may do: viewer, operator or admin.
        #[arg(long)]
        role: Role,
        /// Days until it expires (default: never).
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// Revoke a token: it stops working at once.
    Revoke {
        /// The token's id (`drover token list`).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Audit log entries, newest first.
    List {
        /// Exact action, or a prefix ending in '.' (user.).
        #[arg(long)]
        action: Option<String>,
        /// Username or token name.
        #[arg(long)]
        actor: Option<String>,
        /// Only changes to this kind of thing: user, token, device, group, …
        #[arg(long)]
        target_kind: Option<String>,
        /// Only changes to the thing with this id.
        #[arg(long)]
        target_id: Option<String>,
        /// From this time on: RFC 3339 time or YYYY-MM-DD.
        #[arg(long)]
        since: Option<String>,
        /// Up to this time: RFC 3339 time or YYYY-MM-DD.
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Check the audit log's hash chain (admin); exits 1 when it was altered.
    Verify,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<ExitCode, CliError> {
    let (cli, out) = match parse(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return Ok(ExitCode::from(if e.use_stderr() { 2 } else { 0 }));
        }
    };
    let cfg_path = config::path(&env);
    match cli.command {
        Command::Login { url, token } => {
            let token = match token {
                Some(t) => t,
                None => read_stdin_line("the API token", "API token: ")?,
            };
            let token = token.trim().to_string();
            if token.is_empty() {
                return Err(CliError::Usage("the API token is empty".into()));
            }
            let client = Client::new(&url, Some(token.clone()))?;
            let me: Me = client.get("/me", &[])?;
            // An unreadable file is replaced: logging in again is how to repair it.
            let mut saved = config::load(&cfg_path).unwrap_or_default();
            saved.url = Some(client.base().to_string());
            saved.token = Some(token);
            config::save(&cfg_path, &saved)?;
            if out == Format::Table {
                println!(
                    "logged in to {} as {} ({}), saved in {}",
                    client.base(),
                    me.name,
                    me.role,
                    cfg_path.display()
                );
            }
            print_me(out, &me);
        }
        Command::Logout => {
            let mut saved = config::load(&cfg_path)?;
            if saved.token.take().is_none() {
                println!("no token saved in {}", cfg_path.display());
            } else {
                config::save(&cfg_path, &saved)?;
                println!("forgot the token saved in {}", cfg_path.display());
            }
            if env("DROVER_TOKEN").is_some() {
                eprintln!("note: DROVER_TOKEN is set in the environment and still applies");
            }
        }
        Command::Whoami => {
            let me: Me = client(&cfg_path)?.get("/me", &[])?;
            print_me(out, &me);
        }
        Command::User(cmd) => return user(&client(&cfg_path)?, out, cmd),
        Command::Token(cmd) => return token(&client(&cfg_path)?, out, cmd),
        Command::Audit(cmd) => return audit(&client(&cfg_path)?, out, cmd),
        Command::Device(cmd) => return fleet::device(&client(&cfg_path)?, out, cmd),
        Command::EnrollToken(cmd) => return fleet::enroll_token(&client(&cfg_path)?, out, cmd),
        Command::Group(cmd) => return fleet::group(&client(&cfg_path)?, out, cmd),
        Command::Preauth(cmd) => return fleet::preauth(&client(&cfg_path)?, out, cmd),
        Command::Artifact(cmd) => return artifact::run(out, cmd, || client(&cfg_path)),
        Command::Deploy(cmd) => return deploy::deploy(&client(&cfg_path)?, out, cmd),
        Command::Alert(cmd) => return crate::alerts::alert(&client(&cfg_path)?, out, cmd),
        Command::Rules(cmd) => return crate::alerts::rules(&client(&cfg_path)?, out, cmd),
        Command::Metrics(cmd) => return crate::metrics::metrics(&client(&cfg_path)?, out, cmd),
        Command::TrustRoot(cmd) => return crate::trust::trust_root(&client(&cfg_path)?, out, cmd),
        Command::Term { device } => return remote::term(&client(&cfg_path)?, &device),
        Command::Cp { src, dst } => return remote::cp(&client(&cfg_path)?, &src, &dst),
        Command::Forward { device, spec } => return remote::forward(&client(&cfg_path)?, &device, &spec),
    }
    Ok(ExitCode::SUCCESS)
}

/// A client from DROVER_URL / DROVER_TOKEN, else from what `drover login` saved.
fn client(cfg_path: &std::path::Path) -> Result<Client, CliError> {
    let (url, token) = (env("DROVER_URL"), env("DROVER_TOKEN"));
    let (url, token) = match (url, token) {
        (Some(u), Some(t)) => (u, t),
        (url, token) => {
            let saved = config::load(cfg_path)?;
            (url.or(saved.url).ok_or(CliError::NotLoggedIn)?, token.or(saved.token).ok_or(CliError::NotLoggedIn)?)
        }
    };
    Client::new(&url, Some(token))
}

/// Reads one line of stdin (a pipe, or typed after `prompt` on a terminal), without its line end.
fn read_stdin_line(what: &str, prompt: &str) -> Result<String, CliError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line).map_err(|e| CliError::Usage(format!("cannot read {what} from stdin: {e}")))?;
    let line = line.trim_end_matches(['\n', '\r']).to_string();
    if line.trim().is_empty() {
        return Err(CliError::Usage(format!("expected {what} on stdin")));
    }
    Ok(line)
}

fn print_me(out: Format, me: &Me) {
    match out {
        Format::Json => print!("{}", output::json(me)),
        Format::Table => {
            println!("{} {} ({}) in organization {}", me.kind.as_str(), me.name, me.role, me.organization.name)
        }
    }
}

/// Fetches one page, or every page with `--all`; tells on stderr when more pages exist.
pub(crate) fn list<T: DeserializeOwned>(
    client: &Client,
    path: &str,
    mut query: Vec<(&str, String)>,
    paging: &Paging,
) -> Result<Vec<T>, CliError> {
    if let Some(l) = paging.limit {
        query.push(("limit", l.to_string()));
    }
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = query.clone();
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page: Page<T> = client.get(path, &q)?;
        items.extend(page.items);
        match page.next_cursor {
            Some(c) if paging.all => cursor = Some(c),
            Some(_) => {
                eprintln!("(more results: add --all to list them all)");
                break;
            }
            None => break,
        }
    }
    Ok(items)
}

/// One record: a JSON object, or a table of one row.
pub(crate) fn print_one<T: Serialize>(out: Format, item: &T, headers: &[&str], row: impl Fn(&T) -> Vec<String>) {
    match out {
        Format::Json => print!("{}", output::json(item)),
        Format::Table => print!("{}", output::table(headers, &[row(item)])),
    }
}

pub(crate) fn print_list<T: Serialize>(out: Format, items: &[T], headers: &[&str], row: impl Fn(&T) -> Vec<String>) {
    match out {
        Format::Json => print!("{}", output::json(&items)),
        Format::Table => print!("{}", output::table(headers, &items.iter().map(row).collect::<Vec<_>>())),
    }
}

fn user_row(u: &User) -> Vec<String> {
    vec![
        u.username.clone(),
        u.role.to_string(),
        if u.disabled { "disabled".into() } else { "active".into() },
        output::short_time(Some(&u.created_at)),
        output::short_time(u.last_login_at.as_deref()),
        u.id.clone(),
    ]
}

const USER_HEADERS: &[&str] = &["username", "role", "status", "created", "last sign-in", "id"];

/// Finds a user by exact username (searching every page of matches), else by id.
fn resolve_user(client: &Client, who: &str) -> Result<User, CliError> {
    if !who.is_empty() {
        let paging = Paging { limit: Some(500), all: true };
        let users: Vec<User> = list(client, "/users", vec![("q", who.to_string())], &paging)?;
        if let Some(u) = users.into_iter().find(|u| u.username == who) {
            return Ok(u);
        }
    }
    client.get(&format!("/users/{}", segment(who)), &[]).map_err(|e| match e {
        CliError::Api { status: 404, .. } => CliError::Usage(format!("no user named or with id {who:?}")),
        other => other,
    })
}

fn update_user(client: &Client, who: &str, change: UpdateUser) -> Result<User, CliError> {
    let u = resolve_user(client, who)?;
    client.send("PATCH", &format!("/users/{}", segment(&u.id)), &change)
}

fn user(client: &Client, out: Format, cmd: UserCommand) -> Result<ExitCode, CliError> {
    let show = |u: &User| print_one(out, u, USER_HEADERS, user_row);
    match cmd {
        UserCommand::List { role, search: q, sort, paging } => {
            let mut query = Vec::new();
            if let Some(r) = role {
                query.push(("role", r.to_string()));
            }
            if let Some(q) = q {
                query.push(("q", q));
            }
            if let Some(s) = sort {
                query.push(("sort", s));
            }
            let users: Vec<User> = list(client, "/users", query, &paging)?;
            print_list(out, &users, USER_HEADERS, user_row);
        }
        UserCommand::Create { username, role, password_stdin } => {
            let password = if password_stdin { Some(read_stdin_line("the password", "Password: ")?) } else { None };
            let created: CreatedUser = client.send("POST", "/users", &CreateUser { username, role, password })?;
            match out {
                Format::Json => print!("{}", output::json(&created)),
                Format::Table => {
                    show(&created.user);
                    if let Some(pw) = &created.generated_password {
                        println!("password: {pw}");
                        eprintln!("(the password is shown once: pass it on, and ask them to change it)");
                    }
                }
            }
        }
        UserCommand::Show { user } => show(&resolve_user(client, &user)?),
        UserCommand::SetRole { user, role } => {
            show(&update_user(client, &user, UpdateUser { role: Some(role), disabled: None })?)
        }
        UserCommand::Disable { user } => {
            show(&update_user(client, &user, UpdateUser { role: None, disabled: Some(true) })?)
        }
        UserCommand::Enable { user } => {
            show(&update_user(client, &user, UpdateUser { role: None, disabled: Some(false) })?)
        }
        UserCommand::ResetPassword { user } => {
            let u = resolve_user(client, &user)?;
            let password = read_stdin_line("the new password", "New password: ")?;
            let _: serde_json::Value =
                client.send("POST", &format!("/users/{}/password", segment(&u.id)), &SetPassword { password })?;
            println!("password of {} set; their sessions ended", u.username);
        }
        UserCommand::Delete { user } => {
            let u = resolve_user(client, &user)?;
            let _: serde_json::Value = client.delete(&format!("/users/{}", segment(&u.id)))?;
            println!("deleted user {}", u.username);
        }
    }
    Ok(ExitCode::SUCCESS)
}

const TOKEN_HEADERS: &[&str] = &["name", "role", "prefix", "created", "by", "expires", "last used", "status", "id"];

fn token_row(t: &ApiToken) -> Vec<String> {
    vec![
        t.name.clone(),
        t.role.to_string(),
        format!("{}…", t.prefix),
        output::short_time(Some(&t.created_at)),
        t.created_by.clone(),
        output::short_time(t.expires_at.as_deref()),
        output::short_time(t.last_used_at.as_deref()),
        if t.revoked_at.is_some() { "revoked".into() } else { "active".into() },
        t.id.clone(),
    ]
}

fn token(client: &Client, out: Format, cmd: TokenCommand) -> Result<ExitCode, CliError> {
    match cmd {
        TokenCommand::List { include_revoked, role, paging } => {
            let mut query = vec![("include_revoked", include_revoked.to_string())];
            if let Some(r) = role {
                query.push(("role", r.to_string()));
            }
            let tokens: Vec<ApiToken> = list(client, "/tokens", query, &paging)?;
            print_list(out, &tokens, TOKEN_HEADERS, token_row);
        }
        TokenCommand::Create { name, role, expires_in_days } => {
            let created: CreatedToken = client.send("POST", "/tokens", &CreateToken { name, role, expires_in_days })?;
            match out {
                Format::Json => print!("{}", output::json(&created)),
                Format::Table => {
                    println!("{}", created.secret);
                    eprintln!(
                        "created token {:?} ({}, id {}); the secret above is shown once",
                        created.token.name, created.token.role, created.token.id
                    );
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let t: ApiToken = client.delete(&format!("/tokens/{}", segment(&id)))?;
            print_one(out, &t, TOKEN_HEADERS, token_row);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn audit(client: &Client, out: Format, cmd: AuditCommand) -> Result<ExitCode, CliError> {
    match cmd {
        AuditCommand::List { action, actor, target_kind, target_id, since, until, paging } => {
            let mut query = Vec::new();
            for (k, v) in [
                ("action", action),
                ("actor", actor),
                ("target_kind", target_kind),
                ("target_id", target_id),
                ("since", since),
                ("until", until),
            ] {
                if let Some(v) = v {
                    query.push((k, v));
                }
            }
            let entries: Vec<AuditEntry> = list(client, "/audit", query, &paging)?;
            print_list(out, &entries, &["seq", "when", "who", "action", "target", "from", "what changed"], |e| {
                vec![
                    e.seq.to_string(),
                    output::short_time(Some(&e.at)),
                    format!("{} ({})", e.actor.name, e.actor.kind.as_str()),
                    e.action.clone(),
                    format!("{} {}", e.target_kind, e.target_id),
                    e.source.clone(),
                    e.summary.clone(),
                ]
            });
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify => {
            let v: AuditVerification = client.get("/audit/verify", &[])?;
            match out {
                Format::Json => print!("{}", output::json(&v)),
                Format::Table if v.ok => println!("{}", v.message),
                Format::Table => println!("audit log TAMPERED: {}", v.message),
            }
            Ok(if v.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand and every argument of the whole command tree says what it is for.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_name() == "help" {
                    continue;
                }
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&cli_command(), "drover", &mut missing);
        assert!(missing.is_empty(), "without help text:\n{}", missing.join("\n"));
    }

    #[test]
    fn text_is_another_name_for_table() {
        let (_, out) = parse(["drover", "-o", "text", "whoami"].map(OsString::from)).unwrap();
        assert_eq!(out, Format::Table);
    }

    #[test]
    fn output_is_only_on_commands_that_print_records() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(parse(args(&["drover", "user", "list", "-o", "json"])).unwrap().1, Format::Json);
        assert_eq!(parse(args(&["drover", "-o", "json", "user", "list"])).unwrap().1, Format::Json);
        assert_eq!(parse(args(&["drover", "device", "list"])).unwrap().1, Format::Table);
        // After the command it is not an argument of `term` at all; before it, it is refused.
        let err = parse(args(&["drover", "term", "dev", "-o", "json"])).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        let err = parse(args(&["drover", "-o", "json", "cp", "a", "d:/b"])).unwrap_err().to_string();
        assert!(err.contains("-o/--output has no effect on `drover cp`"), "{err}");
        for path in NO_OUTPUT {
            let mut cmd = cli_command();
            let mut sub = &mut cmd;
            for name in path.split(' ') {
                sub = sub.find_subcommand_mut(name).unwrap_or_else(|| panic!("no command {path}"));
            }
            assert!(sub.get_arguments().all(|a| a.get_id() != "output"), "{path} takes -o");
        }
    }
}
