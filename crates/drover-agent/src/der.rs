//! Just enough DER to read what the agent needs from an X.509 certificate (subject CN,
//! validity, public key) and to write its PKCS#10 certificate signing request, so the binary
//! carries neither a general X.509 parser nor a certificate generator (design decision 7:
//! small agent). Certificates are verified by rustls, never by this code.

/// One TLV: tag, contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, body, rest) = tlv(input)?;
    (t == tag).then_some((body, rest))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];

pub struct Parsed {
    pub common_name: Option<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub public_key_raw: Vec<u8>,
}

pub fn parse_certificate(der: &[u8]) -> Option<Parsed> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (mut tbs, _) = expect(cert, SEQUENCE)?;
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2; // version
    }
    let (_, _, tbs) = tlv(tbs)?; // serial
    let (_, tbs) = expect(tbs, SEQUENCE)?; // signature algorithm
    let (_, tbs) = expect(tbs, SEQUENCE)?; // issuer
    let (validity, tbs) = expect(tbs, SEQUENCE)?;
    let (subject, tbs) = expect(tbs, SEQUENCE)?;
    let (spki, _) = expect(tbs, SEQUENCE)?;
    let (t1, nb, rest) = tlv(validity)?;
    let (t2, na, _) = tlv(rest)?;
    let (_, spki) = expect(spki, SEQUENCE)?; // algorithm
    let (bits, _) = expect(spki, 0x03)?;
    let (&unused, key) = bits.split_first()?;
    if unused != 0 {
        return None;
    }
    Some(Parsed {
        common_name: common_name(subject),
        not_before: parse_time(t1, nb)?,
        not_after: parse_time(t2, na)?,
        public_key_raw: key.to_vec(),
    })
}

fn common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (mut set, rest) = expect(name, SET)?;
        name = rest;
        while !set.is_empty() {
            let (attr, rest) = expect(set, SEQUENCE)?;
            set = rest;
            let (oid, value) = expect(attr, 0x06)?;
            if oid == OID_CN {
                let (_, v, _) = tlv(value)?;
                return String::from_utf8(v.to_vec()).ok();
            }
        }
    }
    None
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix seconds.
fn parse_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| rest.get(i..i + 2).and_then(|x| x.parse::<i64>().ok());
    let (mo, d, h, mi, se) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_time(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// A TLV with DER's definite length.
fn write_tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = body.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(body);
    out
}

const OID: u8 = 0x06;
const BIT_STRING: u8 = 0x03;
/// 1.2.840.10045.2.1 (id-ecPublicKey), 1.2.840.10045.3.1.7 (prime256v1),
/// 1.2.840.10045.4.3.2 (ecdsa-with-SHA256).
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];

fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend_from_slice(bytes);
    write_tlv(BIT_STRING, &body)
}

/// The CertificationRequestInfo (RFC 2986) of a P-256 key with subject `CN=common_name`
/// and no attributes: what the key signs.
pub fn csr_info(public_key_raw: &[u8], common_name: &str) -> Vec<u8> {
    let version = write_tlv(0x02, &[0]);
    let cn = write_tlv(SEQUENCE, &[write_tlv(OID, OID_CN), write_tlv(0x0c, common_name.as_bytes())].concat());
    let subject = write_tlv(SEQUENCE, &write_tlv(SET, &cn));
    let algorithm = write_tlv(SEQUENCE, &[write_tlv(OID, OID_EC_PUBLIC_KEY), write_tlv(OID, OID_P256)].concat());
    let spki = write_tlv(SEQUENCE, &[algorithm, bit_string(public_key_raw)].concat());
    let attributes = write_tlv(0xa0, &[]);
    write_tlv(SEQUENCE, &[version, subject, spki, attributes].concat())
}

/// The CertificationRequest: `info` with its ECDSA-SHA256 signature (DER, as ring makes it).
pub fn csr(info: &[u8], signature: &[u8]) -> Vec<u8> {
    let algorithm = write_tlv(SEQUENCE, &write_tlv(OID, OID_ECDSA_SHA256));
    write_tlv(SEQUENCE, &[info, &algorithm, &bit_string(signature)].concat())
}

/// PEM text of `der` under `label` (base64 in 64-character lines).
pub fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2025, 1, 1) * 86_400, 1_735_689_600);
        assert_eq!(format_time(1_735_689_600), "2025-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }

    /// Compared with rcgen's own view of certificates it made, including a GeneralizedTime
    /// (after 2049); bad inputs: truncated and garbage DER.
    #[test]
    fn certificates_made_by_rcgen() {
        for (nb, na) in [((2024, 3, 1), (2026, 12, 31)), ((2030, 1, 1), (2060, 6, 15))] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
            p.distinguished_name.push(rcgen::DnType::OrganizationName, "Acme");
            p.distinguished_name.push(rcgen::DnType::CommonName, "dev-42");
            p.not_before = rcgen::date_time_ymd(nb.0, nb.1, nb.2);
            p.not_after = rcgen::date_time_ymd(na.0, na.1, na.2);
            let cert = p.self_signed(&key).unwrap();
            let parsed = parse_certificate(cert.der()).unwrap();
            assert_eq!(parsed.common_name.as_deref(), Some("dev-42"));
            assert_eq!(parsed.not_before, p.not_before.unix_timestamp());
            assert_eq!(parsed.not_after, p.not_after.unix_timestamp());
            assert_eq!(parsed.public_key_raw, key.public_key_raw());
            assert!(parse_certificate(&cert.der()[..cert.der().len() / 2]).is_none());
        }
        assert!(parse_certificate(b"\x30\x03abc").is_none());
        assert!(parse_certificate(b"").is_none());
    }

    /// The agent's key and CSR as a CA reads them: rcgen (with x509-parser, as droverd uses it)
    /// parses the CSR and checks its signature, and finds the key's public key in it; the PEM
    /// key reads back to the same key. Bad input: a CSR with one signed byte changed.
    #[test]
    fn csrs_made_here_are_what_a_ca_accepts() {
        use rcgen::PublicKeyData as _;
        use rustls::pki_types::pem::PemObject as _;
        for _ in 0..20 {
            let key = crate::tls::DeviceKey::generate().unwrap();
            let csr_pem = key.csr_pem().unwrap();
            let params = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
            assert_eq!(params.public_key.der_bytes(), key.public_key_raw());
            let again = crate::tls::DeviceKey::from_pem(&key.to_pem()).unwrap();
            assert_eq!(again.public_key_raw(), key.public_key_raw());
            // rcgen reads the key the agent wrote, as droverd's tests and older agents do.
            let theirs = rcgen::KeyPair::from_pem(&key.to_pem()).unwrap();
            assert_eq!(theirs.public_key_raw(), key.public_key_raw());
            let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
            let mut bad = der.as_ref().to_vec();
            let at = bad.len() / 3;
            bad[at] ^= 1;
            assert!(rcgen::CertificateSigningRequestParams::from_der(&bad.into()).is_err());
        }
        // A key rcgen made (what agents enrolled before wrote) loads and signs.
        let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = crate::tls::DeviceKey::from_pem(&old.serialize_pem()).unwrap();
        assert_eq!(key.public_key_raw(), old.public_key_raw());
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&key.csr_pem().unwrap()).is_ok());
        assert!(
            crate::tls::DeviceKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err()
        );
    }
}
