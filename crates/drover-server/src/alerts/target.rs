//! Where webhook and Slack channels may send: not to droverd's own network by default.
//!
//! A target whose host is, or resolves to, a loopback, private, link-local (which holds the
//! cloud metadata address 169.254.169.254), shared (100.64.0.0/10), unspecified, multicast or
//! unique-local address is refused — when the channel is created and again at every send,
//! after DNS resolution: the HTTP client connects only to addresses this module allowed
//! ([`CheckedResolver`]), so a name that changes its answer between the check and the send
//! gains nothing. Redirects are not followed. `notify_allow_hosts` lists host names (exact)
//! and addresses or CIDR blocks that are allowed all the same, for real internal receivers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// The `notify_allow_hosts` setting, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    hosts: Vec<String>,
    nets: Vec<(IpAddr, u8)>,
}

impl AllowList {
    /// Entries: a host name (`hooks.internal`), an address (`10.1.2.3`, `::1`) or a CIDR
    /// block (`10.0.0.0/8`, `fd00::/8`).
    pub fn parse(entries: &[String]) -> Result<AllowList, String> {
        let mut out = AllowList::default();
        for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (addr, bits) = match e.split_once('/') {
                Some((a, b)) => (a, Some(b)),
                None => (e, None),
            };
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            match (addr.parse::<IpAddr>(), bits) {
                (Ok(ip), bits) => {
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    let bits = match bits {
                        None => max,
                        Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(|| {
                            format!("notify_allow_hosts: {e:?}: the prefix length must be 0 to {max}")
                        })?,
                    };
                    out.nets.push((ip, bits));
                }
                (Err(_), None) => {
                    let ok =
                        e.len() <= 253 && e.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
                    if !ok {
                        return Err(format!(
                            "notify_allow_hosts: {e:?} is not a host name, an address or a CIDR block"
                        ));
                    }
                    out.hosts.push(e.trim_end_matches('.').to_ascii_lowercase());
                }
                (Err(_), Some(_)) => {
                    return Err(format!("notify_allow_hosts: {e:?}: a CIDR block needs an address before the '/'"));
                }
            }
        }
        Ok(out)
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|(net, bits)| in_net(ip, canonical(*net), *bits))
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - u32::from(bits)) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Whether `ip` is in droverd's own or a private network (see the module documentation).
pub fn internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        // Shared address space (carrier-grade NAT), 100.64.0.0/10.
        || (a == 100 && (b & 0xc0) == 64)
        // IETF protocol assignments, 192.0.0.0/24.
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        // Reserved, 240.0.0.0/4.
        || a >= 240
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // Unique local (fc00::/7, e.g. fd00:ec2::254, a cloud metadata address).
        || (s & 0xfe00) == 0xfc00
        // Link-local, fe80::/10.
        || (s & 0xffc0) == 0xfe80
        // IPv4-compatible and NAT64 forms of internal IPv4 addresses.
        || ip.to_ipv4().is_some_and(|v4| ip.segments()[..6].iter().all(|s| *s == 0) && internal_v4(v4))
        || (ip.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
            && internal_v4(Ipv4Addr::from(u32::from(ip.segments()[6]) << 16 | u32::from(ip.segments()[7]))))
}

/// The host of an `http://` or `https://` URL, without brackets.
fn host_of(url: &str) -> Result<(String, u16), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("target: not a URL ({e})"))?;
    let host = u.host_str().ok_or("target: the URL has no host")?;
    let port = u.port_or_known_default().unwrap_or(443);
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

fn refused(host: &str, ip: IpAddr) -> String {
    format!(
        "target {host}: {ip} is a loopback, private, link-local or otherwise internal address; droverd does \
         not send notifications there unless notify_allow_hosts allows it"
    )
}

/// Checks a webhook or Slack target: its host, and every address its name resolves to.
/// `resolve_failure_ok`: a name that does not resolve (yet) passes (at creation; the send
/// checks again).
pub async fn check(url: &str, allow: &AllowList, resolve_failure_ok: bool) -> Result<(), String> {
    let (host, port) = host_of(url)?;
    if allow.allows_host(&host) {
        return Ok(());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return if internal(ip) && !allow.allows_ip(ip) { Err(refused(&host, ip)) } else { Ok(()) };
    }
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(a) => a.collect(),
        Err(_) if resolve_failure_ok => return Ok(()),
        Err(e) => return Err(format!("target {host}: cannot resolve the name ({e})")),
    };
    match addrs.iter().map(|a| a.ip()).find(|ip| internal(*ip) && !allow.allows_ip(*ip)) {
        Some(ip) => Err(refused(&host, ip)),
        None => Ok(()),
    }
}

/// The HTTP client's resolver: the addresses of a name, without the internal ones the
/// allow-list does not allow; an error when none is left.
#[derive(Debug, Clone)]
pub struct CheckedResolver {
    pub allow: Arc<AllowList>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if allow.allows_host(&host) {
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let kept: Vec<SocketAddr> =
                addrs.iter().copied().filter(|a| !internal(a.ip()) || allow.allows_ip(a.ip())).collect();
            if kept.is_empty() {
                let ip = addrs.first().map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                return Err(refused(&host, ip).into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            assert!(internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "172.32.0.1", "100.128.0.1"] {
            assert!(!internal(ip.parse().unwrap()), "{ip}");
        }
    }

    /// The client's resolver (what guards the connection itself, after the check): a name
    /// resolving only to loopback gives no address to connect to, unless allowed.
    #[tokio::test]
    async fn the_resolver_keeps_internal_addresses_out() {
        use reqwest::dns::Resolve as _;
        let name = |n: &str| n.parse::<reqwest::dns::Name>().unwrap();
        let strict = CheckedResolver { allow: Arc::new(AllowList::default()) };
        let err = match strict.resolve(name("localhost")).await {
            Ok(a) => panic!("resolved to {:?}", a.collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("internal address") && err.contains("notify_allow_hosts"), "{err}");
        let by_name = CheckedResolver { allow: Arc::new(AllowList::parse(&["localhost".into()]).unwrap()) };
        assert!(by_name.resolve(name("localhost")).await.unwrap().any(|a| a.ip().is_loopback()));
        let by_net = CheckedResolver { allow: Arc::new(AllowList::parse(&["127.0.0.0/8".into()]).unwrap()) };
        let kept: Vec<SocketAddr> = by_net.resolve(name("localhost")).await.unwrap().collect();
        assert!(!kept.is_empty() && kept.iter().all(|a| a.ip().is_ipv4()), "{kept:?}");
    }

    #[test]
    fn allow_list_entries() {
        let a = AllowList::parse(&["hooks.Internal".into(), "10.1.0.0/16".into(), "::1".into(), " ".into()]).unwrap();
        assert!(a.allows_host("hooks.internal") && a.allows_host("HOOKS.internal."));
        assert!(!a.allows_host("other.internal"));
        assert!(a.allows_ip("10.1.200.3".parse().unwrap()));
        assert!(!a.allows_ip("10.2.0.1".parse().unwrap()));
        assert!(a.allows_ip("::1".parse().unwrap()));
        assert!(a.allows_ip("::ffff:10.1.0.1".parse().unwrap()));
        assert!(AllowList::parse(&["10.0.0.0/33".into()]).unwrap_err().contains("prefix"));
        assert!(AllowList::parse(&["a b".into()]).is_err());
        assert!(AllowList::parse(&["x/8".into()]).is_err());
    }
}
