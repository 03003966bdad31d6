//! Health metrics of the machine, read from `/proc`, `/sys` and `statvfs`
//! (names in `docs/telemetry-agent.md`, "Metrics"). What the hardware does not have
//! (a thermal zone, a battery) is simply not reported.

use std::path::{Path, PathBuf};

/// Reads the machine; keeps the previous CPU counters to turn them into a percentage.
pub struct Collector {
    disks: Vec<PathBuf>,
    proc: PathBuf,
    sys: PathBuf,
    prev_cpu: Option<(u64, u64)>,
}

/// `/` → `root`; `/data/logs` → `data_logs`: mount points as metric-name suffixes.
pub fn mount_suffix(mount: &Path) -> String {
    let s: String = mount
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '_' })
        .collect();
    if s.is_empty() { "root".into() } else { s.chars().take(40).collect() }
}

impl Collector {
    pub fn new(disks: Vec<PathBuf>) -> Self {
        Collector { disks, proc: "/proc".into(), sys: "/sys".into(), prev_cpu: None }
    }

    /// All metrics now, as `(name, value)`.
    pub fn collect(&mut self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        if let Some(p) = self.cpu() {
            out.push(("cpu.percent".into(), p));
        }
        if let Some(l) = read(&self.proc.join("loadavg")).and_then(|s| s.split_whitespace().next()?.parse().ok()) {
            out.push(("cpu.load1".into(), l));
        }
        self.memory(&mut out);
        for d in &self.disks {
            disk(d, &mut out);
        }
        self.thermal(&mut out);
        self.battery(&mut out);
        self.network(&mut out);
        if let Some(u) = read(&self.proc.join("uptime")).and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        {
            out.push(("uptime_s".into(), u.floor()));
        }
        out
    }

    fn cpu(&mut self) -> Option<f64> {
        let stat = read(&self.proc.join("stat"))?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        let prev = self.prev_cpu.replace((total, idle));
        let (pt, pi) = prev?;
        let dt = total.saturating_sub(pt);
        if dt == 0 {
            return None;
        }
        let busy = dt.saturating_sub(idle.saturating_sub(pi));
        Some(round2(100.0 * busy as f64 / dt as f64))
    }

    fn memory(&self, out: &mut Vec<(String, f64)>) {
        let Some(mi) = read(&self.proc.join("meminfo")) else { return };
        let kb = |key: &str| -> Option<u64> {
            mi.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        };
        if let (Some(total), Some(avail)) = (kb("MemTotal"), kb("MemAvailable")) {
            let used = total.saturating_sub(avail) * 1024;
            out.push(("mem.total_bytes".into(), (total * 1024) as f64));
            out.push(("mem.used_bytes".into(), used as f64));
            if total > 0 {
                out.push(("mem.used_percent".into(), round2(100.0 * used as f64 / (total * 1024) as f64)));
            }
        }
        if let (Some(st), Some(sf)) = (kb("SwapTotal"), kb("SwapFree"))
            && st > 0
        {
            out.push(("mem.swap_used_bytes".into(), (st.saturating_sub(sf) * 1024) as f64));
        }
    }

    fn thermal(&self, out: &mut Vec<(String, f64)>) {
        let Ok(rd) = std::fs::read_dir(self.sys.join("class/thermal")) else { return };
        let mut zones: Vec<_> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        zones.sort();
        for z in zones.iter().filter(|z| z.starts_with("thermal_zone")) {
            let base = self.sys.join("class/thermal").join(z);
            let Some(milli) = read(&base.join("temp")).and_then(|s| s.trim().parse::<i64>().ok()) else { continue };
            let n = z.trim_start_matches("thermal_zone");
            out.push((format!("temp.zone{n}_celsius"), milli as f64 / 1000.0));
        }
    }

    fn battery(&self, out: &mut Vec<(String, f64)>) {
        let Ok(rd) = std::fs::read_dir(self.sys.join("class/power_supply")) else { return };
        let mut names: Vec<_> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        for n in names {
            let base = self.sys.join("class/power_supply").join(&n);
            if read(&base.join("type")).is_none_or(|t| t.trim() != "Battery") {
                continue;
            }
            let suffix = mount_suffix(Path::new(&n));
            if let Some(c) = read(&base.join("capacity")).and_then(|s| s.trim().parse::<f64>().ok()) {
                out.push((format!("battery.{suffix}.percent"), c));
            }
            if let Some(s) = read(&base.join("status")) {
                out.push((format!("battery.{suffix}.charging"), if s.trim() == "Charging" { 1.0 } else { 0.0 }));
            }
        }
    }

    fn network(&self, out: &mut Vec<(String, f64)>) {
        let Some(dev) = read(&self.proc.join("net/dev")) else { return };
        let (mut rx, mut tx) = (0u64, 0u64);
        for l in dev.lines().skip(2) {
            let Some((iface, rest)) = l.split_once(':') else { continue };
            if iface.trim() == "lo" {
                continue;
            }
            let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            rx += v.first().copied().unwrap_or(0);
            tx += v.get(8).copied().unwrap_or(0);
        }
        out.push(("net.rx_bytes".into(), rx as f64));
        out.push(("net.tx_bytes".into(), tx as f64));
    }
}

#[allow(unsafe_code)]
fn disk(mount: &Path, out: &mut Vec<(String, f64)>) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(mount.as_os_str().as_bytes()) else { return };
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return;
    }
    let frsize = s.f_frsize as u64;
    let total = s.f_blocks as u64 * frsize;
    let free = s.f_bfree as u64 * frsize;
    let avail = s.f_bavail as u64 * frsize;
    let used = total.saturating_sub(free);
    let sfx = mount_suffix(mount);
    out.push((format!("disk.used_bytes.{sfx}"), used as f64));
    out.push((format!("disk.free_bytes.{sfx}"), avail as f64));
    // As df computes it: used / (used + available to unprivileged users).
    if used + avail > 0 {
        out.push((format!("disk.used_percent.{sfx}"), round2(100.0 * used as f64 / (used + avail) as f64)));
    }
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_suffixes() {
        assert_eq!(mount_suffix(Path::new("/")), "root");
        assert_eq!(mount_suffix(Path::new("/data/Logs")), "data_logs");
        assert_eq!(mount_suffix(Path::new("/mnt/sd card")), "mnt_sd_card");
    }

    #[test]
    fn this_machine() {
        let mut c = Collector::new(vec!["/".into()]);
        let first = c.collect();
        let names: Vec<&str> = first.iter().map(|(n, _)| n.as_str()).collect();
        for want in ["mem.used_bytes", "disk.used_percent.root", "net.rx_bytes", "uptime_s"] {
            assert!(names.contains(&want), "{want} in {names:?}");
        }
        assert!(!names.contains(&"cpu.percent"), "needs two readings");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let second = c.collect();
        let cpu = second.iter().find(|(n, _)| n == "cpu.percent").map(|(_, v)| *v);
        assert!(cpu.is_some_and(|v| (0.0..=100.0).contains(&v)), "{cpu:?}");
        for (n, v) in &second {
            assert!(drover_proto::telemetry::valid_name(n) && v.is_finite(), "{n} {v}");
        }
    }
}
