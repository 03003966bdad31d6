//! Fuzz targets (see FUZZING.md): the stream verifier and the pull reader fed mutated signed
//! artifacts in random chunks, and `unpack_safe` fed mutated tar archives.

#[path = "../../../../fuzz/driver.rs"]
mod driver;

use std::io::Read as _;

use driver::{Fuzz, Rng, chunks, fnv};
use drover_artifact::keys::SigningKey;
use drover_artifact::stream::StreamVerifier;
use drover_artifact::tree::pack_dir;
use drover_artifact::{Builder, PayloadRole, Reader};

use crate::tree::{E, raw_tar, sample_tree, unpack_in_box, walk};
use crate::{TempDir, bytes, manifest};

/// A small artifact signed by `key`: three payloads (700, 0 and 40 bytes).
fn small_artifact(key: &SigningKey) -> Vec<u8> {
    let dir = TempDir::new("fuzz-build");
    let mut b = Builder::new(manifest());
    for (name, data, role) in [
        ("app.tar", bytes(3, 700), PayloadRole::Install),
        ("empty", vec![], PayloadRole::Install),
        ("sbom.json", bytes(4, 40), PayloadRole::Sbom),
    ] {
        std::fs::write(dir.join(name), &data).unwrap();
        b = b.payload(name, dir.join(name), role);
    }
    let mut out = Vec::new();
    b.build(&mut out, &[key]).unwrap();
    out
}

#[test]
fn stream_verifier_and_reader() {
    let key = SigningKey::generate().unwrap();
    let other = SigningKey::generate().unwrap();
    let good = small_artifact(&key);
    let unsigned_by_key = small_artifact(&other);
    let original = {
        let mut v = StreamVerifier::new();
        v.feed(&good).unwrap();
        v.finish().unwrap()
    };
    let head_len = original.header.len as usize;
    let public = key.public();
    Fuzz::new("artifact_stream_verifier").seed(&good).seed(&unsigned_by_key).max_len(good.len() * 2).run(|data| {
        // The chunking depends on the input only, so a saved input replays the same way.
        let mut rng = Rng::new(fnv(data));
        let mut v = StreamVerifier::with_limit(1 << 20);
        let mut fed = Ok(());
        let max = 1 + rng.below(300);
        for c in chunks(&mut rng, data, max) {
            fed = v.feed(c);
            if fed.is_err() {
                break;
            }
        }
        let verified = fed.and_then(|()| v.finish());
        let read = read_all(data);
        match &verified {
            Ok(ok) => {
                assert_eq!(ok.size, data.len() as u64);
                assert!(read.is_ok(), "the stream verifier accepted what the reader refused: {read:?}");
                if ok.header.verify_with_key(&public).is_ok() {
                    // Accepted as authentic: the signed manifest and the payloads it covers
                    // are exactly the original's; only unsigned bytes may differ.
                    assert_eq!(ok.header.manifest_bytes, original.header.manifest_bytes);
                    assert_eq!(data[ok.header.len as usize..], good[head_len..]);
                }
            }
            Err(_) => assert!(read.is_err(), "the reader accepted what the stream verifier refused"),
        }
    });
}

/// Every payload through the pull reader.
fn read_all(data: &[u8]) -> Result<Vec<Vec<u8>>, drover_artifact::ArtifactError> {
    let mut r = Reader::new(data)?;
    let mut out = Vec::new();
    while let Some(mut p) = r.next_payload()? {
        let mut buf = Vec::new();
        p.read_to_end(&mut buf)?;
        out.push(buf);
    }
    r.finish()?;
    Ok(out)
}

#[test]
fn unpack_safe_stays_inside() {
    let d = TempDir::new("fuzz-tree");
    let src = d.join("src");
    sample_tree(&src);
    let mut packed = Vec::new();
    pack_dir(&src, &mut packed).unwrap();
    let seeds = [
        packed,
        raw_tar(&[E("d/", b'5', "", b""), E("d/up", b'2', "..", b""), E("d/up/x", b'0', "", b"evil")]),
        raw_tar(&[E("a", b'2', "b", b""), E("b/", b'5', "", b""), E("b/c", b'0', "", b"data")]),
        raw_tar(&[E("x/y/z", b'0', "", b"deep"), E("x/h", b'1', "x/y/z", b""), E("f", b'6', "", b"")]),
        raw_tar(&[E("s", b'2', "./t", b""), E("t", b'0', "", b"ok")]),
    ];
    Fuzz::new("tree_unpack_safe")
        .seeds(&seeds)
        .dict([&b"../"[..], b"/", b"..", b"/etc/passwd", b"\0", b"ustar\0", b"00000000777\0", b"2", b"1", b"5"])
        .max_len(64 * 1024)
        .run(|data| {
            // Most mutations break a header's checksum, which the tar reader refuses: for half
            // the inputs, fix the checksum of every block that looks like a ustar header.
            let mut fixed = data.to_vec();
            if fnv(data).is_multiple_of(2) {
                fix_checksums(&mut fixed);
            }
            let data = &fixed[..];
            // unpack_in_box asserts that nothing lands outside the destination and that no
            // link inside it resolves outside.
            let (r, sandbox) = unpack_in_box("fuzz", data);
            let dest = sandbox.join("dest");
            if r.is_ok() {
                for p in walk(&dest) {
                    let m = std::fs::symlink_metadata(&p).unwrap();
                    if m.file_type().is_symlink() {
                        assert!(!std::fs::read_link(&p).unwrap().is_absolute(), "{}: an absolute link", p.display());
                    } else {
                        use std::os::unix::fs::PermissionsExt as _;
                        assert_eq!(m.permissions().mode() & 0o7000, 0, "{}: setuid/setgid/sticky kept", p.display());
                    }
                }
            }
        });
}

fn fix_checksums(tar: &mut [u8]) {
    for h in tar.chunks_exact_mut(512) {
        if &h[257..262] == b"ustar" {
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
            h[148..156].copy_from_slice(format!("{:06o}\0 ", sum & 0o777777).as_bytes());
        }
    }
}
