//! Build, verify and read: round trips, tampering, truncation, chunking.

use std::io::{self, Read as _};

use drover_artifact::keys::SigningKey;
use drover_artifact::read::Reader;
use drover_artifact::root::TrustError;
use drover_artifact::stream::{StreamVerifier, Verified};
use drover_artifact::write::{self, Builder};
use drover_artifact::{ArtifactError, Manifest, PayloadRole, sha256_hex};

use crate::{TempDir, build, bytes, manifest, trust};

fn verify_stream(data: &[u8], chunks: impl Iterator<Item = usize>) -> Result<Verified, ArtifactError> {
    let mut v = StreamVerifier::new();
    let mut pos = 0;
    for n in chunks {
        if pos >= data.len() {
            break;
        }
        let end = (pos + n.max(1)).min(data.len());
        v.feed(&data[pos..end])?;
        pos = end;
    }
    v.feed(&data[pos..])?;
    v.finish()
}

fn whole(data: &[u8]) -> Result<Verified, ArtifactError> {
    verify_stream(data, std::iter::once(data.len()))
}

/// Reads every payload through the pull reader; the bytes of each, or the first error.
fn read_all(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, ArtifactError> {
    let mut r = Reader::new(data)?;
    let mut out = Vec::new();
    while let Some(mut p) = r.next_payload()? {
        let name = p.info().name.clone();
        let mut buf = Vec::new();
        io::copy(&mut p, &mut buf)?;
        out.push((name, buf));
    }
    r.finish()?;
    Ok(out)
}

#[test]
fn round_trip_build_verify_read() {
    let dir = TempDir::new("round-trip");
    let key = SigningKey::generate().unwrap();
    let (path, payloads) = build(&dir, &[&key]);
    let data = std::fs::read(&path).unwrap();

    let v = whole(&data).unwrap();
    assert_eq!(v.size, data.len() as u64);
    assert_eq!(v.file_sha256, sha256_hex(&data));
    assert_eq!(v.header.total_len(), data.len() as u64);
    assert_eq!(v.header.manifest.name, "edge-app");
    assert_eq!(v.header.manifest.payloads[0].sha256, sha256_hex(&payloads[0].1));
    assert_eq!(v.header.manifest.payloads[2].role, PayloadRole::Sbom);
    assert_eq!(v.header.payload_offset(1), Some(v.header.len + 100_000));
    assert_eq!(&data[v.header.len as usize..][..100_000], &payloads[0].1[..]);

    let store = trust(&SigningKey::generate().unwrap(), &[&key], &[]);
    assert_eq!(store.verify_header(&v.header).unwrap(), key.key_id());
    v.header.verify_with_key(&key.public()).unwrap();

    assert_eq!(read_all(&data).unwrap(), payloads);
    let r = Reader::new(std::fs::File::open(&path).unwrap()).unwrap();
    assert_eq!(r.header(), &v.header);
    assert_eq!(r.manifest().install_payloads().count(), 2);
    // finish() reads and checks payloads nobody read.
    r.finish().unwrap();
}

#[test]
fn a_flipped_payload_byte_names_the_payload() {
    let dir = TempDir::new("flip");
    let key = SigningKey::generate().unwrap();
    let (path, _) = build(&dir, &[&key]);
    let good = std::fs::read(&path).unwrap();
    let h = whole(&good).unwrap().header;
    let app = h.payload_offset(0).unwrap() as usize;
    let sbom = h.payload_offset(2).unwrap() as usize;

    for (at, name) in
        [(app, "app.tar"), (app + 50_000, "app.tar"), (app + 99_999, "app.tar"), (sbom + 299, "sbom.json")]
    {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        match whole(&bad) {
            Err(ArtifactError::DigestMismatch { payload }) => assert_eq!(payload, name),
            other => panic!("stream at {at}: {other:?}"),
        }
        match read_all(&bad) {
            Err(ArtifactError::DigestMismatch { payload }) => assert_eq!(payload, name),
            other => panic!("reader at {at}: {other:?}"),
        }
        let err = Reader::new(&bad[..]).unwrap().finish().unwrap_err();
        assert!(matches!(&err, ArtifactError::DigestMismatch { payload } if payload == name), "{err}");
        assert!(err.to_string().contains(name), "{err}");
        // The signature still verifies: the manifest is intact, the payload is not.
        trust(&SigningKey::generate().unwrap(), &[&key], &[]).verify_header(&h).unwrap();
    }

    // The io::Read side: the read that delivers the last byte fails, with InvalidData.
    let mut bad = good.clone();
    bad[app + 99_999] ^= 0x80;
    let mut r = Reader::new(&bad[..]).unwrap();
    let mut p = r.next_payload().unwrap().unwrap();
    let mut buf = vec![0u8; 60_000];
    assert_eq!(p.read(&mut buf).unwrap(), 60_000);
    let err = p.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("app.tar"), "{err}");
    // It keeps failing instead of looking like a clean end.
    assert_eq!(p.read(&mut buf).unwrap_err().kind(), io::ErrorKind::InvalidData);
    // io::copy into a file fails, and the error converts back to the precise cause.
    let mut r = Reader::new(&bad[..]).unwrap();
    let mut p = r.next_payload().unwrap().unwrap();
    let mut sink = std::fs::File::create(dir.join("staging")).unwrap();
    let e = io::copy(&mut p, &mut sink).unwrap_err();
    assert!(matches!(ArtifactError::from(e), ArtifactError::DigestMismatch { payload } if payload == "app.tar"));
    assert!(matches!(p.finish(), Err(ArtifactError::DigestMismatch { .. })));
}

#[test]
fn payload_reader_stops_at_its_payload() {
    let dir = TempDir::new("bounds");
    let (path, payloads) = build(&dir, &[]);
    let data = std::fs::read(&path).unwrap();
    let mut r = Reader::new(&data[..]).unwrap();
    let mut p = r.next_payload().unwrap().unwrap();
    assert_eq!(p.index(), 0);
    let mut all = Vec::new();
    p.read_to_end(&mut all).unwrap();
    assert_eq!(all, payloads[0].1);
    assert_eq!(p.read(&mut [0u8; 10]).unwrap(), 0, "past its size a payload reads as ended");
    // A payload skipped unread is drained and checked before the next one.
    let mut r = Reader::new(&data[..]).unwrap();
    let _unread = r.next_payload().unwrap().unwrap();
    let p = r.next_payload().unwrap().unwrap();
    assert_eq!(p.info().name, "empty");
    p.finish().unwrap();
    let mut p = r.next_payload().unwrap().unwrap();
    let mut sbom = Vec::new();
    p.read_to_end(&mut sbom).unwrap();
    assert_eq!(sbom, payloads[2].1);
    assert!(r.next_payload().unwrap().is_none());
    r.finish().unwrap();
}

/// The offset of the manifest's `"version":"1.4.2"` value in the file.
fn version_offset(data: &[u8]) -> usize {
    let needle = b"\"version\":\"1.4.2\"";
    data.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len() - 2
}

#[test]
fn signatures_are_checked_against_the_root() {
    let dir = TempDir::new("sigs");
    let root_key = SigningKey::generate().unwrap();
    let release = SigningKey::generate().unwrap();
    let stranger = SigningKey::generate().unwrap();
    let store = trust(&root_key, &[&release], &[]);

    // One manifest byte edited (1.4.2 -> 1.4.3): still a valid manifest, no longer signed.
    let (path, _) = build(&dir, &[&release]);
    let mut data = std::fs::read(&path).unwrap();
    let at = version_offset(&data);
    assert_eq!(data[at], b'2');
    data[at] = b'3';
    let h = whole(&data).unwrap().header;
    assert_eq!(h.manifest.version, "1.4.3");
    assert_eq!(store.verify_header(&h), Err(TrustError::BadSignature(release.key_id())));
    assert_eq!(h.verify_with_key(&release.public()), Err(TrustError::BadSignature(release.key_id())));

    // A key the root does not name.
    let (path, _) = build(&dir, &[&stranger]);
    let h = whole(&std::fs::read(&path).unwrap()).unwrap().header;
    assert_eq!(store.verify_header(&h), Err(TrustError::UnknownKey(stranger.key_id())));
    assert_eq!(h.verify_with_key(&release.public()), Err(TrustError::UnknownKey(stranger.key_id())));
    // The root keys sign roots, not artifacts.
    let (path, _) = build(&dir, &[&root_key]);
    let h = whole(&std::fs::read(&path).unwrap()).unwrap().header;
    assert_eq!(store.verify_header(&h), Err(TrustError::UnknownKey(root_key.key_id())));

    // A revoked key, though still listed as a release key.
    let revoking = trust(&root_key, &[&release], &[release.key_id()]);
    let (path, _) = build(&dir, &[&release]);
    let h = whole(&std::fs::read(&path).unwrap()).unwrap().header;
    assert_eq!(revoking.verify_header(&h), Err(TrustError::RevokedKey(release.key_id())));
    assert!(revoking.verify_header(&h).unwrap_err().to_string().contains("revoke"));

    // Unsigned.
    let (path, _) = build(&dir, &[]);
    let h = whole(&std::fs::read(&path).unwrap()).unwrap().header;
    assert!(h.signatures.is_empty());
    assert_eq!(store.verify_header(&h), Err(TrustError::Unsigned));
    assert_eq!(h.verify_with_key(&release.public()), Err(TrustError::Unsigned));

    // Signed by a stranger and a release key: the release key's signature is enough.
    let (path, _) = build(&dir, &[&stranger, &release]);
    let h = whole(&std::fs::read(&path).unwrap()).unwrap().header;
    assert_eq!(store.verify_header(&h).unwrap(), release.key_id());
}

#[test]
fn truncated_files_are_refused_at_every_stage() {
    let dir = TempDir::new("trunc");
    let (path, _) = build(&dir, &[&SigningKey::generate().unwrap()]);
    let data = std::fs::read(&path).unwrap();
    let h = whole(&data).unwrap().header;
    let hl = h.len as usize;
    for cut in [0, 1, 7, 8, 11, 12, 40, hl - 5, hl - 1, hl, hl + 1, hl + 99_999, hl + 100_000, data.len() - 1] {
        let part = &data[..cut];
        assert!(matches!(whole(part), Err(ArtifactError::Truncated)), "stream cut at {cut}: {:?}", whole(part));
        let r = Reader::new(part).and_then(|r| r.finish());
        assert!(matches!(r, Err(ArtifactError::Truncated)), "reader cut at {cut}: {r:?}");
    }
    // A truncated payload fails its reader with UnexpectedEof.
    let mut r = Reader::new(&data[..hl + 10]).unwrap();
    let mut p = r.next_payload().unwrap().unwrap();
    let e = io::copy(&mut p, &mut io::sink()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(matches!(ArtifactError::from(e), ArtifactError::Truncated));
}

#[test]
fn trailing_bytes_are_refused() {
    let dir = TempDir::new("trailing");
    let (path, _) = build(&dir, &[]);
    let mut data = std::fs::read(&path).unwrap();
    data.push(0);
    assert!(matches!(whole(&data), Err(ArtifactError::TrailingBytes)));
    assert!(matches!(verify_stream(&data, std::iter::repeat(1)), Err(ArtifactError::TrailingBytes)));
    let mut r = Reader::new(&data[..]).unwrap();
    while let Some(p) = r.next_payload().unwrap() {
        p.finish().unwrap();
    }
    assert!(matches!(r.finish(), Err(ArtifactError::TrailingBytes)));
    // Two artifacts back to back are not one artifact.
    let mut two = std::fs::read(&path).unwrap();
    two.extend(std::fs::read(&path).unwrap());
    assert!(matches!(whole(&two), Err(ArtifactError::TrailingBytes)));
}

/// The same chunk sizes from a seed.
fn random_chunks(seed: u64) -> impl Iterator<Item = usize> {
    let mut x = seed | 1;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Mostly small chunks, sometimes large ones.
        if x.is_multiple_of(8) { (x >> 8) as usize % 70_000 } else { (x >> 8) as usize % 40 }
    })
}

fn summary(r: Result<Verified, ArtifactError>) -> String {
    match r {
        Ok(v) => format!("ok {} {} {:?}", v.file_sha256, v.size, v.header),
        Err(e) => format!("err {e:?}"),
    }
}

#[test]
fn chunking_does_not_change_the_result() {
    let dir = TempDir::new("chunks");
    let (path, _) = build(&dir, &[&SigningKey::generate().unwrap()]);
    let good = std::fs::read(&path).unwrap();
    let h = whole(&good).unwrap().header;
    let mut flipped = good.clone();
    flipped[h.len as usize + 500] ^= 0xff;
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"xx");
    let mut bad_magic = good.clone();
    bad_magic[3] = b'X';

    for data in [&good, &flipped, &trailing, &good[..good.len() - 3].to_vec(), &bad_magic] {
        let expected = summary(whole(data));
        assert_eq!(summary(verify_stream(data, std::iter::repeat(1))), expected);
        for seed in 1..6 {
            assert_eq!(summary(verify_stream(data, random_chunks(seed))), expected, "seed {seed}");
        }
    }
    assert!(summary(whole(&good)).starts_with("ok "));
    assert!(summary(whole(&flipped)).contains("DigestMismatch"));

    // The header is there exactly when its last byte has been fed.
    let mut v = StreamVerifier::new();
    v.feed(&good[..h.len as usize - 1]).unwrap();
    assert!(v.header().is_none());
    v.feed(&good[h.len as usize - 1..h.len as usize]).unwrap();
    assert_eq!(v.header(), Some(&h));
    assert_eq!(v.bytes_seen(), h.len);
}

#[test]
fn wrong_files_fail_at_once() {
    let mut v = StreamVerifier::new();
    assert!(matches!(v.feed(b"PK\x03\x04"), Err(ArtifactError::BadMagic)));
    assert!(matches!(v.feed(b"DROVERA\x01"), Err(ArtifactError::AlreadyFailed)));
    assert!(matches!(Reader::new(&b"#!/bin/sh\nrm -rf /\n"[..]), Err(ArtifactError::BadMagic)));
    assert!(matches!(Reader::new(&b"DRO"[..]), Err(ArtifactError::Truncated)));
    let mut v = StreamVerifier::new();
    assert!(matches!(v.feed(b"DROVERA\x02rest"), Err(ArtifactError::UnsupportedVersion(2))));
    assert!(matches!(Reader::new(&b"DROVERA\x02rest"[..]), Err(ArtifactError::UnsupportedVersion(2))));

    // A manifest length over 1 MiB is refused before any of it arrives.
    let mut v = StreamVerifier::new();
    let mut huge = b"DROVERA\x01".to_vec();
    huge.extend_from_slice(&(1024 * 1024 + 1u32).to_be_bytes());
    assert!(matches!(v.feed(&huge), Err(ArtifactError::HeaderTooLarge)));
    assert!(matches!(Reader::new(&huge[..]), Err(ArtifactError::HeaderTooLarge)));

    // Not JSON, or a manifest with an unknown field.
    for manifest in
        [&b"not json"[..], br#"{"v":1,"name":"a","version":"1","device_types":["x"],"payload_type":"file","hook":"x"}"#]
    {
        let mut f = b"DROVERA\x01".to_vec();
        f.extend_from_slice(&(manifest.len() as u32).to_be_bytes());
        f.extend_from_slice(manifest);
        f.extend_from_slice(&2u32.to_be_bytes());
        f.extend_from_slice(b"[]");
        let mut v = StreamVerifier::new();
        assert!(matches!(v.feed(&f), Err(ArtifactError::Manifest(_))));
        assert!(matches!(Reader::new(&f[..]), Err(ArtifactError::Manifest(_))));
    }
}

#[test]
fn a_size_limit_is_enforced_from_the_header() {
    let dir = TempDir::new("limit");
    let (path, _) = build(&dir, &[]);
    let data = std::fs::read(&path).unwrap();
    let h = whole(&data).unwrap().header;
    let mut v = StreamVerifier::with_limit(data.len() as u64 - 1);
    // Refused as soon as the header says how long the file is.
    assert!(
        matches!(v.feed(&data[..h.len as usize]), Err(ArtifactError::TooLarge { limit }) if limit == data.len() as u64 - 1)
    );
    let mut v = StreamVerifier::with_limit(data.len() as u64);
    v.feed(&data).unwrap();
    v.finish().unwrap();
}

#[test]
fn signing_adds_a_signature_and_keeps_payloads() {
    let dir = TempDir::new("sign");
    let (path, payloads) = build(&dir, &[]);
    let a = SigningKey::generate().unwrap();
    let b = SigningKey::generate().unwrap();
    let signed_a = dir.join("a.drover");
    let h = write::sign(std::fs::File::open(&path).unwrap(), std::fs::File::create(&signed_a).unwrap(), &a).unwrap();
    assert_eq!(h.signatures.len(), 1);
    let signed_ab = dir.join("ab.drover");
    write::sign(std::fs::File::open(&signed_a).unwrap(), std::fs::File::create(&signed_ab).unwrap(), &b).unwrap();
    // Signing again with the same key replaces its signature instead of adding one.
    let mut again = Vec::new();
    let h = write::sign(std::fs::File::open(&signed_ab).unwrap(), &mut again, &a).unwrap();
    assert_eq!(h.signatures.iter().map(|s| s.key_id.clone()).collect::<Vec<_>>(), [a.key_id(), b.key_id()]);

    let data = std::fs::read(&signed_ab).unwrap();
    let v = whole(&data).unwrap();
    assert_eq!(v.header.manifest_bytes, whole(&std::fs::read(&path).unwrap()).unwrap().header.manifest_bytes);
    for k in [&a, &b] {
        assert_eq!(trust(&SigningKey::generate().unwrap(), &[k], &[]).verify_header(&v.header).unwrap(), k.key_id());
    }
    assert_eq!(read_all(&data).unwrap(), payloads);

    // Signing a corrupt artifact fails on the payload instead of blessing it.
    let mut bad = std::fs::read(&path).unwrap();
    let n = bad.len();
    bad[n - 1] ^= 1;
    let e = write::sign(&bad[..], io::sink(), &a).unwrap_err();
    assert!(matches!(e, ArtifactError::DigestMismatch { payload } if payload == "sbom.json"));
}

#[test]
fn builder_refuses_bad_input() {
    let dir = TempDir::new("builder");
    std::fs::write(dir.join("a"), b"a").unwrap();
    let e = Builder::new(manifest()).payload("../a", dir.join("a"), PayloadRole::Install).build(io::sink(), &[]);
    assert!(matches!(e, Err(ArtifactError::Manifest(m)) if m.contains("payload name")));
    let e =
        Builder::new(manifest()).payload("missing", dir.join("missing"), PayloadRole::Install).build(io::sink(), &[]);
    let e = e.unwrap_err();
    assert!(matches!(e, ArtifactError::File { .. }) && e.to_string().contains("missing"), "{e}");
    let mut m: Manifest = manifest();
    m.provenance = Some(drover_artifact::Provenance { sbom: Some("nope".into()), ..Default::default() });
    let e = Builder::new(m).payload("a", dir.join("a"), PayloadRole::Install).build(io::sink(), &[]);
    assert!(matches!(e, Err(ArtifactError::Manifest(m)) if m.contains("provenance.sbom")));
    // Built without payloads, an artifact is just a header (a script module may need none).
    let mut out = Vec::new();
    Builder::new(manifest()).build(&mut out, &[]).unwrap();
    assert_eq!(whole(&out).unwrap().size, out.len() as u64);
    assert_eq!(bytes(3, 4).len(), 4);
}

/// The worked example of `docs/artifact-format.md`: an implementation in another language can
/// check itself against these bytes (Ed25519 signatures are deterministic).
#[test]
fn documented_example_is_byte_exact() {
    // RFC 8410, section 10.3.
    let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
    let key = SigningKey::from_pem(pem).unwrap();
    let dir = TempDir::new("example");
    std::fs::write(dir.join("hello.txt"), b"hello\n").unwrap();
    let mut m = Manifest::new("hello", "1.0.0", vec!["rpi4".into()], "file");
    m.module_args.insert("dest".into(), "/etc/hello.txt".into());
    let mut out = Vec::new();
    Builder::new(m).payload("hello.txt", dir.join("hello.txt"), PayloadRole::Install).build(&mut out, &[&key]).unwrap();
    let v = whole(&out).unwrap();
    assert_eq!(key.public().to_string(), "ed25519:Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=");
    assert_eq!(key.key_id(), "e744c0791320c328");
    assert_eq!(
        String::from_utf8(v.header.manifest_bytes.clone()).unwrap(),
        r#"{"v":1,"name":"hello","version":"1.0.0","device_types":["rpi4"],"payload_type":"file","payloads":[{"name":"hello.txt","size":6,"sha256":"5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03","role":"install"}],"module_args":{"dest":"/etc/hello.txt"}}"#
    );
    assert_eq!(
        serde_json::to_string(&v.header.signatures).unwrap(),
        r#"[{"key_id":"e744c0791320c328","alg":"ed25519","sig":"1MezX+k3wlXu8W8oPmMgfpHWZe3LGT5ApUOA1fi59SCVrze90ERqO97bCuNt6wy286B5PaqINg3riMTSx69ZAQ=="}]"#
    );
    assert_eq!(&out[..12], b"DROVERA\x01\x00\x00\x01\x06");
    assert_eq!((v.header.len, v.size), (422, 428));
    assert_eq!(v.file_sha256, "edddaa214173af77e89a18fb177f81085b887c2b0b4ada4821b4d42d3848e223");
    assert_eq!(&out[422..], b"hello\n");
}
