//! Just enough DER to read what the agent needs from an X.509 certificate (subject CN,
//! validity, public key), so the binary does not carry a general X.509 parser (design
//! decision 7: small agent). Certificates are verified by rustls, never by this code.

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
}
