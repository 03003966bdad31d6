//! `drover-agent`: the Drover device agent. A thin wrapper around the library.

use std::path::PathBuf;
use std::process::ExitCode;

use drover_agent::check::Level;
use drover_agent::config;

const HELP: &str = "\
drover-agent: the Drover device agent

Usage: drover-agent [--config PATH] <COMMAND>

Commands:
  run       Enroll if needed, then stay connected until SIGTERM/SIGINT
  check     Check configuration, clock, identity, certificate, server and broker
  version   Print the version
  help      Print this help

Options:
  -c, --config PATH   Configuration file [default: /etc/drover/agent.toml]
                      (drop-ins: <dir of PATH>/config.d/*.toml)
  -h, --help          Print this help
  -V, --version       Print the version

Exit codes: 0 success, 1 failure, 2 bad arguments,
  78 `run` with a configuration that cannot be read or is invalid (not worth restarting)
";

enum Command {
    Run,
    Check,
    Version,
    Help,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<(Command, PathBuf), String> {
    let mut config = PathBuf::from(config::DEFAULT_CONFIG_PATH);
    let mut command = None;
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        let cmd = match a.as_str() {
            "-c" | "--config" => {
                config = args.next().ok_or("--config needs a path")?.into();
                continue;
            }
            s if s.starts_with("--config=") => {
                config = s["--config=".len()..].into();
                continue;
            }
            "-h" | "--help" | "help" => Command::Help,
            "-V" | "--version" | "version" => Command::Version,
            "run" => Command::Run,
            "check" => Command::Check,
            other => return Err(format!("unknown argument {other:?}")),
        };
        if command.is_some() {
            return Err(format!("unexpected argument {a:?}: one command at a time"));
        }
        command = Some(cmd);
    }
    Ok((command.ok_or("no command given")?, config))
}

fn main() -> ExitCode {
    let (command, config_path) = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("drover-agent: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("{}", drover_agent::AGENT);
            ExitCode::SUCCESS
        }
        Command::Check => {
            drover_agent::tls::install_default_provider();
            let lines = drover_agent::check::run_checks(&config_path);
            for l in &lines {
                println!("{l}");
            }
            if lines.iter().any(|l| l.level == Level::Fail) { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Command::Run => run(config_path),
    }
}

fn run(config_path: PathBuf) -> ExitCode {
    drover_agent::tls::install_default_provider();
    let cfg = match config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("drover-agent: configuration: {e}");
            return ExitCode::from(config::EXIT_CONFIG);
        }
    };
    drover_agent::log::StderrLog::new(cfg.log_level.to_tracing(), drover_agent::log_colours()).install();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(drover_agent::agent::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
