//! Trust roots: first root, rotation, chains, revocation, expiry.

use drover_artifact::keys::SigningKey;
use drover_artifact::root::{Root, RootDocument, RootKey, TrustError, TrustStore, create_root, sign_root};
use drover_artifact::stream::{Header, StreamVerifier};

use crate::{TempDir, build};

fn key() -> SigningKey {
    SigningKey::generate().unwrap()
}

fn keys(ks: &[&SigningKey], name: &str) -> Vec<RootKey> {
    ks.iter().map(|k| RootKey::new(k.public(), name)).collect()
}

/// A root of `version` naming `root_keys` (threshold `t`) and `release`.
fn root(version: u64, root_keys: &[&SigningKey], t: u32, release: &[&SigningKey]) -> Root {
    let mut r = Root::new(version, keys(root_keys, "root"), keys(release, "ci"));
    r.root_threshold = t;
    r
}

fn signed(r: Root, signers: &[&SigningKey]) -> Vec<u8> {
    create_root(r, signers).unwrap().to_json()
}

fn header_signed_by(dir: &TempDir, k: &SigningKey) -> Header {
    let (path, _) = build(dir, &[k]);
    let mut v = StreamVerifier::new();
    v.feed(&std::fs::read(path).unwrap()).unwrap();
    v.finish().unwrap().header
}

#[test]
fn the_first_root_must_be_self_signed() {
    let (r1, rel) = (key(), key());
    let good = signed(root(1, &[&r1], 1, &[&rel]), &[&r1]);
    let store = TrustStore::from_initial(&good).unwrap();
    assert_eq!(store.version(), 1);
    assert_eq!(store.current_json(), &good[..]);
    assert_eq!(store.root().release_keys[0].id, rel.key_id());

    // Signed by another key, or not at all.
    let e = TrustStore::from_initial(&signed(root(1, &[&r1], 1, &[&rel]), &[&rel])).unwrap_err();
    assert!(matches!(e, TrustError::Threshold { have: 0, need: 1, .. }), "{e}");
    assert!(TrustStore::from_initial(&signed(root(1, &[&r1], 1, &[&rel]), &[])).is_err());

    // An edited root no longer verifies (the release key swapped for the attacker's).
    let attacker = key();
    let text = String::from_utf8(good.clone()).unwrap();
    let forged = text
        .replace(&rel.public().to_string(), &attacker.public().to_string())
        .replace(&format!("\"id\": \"{}\"", rel.key_id()), &format!("\"id\": \"{}\"", attacker.key_id()));
    assert_ne!(forged, text);
    assert!(matches!(TrustStore::from_initial(forged.as_bytes()), Err(TrustError::Threshold { .. })));

    // Formatting does not matter: signatures cover the canonical form.
    let doc = RootDocument::parse(&good).unwrap();
    let compact = serde_json::to_vec(&doc).unwrap();
    assert_ne!(compact, good);
    TrustStore::from_initial(&compact).unwrap();

    // Unknown fields are refused (they would not be covered by the signature).
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["signed"]["extra"] = 1.into();
    let e = TrustStore::from_initial(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(matches!(&e, TrustError::InvalidRoot(m) if m.contains("unknown field")), "{e}");
}

#[test]
fn thresholds_count_distinct_root_keys() {
    let (a, b, c, rel) = (key(), key(), key(), key());
    let r = root(1, &[&a, &b, &c], 2, &[&rel]);
    assert!(matches!(
        TrustStore::from_initial(&signed(r.clone(), &[&a])),
        Err(TrustError::Threshold { have: 1, need: 2, .. })
    ));
    // The same key twice counts once.
    let mut doc = create_root(r.clone(), &[&a]).unwrap();
    let dup = doc.signatures[0].clone();
    doc.signatures.push(dup);
    assert!(TrustStore::from_initial(&doc.to_json()).is_err());
    TrustStore::from_initial(&signed(r.clone(), &[&a, &c])).unwrap();
    // A threshold above the number of keys is not a valid root.
    let mut too_high = r;
    too_high.root_threshold = 4;
    assert!(matches!(create_root(too_high, &[&a]), Err(TrustError::InvalidRoot(_))));
}

#[test]
fn rotation_follows_the_chain_of_root_keys() {
    let dir = TempDir::new("rotation");
    let (old_root, new_root, newer_root) = (key(), key(), key());
    let (rel1, rel2, rel3) = (key(), key(), key());
    let v1 = signed(root(1, &[&old_root], 1, &[&rel1]), &[&old_root]);
    // v2 hands over to a new root key and release key; revokes rel1.
    let mut r2 = root(2, &[&new_root], 1, &[&rel2]);
    r2.revoked = vec![rel1.key_id()];
    let v2 = signed(r2.clone(), &[&old_root, &new_root]);
    let v3 = signed(root(3, &[&newer_root], 1, &[&rel3]), &[&new_root, &newer_root]);

    let h1 = header_signed_by(&dir, &rel1);
    let h2 = header_signed_by(&dir, &rel2);
    let h3 = header_signed_by(&dir, &rel3);

    let mut store = TrustStore::from_initial(&v1).unwrap();
    assert_eq!(store.verify_header(&h1).unwrap(), rel1.key_id());
    assert_eq!(store.verify_header(&h2), Err(TrustError::UnknownKey(rel2.key_id())));

    // v2 signed only by the new root key: the device has no reason to trust that key.
    let only_new = signed(r2.clone(), &[&new_root]);
    let e = store.apply(&only_new).unwrap_err();
    assert!(matches!(e, TrustError::Threshold { version: 2, have: 0, .. }), "{e}");
    assert!(e.to_string().contains("current root"), "{e}");
    // v2 signed only by the old root key: not by its own root keys.
    let only_old = signed(r2.clone(), &[&old_root]);
    assert!(matches!(store.apply(&only_old), Err(TrustError::Threshold { .. })));
    // Skipping a version.
    assert_eq!(store.apply(&v3), Err(TrustError::VersionSkip { current: 1, got: 3 }));
    assert_eq!(store.version(), 1, "refused roots leave the store as it was");

    assert!(store.apply(&v2).unwrap());
    assert_eq!(store.version(), 2);
    assert_eq!(store.current_json(), &v2[..]);
    // Same and older versions are no-ops.
    assert!(!store.apply(&v2).unwrap());
    assert!(!store.apply(&v1).unwrap());

    // After the rotation: rel1 is revoked, rel2 trusted.
    assert_eq!(store.verify_header(&h1), Err(TrustError::RevokedKey(rel1.key_id())));
    assert_eq!(store.verify_header(&h2).unwrap(), rel2.key_id());

    // The persisted root is a valid starting point after a restart.
    let mut restarted = TrustStore::from_initial(store.current_json()).unwrap();
    assert!(restarted.apply(&v3).unwrap());
    // v3 dropped rel2 without revoking it: unknown now.
    assert_eq!(restarted.verify_header(&h2), Err(TrustError::UnknownKey(rel2.key_id())));
    assert_eq!(restarted.verify_header(&h3).unwrap(), rel3.key_id());
}

#[test]
fn a_chain_is_applied_in_order() {
    let (k1, k2, k3, rel) = (key(), key(), key(), key());
    let v1 = signed(root(1, &[&k1], 1, &[&rel]), &[&k1]);
    let v2 = signed(root(2, &[&k2], 1, &[&rel]), &[&k1, &k2]);
    let v3 = signed(root(3, &[&k3], 1, &[&rel]), &[&k2, &k3]);
    // v3 is not signed by v1's key, so it only verifies after v2.
    let mut store = TrustStore::from_initial(&v1).unwrap();
    assert!(matches!(store.apply(&v3), Err(TrustError::VersionSkip { .. })));
    assert!(store.apply_chain([&v1[..], &v2[..], &v3[..]]).unwrap());
    assert_eq!(store.version(), 3);
    assert!(!store.apply_chain([&v1[..], &v2[..], &v3[..]]).unwrap());

    let mut store = TrustStore::from_initial(&v1).unwrap();
    assert!(store.apply_chain([&v3[..], &v2[..]]).is_err(), "out of order");
    assert_eq!(store.version(), 1);

    // A v3 whose handover is signed by v1's key instead of v2's is refused even in order.
    let v3_bad = signed(root(3, &[&k3], 1, &[&rel]), &[&k1, &k3]);
    let mut store = TrustStore::from_initial(&v1).unwrap();
    assert!(matches!(store.apply_chain([&v2[..], &v3_bad[..]]), Err(TrustError::Threshold { version: 3, .. })));
    assert_eq!(store.version(), 2, "the roots before the refused one stay applied");
}

#[test]
fn an_expired_root_refuses_artifacts() {
    let dir = TempDir::new("expired");
    let (k1, rel) = (key(), key());
    let mut r = root(1, &[&k1], 1, &[&rel]);
    r.expires = Some("2030-01-01T00:00:00Z".into());
    let mut store = TrustStore::from_initial(&signed(r, &[&k1])).unwrap();
    let h = header_signed_by(&dir, &rel);
    let jan_2030 = 1_893_456_000;
    assert_eq!(store.verify_header_at(&h, jan_2030 - 1).unwrap(), rel.key_id());
    assert_eq!(store.verify_header_at(&h, jan_2030), Err(TrustError::Expired));
    assert!(TrustError::Expired.to_string().contains("newer root"));
    // A newer root (without expiry) repairs it.
    let v2 = signed(root(2, &[&k1], 1, &[&rel]), &[&k1]);
    assert!(store.apply(&v2).unwrap());
    assert_eq!(store.verify_header_at(&h, jan_2030 + 1).unwrap(), rel.key_id());

    let mut bad = root(1, &[&k1], 1, &[&rel]);
    bad.expires = Some("next year".into());
    assert!(matches!(create_root(bad, &[&k1]), Err(TrustError::InvalidRoot(m)) if m.contains("expires")));
}

#[test]
fn sign_root_adds_or_replaces_a_signature() {
    let (a, b, rel) = (key(), key(), key());
    let mut doc = create_root(root(1, &[&a, &b], 2, &[&rel]), &[&a]).unwrap();
    assert!(doc.verify_self_signed().is_err());
    sign_root(&mut doc, &b);
    sign_root(&mut doc, &b);
    assert_eq!(doc.signer_ids(), [a.key_id(), b.key_id()]);
    doc.verify_self_signed().unwrap();
    TrustStore::from_initial(&doc.to_json()).unwrap();
    // A revoked root key does not count.
    let mut r = root(1, &[&a, &b], 1, &[&rel]);
    r.revoked = vec![a.key_id()];
    assert!(matches!(TrustStore::from_initial(&signed(r.clone(), &[&a])), Err(TrustError::Threshold { .. })));
    TrustStore::from_initial(&signed(r, &[&b])).unwrap();
}

/// The root example of `docs/artifact-format.md`, byte for byte.
#[test]
fn documented_root_example_is_byte_exact() {
    let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
    let k = SigningKey::from_pem(pem).unwrap();
    let mut r = Root::new(1, keys(&[&k], "root-2026"), keys(&[&k], "ci-2026"));
    r.expires = Some("2030-01-01T00:00:00Z".into());
    let doc = create_root(r, &[&k]).unwrap();
    let canonical = r#"{"v":1,"type":"drover-root","version":1,"expires":"2030-01-01T00:00:00Z","root_keys":[{"id":"e744c0791320c328","public":"ed25519:Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=","name":"root-2026"}],"root_threshold":1,"release_keys":[{"id":"e744c0791320c328","public":"ed25519:Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=","name":"ci-2026"}],"revoked":[]}"#;
    assert_eq!(String::from_utf8(doc.signed.canonical_bytes()).unwrap(), canonical);
    let sig = "xS4MLxTrJTBQHoq2i7oeHgXdyHssXrhwUajYJBXMi6VhpL3QLtW/5kNItd7sXgJWKEO+uRyZO3Ow4ooERxy7BQ==";
    assert_eq!(doc.signatures[0].sig, sig);
    // As written in the document: formatted by hand, and "revoked" left out.
    let file = format!(
        r#"{{
  "signed": {{
    "v": 1, "type": "drover-root", "version": 1, "expires": "2030-01-01T00:00:00Z",
    "root_keys": [{{"id": "e744c0791320c328", "public": "ed25519:Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=", "name": "root-2026"}}],
    "root_threshold": 1,
    "release_keys": [{{"id": "e744c0791320c328", "public": "ed25519:Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=", "name": "ci-2026"}}]
  }},
  "signatures": [{{"key_id": "e744c0791320c328", "alg": "ed25519", "sig": "{sig}"}}]
}}"#
    );
    let store = TrustStore::from_initial(file.as_bytes()).unwrap();
    assert_eq!(store.root(), &doc.signed);
}
