//! Inventory: what the device is, as flat `key = value` attributes (`docs/protocol.md` lists
//! the built-in keys, `docs/agent.md` describes each), plus whatever the executables in the
//! inventory-scripts folder print as `key=value` lines.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use drover_proto::device::{MAX_ATTRIBUTE_KEY_LEN, MAX_INVENTORY_ATTRIBUTES, check_inventory, parse_key_value_lines};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

pub type Attributes = BTreeMap<String, String>;

/// The most a script may print; the rest is ignored.
const SCRIPT_OUTPUT_LIMIT: u64 = 64 * 1024;

/// A digest of a set of attributes, to tell whether an inventory changed without keeping a copy.
pub fn digest(attrs: &Attributes) -> [u8; 32] {
    let mut h = Sha256::new();
    for (k, v) in attrs {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    h.finalize().into()
}

/// The inventory of the machine the agent runs on.
#[derive(Debug, Clone)]
pub struct SystemInventory {
    pub scripts_dir: PathBuf,
    pub script_timeout: Duration,
}

impl SystemInventory {
    pub async fn collect(&self) -> Attributes {
        let mut attrs = builtin_attributes();
        if let Some((total, free)) = root_fs_kb().await {
            attrs.insert("disk_total_kb".into(), total.to_string());
            attrs.insert("disk_free_kb".into(), free.to_string());
        }
        let scripts = run_scripts(&self.scripts_dir, self.script_timeout).await;
        attrs.extend(scripts);
        let net = network_attributes().await;
        finish(attrs, net)
    }
}

/// Keeps the limits of `check_inventory`: invalid entries are dropped (and logged), and the
/// network entries, which can be many on a host with containers, fill what room is left.
pub fn finish(mut attrs: Attributes, net: Attributes) -> Attributes {
    attrs.retain(|k, v| {
        let ok = check_inventory(&BTreeMap::from([(k.clone(), v.clone())])).is_ok();
        if !ok {
            tracing::warn!(key = %k, "inventory attribute dropped: invalid key or value");
        }
        ok
    });
    let mut dropped = 0;
    for (k, v) in net {
        if attrs.len() >= MAX_INVENTORY_ATTRIBUTES {
            dropped += 1;
        } else if !attrs.contains_key(&k) && check_inventory(&BTreeMap::from([(k.clone(), v.clone())])).is_ok() {
            attrs.insert(k, v);
        }
    }
    while attrs.len() > MAX_INVENTORY_ATTRIBUTES {
        attrs.pop_last();
        dropped += 1;
    }
    if dropped > 0 {
        tracing::warn!(dropped, "inventory over {MAX_INVENTORY_ATTRIBUTES} attributes; some left out");
    }
    attrs
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// `/proc/sys/kernel/random/boot_id`: changes at every boot.
pub fn boot_id() -> Option<String> {
    read_trim("/proc/sys/kernel/random/boot_id")
}

/// Seconds since boot, from `/proc/uptime`.
pub fn uptime_secs() -> u64 {
    read_trim("/proc/uptime")
        .and_then(|s| s.split_whitespace().next().and_then(|f| f.parse::<f64>().ok()))
        .map(|f| f as u64)
        .unwrap_or(0)
}

/// `KEY=value` of `/etc/os-release`, unquoted.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').trim_matches('\'').to_string()))
        .collect()
}

/// The values of `/proc/cpuinfo`: model and number of processors.
pub fn parse_cpuinfo(text: &str) -> (Option<String>, usize) {
    let mut model = None;
    let mut count = 0;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        match k.trim() {
            "processor" => count += 1,
            "model name" | "Model" | "Hardware" | "cpu model" if model.is_none() => {
                model = Some(v.trim().to_string()).filter(|m| !m.is_empty())
            }
            _ => {}
        }
    }
    (model, count)
}

fn builtin_attributes() -> Attributes {
    let mut a = Attributes::new();
    let os = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .map(|t| parse_os_release(&t))
        .unwrap_or_default();
    a.insert("os".into(), os.get("ID").cloned().unwrap_or_else(|| std::env::consts::OS.to_string()));
    for (key, field) in [("os_version", "VERSION_ID"), ("os_name", "PRETTY_NAME")] {
        if let Some(v) = os.get(field).filter(|v| !v.is_empty()) {
            a.insert(key.into(), v.clone());
        }
    }
    if let Some(k) = read_trim("/proc/sys/kernel/osrelease") {
        a.insert("kernel".into(), k);
    }
    a.insert("arch".into(), std::env::consts::ARCH.into());
    if let Some(h) = read_trim("/proc/sys/kernel/hostname") {
        a.insert("hostname".into(), h);
    }
    a.insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
    let (model, count) = std::fs::read_to_string("/proc/cpuinfo").map(|t| parse_cpuinfo(&t)).unwrap_or((None, 0));
    if let Some(m) = model {
        a.insert("cpu_model".into(), m);
    }
    let count = if count > 0 { count } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) };
    a.insert("cpu_count".into(), count.to_string());
    if let Some(mem) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines().find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().trim_end_matches("kB").trim().to_string()))
    }) {
        a.insert("mem_total_kb".into(), mem);
    }
    a
}

/// Total and free kB of `/`, from `df -kP /` (POSIX output).
async fn root_fs_kb() -> Option<(u64, u64)> {
    let out = run_command(tokio::process::Command::new("df").args(["-kP", "/"]), Duration::from_secs(5)).await?;
    parse_df(&out)
}

pub fn parse_df(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().nth(1)?;
    let f: Vec<&str> = line.split_whitespace().collect();
    Some((f.get(1)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

async fn run_command(cmd: &mut tokio::process::Command, timeout: Duration) -> Option<String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true);
    let mut child = cmd.spawn().ok()?;
    let mut stdout = child.stdout.take()?;
    let fut = async {
        let mut buf = Vec::new();
        (&mut stdout).take(SCRIPT_OUTPUT_LIMIT).read_to_end(&mut buf).await.ok()?;
        let status = child.wait().await.ok()?;
        status.success().then(|| String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// A key for an interface name, if it can be one.
fn net_key(iface: &str, what: &str) -> Option<String> {
    let k = format!("net.{iface}.{what}");
    (k.len() <= MAX_ATTRIBUTE_KEY_LEN && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        .then_some(k)
}

/// `net.{iface}.mac` from `/sys/class/net`, `net.{iface}.ipv4` / `.ipv6` (global) from
/// `ip -o addr` when that is installed. Loopback is left out.
async fn network_attributes() -> Attributes {
    let mut a = Attributes::new();
    if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "lo" {
                continue;
            }
            if let (Some(mac), Some(key)) =
                (read_trim(&format!("/sys/class/net/{name}/address")), net_key(&name, "mac"))
                && mac != "00:00:00:00:00:00"
            {
                a.insert(key, mac);
            }
        }
    }
    if let Some(out) =
        run_command(tokio::process::Command::new("ip").args(["-o", "addr", "show"]), Duration::from_secs(5)).await
    {
        a.extend(parse_ip_addr(&out));
    }
    a
}

/// `ip -o addr show` lines into `net.{iface}.ipv4` / `.ipv6`, several addresses comma-separated.
pub fn parse_ip_addr(out: &str) -> Attributes {
    let mut lists: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "2: eth0    inet 10.0.0.5/24 brd ... scope global eth0 ..."
        let (Some(name), Some(family), Some(addr)) = (f.get(1), f.get(2), f.get(3)) else { continue };
        let name = name.trim_end_matches(':').split('@').next().unwrap_or(name);
        if name == "lo" {
            continue;
        }
        let what = match *family {
            "inet" => "ipv4",
            "inet6" if line.contains("scope global") => "ipv6",
            _ => continue,
        };
        let addr = addr.split('/').next().unwrap_or(addr);
        if let Some(key) = net_key(name, what) {
            lists.entry(key).or_default().push(addr.to_string());
        }
    }
    lists.into_iter().map(|(k, v)| (k, v.join(","))).collect()
}

/// Runs every executable in `dir` (sorted by name; hidden files skipped) with `timeout` each and
/// merges their `key=value` output; later scripts win. A script that fails, times out or prints
/// something else is logged and skipped.
pub async fn run_scripts(dir: &Path, timeout: Duration) -> Attributes {
    let mut out = Attributes::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "cannot read the inventory scripts folder: {e}");
            return out;
        }
    };
    let mut scripts: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .collect();
    scripts.sort();
    for script in scripts {
        match run_script(&script, timeout).await {
            Ok(attrs) => out.extend(attrs),
            Err(e) => tracing::warn!(script = %script.display(), "inventory script skipped: {e}"),
        }
    }
    out
}

/// One script's attributes, or why there are none.
pub async fn run_script(script: &Path, timeout: Duration) -> Result<Attributes, String> {
    let mut child = tokio::process::Command::new(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let work = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut out_reader = (&mut stdout).take(SCRIPT_OUTPUT_LIMIT);
        let mut err_reader = (&mut stderr).take(4096);
        let (r1, r2) = tokio::join!(out_reader.read_to_end(&mut out), err_reader.read_to_end(&mut err));
        r1.map_err(|e| e.to_string())?;
        let _ = r2;
        let status = child.wait().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, out, err))
    };
    let (status, out, err) = match tokio::time::timeout(timeout, work).await {
        Ok(r) => r?,
        Err(_) => return Err(format!("no answer within {}s; killed", timeout.as_secs_f64())),
    };
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        return Err(format!("{status}: {}", err.trim()));
    }
    let text = String::from_utf8(out).map_err(|_| "output is not UTF-8".to_string())?;
    parse_key_value_lines(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        let os = parse_os_release("NAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID=\"12\"\n");
        assert_eq!(os["ID"], "debian");
        assert_eq!(os["VERSION_ID"], "12");
        let (model, n) =
            parse_cpuinfo("processor\t: 0\nmodel name\t: Xeon X\n\nprocessor\t: 1\nmodel name\t: Xeon X\n");
        assert_eq!((model.as_deref(), n), (Some("Xeon X"), 2));
        let df = "Filesystem     1024-blocks      Used Available Capacity Mounted on\n/dev/sda1 100 40 60 40% /\n";
        assert_eq!(parse_df(df), Some((100, 60)));
        assert_eq!(parse_df("garbage"), None);
        let ip = "1: lo    inet 127.0.0.1/8 scope host lo\n\
                  2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\n\
                  2: eth0    inet 10.0.0.6/24 scope global secondary eth0\n\
                  2: eth0    inet6 fe80::1/64 scope link \n\
                  3: wg0    inet6 2001:db8::1/64 scope global \n";
        let a = parse_ip_addr(ip);
        assert_eq!(a["net.eth0.ipv4"], "10.0.0.5,10.0.0.6");
        assert_eq!(a["net.wg0.ipv6"], "2001:db8::1");
        assert!(!a.contains_key("net.lo.ipv4") && !a.contains_key("net.eth0.ipv6"));
    }

    /// Bad input: more network entries than the protocol allows attributes, and an invalid value.
    #[test]
    fn finish_keeps_the_limits() {
        let mut attrs = Attributes::from([("os".to_string(), "x".to_string()), ("bad".into(), "a\nb".into())]);
        attrs.insert("k".into(), "v".into());
        let net: Attributes = (0..400).map(|i| (format!("net.veth{i}.mac"), "02:00:00:00:00:01".into())).collect();
        let out = finish(attrs, net);
        assert_eq!(out.len(), MAX_INVENTORY_ATTRIBUTES);
        assert!(check_inventory(&out).is_ok());
        assert_eq!(out["os"], "x");
        assert!(!out.contains_key("bad"));
    }

    fn script(dir: &Path, name: &str, body: &str, exec: bool) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 })).unwrap();
    }

    /// Bad inputs: a failing script, a slow one, one printing something other than key=value,
    /// a non-executable file; none of them stops the others.
    #[tokio::test]
    async fn scripts_merge_and_bad_ones_are_skipped() {
        let dir = std::env::temp_dir().join(format!("drover-agent-inv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        script(&dir, "10-site", "echo '# facts'\necho rack=r12\necho zone=a", true);
        script(&dir, "20-fails", "echo leaked=1\necho oops >&2\nexit 3", true);
        script(&dir, "30-slow", "sleep 5\necho slow=1", true);
        script(&dir, "40-garbage", "echo 'this is not key value'", true);
        script(&dir, "50-override", "echo zone=b", true);
        script(&dir, "60-not-executable", "echo noexec=1", false);
        script(&dir, ".hidden", "echo hidden=1", true);
        let started = std::time::Instant::now();
        let attrs = run_scripts(&dir, Duration::from_millis(700)).await;
        assert!(started.elapsed() < Duration::from_secs(4), "the slow script was not cut off");
        assert_eq!(attrs, Attributes::from([("rack".into(), "r12".into()), ("zone".into(), "b".into())]));
        let err = run_script(&dir.join("20-fails"), Duration::from_secs(5)).await.unwrap_err();
        assert!(err.contains("oops"), "{err}");
        let err = run_script(&dir.join("30-slow"), Duration::from_millis(200)).await.unwrap_err();
        assert!(err.contains("killed"), "{err}");
        assert!(run_scripts(&dir.join("missing"), Duration::from_secs(1)).await.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn this_machine() {
        let inv = SystemInventory { scripts_dir: "/nonexistent".into(), script_timeout: Duration::from_secs(1) };
        let a = inv.collect().await;
        for k in ["os", "arch", "agent_version", "cpu_count", "kernel", "mem_total_kb", "disk_total_kb"] {
            assert!(a.contains_key(k), "{k} missing from {a:?}");
        }
        assert!(check_inventory(&a).is_ok());
        assert_ne!(digest(&a), digest(&Attributes::new()));
    }
}
