//! The `droverd` command line: run the server, and the tasks that need no running server
//! (print the default configuration, make an API token, verify the audit log).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use drover_proto::api::{CreateToken, Role};

use crate::app;
use crate::auth::Principal;
use crate::config::{Config, DEFAULT_TOML, Overrides};
use crate::ops;

#[derive(Parser, Debug)]
#[command(name = "droverd", version, about = "The Drover fleet server")]
pub struct Args {
    /// Where droverd keeps its configuration and (by default) its SQLite database.
    #[arg(long, env = "DROVER_DATA_DIR", default_value = "./drover-data", global = true)]
    pub data_dir: PathBuf,
    /// Address of the web UI and REST API (overrides http_listen in the config file).
    #[arg(long, global = true)]
    pub http_listen: Option<String>,
    /// sqlite://PATH or postgres://USER@HOST/DB (overrides database_url in the config file).
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Address of the embedded MQTT broker for devices, mutual TLS (overrides mqtt_listen;
    /// empty: no embedded broker).
    #[arg(long, global = true)]
    pub mqtt_listen: Option<String>,
    /// An external MQTT 5 broker (mqtts://HOST:PORT) to take device traffic from instead.
    #[arg(long, global = true)]
    pub mqtt_url: Option<String>,
    /// Address of the HTTPS endpoint devices enroll through (overrides device_listen).
    #[arg(long, global = true)]
    pub device_listen: Option<String>,
    /// Where artifact files are kept: empty for DATA_DIR/artifacts, file:///PATH, or
    /// s3://BUCKET/PREFIX with the usual AWS_* variables (overrides artifact_store).
    #[arg(long, global = true)]
    pub artifact_store: Option<String>,
    /// Largest artifact accepted by upload, in bytes (overrides max_artifact_size).
    #[arg(long, global = true)]
    pub max_artifact_size: Option<u64>,
    #[command(flatten)]
    pub telemetry: crate::telemetry::TelemetryFlags,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Configuration tasks.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// API tokens, without a running server (automation and recovery).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print the OpenAPI document of the REST API.
    Openapi,
    /// The fleet CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Print the fleet CA's certificate (PEM): what devices and tools trust.
    Cert,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the commented default configuration file.
    Generate,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create an API token and print its secret (shown once).
    Create {
        #[arg(long)]
        role: Role,
        #[arg(long)]
        name: String,
        /// Days until it expires (default: never).
        #[arg(long)]
        expires_in_days: Option<u32>,
        /// Organization name (default: the default organization).
        #[arg(long)]
        org: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain of the whole audit log; exits 1 and names the first bad entry
    /// when it was altered.
    Verify,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    match &args.command {
        Some(Command::Config { command: ConfigCommand::Generate }) => {
            print!("{DEFAULT_TOML}");
            return ExitCode::SUCCESS;
        }
        Some(Command::Openapi) => {
            println!("{}", serde_json::to_string_pretty(&crate::api::openapi_document()).unwrap_or_default());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let serving = matches!(args.command, None | Some(Command::Serve));
    // A read-only command works on an existing server's data: run from the wrong directory,
    // it must not make a new data directory (a new CA, a new admin) and print *that*.
    let read_only = matches!(args.command, Some(Command::Ca { .. } | Command::Audit { .. }));
    if read_only && !args.data_dir.is_dir() {
        return fail(&format!(
            "no data directory at {}: give the server's --data-dir (or DROVER_DATA_DIR); \
             only `droverd serve` (or `token create`) makes a new one",
            args.data_dir.display()
        ));
    }
    if let Err(e) = app::prepare_data_dir(&args.data_dir) {
        return fail(&e.to_string());
    }
    let flags = Overrides {
        http_listen: args.http_listen.clone(),
        database_url: args.database_url.clone(),
        mqtt_listen: args.mqtt_listen.clone(),
        mqtt_url: args.mqtt_url.clone(),
        device_listen: args.device_listen.clone(),
        artifact_store: args.artifact_store.clone(),
        max_artifact_size: args.max_artifact_size,
        telemetry: args.telemetry.clone(),
    };
    let env = |k: &str| std::env::var(k).ok();
    let config = match Config::load(&args.data_dir, &env, &flags) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    if read_only
        && let Some(path) = config
            .effective_database_url()
            .strip_prefix("sqlite://")
            .map(|p| p.split('?').next().unwrap_or_default().to_string())
        && !std::path::Path::new(&path).exists()
    {
        return fail(&format!(
            "no database at {path}: this is not a server's data directory (give its --data-dir); \
             only `droverd serve` (or `token create`) makes a new one"
        ));
    }
    init_logging(&config.log, serving);
    // The one crypto provider (design decision 10), for the TLS that takes the process's
    // (object_store's S3 client); droverd's own TLS configurations name ring themselves.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(run(args, config))
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("droverd: error: {msg}");
    ExitCode::FAILURE
}

fn init_logging(filter: &str, serving: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // One-off commands print their result; only warnings and errors go to the log.
    let filter = if serving { filter } else { tracing_subscriber::EnvFilter::new("warn") };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr())
        .try_init();
}

/// Colours only for a person at a terminal: not in a log file, and never with `NO_COLOR`.
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

async fn run(args: Args, config: Config) -> ExitCode {
    let admin_password = std::env::var("DROVER_ADMIN_PASSWORD").ok().filter(|p| !p.is_empty());
    let serving = matches!(args.command, None | Some(Command::Serve));
    let announce = |m: &str| if serving { println!("{m}") } else { eprintln!("{m}") };
    // A generated password is shown only to a person at a terminal, else written to a file.
    let to_terminal = {
        use std::io::IsTerminal as _;
        if serving { std::io::stdout().is_terminal() } else { std::io::stderr().is_terminal() }
    };
    let db = match app::open_db_announcing(&config, admin_password, announce, to_terminal).await {
        Ok(db) => db,
        Err(e) => return fail(&e.to_string()),
    };
    match args.command {
        // `serve` opens the CA itself; only this command needs it here.
        Some(Command::Ca { command: CaCommand::Cert }) => match app::open_ca(&config, &db).await {
            Ok(ca) => {
                print!("{}", ca.cert_pem());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
        None | Some(Command::Serve) => match app::serve(config, db, std::future::pending(), |_| {}).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string()),
        },
        Some(Command::Token { command: TokenCommand::Create { role, name, expires_in_days, org } }) => {
            let org_id = match ops::find_org(&db, org.as_deref()).await {
                Ok(id) => id,
                Err(e) => return fail(&e.public_message()),
            };
            match ops::create_token(&db, &Principal::cli(&org_id), CreateToken { name, role, expires_in_days }).await {
                Ok(created) => {
                    println!("{}", created.secret);
                    eprintln!(
                        "droverd: created token {:?} ({}, id {}); the secret above is shown once",
                        created.token.name, created.token.role, created.token.id
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.public_message()),
            }
        }
        Some(Command::Audit { command: AuditCommand::Verify }) => match crate::audit::verify(&db).await {
            Ok(v) if v.ok => {
                println!("{}", v.message);
                ExitCode::SUCCESS
            }
            Ok(v) => {
                println!("audit log TAMPERED: {}", v.message);
                ExitCode::FAILURE
            }
            Err(e) => fail(&format!("cannot read the audit log: {e}")),
        },
        Some(Command::Config { .. }) | Some(Command::Openapi) => ExitCode::SUCCESS,
    }
}
