//! Made-up but plausible inventories: every attribute a real `drover-agent` reports, varying
//! by the device's index so that filters and groups in the UI have something to bite on
//! (`attr.arch = "aarch64"`, `attr.region = "eu-west"`, …). Pure and deterministic: the same
//! index always gives the same device.

use drover_agent::inventory::Attributes;

struct Model {
    name: &'static str,
    arch: &'static str,
    cpu_model: &'static str,
    cpu_count: u32,
    mem_total_kb: u64,
    disk_total_kb: u64,
}

const MODELS: &[Model] = &[
    Model {
        name: "rpi4-b",
        arch: "aarch64",
        cpu_model: "Cortex-A72",
        cpu_count: 4,
        mem_total_kb: 3_884_096,
        disk_total_kb: 30_497_732,
    },
    Model {
        name: "rpi-zero2w",
        arch: "aarch64",
        cpu_model: "Cortex-A53",
        cpu_count: 4,
        mem_total_kb: 438_776,
        disk_total_kb: 15_023_248,
    },
    Model {
        name: "imx8m-gw",
        arch: "aarch64",
        cpu_model: "Cortex-A53",
        cpu_count: 4,
        mem_total_kb: 2_015_232,
        disk_total_kb: 7_456_784,
    },
    Model {
        name: "am335x-hmi",
        arch: "armv7l",
        cpu_model: "ARMv7 Processor rev 2 (v7l)",
        cpu_count: 1,
        mem_total_kb: 496_140,
        disk_total_kb: 3_678_208,
    },
    Model {
        name: "nuc-edge",
        arch: "x86_64",
        cpu_model: "Intel(R) Celeron(R) N5105 @ 2.00GHz",
        cpu_count: 4,
        mem_total_kb: 7_942_160,
        disk_total_kb: 122_030_592,
    },
    Model {
        name: "visionfive2",
        arch: "riscv64",
        cpu_model: "sifive,u74-mc",
        cpu_count: 4,
        mem_total_kb: 3_987_456,
        disk_total_kb: 30_497_732,
    },
];

const OSES: &[(&str, &str, &str)] = &[
    ("Debian GNU/Linux 12 (bookworm)", "12", "6.1.0-27"),
    ("Ubuntu 24.04.1 LTS", "24.04", "6.8.0-49"),
    ("Yocto Linux 5.0 (scarthgap)", "5.0", "6.6.23-yocto-standard"),
    ("Raspberry Pi OS (bookworm)", "12", "6.6.51+rpt-rpi-v8"),
];

const REGIONS: &[(&str, &[&str])] = &[
    ("eu-west", &["dublin", "lisbon", "nantes"]),
    ("eu-central", &["frankfurt", "vienna", "zurich"]),
    ("us-east", &["ashburn", "toronto", "atlanta"]),
    ("us-west", &["portland", "fresno"]),
    ("ap-south", &["pune", "singapore", "jakarta"]),
];

const FIRMWARE: &[&str] = &["2.3.1", "2.3.1", "2.3.1", "2.4.0", "2.4.0", "2.2.7"];

/// A small, well-mixed hash so neighbouring indexes do not look alike.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn pick<T>(items: &[T], index: u64, salt: u64) -> &T {
    &items[(mix(index ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % items.len() as u64) as usize]
}

/// The simulated host name of device `index`: `{prefix}-{index:05}`.
pub fn hostname(prefix: &str, index: u64) -> String {
    format!("{prefix}-{index:05}")
}

/// A locally administered MAC address unique to (`run`, `index`).
pub fn mac(run: &str, index: u64) -> String {
    let r = mix(run.bytes().fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b))));
    let b = (r ^ (index << 8)).to_be_bytes();
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[3], b[4], b[5], (index >> 8) as u8, index as u8)
}

/// Seconds the simulated device has been up when the simulator starts it (up to 60 days).
pub fn uptime_base(index: u64) -> u64 {
    mix(index ^ 0x5eed) % (60 * 86_400)
}

/// The complete inventory of device `index`.
pub fn attributes(prefix: &str, run: &str, index: u64) -> Attributes {
    let model = pick(MODELS, index, 1);
    let (os, os_version, kernel) = *pick(OSES, index, 2);
    let (region, sites) = *pick(REGIONS, index, 3);
    let site = *pick(sites, index, 4);
    let mut a = Attributes::new();
    let mut put = |k: &str, v: String| {
        a.insert(k.to_string(), v);
    };
    put("os", "linux".into());
    put("os_name", os.into());
    put("os_version", os_version.into());
    put("kernel", format!("{kernel}-{}", model.arch));
    put("arch", model.arch.into());
    put("hostname", hostname(prefix, index));
    put("agent_version", env!("CARGO_PKG_VERSION").into());
    put("cpu_model", model.cpu_model.into());
    put("cpu_count", model.cpu_count.to_string());
    put("mem_total_kb", model.mem_total_kb.to_string());
    put("disk_total_kb", model.disk_total_kb.to_string());
    put("model", model.name.into());
    put("firmware", (*pick(FIRMWARE, index, 5)).into());
    put("region", region.into());
    put("site", site.into());
    put("serial", serial(prefix, run, index));
    put("net.eth0.mac", mac(run, index));
    put("net.eth0.ipv4", format!("10.{}.{}.{}", (index >> 16) & 0xff, (index >> 8) & 0xff, (index & 0xff).max(1)));
    put("simulated", "true".into());
    a
}

/// The hardware serial: `{prefix}-{run}-{index:05}`, so that two simulator runs without a
/// shared state directory never claim the same identity.
pub fn serial(prefix: &str, run: &str, index: u64) -> String {
    format!("{prefix}-{run}-{index:05}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_valid_deterministic_and_varied() {
        let a = attributes("sim", "r1", 7);
        assert_eq!(a, attributes("sim", "r1", 7));
        assert_eq!(a["hostname"], "sim-00007");
        assert_eq!(a["serial"], "sim-r1-00007");
        drover_proto::device::check_inventory(&a).unwrap();
        let archs: std::collections::BTreeSet<_> =
            (0..200).map(|i| attributes("sim", "r1", i)["arch"].clone()).collect();
        assert!(archs.len() >= 3, "{archs:?}");
        let regions: std::collections::BTreeSet<_> =
            (0..200).map(|i| attributes("sim", "r1", i)["region"].clone()).collect();
        assert_eq!(regions.len(), REGIONS.len());
        assert_ne!(mac("r1", 1), mac("r1", 2));
        assert_ne!(mac("r1", 1), mac("r2", 1));
    }
}
