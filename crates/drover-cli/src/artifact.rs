//! `drover artifact …`: release keys, building, signing, verifying and inspecting artifacts,
//! trust roots, and uploading. Everything but `upload` works offline, on local files: release
//! keys stay on the machine that signs (design decision 5).
//!
//! Files are streamed, never read whole: an artifact may be larger than memory.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use drover_artifact::keys::{PublicKey, SigningKey};
use drover_artifact::manifest::{Manifest, PayloadRole, Provenance};
use drover_artifact::root::{Root, RootDocument, RootKey, TrustStore, create_root, sign_root};
use drover_artifact::stream::{Header, StreamVerifier};
use drover_artifact::{ArtifactError, Reader, tree, write};
use serde_json::{Value, json};

use crate::client::{CliError, Client};
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub(crate) enum ArtifactCommand {
    /// Make an Ed25519 signing key: KEY (private, mode 0600) and KEY.pub (public).
    Keygen {
        /// Where to write the private key; the public key goes to the same path plus `.pub`.
        #[arg(long)]
        out: PathBuf,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Build an artifact from files (--payload) or a directory (--dir, packed as app.tar).
    Build(Box<BuildArgs>),
    /// Add a signature to an artifact; rewrites FILE unless --out is given.
    Sign {
        /// Private key file (`drover artifact keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The artifact to sign.
        file: PathBuf,
        /// Write the signed artifact here instead of rewriting FILE.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check the signature and every payload digest; exits 1 with the reason when either fails.
    Verify {
        /// The artifact to check.
        file: PathBuf,
        /// Trust root (root.json); repeat to apply newer roots in order, as a device does.
        #[arg(long, required_unless_present = "key", conflicts_with = "key")]
        root: Vec<PathBuf>,
        /// A single trusted public key: a .pub file, or `ed25519:…`.
        #[arg(long)]
        key: Option<String>,
    },
    /// Show an artifact's manifest, signatures and sizes (without checking them: see verify).
    Inspect {
        /// The artifact to show.
        file: PathBuf,
    },
    /// Upload an artifact to the server (streamed; the server stores it by its SHA-256).
    Upload {
        /// The artifact to upload.
        file: PathBuf,
    },
    /// Trust roots (root.json): the signed list of release keys devices trust.
    #[command(subcommand)]
    Root(RootCommand),
    /// list, show, delete: the artifacts uploaded to the server (`crate::deploy`).
    #[command(flatten)]
    Server(crate::deploy::ArtifactServerCommand),
}

#[derive(Args, Debug)]
pub(crate) struct BuildArgs {
    /// The software's name (edge-app).
    #[arg(long)]
    name: String,
    /// The software's version (1.4.2).
    #[arg(long)]
    version: String,
    /// A device type that takes the artifact; repeat for several.
    #[arg(long = "device-type", required = true)]
    device_types: Vec<String>,
    /// The update module: file, app, script, or an external module's name.
    #[arg(long = "type")]
    payload_type: String,
    /// A payload file, named by its file name; repeat for several, installed in order.
    #[arg(long = "payload", required_unless_present = "dir", conflicts_with = "dir")]
    payloads: Vec<PathBuf>,
    /// A directory, packed deterministically into one payload named app.tar.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// What the device provides once installed: KEY=VALUE; repeatable.
    #[arg(long = "provides", value_parser = key_value)]
    provides: Vec<(String, String)>,
    /// What the device must provide: KEY=V1,V2 (any of the values); repeatable.
    #[arg(long = "depends", value_parser = key_value)]
    depends: Vec<(String, String)>,
    /// An argument for the update module: KEY=VALUE; repeatable.
    #[arg(long = "arg", value_parser = key_value)]
    module_args: Vec<(String, String)>,
    /// Provenance: the source repository.
    #[arg(long)]
    source: Option<String>,
    /// Provenance: the commit built.
    #[arg(long)]
    commit: Option<String>,
    /// Provenance: the CI build id.
    #[arg(long)]
    build_id: Option<String>,
    /// A software bill of materials, carried as a payload with role sbom.
    #[arg(long)]
    sbom: Option<PathBuf>,
    /// Sign with this private key; repeatable. Without it the artifact is unsigned.
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    /// The artifact file to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
pub(crate) enum RootCommand {
    /// Write a new root.json, signed by the given root private keys.
    ///
    /// For a rotation, create version N+1 and add a signature with each current root key too
    /// (`drover artifact root sign --key OLD_ROOT.key root.json`).
    Create {
        /// A root key, listed and signing: a private key file; repeatable.
        #[arg(long = "root-key")]
        root_keys: Vec<PathBuf>,
        /// A root key listed but not signing now (it signs later with `root sign`): a public
        /// key file or `ed25519:…`; repeatable.
        #[arg(long = "root-pub")]
        root_pubs: Vec<String>,
        /// A release key that may sign artifacts: a public key file or `ed25519:…`; repeatable.
        #[arg(long = "release-key", required = true)]
        release_keys: Vec<String>,
        /// A key id to refuse everywhere; repeatable.
        #[arg(long = "revoke")]
        revoked: Vec<String>,
        /// How many root keys must sign this root and the next.
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        /// Version: 1 for the first root, current + 1 for a rotation.
        #[arg(long, default_value_t = 1)]
        version: u64,
        /// RFC 3339 time after which devices refuse artifacts until they get a newer root.
        #[arg(long)]
        expires: Option<String>,
        /// Where to write the root.json.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a signature to a root.json (in place unless --out).
    Sign {
        /// A root private key file (`drover artifact keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The root.json to sign.
        file: PathBuf,
        /// Write the signed root here instead of rewriting FILE.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check that NEW roots follow from a TRUSTED one, as a device would; prints the result.
    Verify {
        /// The root.json already trusted (as devices are provisioned with).
        #[arg(long)]
        trusted: PathBuf,
        /// Newer roots, applied in order.
        newer: Vec<PathBuf>,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

fn at(path: &Path) -> impl Fn(io::Error) -> CliError + '_ {
    move |e| usage(format!("{}: {e}", path.display()))
}

fn artifact_err(path: &Path) -> impl Fn(ArtifactError) -> CliError + '_ {
    move |e| usage(format!("{}: {e}", path.display()))
}

pub(crate) fn run(
    out: Format,
    cmd: ArtifactCommand,
    client: impl FnOnce() -> Result<Client, CliError>,
) -> Result<ExitCode, CliError> {
    match cmd {
        ArtifactCommand::Keygen { out: path, force } => keygen(out, &path, force)?,
        ArtifactCommand::Build(args) => build(out, *args)?,
        ArtifactCommand::Sign { key, file, out: dest } => sign(out, &key, &file, dest.as_deref())?,
        ArtifactCommand::Verify { file, root, key } => verify(out, &file, &root, key.as_deref())?,
        ArtifactCommand::Inspect { file } => inspect(out, &file)?,
        ArtifactCommand::Upload { file } => upload(out, &file, &client()?)?,
        ArtifactCommand::Server(cmd) => return crate::deploy::artifact(&client()?, out, cmd),
        ArtifactCommand::Root(RootCommand::Create {
            root_keys,
            root_pubs,
            release_keys,
            revoked,
            threshold,
            version,
            expires,
            out: dest,
        }) => {
            let signers = root_keys.iter().map(|p| load_signing_key(p)).collect::<Result<Vec<_>, _>>()?;
            let mut listed: Vec<RootKey> =
                signers.iter().zip(&root_keys).map(|(k, p)| RootKey::new(k.public(), key_name(p))).collect();
            for p in &root_pubs {
                listed.push(RootKey::new(load_public_key(p)?, key_name(Path::new(p))));
            }
            let release = release_keys
                .iter()
                .map(|p| Ok(RootKey::new(load_public_key(p)?, key_name(Path::new(p)))))
                .collect::<Result<Vec<_>, CliError>>()?;
            let mut root = Root::new(version, listed, release);
            root.root_threshold = threshold;
            root.revoked = revoked;
            root.expires = expires;
            let doc = create_root(root, &signers.iter().collect::<Vec<_>>()).map_err(|e| usage(e.to_string()))?;
            write_atomic(&dest, |w| w.write_all(&doc.to_json()).map_err(at(&dest)))?;
            print_root(out, &doc, &dest);
        }
        ArtifactCommand::Root(RootCommand::Sign { key, file, out: dest }) => {
            let key = load_signing_key(&key)?;
            let mut doc = RootDocument::parse(&fs::read(&file).map_err(at(&file))?)
                .map_err(|e| usage(format!("{}: {e}", file.display())))?;
            sign_root(&mut doc, &key);
            let dest = dest.unwrap_or(file);
            write_atomic(&dest, |w| w.write_all(&doc.to_json()).map_err(at(&dest)))?;
            print_root(out, &doc, &dest);
        }
        ArtifactCommand::Root(RootCommand::Verify { trusted, newer }) => {
            let read = |p: &Path| fs::read(p).map_err(at(p));
            let mut store =
                TrustStore::from_initial(&read(&trusted)?).map_err(|e| usage(format!("{}: {e}", trusted.display())))?;
            for p in &newer {
                let advanced = store.apply(&read(p)?).map_err(|e| usage(format!("{}: {e}", p.display())))?;
                if !advanced {
                    eprintln!("{}: not newer than version {}, skipped", p.display(), store.version());
                }
            }
            let r = store.root();
            match out {
                Format::Json => print!("{}", output::json(&json!({"ok": true, "root": r}))),
                Format::Table => print!(
                    "{}",
                    output::fields(&[
                        ("trusted version", r.version.to_string()),
                        ("expires", r.expires.clone().unwrap_or_else(|| "never".into())),
                        ("root keys", format!("{} (threshold {})", key_list(&r.root_keys), r.root_threshold)),
                        ("release keys", key_list(&r.release_keys)),
                        ("revoked", list_or_none(&r.revoked)),
                    ])
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn key_list(keys: &[RootKey]) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    keys.iter()
        .map(|k| if k.name.is_empty() { k.id.clone() } else { format!("{} ({})", k.id, k.name) })
        .collect::<Vec<_>>()
        .join(", ")
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() { "none".into() } else { items.join(", ") }
}

fn print_root(out: Format, doc: &RootDocument, path: &Path) {
    let have = doc.verify_self_signed();
    match out {
        Format::Json => print!(
            "{}",
            output::json(&json!({
                "file": path,
                "root": doc.signed,
                "signed_by": doc.signer_ids(),
                "complete": have.is_ok(),
            }))
        ),
        Format::Table => {
            let r = &doc.signed;
            print!(
                "{}",
                output::fields(&[
                    ("file", path.display().to_string()),
                    ("version", r.version.to_string()),
                    ("expires", r.expires.clone().unwrap_or_else(|| "never".into())),
                    ("root keys", format!("{} (threshold {})", key_list(&r.root_keys), r.root_threshold)),
                    ("release keys", key_list(&r.release_keys)),
                    ("revoked", list_or_none(&r.revoked)),
                    ("signed by", list_or_none(&doc.signer_ids())),
                ])
            );
        }
    }
    if let Err(e) = have {
        eprintln!(
            "note: not yet valid on its own: {e}; add signatures with `drover artifact root sign --key KEY {}`",
            path.display()
        );
    }
}

/// The label of a key from its file name: `keys/ci-2026.key` → `ci-2026`.
fn key_name(p: &Path) -> String {
    if p.to_string_lossy().starts_with("ed25519:") {
        return String::new();
    }
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = name.strip_suffix(".pub").unwrap_or(&name);
    let name = name.strip_suffix(".key").unwrap_or(name);
    name.chars().filter(|c| !c.is_control()).take(128).collect()
}

fn load_signing_key(path: &Path) -> Result<SigningKey, CliError> {
    let text = fs::read_to_string(path).map_err(at(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(m) = fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            eprintln!("warning: {} can be read by other users; chmod 600 it", path.display());
        }
    }
    SigningKey::from_pem(&text).map_err(|e| usage(format!("{}: {e}", path.display())))
}

/// `ed25519:…` itself, or a file holding it (a `.pub` file), or a private key file.
fn load_public_key(arg: &str) -> Result<PublicKey, CliError> {
    if arg.starts_with("ed25519:") {
        return arg.parse().map_err(|e: drover_artifact::KeyError| usage(e.to_string()));
    }
    let path = Path::new(arg);
    let text = fs::read_to_string(path).map_err(at(path))?;
    if text.contains("PRIVATE KEY") {
        return Ok(SigningKey::from_pem(&text).map_err(|e| usage(format!("{arg}: {e}")))?.public());
    }
    text.parse().map_err(|e: drover_artifact::KeyError| usage(format!("{arg}: {e}")))
}

/// Writes `path` through a temporary file in the same directory, renamed into place only when
/// `f` succeeds: a failure never leaves a half-written file under the final name.
fn write_atomic(
    path: &Path,
    f: impl FnOnce(&mut io::BufWriter<fs::File>) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| usage(format!("{}: not a file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut w = io::BufWriter::new(fs::File::create(&tmp).map_err(at(&tmp))?);
        f(&mut w)?;
        let file = w.into_inner().map_err(|e| at(&tmp)(e.into_error()))?;
        file.sync_all().map_err(at(&tmp))?;
        fs::rename(&tmp, path).map_err(at(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn keygen(out: Format, path: &Path, force: bool) -> Result<(), CliError> {
    let key = SigningKey::generate().map_err(|e| usage(e.to_string()))?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    if !force {
        for p in [path, &pub_path] {
            if fs::symlink_metadata(p).is_ok() {
                return Err(usage(format!("{} exists; pass --force to replace it", p.display())));
            }
        }
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(at(path))?;
    #[cfg(unix)]
    {
        // An existing file (with --force) keeps its mode on open: tighten it.
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(at(path))?;
    }
    f.write_all(key.to_pem().as_bytes()).and_then(|()| f.sync_all()).map_err(at(path))?;
    let public = key.public();
    fs::write(&pub_path, format!("{public}\n")).map_err(at(&pub_path))?;
    match out {
        Format::Json => print!(
            "{}",
            output::json(&json!({
                "key_id": public.key_id(),
                "public": public.to_string(),
                "private_key_file": path,
                "public_key_file": pub_path,
            }))
        ),
        Format::Table => {
            print!(
                "{}",
                output::fields(&[
                    ("key id", public.key_id()),
                    ("private key", format!("{} (keep it secret)", path.display())),
                    ("public key", format!("{} ({public})", pub_path.display())),
                ])
            );
        }
    }
    Ok(())
}

/// `created_at`: SOURCE_DATE_EPOCH when set (reproducible builds), else now.
fn created_at() -> Result<String, CliError> {
    let now = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) if !s.is_empty() => {
            let secs: i64 = s.trim().parse().map_err(|_| usage(format!("SOURCE_DATE_EPOCH {s:?} is not a number")))?;
            time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| usage(format!("SOURCE_DATE_EPOCH: {e}")))?
        }
        _ => time::OffsetDateTime::now_utc(),
    };
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339).map_err(|e| usage(e.to_string()))
}

fn file_name(p: &Path) -> Result<String, CliError> {
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| usage(format!("{}: the payload needs a UTF-8 file name", p.display())))
}

fn build(out: Format, a: BuildArgs) -> Result<(), CliError> {
    let mut m = Manifest::new(a.name, a.version, a.device_types, &a.payload_type);
    for (k, v) in a.provides {
        if m.provides.insert(k.clone(), v).is_some() {
            return Err(usage(format!("--provides {k} is given twice")));
        }
    }
    for (k, v) in a.depends {
        let values = v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        if m.depends.insert(k.clone(), values).is_some() {
            return Err(usage(format!("--depends {k} is given twice; list the values once: {k}=A,B")));
        }
    }
    for (k, v) in a.module_args {
        if m.module_args.insert(k.clone(), v).is_some() {
            return Err(usage(format!("--arg {k} is given twice")));
        }
    }
    m.created_at = Some(created_at()?);
    let mut payloads: Vec<(String, PathBuf, PayloadRole)> = Vec::new();
    // A directory is packed into a temporary file beside the output, removed afterwards.
    let mut packed: Option<PathBuf> = None;
    if let Some(dir) = &a.dir {
        let dest_dir = a.out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = dest_dir.join(format!(".drover-pack-{}.tar", std::process::id()));
        let f = fs::File::create(&tmp).map_err(at(&tmp))?;
        packed = Some(tmp.clone());
        let r = tree::pack_dir(dir, io::BufWriter::new(f)).map_err(artifact_err(dir));
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        payloads.push(("app.tar".into(), tmp, PayloadRole::Install));
    }
    for p in a.payloads {
        payloads.push((file_name(&p)?, p, PayloadRole::Install));
    }
    let provenance = Provenance {
        source: a.source,
        commit: a.commit,
        build_id: a.build_id,
        sbom: a.sbom.as_deref().map(file_name).transpose()?,
    };
    if let (Some(path), Some(name)) = (&a.sbom, &provenance.sbom) {
        payloads.push((name.clone(), path.clone(), PayloadRole::Sbom));
    }
    if provenance != Provenance::default() {
        m.provenance = Some(provenance);
    }
    let keys = a.keys.iter().map(|p| load_signing_key(p)).collect::<Result<Vec<_>, _>>()?;
    let mut builder = write::Builder::new(m);
    for (name, path, role) in payloads {
        builder = builder.payload(name, path, role);
    }
    let result = write_atomic(&a.out, |w| {
        builder.build(w, &keys.iter().collect::<Vec<_>>()).map(drop).map_err(|e| usage(e.to_string()))
    });
    if let Some(tmp) = packed {
        let _ = fs::remove_file(tmp);
    }
    result?;
    // Read back what was written: the summary shows the file as a device will see it.
    let header =
        Reader::new(fs::File::open(&a.out).map_err(at(&a.out))?).map_err(artifact_err(&a.out))?.header().clone();
    let (size, sha) = drover_artifact::write::hash_file(&a.out).map_err(artifact_err(&a.out))?;
    print_summary(out, &a.out, &header, size, &sha, None);
    if keys.is_empty() {
        eprintln!("note: the artifact is unsigned; sign it with `drover artifact sign --key KEY {}`", a.out.display());
    }
    Ok(())
}

fn print_summary(out: Format, path: &Path, h: &Header, size: u64, sha: &str, verified_by: Option<&str>) {
    let m = &h.manifest;
    let signers: Vec<String> = h.signatures.iter().map(|s| s.key_id.clone()).collect();
    match out {
        Format::Json => {
            let mut v = json!({
                "file": path,
                "sha256": sha,
                "size": size,
                "name": m.name,
                "version": m.version,
                "payloads": m.payloads,
                "signed_by": signers,
            });
            if let Some(k) = verified_by {
                v["ok"] = true.into();
                v["verified_key"] = k.into();
            }
            print!("{}", output::json(&v));
        }
        Format::Table => {
            let mut rows = vec![
                ("file", path.display().to_string()),
                ("artifact", format!("{} {}", m.name, m.version)),
                ("size", size.to_string()),
                ("sha256", sha.to_string()),
                ("payloads", payload_list(m)),
                ("signed by", list_or_none(&signers)),
            ];
            if let Some(k) = verified_by {
                rows.insert(0, ("verified", format!("signature by {k} and every payload digest")));
            }
            print!("{}", output::fields(&rows));
        }
    }
}

fn payload_list(m: &Manifest) -> String {
    if m.payloads.is_empty() {
        return "none".into();
    }
    m.payloads
        .iter()
        .map(|p| format!("{} ({} bytes{})", p.name, p.size, if p.role == PayloadRole::Sbom { ", sbom" } else { "" }))
        .collect::<Vec<_>>()
        .join(", ")
}

fn sign(out: Format, key: &Path, file: &Path, dest: Option<&Path>) -> Result<(), CliError> {
    let key = load_signing_key(key)?;
    let input = io::BufReader::new(fs::File::open(file).map_err(at(file))?);
    let dest = dest.unwrap_or(file);
    let mut header = None;
    write_atomic(dest, |w| {
        header = Some(write::sign(input, w, &key).map_err(artifact_err(file))?);
        Ok(())
    })?;
    let header = header.expect("set on success");
    let (size, sha) = write::hash_file(dest).map_err(artifact_err(dest))?;
    print_summary(out, dest, &header, size, &sha, None);
    Ok(())
}

fn verify(out: Format, file: &Path, roots: &[PathBuf], key: Option<&str>) -> Result<(), CliError> {
    let check: Box<dyn Fn(&Header) -> Result<String, CliError>> = match key {
        Some(k) => {
            let public = load_public_key(k)?;
            Box::new(move |h: &Header| {
                h.verify_with_key(&public)
                    .map(|()| public.key_id())
                    .map_err(|e| usage(format!("{}: {e}", file.display())))
            })
        }
        None => {
            let (first, newer) = roots.split_first().ok_or_else(|| usage("give --root root.json or --key PUB"))?;
            let mut store = TrustStore::from_initial(&fs::read(first).map_err(at(first))?)
                .map_err(|e| usage(format!("{}: {e}", first.display())))?;
            for p in newer {
                store.apply(&fs::read(p).map_err(at(p))?).map_err(|e| usage(format!("{}: {e}", p.display())))?;
            }
            Box::new(move |h: &Header| store.verify_header(h).map_err(|e| usage(format!("{}: {e}", file.display()))))
        }
    };
    let mut f = fs::File::open(file).map_err(at(file))?;
    let mut v = StreamVerifier::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut signer = None;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(at(file)(e)),
        };
        v.feed(&buf[..n]).map_err(artifact_err(file))?;
        // Check who signed as soon as the header is in, before hashing the payloads.
        if signer.is_none()
            && let Some(h) = v.header()
        {
            signer = Some(check(h)?);
        }
    }
    let verified = v.finish().map_err(artifact_err(file))?;
    let signer = match signer {
        Some(s) => s,
        None => check(&verified.header)?,
    };
    print_summary(out, file, &verified.header, verified.size, &verified.file_sha256, Some(&signer));
    Ok(())
}

fn inspect(out: Format, file: &Path) -> Result<(), CliError> {
    let size = fs::metadata(file).map_err(at(file))?.len();
    let r = Reader::new(io::BufReader::new(fs::File::open(file).map_err(at(file))?)).map_err(artifact_err(file))?;
    let h = r.header();
    let m = &h.manifest;
    match out {
        Format::Json => print!(
            "{}",
            output::json(&json!({
                "file": file,
                "size": size,
                "header_len": h.len,
                "expected_size": h.total_len(),
                "manifest": m,
                "signatures": h.signatures.iter().map(|s| json!({"key_id": s.key_id, "alg": s.alg})).collect::<Vec<_>>(),
            }))
        ),
        Format::Table => {
            let map = |m: &BTreeMap<String, String>| {
                if m.is_empty() {
                    "none".to_string()
                } else {
                    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
                }
            };
            let depends = if m.depends.is_empty() {
                "none".to_string()
            } else {
                m.depends.iter().map(|(k, v)| format!("{k}={}", v.join("|"))).collect::<Vec<_>>().join(", ")
            };
            let mut rows = vec![
                ("artifact", format!("{} {}", m.name, m.version)),
                ("device types", m.device_types.join(", ")),
                ("type", m.payload_type.clone()),
                ("provides", map(&m.provides)),
                ("depends", depends),
                ("module args", map(&m.module_args)),
            ];
            if let Some(p) = &m.provenance {
                for (label, v) in
                    [("source", &p.source), ("commit", &p.commit), ("build id", &p.build_id), ("sbom", &p.sbom)]
                {
                    if let Some(v) = v {
                        rows.push((label, v.clone()));
                    }
                }
            }
            rows.push(("created", m.created_at.clone().unwrap_or_else(|| "-".into())));
            rows.push((
                "signatures",
                list_or_none(&h.signatures.iter().map(|s| format!("{} ({})", s.key_id, s.alg)).collect::<Vec<_>>()),
            ));
            rows.push(("size", format!("{size} bytes (header {} bytes)", h.len)));
            print!("{}", output::fields(&rows));
            println!();
            print!(
                "{}",
                output::table(
                    &["payload", "role", "size", "sha256"],
                    &m.payloads
                        .iter()
                        .map(|p| vec![p.name.clone(), p.role.to_string(), p.size.to_string(), p.sha256.clone()])
                        .collect::<Vec<_>>()
                )
            );
            eprintln!("(nothing was verified: `drover artifact verify --root root.json FILE` checks it)");
        }
    }
    if h.total_len() != size {
        eprintln!(
            "warning: the file has {size} bytes and the header says {}: it is truncated or has extra bytes",
            h.total_len()
        );
    }
    Ok(())
}

fn upload(out: Format, file: &Path, client: &Client) -> Result<(), CliError> {
    // Refuse what is not an artifact before sending anything.
    let header = Reader::new(io::BufReader::new(fs::File::open(file).map_err(at(file))?))
        .map_err(artifact_err(file))?
        .header()
        .clone();
    let f = fs::File::open(file).map_err(at(file))?;
    let len = f.metadata().map_err(at(file))?.len();
    if len != header.total_len() {
        return Err(usage(format!(
            "{}: the file has {len} bytes and its header says {}; `drover artifact verify` it",
            file.display(),
            header.total_len()
        )));
    }
    let mut body = io::BufReader::with_capacity(256 * 1024, f);
    let created: Value = client.send_stream("/artifacts", "application/octet-stream", &mut body, len)?;
    match out {
        Format::Json => print!("{}", output::json(&created)),
        Format::Table => match serde_json::from_value::<drover_proto::deploy::Artifact>(created.clone()) {
            Ok(a) => print!(
                "{}",
                output::fields(&[
                    ("id", a.id),
                    ("artifact", format!("{} {}", a.name, a.version)),
                    ("device types", a.device_types.join(", ")),
                    ("type", a.payload_type),
                    ("size", a.size.to_string()),
                    ("signed by", list_or_none(&a.signed_by)),
                    ("uploaded", format!("{} by {}", a.uploaded_at, a.uploaded_by)),
                ])
            ),
            Err(_) => print!("{}", output::json(&created)),
        },
    }
    Ok(())
}
