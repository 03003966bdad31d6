//! `drover trust-root …`: the trust root the server holds for the organization's devices
//! (`PUT`/`GET /api/v1/trust-root`, `docs/updates-server.md`). Devices get the whole chain with
//! every install command, so uploading the next root is how release keys are rotated.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use drover_proto::deploy::TrustRoot;

use crate::client::{CliError, Client};
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub(crate) enum TrustRootCommand {
    /// Upload a root.json (admin): the first root, signed by its own root keys, or the next
    /// version, signed by the current root keys and its own (a rotation).
    Set {
        /// The signed root.json (`drover artifact root create` / `root sign`).
        file: PathBuf,
    },
    /// The current trust root: version, release keys, revoked keys and the versions held.
    Show,
}

fn print_root(out: Format, r: &TrustRoot) {
    let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(", ") };
    match out {
        Format::Json => print!("{}", output::json(r)),
        Format::Table => print!(
            "{}",
            output::fields(&[
                ("version", r.version.to_string()),
                ("release keys", list(&r.release_keys)),
                ("revoked", list(&r.revoked)),
                ("chain", r.chain.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")),
            ])
        ),
    }
}

pub(crate) fn trust_root(client: &Client, out: Format, cmd: TrustRootCommand) -> Result<ExitCode, CliError> {
    match cmd {
        TrustRootCommand::Set { file } => {
            let bytes =
                std::fs::read(&file).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            if serde_json::from_slice::<serde_json::Value>(&bytes).is_err() {
                return Err(CliError::Usage(format!(
                    "{} is not JSON: give the root.json written by `drover artifact root create`",
                    file.display()
                )));
            }
            let r: TrustRoot = client.put_bytes("/trust-root", "application/json", bytes)?;
            print_root(out, &r);
        }
        TrustRootCommand::Show => {
            let r: TrustRoot = client.get("/trust-root", &[]).map_err(|e| match e {
                CliError::Api { status: 404, .. } => CliError::Usage(
                    "the server has no trust root yet: upload one with `drover trust-root set root.json`".into(),
                ),
                other => other,
            })?;
            print_root(out, &r);
        }
    }
    Ok(ExitCode::SUCCESS)
}
