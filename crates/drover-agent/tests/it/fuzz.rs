//! Fuzz targets (see FUZZING.md): the telemetry outbox reopened over corrupted files, the
//! agent's certificate reader, and its CSR writer read back by what droverd parses CSRs with
//! (rcgen's `CertificateSigningRequestParams::from_pem`, in `key_fingerprint`).

#[path = "../../../../fuzz/driver.rs"]
mod driver;

use std::path::{Path, PathBuf};

use driver::{Fuzz, fnv};
use drover_agent::telemetry::outbox::{Outbox, OutboxConfig, Record};
use drover_agent::tls::DeviceKey;
use drover_proto::telemetry::Point;

/// Records written before the damage: record `i` is the point `m` with `t = v = i`.
const RECORDS: u64 = 24;

/// A directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "drover-agent-fuzz-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config() -> OutboxConfig {
    OutboxConfig { max_bytes: 1 << 20, segment_bytes: 1 << 20, fsync: false }
}

fn point(i: u64) -> Record {
    Record::Point(Point { n: "m".into(), t: i as i64, v: i as f64 })
}

/// A fresh outbox with [`RECORDS`] records, the first `acked` acknowledged; its files' bytes.
fn written(acked: u64) -> (Vec<u8>, Vec<u8>) {
    let dir = Scratch::new("seed");
    let mut ob = Outbox::open(&dir.0, config()).unwrap();
    for i in 1..=RECORDS {
        ob.append(&point(i)).unwrap();
    }
    ob.sync().unwrap();
    if acked > 0 {
        ob.read_batch(acked as usize, 0, 1 << 20).unwrap();
        ob.ack(acked).unwrap();
        ob.save().unwrap();
    }
    drop(ob);
    let seg = segment(&dir.0);
    (std::fs::read(seg).unwrap(), std::fs::read(dir.0.join("state")).unwrap())
}

fn segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "one segment expected: {segs:?}");
    segs.pop().unwrap()
}

/// Reopens an outbox over `seg` and `state`, reads everything one record at a time, then
/// appends one record and reads it back.
fn reopen_and_read(seg: &[u8], state: &[u8]) {
    let dir = Scratch::new("run");
    std::fs::write(dir.0.join(format!("{:016x}.seg", 1)), seg).unwrap();
    std::fs::write(dir.0.join("state"), state).unwrap();
    let mut ob = Outbox::open(&dir.0, config()).expect("a damaged outbox still opens");
    let mut last = 0;
    // Records lost between the first and the last one reached: gaps in the indices, and
    // frames whose payload does not decode.
    let mut lost = 0u64;
    for round in 0.. {
        assert!(round <= 10 * RECORDS, "read_batch keeps returning without reaching the end");
        let batch = ob.read_batch(1, 1, 1 << 20).unwrap();
        assert!(batch.events.is_empty(), "an event was invented: {:?}", batch.events);
        if batch.last == last {
            assert!(batch.points.is_empty());
            break;
        }
        assert!(batch.last > last, "indices go back: {} after {last}", batch.last);
        if last > 0 {
            lost += batch.last - last - 1;
        }
        match batch.points.as_slice() {
            // Nothing read, `last` is where reading starts: the acknowledged records.
            [] if round == 0 => {}
            // Never an invented record: what comes out is what was written at that index.
            [p] => assert_eq!(
                (p.n.as_str(), p.t, p.v),
                ("m", batch.last as i64, batch.last as f64),
                "record {}",
                batch.last
            ),
            [] => lost += 1,
            more => panic!("one point asked for, {} read", more.len()),
        }
        last = batch.last;
    }
    assert!(ob.corrupt() >= lost, "{lost} records lost, {} counted as corrupted", ob.corrupt());
    assert!(ob.dropped() >= ob.corrupt());
    // The outbox goes on working: a new record is read back.
    ob.append(&Record::Point(Point { n: "new".into(), t: -1, v: -1.0 })).unwrap();
    let batch = ob.read_batch(100, 100, 1 << 20).unwrap();
    assert!(
        batch.points.iter().any(|p| p.n == "new"),
        "a record appended after reopening is not read back (last read {last}, got {:?})",
        batch.points
    );
}

#[test]
fn outbox_segment_corrupted() {
    let (seg, state) = written(0);
    let (seg_acked, state_acked) = written(5);
    assert_eq!(seg, seg_acked, "acks do not touch the segment");
    Fuzz::new("agent_outbox_segment").seed(&seg).max_len(64 * 1024).run(|data| {
        // Half the inputs with the state of five acknowledged records.
        let state = if fnv(data).is_multiple_of(2) { &state } else { &state_acked };
        reopen_and_read(data, state);
    });
}

#[test]
fn outbox_state_corrupted() {
    let (seg, state) = written(5);
    Fuzz::new("agent_outbox_state").seed(&state).max_len(256).run(|data| reopen_and_read(&seg, data));
}

/// The agent's certificate reader on mutated certificates.
#[test]
fn der_parse_certificate() {
    let key = DeviceKey::generate().unwrap();
    let kp = rcgen::KeyPair::from_pem(&key.to_pem()).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["dev.example".to_string()]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "0193f3a0-device");
    let cert = p.self_signed(&kp).unwrap();
    let der = cert.der().to_vec();
    let parsed = drover_agent::der::parse_certificate(&der).expect("a valid certificate parses");
    assert_eq!(parsed.common_name.as_deref(), Some("0193f3a0-device"));
    assert_eq!(parsed.public_key_raw, key.public_key_raw());
    Fuzz::new("agent_der_certificate").seed(&der).max_len(8 * 1024).run(|data| {
        if let Some(p) = drover_agent::der::parse_certificate(data) {
            assert!(p.public_key_raw.len() <= data.len());
            let _ = drover_agent::der::format_time(p.not_before);
            let _ = drover_agent::der::format_time(p.not_after);
        }
    });
}

/// The public key droverd fingerprints: what `key_fingerprint` hashes.
fn server_key(pem: &str) -> Option<Vec<u8>> {
    use rcgen::PublicKeyData as _;
    if pem.len() > 16 * 1024 {
        return None;
    }
    rcgen::CertificateSigningRequestParams::from_pem(pem).ok().map(|c| c.public_key.der_bytes().to_vec())
}

/// The server's CSR parsing on mutated CSRs (as PEM text, and as DER wrapped in PEM).
#[test]
fn csr_server_parse() {
    let key = DeviceKey::generate().unwrap();
    let pem = key.csr_pem().unwrap();
    assert_eq!(server_key(&pem).as_deref(), Some(key.public_key_raw()), "the server reads the agent's CSR");
    let der = pem_body(&pem);
    Fuzz::new("csr_server_parse")
        .seed(pem.as_bytes())
        .seed([&[0u8][..], &der].concat())
        .dict(["-----BEGIN CERTIFICATE REQUEST-----\n", "-----END CERTIFICATE REQUEST-----\n", "\n", "="])
        .max_len(20 * 1024)
        .run(|data| match data.split_first() {
            // A leading 0: the rest is DER, wrapped as the agent wraps it.
            Some((0, der)) => {
                let _ = server_key(&drover_agent::der::pem("CERTIFICATE REQUEST", der));
            }
            _ => {
                let _ = server_key(&String::from_utf8_lossy(data));
            }
        });
}

/// The agent's CSR writer for any subject: what it writes the server reads, with its key.
#[test]
fn csr_writer_read_back() {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    use ring::signature::KeyPair as _;
    let raw = pair.public_key().as_ref().to_vec();
    Fuzz::new("agent_csr_writer").seed("drover-device").seed("x".repeat(300)).max_len(2048).run(|data| {
        let cn = String::from_utf8_lossy(data);
        let info = drover_agent::der::csr_info(&raw, &cn);
        let sig = pair.sign(&rng, &info).unwrap();
        let pem = drover_agent::der::pem("CERTIFICATE REQUEST", &drover_agent::der::csr(&info, sig.as_ref()));
        let params = rcgen::CertificateSigningRequestParams::from_pem(&pem)
            .unwrap_or_else(|e| panic!("the CSR for CN {cn:?} does not parse: {e}"));
        use rcgen::PublicKeyData as _;
        assert_eq!(params.public_key.der_bytes(), &raw[..]);
    });
}

/// The DER inside a PEM text.
fn pem_body(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64_decode(&b64)
}

fn base64_decode(s: &str) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let vals: Vec<u32> = s.bytes().filter_map(|c| A.iter().position(|&a| a == c).map(|v| v as u32)).collect();
    let mut out = Vec::new();
    for chunk in vals.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, v)| acc | (v << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
