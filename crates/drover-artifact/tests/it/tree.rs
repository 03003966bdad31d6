//! Directory payloads: deterministic packing, and extraction that stays inside its destination.

use std::fs;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;

use drover_artifact::tree::{UnpackError, pack_dir, unpack_safe};
use drover_artifact::write::Builder;
use drover_artifact::{ArtifactError, PayloadRole, Reader};

use crate::{TempDir, manifest};

/// One raw ustar entry, written by hand so the archive can hold what `tar::Builder` refuses.
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: u8, link: &str, mode: u32, data: &[u8]) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
        let s = format!("{v:0w$o}\0", w = width - 1);
        h[at..at + width].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, data.len() as u64);
    octal(&mut h, 136, 12, 0);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

pub(crate) struct E<'a>(pub &'a str, pub u8, pub &'a str, pub &'a [u8]);

pub(crate) fn raw_tar(entries: &[E]) -> Vec<u8> {
    let mut out = Vec::new();
    for E(name, kind, link, data) in entries {
        raw_entry(&mut out, name, *kind, link, 0o644, data);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

/// Every path under `root`, relative, sorted (symlinks not followed).
fn listing(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Every path under `dir` (symlinks not followed).
pub(crate) fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// Unpacks `tar` into `box/dest`; checks that nothing appeared in `box` outside `dest` and
/// that no link inside `dest` points outside it.
pub(crate) fn unpack_in_box(tag: &str, tar: &[u8]) -> (Result<(), UnpackError>, TempDir) {
    let sandbox = TempDir::new(tag);
    fs::write(sandbox.join("outside.txt"), b"keep").unwrap();
    let dest = sandbox.join("dest");
    let r = unpack_safe(tar, &dest);
    let outside: Vec<String> = listing(sandbox.path()).into_iter().filter(|p| !p.starts_with("dest")).collect();
    assert_eq!(outside, ["outside.txt"], "{tag}: something was written outside dest");
    assert_eq!(fs::read(sandbox.join("outside.txt")).unwrap(), b"keep");
    if dest.exists() {
        // Paths, not strings: a name need not be UTF-8.
        for full in walk(&dest) {
            if fs::symlink_metadata(&full).unwrap().file_type().is_symlink() {
                let resolved = fs::canonicalize(&full);
                if let Ok(r) = resolved {
                    let p = full.display();
                    assert!(r.starts_with(fs::canonicalize(&dest).unwrap()), "{tag}: {p} -> {}", r.display());
                }
            }
        }
    }
    (r, sandbox)
}

#[test]
fn unpack_refuses_paths_that_leave_the_destination() {
    let (r, _b) = unpack_in_box("dotdot", &raw_tar(&[E("../x", b'0', "", b"evil")]));
    assert!(matches!(&r, Err(UnpackError::UnsafePath { path, .. }) if path == "../x"), "{r:?}");
    let (r, _b) = unpack_in_box("dotdot-mid", &raw_tar(&[E("a/../../x", b'0', "", b"evil")]));
    assert!(matches!(&r, Err(UnpackError::UnsafePath { .. })), "{r:?}");

    let sandbox = TempDir::new("abs-target");
    let abs = sandbox.join("abs-x");
    let (r, _b) = unpack_in_box("absolute", &raw_tar(&[E(abs.to_str().unwrap(), b'0', "", b"evil")]));
    assert!(matches!(&r, Err(UnpackError::UnsafePath { reason, .. }) if reason.contains("absolute")), "{r:?}");
    assert!(!abs.exists());
    let (r, _b) = unpack_in_box("etc", &raw_tar(&[E("/etc/x", b'0', "", b"evil")]));
    assert!(matches!(&r, Err(UnpackError::UnsafePath { path, .. }) if path == "/etc/x"), "{r:?}");
}

#[test]
fn unpack_refuses_symlinks_that_leave_the_destination() {
    let (r, _b) = unpack_in_box("passwd", &raw_tar(&[E("pw", b'2', "/etc/passwd", b"")]));
    assert!(matches!(&r, Err(UnpackError::UnsafeSymlink { target, .. }) if target == "/etc/passwd"), "{r:?}");
    let (r, _b) = unpack_in_box("up2", &raw_tar(&[E("a", b'2', "../../x", b"")]));
    assert!(matches!(&r, Err(UnpackError::UnsafeSymlink { .. })), "{r:?}");
    let (r, _b) = unpack_in_box("up1", &raw_tar(&[E("a", b'2', "../outside.txt", b"")]));
    assert!(matches!(&r, Err(UnpackError::UnsafeSymlink { .. })), "{r:?}");
    // `..` after a name could climb through another link: refused even if it would stay inside.
    let (r, _b) = unpack_in_box("after-name", &raw_tar(&[E("d/", b'5', "", b""), E("d/l", b'2', "x/../y", b"")]));
    assert!(matches!(&r, Err(UnpackError::UnsafeSymlink { .. })), "{r:?}");
    // The classic chain: `d/up -> ..` is inside, but `d/c -> up/..` would climb through it.
    let (r, _b) = unpack_in_box(
        "chain",
        &raw_tar(&[E("d/", b'5', "", b""), E("d/up", b'2', "..", b""), E("d/c", b'2', "up/..", b"")]),
    );
    assert!(matches!(&r, Err(UnpackError::UnsafeSymlink { path, .. }) if path == "d/c"), "{r:?}");
}

#[test]
fn unpack_refuses_writing_through_a_symlink() {
    // A file under a symlinked directory.
    let (r, _b) = unpack_in_box(
        "through-dir",
        &raw_tar(&[E("sub/", b'5', "", b""), E("s", b'2', "sub", b""), E("s/evil", b'0', "", b"x")]),
    );
    assert!(matches!(&r, Err(UnpackError::UnderSymlink { path, link }) if path == "s/evil" && link == "s"), "{r:?}");
    // `d/up -> ..` points at the destination itself, and `d/up/x` would still go through it.
    let (r, b) = unpack_in_box(
        "through-up",
        &raw_tar(&[E("d/", b'5', "", b""), E("d/up", b'2', "..", b""), E("d/up/x", b'0', "", b"x")]),
    );
    assert!(matches!(&r, Err(UnpackError::UnderSymlink { .. })), "{r:?}");
    assert!(!b.join("dest/x").exists());
    // A file with the name of an earlier symlink must not be written through it.
    let (r, b) = unpack_in_box(
        "replace-link",
        &raw_tar(&[E("target.txt", b'0', "", b"orig"), E("f", b'2', "target.txt", b""), E("f", b'0', "", b"new")]),
    );
    assert!(matches!(&r, Err(UnpackError::Exists { path }) if path == "f"), "{r:?}");
    assert_eq!(fs::read(b.join("dest/target.txt")).unwrap(), b"orig");
}

#[test]
fn unpack_refuses_links_and_special_files() {
    let (r, _b) = unpack_in_box("hardlink", &raw_tar(&[E("a", b'0', "", b"x"), E("h", b'1', "a", b"")]));
    assert!(matches!(&r, Err(UnpackError::HardLink { path }) if path == "h"), "{r:?}");
    let (r, _b) = unpack_in_box("hardlink-out", &raw_tar(&[E("h", b'1', "/etc/shadow", b"")]));
    assert!(matches!(&r, Err(UnpackError::HardLink { .. })), "{r:?}");
    for (kind, what) in [(b'3', "character device"), (b'4', "block device"), (b'6', "FIFO")] {
        let (r, _b) = unpack_in_box("special", &raw_tar(&[E("dev", kind, "", b"")]));
        assert!(matches!(&r, Err(UnpackError::Special { kind, .. }) if *kind == what), "{r:?}");
    }
}

#[test]
fn unpack_drops_setuid_and_needs_an_empty_destination() {
    let mut tar = Vec::new();
    raw_entry(&mut tar, "bin/", b'5', "", 0o755, b"");
    raw_entry(&mut tar, "bin/tool", b'0', "", 0o4755, b"#!/bin/sh\n");
    raw_entry(&mut tar, "bin/group", b'0', "", 0o2750, b"x");
    raw_entry(&mut tar, "ok", b'2', "bin/tool", 0o777, b"");
    tar.extend_from_slice(&[0; 1024]);
    let (r, b) = unpack_in_box("modes", &tar);
    r.unwrap();
    let mode = |p: &str| fs::metadata(b.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("dest/bin/tool"), 0o755);
    assert_eq!(mode("dest/bin/group"), 0o750);
    assert_eq!(fs::read(b.join("dest/ok")).unwrap(), b"#!/bin/sh\n");

    // Not empty, or not a directory.
    let e = unpack_safe(&tar[..], &b.join("dest")).unwrap_err();
    assert!(matches!(e, UnpackError::DestNotEmpty(_)), "{e}");
    let e = unpack_safe(&tar[..], &b.join("outside.txt")).unwrap_err();
    assert!(matches!(e, UnpackError::DestNotEmpty(_)), "{e}");
    fs::create_dir(b.join("empty")).unwrap();
    unpack_safe(&tar[..], &b.join("empty")).unwrap();
}

pub(crate) fn sample_tree(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("share/doc/deep/er")).unwrap();
    fs::write(dir.join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(dir.join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("config.toml"), b"a = 1\n").unwrap();
    fs::write(dir.join("share/doc/deep/er/README"), crate::bytes(9, 5000)).unwrap();
    let long = "n".repeat(150);
    fs::write(dir.join("share").join(&long), b"long name").unwrap();
    symlink("bin/app", dir.join("run")).unwrap();
    symlink("../../config.toml", dir.join("share/doc/cfg")).unwrap();
    fs::write(dir.join("empty"), b"").unwrap();
}

#[test]
fn pack_is_deterministic_and_unpacks_to_the_same_tree() {
    let d = TempDir::new("pack");
    let src = d.join("src");
    sample_tree(&src);
    let mut a = Vec::new();
    let n = pack_dir(&src, &mut a).unwrap();
    assert_eq!(n, a.len() as u64);
    // Change times: the bytes stay the same.
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(src.join("config.toml"), b"a = 1\n").unwrap();
    let mut b = Vec::new();
    pack_dir(&src, &mut b).unwrap();
    assert_eq!(a, b);
    // A copy made in another order packs the same too.
    let src2 = d.join("src2");
    fs::create_dir(&src2).unwrap();
    fs::write(src2.join("empty"), b"").unwrap();
    symlink("bin/app", src2.join("run")).unwrap();
    sample_tree_rest(&src2);
    let mut c = Vec::new();
    pack_dir(&src2, &mut c).unwrap();
    assert_eq!(a, c);

    let out = d.join("out");
    unpack_safe(&a[..], &out).unwrap();
    assert_eq!(listing(&out), listing(&src));
    for p in listing(&src) {
        let (x, y) = (src.join(&p), out.join(&p));
        let (mx, my) = (fs::symlink_metadata(&x).unwrap(), fs::symlink_metadata(&y).unwrap());
        assert_eq!(mx.file_type(), my.file_type(), "{p}");
        if mx.is_file() {
            assert_eq!(fs::read(&x).unwrap(), fs::read(&y).unwrap(), "{p}");
            assert_eq!(mx.permissions().mode() & 0o777, my.permissions().mode() & 0o777, "{p}");
        } else if mx.file_type().is_symlink() {
            assert_eq!(fs::read_link(&x).unwrap(), fs::read_link(&y).unwrap(), "{p}");
        }
    }
}

fn sample_tree_rest(dir: &Path) {
    fs::create_dir_all(dir.join("share/doc/deep/er")).unwrap();
    fs::write(dir.join("share/doc/deep/er/README"), crate::bytes(9, 5000)).unwrap();
    symlink("../../config.toml", dir.join("share/doc/cfg")).unwrap();
    fs::write(dir.join("share").join("n".repeat(150)), b"long name").unwrap();
    fs::write(dir.join("config.toml"), b"a = 1\n").unwrap();
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::write(dir.join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(dir.join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn pack_refuses_what_devices_would_refuse() {
    let d = TempDir::new("pack-bad");
    let src = d.join("src");
    fs::create_dir(&src).unwrap();
    symlink("/etc/passwd", src.join("pw")).unwrap();
    let e = pack_dir(&src, std::io::sink()).unwrap_err();
    assert!(matches!(&e, ArtifactError::Pack { .. }) && e.to_string().contains("/etc/passwd"), "{e}");
    let e = pack_dir(&d.join("missing"), std::io::sink()).unwrap_err();
    assert!(matches!(e, ArtifactError::File { .. }), "{e}");
}

#[test]
fn unpacking_a_tampered_payload_fails_on_its_digest() {
    let d = TempDir::new("pack-artifact");
    let src = d.join("src");
    sample_tree(&src);
    let tar = d.join("app.tar");
    pack_dir(&src, fs::File::create(&tar).unwrap()).unwrap();
    let art = d.join("app.drover");
    Builder::new(manifest())
        .payload("app.tar", &tar, PayloadRole::Install)
        .build(fs::File::create(&art).unwrap(), &[])
        .unwrap();
    let good = fs::read(&art).unwrap();

    let mut r = Reader::new(&good[..]).unwrap();
    let p = r.next_payload().unwrap().unwrap();
    unpack_safe(p, &d.join("good")).unwrap();
    r.finish().unwrap();
    assert_eq!(fs::read(d.join("good/config.toml")).unwrap(), b"a = 1\n");

    // One byte of README's content flipped: the tar still parses, the digest does not match,
    // and the error says so (not a tar error).
    let mut bad = good.clone();
    let at = bad.windows(4).position(|w| w == b"a = ").unwrap();
    bad[at] = b'b';
    let mut r = Reader::new(&bad[..]).unwrap();
    let p = r.next_payload().unwrap().unwrap();
    let e = unpack_safe(p, &d.join("bad")).unwrap_err();
    assert!(
        matches!(&e, UnpackError::Artifact(ArtifactError::DigestMismatch { payload }) if payload == "app.tar"),
        "{e:?}"
    );
}
