//! The real `drover-agent` binary: `check`, `run` with SIGTERM, `version`, argument errors.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_drover-agent");
const S: Duration = Duration::from_secs(1);

/// A data folder as enrollment leaves it.
fn provision(dir: &Path, dev: &Device, ca_pem: &str) {
    std::fs::create_dir_all(dir).unwrap();
    write(&dir.join("device.key"), &dev.key.to_pem());
    std::fs::set_permissions(dir.join("device.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    write(&dir.join("device.crt"), &dev.cert_pem);
    write(&dir.join("ca.crt"), ca_pem);
    write(&dir.join("device.json"), &format!("{{\"device_id\":\"{}\"}}", dev.id));
}

fn config(dir: &Path, port: u16, ca_file: &Path, data_dir: &Path) -> PathBuf {
    let path = dir.join("agent.toml");
    write(
        &path,
        &format!(
            "server_url = \"https://127.0.0.1:{port}\"\n\
             mqtt_url = \"mqtts://127.0.0.1:{port}\"\n\
             ca_file = {ca_file:?}\n\
             data_dir = {data_dir:?}\n\
             keepalive_secs = 5\n\
             inventory_scripts_dir = {:?}\n",
            dir.join("inventory.d")
        ),
    );
    path
}

fn check(config: &Path) -> (i32, String) {
    let out = Command::new(BIN).args(["check", "--config"]).arg(config).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn line<'a>(out: &'a str, id: &str) -> &'a str {
    out.lines()
        .find(|l| l.get(5..).is_some_and(|r| r.starts_with(&format!("{id} "))))
        .unwrap_or_else(|| panic!("no {id} line in\n{out}"))
}

/// `check` against a Mosquitto with mutual TLS. Bad inputs: a config drop-in with an unknown
/// key; a `ca_file` of another CA (server not trusted); a device certificate from another CA
/// (the broker refuses the client); a folder with no identity yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_line() {
    let ca = Ca::new("fleet CA");
    let other = Ca::new("some other CA");
    let m = Mosquitto::start(&ca);
    let dir = temp_dir("check");
    write(&dir.join("ca.crt"), &ca.cert_pem);
    write(&dir.join("other-ca.crt"), &other.cert_pem);

    // All good: one line per check, in order, exit 0.
    let data = dir.join("data");
    provision(&data, &Device::new(&ca, "dev-check"), &ca.cert_pem);
    let cfg = config(&dir, m.port, &dir.join("ca.crt"), &data);
    std::fs::create_dir_all(dir.join("config.d")).unwrap();
    write(&dir.join("config.d/10-log.toml"), "log_level = \"debug\"\n");
    let (code, out) = check(&cfg);
    let ids: Vec<&str> = out.lines().map(|l| l[5..].split_whitespace().next().unwrap()).collect();
    assert_eq!(ids, ["config", "clock", "identity", "certificate", "server", "broker"], "{out}");
    assert_eq!(line(&out, "config"), format!("ok   config       {} (+1 drop-in)", cfg.display()));
    assert!(line(&out, "clock").starts_with("ok   clock        20"), "{out}");
    assert_eq!(line(&out, "identity"), "ok   identity     device dev-check (key and certificate match)");
    assert!(line(&out, "certificate").starts_with("ok   certificate  expires "), "{out}");
    assert!(
        line(&out, "server").starts_with(&format!("ok   server       https://127.0.0.1:{}: TLS verified", m.port)),
        "{out}"
    );
    assert_eq!(line(&out, "broker"), format!("ok   broker       127.0.0.1:{}: mutual TLS accepted", m.port));
    assert_eq!(code, 0, "{out}");

    // A typo in a drop-in: the config line names file and key, nothing else runs, exit 1.
    write(&dir.join("config.d/20-typo.toml"), "mqtt_ur = \"x\"\n");
    let (code, out) = check(&cfg);
    assert_eq!(code, 1);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("FAIL config") && out.contains("20-typo.toml") && out.contains("mqtt_ur"), "{out}");
    std::fs::remove_file(dir.join("config.d/20-typo.toml")).unwrap();

    // The wrong CA for the server: FAIL server, named as a CA mismatch, exit 1. Another CA
    // (unknown issuer), and one with the fleet CA's very name but another key (bad signature).
    let lookalike = Ca::new("fleet CA");
    write(&dir.join("lookalike-ca.crt"), &lookalike.cert_pem);
    for wrong in ["other-ca.crt", "lookalike-ca.crt"] {
        let cfg = config(&dir, m.port, &dir.join(wrong), &data);
        let (code, out) = check(&cfg);
        let want = format!(
            "FAIL server       https://127.0.0.1:{}: the server's certificate is not signed by the CA in {} \
             — is it this server's fleet CA (`droverd ca cert`)?",
            m.port,
            dir.join(wrong).display()
        );
        assert!(line(&out, "server").starts_with(&want), "{wrong}: {out}");
        assert_eq!(code, 1);
    }
    // The broker too, checked against ca_file (the data folder's CA is the fleet's: the
    // broker's line is ok with it). A data folder whose CA is the other one as well:
    let data3 = dir.join("data3");
    provision(&data3, &Device::new(&ca, "dev-other-ca"), &other.cert_pem);
    let cfg = config(&dir, m.port, &dir.join("other-ca.crt"), &data3);
    let (_, out) = check(&cfg);
    assert!(
        line(&out, "broker").contains("the broker's certificate is not signed by the CA in ")
            && line(&out, "broker").contains("droverd ca cert"),
        "{out}"
    );

    // A device certificate the broker does not trust: FAIL broker.
    let data2 = dir.join("data2");
    provision(&data2, &Device::new(&other, "dev-stranger"), &ca.cert_pem);
    let cfg = config(&dir, m.port, &dir.join("ca.crt"), &data2);
    let (code, out) = check(&cfg);
    assert!(line(&out, "identity").starts_with("ok"), "{out}");
    assert!(line(&out, "broker").starts_with("FAIL broker"), "{out}");
    assert_eq!(code, 1);

    // Not enrolled yet: warnings, not failures.
    let cfg = config(&dir, m.port, &dir.join("ca.crt"), &dir.join("empty"));
    let (code, out) = check(&cfg);
    assert!(line(&out, "identity").starts_with("warn identity     not enrolled yet"), "{out}");
    assert!(line(&out, "broker").starts_with("warn broker"), "{out}");
    assert_eq!(code, 0, "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `run` with a provisioned folder: online, hello, inventory (with a script's value); SIGTERM →
/// retained `offline` published by the agent itself (clean DISCONNECT), exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_goes_online_and_offline_on_sigterm() {
    drover_agent::tls::install_default_provider();
    let ca = Ca::new("fleet CA");
    let m = Mosquitto::start(&ca);
    let mut obs = Observer::start(&ca, m.port, "drover/v1/d/#");
    let dir = temp_dir("run");
    write(&dir.join("ca.crt"), &ca.cert_pem);
    let data = dir.join("data");
    let dev = Device::new(&ca, "dev-run");
    provision(&data, &dev, &ca.cert_pem);
    let cfg = config(&dir, m.port, &dir.join("ca.crt"), &data);
    std::fs::create_dir_all(dir.join("inventory.d")).unwrap();
    let script = dir.join("inventory.d/serial");
    write(&script, "#!/bin/sh\necho serial=SN-0042\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
    let mut child =
        Command::new(BIN).args(["run", "--config"]).arg(&cfg).stderr(stderr).stdout(Stdio::null()).spawn().unwrap();
    obs.expect(10 * S, "online", |m| is(m, &dev.id, "up/status") && state(m) == "online").await;
    let hello = obs.expect(5 * S, "hello", |m| is(m, &dev.id, "up/hello")).await;
    assert_eq!(hello.payload["agent"], format!("drover-agent/{}", env!("CARGO_PKG_VERSION")));
    // What this configuration switches on: telemetry (the default) and so device rules;
    // no [update], no log source, no [remote].
    assert_eq!(hello.payload["capabilities"], serde_json::json!(["telemetry", "rules"]), "{:?}", hello.payload);
    let inv = obs.expect(10 * S, "inventory", |m| is(m, &dev.id, "up/inventory")).await;
    assert_eq!(inv.payload["attributes"]["serial"], "SN-0042");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut exited = None;
    for _ in 0..50 {
        if let Some(s) = child.try_wait().unwrap() {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited = exited.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("drover-agent did not exit after SIGTERM")
    });
    let log = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert_eq!(exited.code(), Some(0), "{log}");
    obs.expect(3 * S, "offline", |m| is(m, &dev.id, "up/status") && state(m) == "offline").await;
    // It said goodbye (DISCONNECT), so this offline is its own, not the broker's will.
    assert!(log.contains("disconnected"), "{log}");
    // stderr is a file here, not a terminal: plain lines, no colour codes.
    assert!(log.contains(" INFO ") && !log.contains('\u{1b}'), "{log:?}");
    // Mosquitto logs "disconnected" for an MQTT DISCONNECT ("closed its connection" otherwise).
    assert!(m.log().contains("Client dev-run disconnected"), "{}", m.log());
    let mut late = Observer::start(&ca, m.port, &format!("drover/v1/d/{}/up/status", dev.id));
    let st = late.expect(5 * S, "retained offline", |_| true).await;
    assert!(st.retain && state(&st) == "offline", "{st:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Bad inputs: an unknown argument, no command, a config with an unknown key for `run`.
#[test]
fn version_help_and_argument_errors() {
    let out = Command::new(BIN).arg("version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("drover-agent/{}", env!("CARGO_PKG_VERSION")));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: drover-agent [--config PATH] <COMMAND>"));
    for bad in [&["--frobnicate"][..], &[], &["run", "check"], &["--config"]] {
        let out = Command::new(BIN).args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Usage:"), "{bad:?}");
    }
    // An invalid configuration: `run` exits 78 (EX_CONFIG), which the unit does not restart.
    let dir = temp_dir("badcfg");
    write(&dir.join("agent.toml"), "mqtt_url = \"mqtts://x\"\nheartbeat = 5\n");
    let out = Command::new(BIN).args(["run", "--config"]).arg(dir.join("agent.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent.toml") && err.contains("heartbeat"), "{err}");
    // A value out of range, and a configuration file that is not there: 78 too.
    write(&dir.join("agent.toml"), "mqtt_url = \"mqtts://x\"\nkeepalive_secs = 1\n");
    let out = Command::new(BIN).args(["run", "--config"]).arg(dir.join("agent.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(BIN).args(["run", "--config"]).arg(dir.join("missing.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
    // The shipped unit does not restart the agent for it.
    let unit = include_str!("../../drover-agent.service");
    let prevent = unit.lines().find(|l| l.starts_with("RestartPreventExitStatus=")).expect("RestartPreventExitStatus=");
    assert!(prevent.split(['=', ' ']).any(|c| c == drover_agent::config::EXIT_CONFIG.to_string()), "{prevent}");
}
