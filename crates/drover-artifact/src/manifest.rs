//! The manifest: what an artifact is, which devices take it, and the size and SHA-256 of every
//! payload. The signature covers exactly the manifest's bytes, so it covers the payloads too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::ArtifactError;

/// The manifest version this crate reads and writes (`"v"`).
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub v: u32,
    pub name: String,
    pub version: String,
    pub device_types: Vec<String>,
    /// The update module that installs it: `file`, `app`, `script`, or an external module's name.
    pub payload_type: String,
    #[serde(default)]
    pub payloads: Vec<PayloadInfo>,
    /// What the device provides once it is installed (`app.edge-app.version` = `1.4.2`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "unique_keys")]
    pub provides: BTreeMap<String, String>,
    /// Key → accepted values: the device must provide the key with one of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "unique_keys")]
    pub depends: BTreeMap<String, Vec<String>>,
    /// Passed to the update module as they are (and signed with everything else).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "unique_keys")]
    pub module_args: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadInfo {
    pub name: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
    #[serde(default)]
    pub role: PayloadRole,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadRole {
    /// Handed to the update module.
    #[default]
    Install,
    /// A software bill of materials: carried and signed, never installed.
    Sbom,
}

impl fmt::Display for PayloadRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PayloadRole::Install => "install",
            PayloadRole::Sbom => "sbom",
        })
    }
}

/// Where the artifact came from. All optional; `sbom` names a payload whose role is `sbom`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<String>,
}

/// Why a device cannot take an artifact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    #[error("the artifact is for device types {accepted:?}, not {device_type:?}")]
    DeviceType { device_type: String, accepted: Vec<String> },
    #[error("the artifact depends on {key:?} being one of {accepted:?}, and the device does not provide {key:?}")]
    Missing { key: String, accepted: Vec<String> },
    #[error("the artifact depends on {key:?} being one of {accepted:?}, and the device provides {key}={actual:?}")]
    Mismatch { key: String, accepted: Vec<String>, actual: String },
}

/// Limits, documented in `docs/artifact-format.md`.
pub(crate) const MAX_LABEL: usize = 128;
const MAX_PAYLOAD_NAME: usize = 255;
const MAX_VALUE: usize = 1024;
const MAX_ARG_VALUE: usize = 4096;
const MAX_ITEMS: usize = 1024;

impl Manifest {
    /// A manifest with the required fields and nothing else.
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        device_types: Vec<String>,
        payload_type: &str,
    ) -> Self {
        Manifest {
            v: MANIFEST_VERSION,
            name: name.into(),
            version: version.into(),
            device_types,
            payload_type: payload_type.to_string(),
            payloads: Vec::new(),
            provides: BTreeMap::new(),
            depends: BTreeMap::new(),
            module_args: BTreeMap::new(),
            provenance: None,
            created_at: None,
        }
    }

    /// Parses and validates manifest JSON. Unknown fields and duplicate keys are refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, ArtifactError> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ArtifactError::Manifest(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Checks every rule of `docs/artifact-format.md`; the error names the field.
    pub fn validate(&self) -> Result<(), ArtifactError> {
        let bad = |msg: String| Err(ArtifactError::Manifest(msg));
        if self.v != MANIFEST_VERSION {
            return bad(format!("manifest version (v) {} is not supported; this build reads version 1", self.v));
        }
        label("name", &self.name)?;
        label("version", &self.version)?;
        if self.device_types.is_empty() {
            return bad("device_types must name at least one device type".into());
        }
        let mut seen = BTreeSet::new();
        for t in &self.device_types {
            label("device_types", t)?;
            if !seen.insert(t) {
                return bad(format!("device type {t:?} is listed twice"));
            }
        }
        if !is_module_name(&self.payload_type) {
            return bad(format!(
                "payload_type {:?} must be 1-64 characters of a-z, 0-9, '_' and '-' (file, app, script, or a module name)",
                self.payload_type
            ));
        }
        if self.payloads.len() > MAX_ITEMS {
            return bad(format!("at most {MAX_ITEMS} payloads"));
        }
        let mut names = BTreeSet::new();
        let mut total: u64 = 0;
        for p in &self.payloads {
            payload_name(&p.name)?;
            if !names.insert(p.name.as_str()) {
                return bad(format!("payload name {:?} is used twice", p.name));
            }
            if !crate::is_sha256_hex(&p.sha256) {
                return bad(format!("payload {:?}: sha256 must be 64 lowercase hex characters", p.name));
            }
            total =
                total.checked_add(p.size).ok_or_else(|| ArtifactError::Manifest("payload sizes overflow".into()))?;
        }
        // The whole file's length must fit in a u64 too (header included).
        if total > u64::MAX - 2 * 1024 * 1024 {
            return bad("payload sizes overflow".into());
        }
        check_map("provides", self.provides.iter().map(|(k, v)| (k, std::slice::from_ref(v))), MAX_VALUE)?;
        check_map("depends", self.depends.iter().map(|(k, v)| (k, v.as_slice())), MAX_VALUE)?;
        if let Some((k, _)) = self.depends.iter().find(|(_, v)| v.is_empty()) {
            return bad(format!("depends {k:?} lists no accepted value"));
        }
        check_map("module_args", self.module_args.iter().map(|(k, v)| (k, std::slice::from_ref(v))), MAX_ARG_VALUE)?;
        if let Some(p) = &self.provenance {
            for (field, v) in [("source", &p.source), ("commit", &p.commit), ("build_id", &p.build_id)] {
                if let Some(v) = v {
                    text(&format!("provenance.{field}"), v, MAX_VALUE)?;
                }
            }
            if let Some(s) = &p.sbom {
                match self.payloads.iter().find(|x| &x.name == s) {
                    Some(x) if x.role == PayloadRole::Sbom => {}
                    Some(_) => return bad(format!("provenance.sbom names payload {s:?}, whose role is not sbom")),
                    None => return bad(format!("provenance.sbom names payload {s:?}, which is not in payloads")),
                }
            }
        }
        if let Some(t) = &self.created_at
            && crate::rfc3339::parse(t).is_none()
        {
            return bad(format!("created_at {t:?} is not an RFC 3339 time (2026-11-23T10:00:00Z)"));
        }
        Ok(())
    }

    /// The payloads the update module installs (role `install`), in order.
    pub fn install_payloads(&self) -> impl Iterator<Item = &PayloadInfo> {
        self.payloads.iter().filter(|p| p.role == PayloadRole::Install)
    }

    pub fn payload(&self, name: &str) -> Option<&PayloadInfo> {
        self.payloads.iter().find(|p| p.name == name)
    }

    /// Sum of the payload sizes.
    pub fn payloads_len(&self) -> u64 {
        self.payloads.iter().map(|p| p.size).sum()
    }

    /// `device_type` must be listed, and every `depends` key must be in `provides` with one of
    /// the accepted values.
    pub fn check_compatible(&self, device_type: &str, provides: &BTreeMap<String, String>) -> Result<(), Incompatible> {
        if !self.device_types.iter().any(|t| t == device_type) {
            return Err(Incompatible::DeviceType {
                device_type: device_type.to_string(),
                accepted: self.device_types.clone(),
            });
        }
        for (key, accepted) in &self.depends {
            match provides.get(key) {
                None => return Err(Incompatible::Missing { key: key.clone(), accepted: accepted.clone() }),
                Some(actual) if !accepted.contains(actual) => {
                    return Err(Incompatible::Mismatch {
                        key: key.clone(),
                        accepted: accepted.clone(),
                        actual: actual.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// 1-128 characters, none of them control characters.
pub(crate) fn label(field: &str, v: &str) -> Result<(), ArtifactError> {
    let n = v.chars().count();
    if n == 0 || n > MAX_LABEL || has_control(v) {
        return Err(ArtifactError::Manifest(format!(
            "{field} {v:?} must be 1-{MAX_LABEL} characters without control characters"
        )));
    }
    Ok(())
}

fn text(field: &str, v: &str, max: usize) -> Result<(), ArtifactError> {
    if v.chars().count() > max || has_control(v) {
        return Err(ArtifactError::Manifest(format!(
            "{field} must be at most {max} characters without control characters"
        )));
    }
    Ok(())
}

/// Keys: 1-128 characters, no control characters and no whitespace.
fn check_map<'a>(
    field: &str,
    entries: impl Iterator<Item = (&'a String, &'a [String])>,
    max_value: usize,
) -> Result<(), ArtifactError> {
    for (i, (k, values)) in entries.enumerate() {
        if i >= MAX_ITEMS {
            return Err(ArtifactError::Manifest(format!("{field}: at most {MAX_ITEMS} entries")));
        }
        let n = k.chars().count();
        if n == 0 || n > MAX_LABEL || k.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ArtifactError::Manifest(format!(
                "{field} key {k:?} must be 1-{MAX_LABEL} characters without whitespace or control characters"
            )));
        }
        for v in values {
            text(&format!("{field}.{k}"), v, max_value)?;
        }
    }
    Ok(())
}

/// `[a-z0-9_-]{1,64}`.
pub fn is_module_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

/// 1-255 bytes, no `/`, `\`, `..` or control characters, not `.`: safe as a file name.
pub fn payload_name(name: &str) -> Result<(), ArtifactError> {
    if name.is_empty()
        || name.len() > MAX_PAYLOAD_NAME
        || name == "."
        || name.contains("..")
        || name.contains(['/', '\\'])
        || has_control(name)
    {
        return Err(ArtifactError::Manifest(format!(
            "payload name {name:?} must be a plain file name: 1-255 bytes, no '/', '\\', '..' or control characters"
        )));
    }
    Ok(())
}

/// A JSON object into a map, refusing duplicate keys (which different JSON parsers would
/// resolve differently, so a signed manifest could mean two things).
fn unique_keys<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Visit<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = a.next_entry::<String, V>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visit(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new("edge-app", "1.4.2", vec!["rpi4".into(), "x86-gw".into()], "app");
        m.payloads.push(PayloadInfo {
            name: "app.tar".into(),
            size: 3,
            sha256: crate::sha256_hex(b"abc"),
            role: PayloadRole::Install,
        });
        m.depends.insert("os.version".into(), vec!["12".into(), "13".into()]);
        m
    }

    #[test]
    fn documented_example_parses() {
        let json = r#"{"v":1,"name":"edge-app","version":"1.4.2","device_types":["rpi4","x86-gw"],
          "payload_type":"app",
          "payloads":[{"name":"app.tar","size":123,"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","role":"install"},
                      {"name":"sbom.spdx.json","size":5,"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","role":"sbom"}],
          "provides":{"app.edge-app.version":"1.4.2"},
          "depends":{"os.version":["12","13"]},
          "module_args":{"name":"edge-app"},
          "provenance":{"source":"https://git.example/acme/edge","commit":"abc","build_id":"ci-123","sbom":"sbom.spdx.json"},
          "created_at":"2026-11-23T10:00:00Z"}"#;
        let m = Manifest::parse(json.as_bytes()).unwrap();
        assert_eq!(m.install_payloads().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["app.tar"]);
        assert_eq!(m.payloads[1].role, PayloadRole::Sbom);
        // Round trip through our own serialization.
        assert_eq!(Manifest::parse(&serde_json::to_vec(&m).unwrap()).unwrap(), m);
    }

    #[test]
    fn invalid_manifests_are_refused_naming_the_field() {
        let cases: Vec<(&str, Box<dyn Fn(&mut Manifest)>)> = vec![
            ("name", Box::new(|m| m.name = String::new())),
            ("name", Box::new(|m| m.name = "a\nb".into())),
            ("version", Box::new(|m| m.version = "x".repeat(129))),
            ("device_types", Box::new(|m| m.device_types.clear())),
            ("payload_type", Box::new(|m| m.payload_type = "App".into())),
            ("payload name", Box::new(|m| m.payloads[0].name = "../x".into())),
            ("payload name", Box::new(|m| m.payloads[0].name = "a/b".into())),
            ("payload name", Box::new(|m| m.payloads[0].name = "..".into())),
            ("sha256", Box::new(|m| m.payloads[0].sha256 = "AB".repeat(32))),
            ("used twice", Box::new(|m| m.payloads.push(m.payloads[0].clone()))),
            (
                "provenance.sbom",
                Box::new(|m| m.provenance = Some(Provenance { sbom: Some("app.tar".into()), ..Default::default() })),
            ),
            ("created_at", Box::new(|m| m.created_at = Some("yesterday".into()))),
            (
                "depends",
                Box::new(|m| {
                    m.depends.insert("k".into(), vec![]);
                }),
            ),
            (
                "provides key",
                Box::new(|m| {
                    m.provides.insert("a b".into(), "1".into());
                }),
            ),
            ("manifest version", Box::new(|m| m.v = 2)),
        ];
        for (want, change) in cases {
            let mut m = sample();
            m.validate().unwrap();
            change(&mut m);
            let err = m.validate().unwrap_err().to_string();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
    }

    #[test]
    fn unknown_fields_and_duplicate_keys_are_refused() {
        let base = serde_json::to_value(sample()).unwrap();
        let mut extra = base.clone();
        extra["install_hook"] = "rm -rf /".into();
        let err = Manifest::parse(&serde_json::to_vec(&extra).unwrap()).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
        let json = serde_json::to_string(&base).unwrap().replace(r#""depends":{"#, r#""depends":{"os.version":["1"],"#);
        let err = Manifest::parse(json.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("duplicate key \"os.version\""), "{err}");
    }

    #[test]
    fn compatibility_names_what_is_missing() {
        let m = sample();
        let mut provides = BTreeMap::new();
        let err = m.check_compatible("esp32", &provides).unwrap_err();
        assert!(matches!(err, Incompatible::DeviceType { .. }));
        assert!(err.to_string().contains("\"esp32\""), "{err}");
        let err = m.check_compatible("rpi4", &provides).unwrap_err();
        assert!(matches!(&err, Incompatible::Missing { key, .. } if key == "os.version"));
        assert!(err.to_string().contains("os.version"), "{err}");
        provides.insert("os.version".to_string(), "11".to_string());
        let err = m.check_compatible("rpi4", &provides).unwrap_err();
        assert!(err.to_string().contains("os.version=\"11\""), "{err}");
        provides.insert("os.version".to_string(), "13".to_string());
        m.check_compatible("x86-gw", &provides).unwrap();
    }
}
