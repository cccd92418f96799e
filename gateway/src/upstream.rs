//! Step 7 of the data path: forwarding to the origin.
//!
//! Host names are resolved here, asynchronously (pingora's `HttpPeer::new` would resolve with
//! a blocking call on the proxy's worker thread), and every address — resolved or given as an
//! IP literal — passes the SSRF guard before a connection is made: a sandbox must not reach
//! the host's loopback services, the cloud metadata endpoint (169.254.169.254) or private
//! networks through the gateway unless the operator allowed that network explicitly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use crate::config::UpstreamConfig;
use crate::reply::Refusal;
use crate::target::{Host, Scheme, Target};

/// Decides which origin addresses may be connected to.
#[derive(Debug, Clone, Default)]
pub struct NetworkGuard {
    allowed: Vec<IpNet>,
}

impl NetworkGuard {
    /// A guard that lets `allowed` networks through although they are internal.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        NetworkGuard { allowed }
    }

    /// Why `ip` may not be connected to, or `None` if it may.
    pub fn refuses(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        internal_network(ip)
    }
}

/// Names the kind of internal network `ip` belongs to, if any.
fn internal_network(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else {
        None
    }
}

fn internal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // Addresses that embed an IPv4 address are judged by that address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return internal_v4(v4);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return internal_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    if s[0] == 0x2002 {
        let embedded = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        if let Some(kind) = internal_v4(embedded) {
            return Some(kind);
        }
    }
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique-local")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast or reserved")
    } else {
        None
    }
}

/// How origins are reached: resolution, the SSRF guard and connection settings.
#[derive(Debug, Clone)]
pub struct Upstream {
    guard: NetworkGuard,
    /// The gateway's own listeners: never an origin.
    own: Vec<SocketAddr>,
    resolve: std::collections::BTreeMap<String, IpAddr>,
    connect_timeout: Duration,
    read_timeout: Duration,
    write_timeout: Duration,
}

impl Upstream {
    /// Settings from the `[upstream]` config section.
    pub fn new(config: &UpstreamConfig) -> Self {
        Upstream {
            guard: NetworkGuard::new(config.allow_networks.clone()),
            own: Vec::new(),
            resolve: config
                .resolve
                .iter()
                .map(|(name, ip)| (name.trim_end_matches('.').to_ascii_lowercase(), *ip))
                .collect(),
            connect_timeout: config.connect_timeout(),
            read_timeout: config.read_timeout(),
            write_timeout: config.write_timeout(),
        }
    }

    /// The same settings, refusing `own` addresses (the gateway's listeners) as origins. A
    /// listener on an unspecified address (0.0.0.0, ::) is matched on any loopback address.
    pub fn refusing(mut self, own: Vec<SocketAddr>) -> Self {
        self.own = own;
        self
    }

    fn is_own(&self, addr: &SocketAddr) -> bool {
        self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == addr.ip() || (own.ip().is_unspecified() && addr.ip().is_loopback()))
        })
    }

    /// Resolves `target` and picks the first address the guard allows.
    ///
    /// Only allowed addresses are ever returned, so a name that resolves to both a public and
    /// an internal address (DNS rebinding) is connected to the public one or refused.
    pub async fn resolve(&self, target: &Target) -> Result<SocketAddr, Refusal> {
        let candidates: Vec<SocketAddr> = match &target.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
            Host::Name(name) => match self.resolve.get(name) {
                Some(ip) => vec![SocketAddr::new(*ip, target.port)],
                None => self.lookup(name, target.port).await?,
            },
        };
        if let Some(own) = candidates.iter().find(|a| self.is_own(a)) {
            return Err(Refusal::new(
                403,
                "destination_forbidden",
                format!("{own} is one of the gateway's own listeners; it is never an origin"),
            ));
        }
        let mut refused = None;
        for addr in &candidates {
            match self.guard.refuses(addr.ip()) {
                None => return Ok(*addr),
                Some(kind) => refused = refused.or(Some((addr.ip(), kind))),
            }
        }
        match refused {
            Some((ip, kind)) => {
                let what = match &target.host {
                    Host::Ip(_) => format!("{ip} is a {kind} address"),
                    Host::Name(name) => format!("{name} resolves to {ip}, a {kind} address"),
                };
                Err(Refusal::new(
                    403,
                    "destination_forbidden",
                    format!(
                        "{what}; the gateway does not connect to internal networks unless \
                         upstream.allow_networks lists them"
                    ),
                ))
            }
            None => Err(Refusal::new(
                502,
                "upstream_unresolvable",
                format!("{} has no addresses", target.host),
            )),
        }
    }

    /// Resolves `name` with the system resolver, off the proxy's worker threads.
    async fn lookup(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        let lookup = tokio::net::lookup_host((name, port));
        match tokio::time::timeout(self.connect_timeout, lookup).await {
            Ok(Ok(addrs)) => Ok(addrs.collect()),
            Ok(Err(e)) => Err(Refusal::new(
                502,
                "upstream_unresolvable",
                format!("cannot resolve {name}: {e}"),
            )),
            Err(_) => Err(Refusal::new(
                504,
                "upstream_timeout",
                format!("resolving {name} timed out"),
            )),
        }
    }

    /// The pingora peer for a resolved target, with timeouts and (for https) hostname
    /// verification against the SNI.
    pub fn peer(&self, target: &Target, addr: SocketAddr) -> HttpPeer {
        let tls = target.scheme == Scheme::Https;
        // The SNI is always the host the sandbox asked for: an empty SNI would switch off
        // certificate verification in pingora, so IP targets use the IP's text form.
        let sni = match &target.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        };
        let mut peer = HttpPeer::new(addr, tls, sni);
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout * 2);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.write_timeout);
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        peer
    }
}

/// Maps a pingora error raised while talking to the origin to the refusal the sandbox sees.
pub fn refusal_for_upstream_error(e: &pingora::Error, target: &str) -> Refusal {
    use ErrorType::*;
    // A reset is reported by whichever step met it first (the connect, the write of the
    // request, the read of the answer): one code for all, so the sandbox sees what happened.
    let classified = matches!(
        e.etype(),
        ConnectTimedout
            | ReadTimedout
            | WriteTimedout
            | ConnectRefused
            | TLSHandshakeFailure
            | TLSHandshakeTimedout
            | InvalidCert
            | HandshakeError
    );
    if !classified
        && io_error_kind(e).is_some_and(|kind| {
            matches!(
                kind,
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            )
        })
    {
        return Refusal::new(
            502,
            "upstream_reset",
            format!("{target} reset the connection before it answered"),
        );
    }
    match e.etype() {
        ConnectTimedout => Refusal::new(
            504,
            "upstream_timeout",
            format!("connecting to {target} timed out"),
        ),
        ReadTimedout | WriteTimedout => Refusal::new(
            504,
            "upstream_timeout",
            format!("{target} did not answer in time"),
        ),
        ConnectRefused => Refusal::new(
            502,
            "upstream_refused",
            format!("{target} refused the connection"),
        ),
        ConnectNoRoute | ConnectError | BindError | SocketError => Refusal::new(
            502,
            "upstream_unreachable",
            format!("cannot connect to {target} ({})", root_cause_text(e)),
        ),
        TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError => Refusal::new(
            502,
            "upstream_tls_failed",
            format!(
                "TLS to {target} failed ({}); the origin's certificate must be valid for \
                     its name and issued by a trusted CA",
                root_cause_text(e)
            ),
        ),
        InvalidHTTPHeader | H1Error | InvalidH2 => Refusal::new(
            502,
            "upstream_bad_response",
            format!(
                "{target} sent a malformed response ({}); none of it was passed on",
                e.etype().as_str()
            ),
        ),
        _ => Refusal::new(
            502,
            "upstream_error",
            format!("talking to {target} failed: {}", e.etype().as_str()),
        ),
    }
}

/// The kind of the I/O error at the root of `e`, if one is there (pingora wraps its own
/// errors, and connect errors wrap the OS error once more).
fn io_error_kind(e: &pingora::Error) -> Option<std::io::ErrorKind> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        // A nested pingora error sits in the chain as itself or as its box.
        let nested = c
            .downcast_ref::<pingora::Error>()
            .or_else(|| c.downcast_ref::<Box<pingora::Error>>().map(|b| &**b));
        cause = match nested {
            Some(inner) => inner
                .cause
                .as_deref()
                .map(|c| c as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    None
}

fn root_cause_text(e: &pingora::Error) -> String {
    let text = match &e.cause {
        Some(cause) => cause.to_string(),
        None => e.etype().as_str().to_string(),
    };
    text.chars().take(200).collect()
}

/// Headers that describe one hop, not the message: never passed on to the sandbox.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// The hop-by-hop headers present in `headers`: the fixed list plus any named in
/// `Connection`. (`Transfer-Encoding` is left to pingora, which re-frames bodies itself.)
pub fn hop_by_hop_headers(headers: &http::HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = HOP_BY_HOP
        .iter()
        .map(|n| HeaderName::from_static(n))
        .filter(|n| headers.contains_key(n))
        .collect();
    for value in headers.get_all(http::header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("transfer-encoding")
                || token.eq_ignore_ascii_case("content-length")
                || token.eq_ignore_ascii_case("host")
            {
                continue; // framing and routing headers cannot be dropped by the sender
            }
            if let Ok(name) = HeaderName::from_bytes(token.to_ascii_lowercase().as_bytes()) {
                if headers.contains_key(&name) && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_networks_are_refused() {
        let guard = NetworkGuard::default();
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "224.0.0.1",
        ] {
            assert!(
                guard.refuses(ip(internal)).is_some(),
                "{internal} must be refused"
            );
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "172.32.0.1"] {
            assert_eq!(guard.refuses(ip(public)), None, "{public} must be allowed");
        }
    }

    #[test]
    fn allowed_networks_are_let_through_and_only_those() {
        let guard = NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(guard.refuses(ip("127.0.0.5")), None);
        assert!(guard.refuses(ip("169.254.169.254")).is_some());
        assert!(guard.refuses(ip("::1")).is_some());
    }

    #[tokio::test]
    async fn an_ip_literal_goes_through_the_guard() {
        let up = Upstream::new(&UpstreamConfig::default());
        let t = Target::from_url_authority(Scheme::Http, "169.254.169.254").unwrap();
        let r = up.resolve(&t).await.unwrap_err();
        assert_eq!(r.status, 403);
        assert_eq!(r.error, "destination_forbidden");
        assert!(r.detail.contains("link-local"), "{}", r.detail);
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused() {
        let up = Upstream::new(&UpstreamConfig::default());
        let t = Target::from_url_authority(Scheme::Http, "localhost:8080").unwrap();
        let r = up.resolve(&t).await.unwrap_err();
        assert_eq!(r.status, 403, "{r}");
    }

    #[test]
    fn hop_by_hop_includes_connection_tokens_but_not_framing() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "connection",
            "close, x-secret-hop, Transfer-Encoding".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("proxy-authorization", "Basic abc".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        let names = hop_by_hop_headers(&h);
        assert!(names.contains(&HeaderName::from_static("connection")));
        assert!(names.contains(&HeaderName::from_static("x-secret-hop")));
        assert!(names.contains(&HeaderName::from_static("proxy-authorization")));
        assert!(!names.contains(&HeaderName::from_static("transfer-encoding")));
        assert!(!names.contains(&HeaderName::from_static("accept")));
    }
}
