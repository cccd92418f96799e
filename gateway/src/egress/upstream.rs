//! Step 7 of the data path: forwarding to the origin.
//!
//! Host names are resolved here, asynchronously (pingora's `HttpPeer::new` would resolve with
//! a blocking call on the proxy's worker thread), and every address — resolved or given as an
//! IP literal — passes the SSRF guard before a connection is made: a sandbox must not reach
//! the host's loopback services, the cloud metadata endpoint (169.254.169.254), private
//! networks or any other range the IANA special-purpose registries call not globally reachable
//! through the gateway unless the operator allowed that network explicitly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use crate::config::UpstreamConfig;
use crate::reply::{ErrorCode, Refusal};
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

    /// Why `ip` may not be connected to (the kind of address it is), or `None` if it may.
    pub fn refuses(&self, ip: IpAddr) -> Option<&'static str> {
        self.refusal(ip).map(|r| r.kind)
    }

    /// Why `ip` may not be connected to, with the registry entry that says so.
    pub fn refusal(&self, ip: IpAddr) -> Option<Refused> {
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        special_purpose(ip)
    }
}

/// Why the guard refuses an address: the range it falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// What the address is, as the 403 says it: "a {kind} address".
    pub kind: &'static str,
    /// The range's name as its registry gives it.
    pub name: &'static str,
    /// The RFC (or registry) that defines the range.
    pub rfc: &'static str,
    /// For an IPv6 address judged by the IPv4 address it embeds: the IPv6 range's kind and
    /// the embedded address.
    pub embedded_in: Option<(&'static str, Ipv4Addr)>,
}

impl std::fmt::Display for Refused {
    /// "a private-use address (Private-Use, RFC 1918)", or for an embedded IPv4 address
    /// "a 6to4 address embedding 10.0.0.1, a private-use address (Private-Use, RFC 1918)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some((outer, v4)) = self.embedded_in {
            write!(f, "a {outer} address embedding {v4}, ")?;
        }
        write!(f, "a {} address ({}, {})", self.kind, self.name, self.rfc)
    }
}

/// What the guard does with an address in a range of the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Treat {
    /// Never an origin.
    Refuse,
    /// Globally reachable: listed where the registry carves it out of a refused range (or
    /// lists it at all), so that the decision is visible per entry.
    Allow,
    /// Judged by the IPv4 address it embeds (`Treat::Embedded(at)`: the embedded address
    /// is the 32 bits that end `at` bits from the address's end).
    Embedded(u32),
}

/// One range of the special-purpose tables.
#[derive(Debug)]
struct Special<A> {
    net: A,
    mask: A,
    len: u8,
    treat: Treat,
    /// The word the 403 uses: "is a {kind} address".
    kind: &'static str,
    /// The name the registry gives the range (or, for the few ranges the IANA special-purpose
    /// registries do not list, the name their RFC gives them).
    name: &'static str,
    rfc: &'static str,
}

const fn v4(
    net: [u8; 4],
    len: u8,
    treat: Treat,
    kind: &'static str,
    name: &'static str,
    rfc: &'static str,
) -> Special<u32> {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Special {
        net: u32::from_be_bytes(net),
        mask,
        len,
        treat,
        kind,
        name,
        rfc,
    }
}

const fn v6(
    net: [u16; 8],
    len: u8,
    treat: Treat,
    kind: &'static str,
    name: &'static str,
    rfc: &'static str,
) -> Special<u128> {
    let mut bits = 0u128;
    let mut i = 0;
    while i < 8 {
        bits = (bits << 16) | net[i] as u128;
        i += 1;
    }
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    Special {
        net: bits,
        mask,
        len,
        treat,
        kind,
        name,
        rfc,
    }
}

use Treat::{Allow, Embedded, Refuse};

/// The IANA IPv4 Special-Purpose Address Registry
/// (<https://www.iana.org/assignments/iana-ipv4-special-registry/>, RFC 6890 and its updates),
/// every entry, in the registry's order: those not globally reachable (Globally Reachable
/// False, or left empty for a terminated allocation) are refused, the globally reachable ones
/// let through. Then the one range the registry does not list that is never a public origin:
/// multicast. An address is judged by the most specific range that holds it.
#[rustfmt::skip]
static SPECIAL_V4: &[Special<u32>] = &[
    v4([0, 0, 0, 0], 8, Refuse, "\"this network\"", "\"This network\"", "RFC 791, section 3.2"),
    v4([0, 0, 0, 0], 32, Refuse, "unspecified", "\"This host on this network\"", "RFC 1122, section 3.2.1.3"),
    v4([10, 0, 0, 0], 8, Refuse, "private-use", "Private-Use", "RFC 1918"),
    v4([100, 64, 0, 0], 10, Refuse, "shared (CGNAT)", "Shared Address Space", "RFC 6598"),
    v4([127, 0, 0, 0], 8, Refuse, "loopback", "Loopback", "RFC 1122, section 3.2.1.3"),
    v4([169, 254, 0, 0], 16, Refuse, "link-local", "Link Local", "RFC 3927"),
    v4([172, 16, 0, 0], 12, Refuse, "private-use", "Private-Use", "RFC 1918"),
    // The issue behind this table asked to refuse all of 192.0.0.0/24. The registry carves
    // .9 and .10 out of it as globally reachable, and so does this table: they are anycast
    // addresses for PCP (RFC 7723, UDP only) and TURN (RFC 8155, STUN framing) — the gateway
    // speaks neither, only HTTP, so the sandbox can do nothing through them that it could not
    // do with any public address. (The instance an anycast address reaches may be the
    // network operator's own server; that is so of any anycast service.)
    v4([192, 0, 0, 0], 24, Refuse, "IETF protocol assignment", "IETF Protocol Assignments", "RFC 6890, section 2.1"),
    v4([192, 0, 0, 0], 29, Refuse, "IPv4 service continuity", "IPv4 Service Continuity Prefix", "RFC 7335"),
    v4([192, 0, 0, 8], 32, Refuse, "IPv4 dummy", "IPv4 dummy address", "RFC 7600"),
    v4([192, 0, 0, 9], 32, Allow, "PCP anycast", "Port Control Protocol Anycast", "RFC 7723"),
    v4([192, 0, 0, 10], 32, Allow, "TURN anycast", "Traversal Using Relays around NAT Anycast", "RFC 8155"),
    v4([192, 0, 0, 170], 32, Refuse, "NAT64/DNS64 discovery", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050 section 2.2"),
    v4([192, 0, 0, 171], 32, Refuse, "NAT64/DNS64 discovery", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050 section 2.2"),
    v4([192, 0, 2, 0], 24, Refuse, "documentation", "Documentation (TEST-NET-1)", "RFC 5737"),
    v4([192, 31, 196, 0], 24, Allow, "AS112", "AS112-v4", "RFC 7535"),
    v4([192, 52, 193, 0], 24, Allow, "AMT", "AMT", "RFC 7450"),
    // Terminated in 2015; the registry left its columns empty: not a destination any more.
    v4([192, 88, 99, 0], 24, Refuse, "deprecated 6to4 relay anycast", "Deprecated (6to4 Relay Anycast)", "RFC 7526"),
    v4([192, 88, 99, 2], 32, Refuse, "6a44 relay anycast", "6a44-relay anycast address", "RFC 6751"),
    v4([192, 168, 0, 0], 16, Refuse, "private-use", "Private-Use", "RFC 1918"),
    v4([192, 175, 48, 0], 24, Allow, "AS112", "Direct Delegation AS112 Service", "RFC 7534"),
    v4([198, 18, 0, 0], 15, Refuse, "benchmarking", "Benchmarking", "RFC 2544"),
    v4([198, 51, 100, 0], 24, Refuse, "documentation", "Documentation (TEST-NET-2)", "RFC 5737"),
    v4([203, 0, 113, 0], 24, Refuse, "documentation", "Documentation (TEST-NET-3)", "RFC 5737"),
    v4([240, 0, 0, 0], 4, Refuse, "reserved", "Reserved", "RFC 1112, section 4"),
    v4([255, 255, 255, 255], 32, Refuse, "limited broadcast", "Limited Broadcast", "RFC 8190, RFC 919 section 7"),
    // Not in the special-purpose registry (multicast has a registry of its own).
    v4([224, 0, 0, 0], 4, Refuse, "multicast", "Multicast", "RFC 5771"),
];

/// The IANA IPv6 Special-Purpose Address Registry
/// (<https://www.iana.org/assignments/iana-ipv6-special-registry/>), every entry, in the
/// registry's order, decided by its Globally Reachable column as for IPv4 (False, N/A or
/// empty: refused) — with one exception, 6to4 (see there). Then the ranges the registry does
/// not list that are never a public origin. An address is judged by the most specific range
/// that holds it.
#[rustfmt::skip]
static SPECIAL_V6: &[Special<u128>] = &[
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, Refuse, "loopback", "Loopback Address", "RFC 4291"),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, Refuse, "unspecified", "Unspecified Address", "RFC 4291"),
    // Not globally reachable: refused whatever it embeds (the sandbox can name the IPv4
    // address itself).
    v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, Refuse, "IPv4-mapped", "IPv4-mapped Address", "RFC 4291"),
    // The well-known NAT64 prefix is globally reachable: judged by the IPv4 address in its
    // last 32 bits (RFC 6052 forbids it to embed a non-global one).
    v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, Embedded(0), "NAT64", "IPv4-IPv6 Translat.", "RFC 6052"),
    v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, Refuse, "NAT64 local-use", "IPv4-IPv6 Translat.", "RFC 8215"),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, Refuse, "discard-only", "Discard-Only Address Block", "RFC 6666"),
    v6([0x100, 0, 0, 1, 0, 0, 0, 0], 64, Refuse, "dummy IPv6", "Dummy IPv6 Prefix", "RFC 9780"),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, Refuse, "IETF protocol assignment", "IETF Protocol Assignments", "RFC 2928"),
    // Globally Reachable N/A: refused as a whole. A Teredo address embeds the Teredo server's
    // IPv4 address (bits 32..63) and the client's mapped one XOR 0xffffffff (the last 32
    // bits); it is reached through a Teredo relay, never a plain origin.
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, Refuse, "Teredo", "TEREDO", "RFC 4380, RFC 8190"),
    v6([0x2001, 1, 0, 0, 0, 0, 0, 1], 128, Allow, "PCP anycast", "Port Control Protocol Anycast", "RFC 7723"),
    v6([0x2001, 1, 0, 0, 0, 0, 0, 2], 128, Allow, "TURN anycast", "Traversal Using Relays around NAT Anycast", "RFC 8155"),
    v6([0x2001, 1, 0, 0, 0, 0, 0, 3], 128, Allow, "DNS-SD SRP anycast", "DNS-SD Service Registration Protocol Anycast", "RFC 9665"),
    v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48, Refuse, "benchmarking", "Benchmarking", "RFC 5180, RFC Errata 1752"),
    v6([0x2001, 3, 0, 0, 0, 0, 0, 0], 32, Allow, "AMT", "AMT", "RFC 7450"),
    v6([0x2001, 4, 0x112, 0, 0, 0, 0, 0], 48, Allow, "AS112", "AS112-v6", "RFC 7535"),
    // Terminated in 2014; the registry left its columns empty.
    v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28, Refuse, "deprecated ORCHID", "Deprecated (previously ORCHID)", "RFC 4843"),
    v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28, Allow, "ORCHIDv2", "ORCHIDv2", "RFC 7343"),
    v6([0x2001, 0x30, 0, 0, 0, 0, 0, 0], 28, Allow, "DET", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", "RFC 9374"),
    v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, Refuse, "documentation", "Documentation", "RFC 3849"),
    // Deviation: the registry says N/A ("see RFC 3056") for 6to4, which would refuse it as a
    // whole. 2002:V4ADDR::/48 is the prefix of the site that owns V4ADDR, reached through
    // V4ADDR, so it is judged by the IPv4 address in bits 16..47 instead: an internal one is
    // refused, a public one let through as before this table.
    v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, Embedded(80), "6to4", "6to4", "RFC 3056"),
    v6([0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0], 48, Allow, "AS112", "Direct Delegation AS112 Service", "RFC 7534"),
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, Refuse, "documentation", "Documentation", "RFC 9637"),
    v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, Refuse, "SRv6 SID", "Segment Routing (SRv6) SIDs", "RFC 9602"),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, Refuse, "unique-local", "Unique-Local", "RFC 4193, RFC 8190"),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, Refuse, "link-local", "Link-Local Unicast", "RFC 4291"),
    // Not in the special-purpose registry:
    // IPv4-compatible addresses (::a.b.c.d), deprecated: refused whatever they embed.
    v6([0, 0, 0, 0, 0, 0, 0, 0], 96, Refuse, "IPv4-compatible IPv6", "IPv4-Compatible IPv6 Address (deprecated)", "RFC 4291, section 2.5.5.1"),
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Refuse, "site-local", "Site-Local (deprecated)", "RFC 3879"),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Refuse, "multicast", "Multicast", "RFC 4291, section 2.7"),
    // Everything outside global unicast (2000::/3) is reserved by the IETF (IANA IPv6
    // Address Space registry): no public origin lives there. The ranges above that lie
    // outside 2000::/3 (NAT64 among them) are more specific and decide for themselves.
    v6([0, 0, 0, 0, 0, 0, 0, 0], 0, Refuse, "reserved", "Reserved by IETF", "RFC 4291, section 2.4"),
    v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3, Allow, "global unicast", "Global Unicast", "RFC 4291, section 2.4"),
];

/// The most specific range of `table` that holds `ip`.
fn most_specific<A>(table: &'static [Special<A>], ip: A) -> Option<&'static Special<A>>
where
    A: Copy + PartialEq + std::ops::BitAnd<Output = A>,
{
    let mut best: Option<&'static Special<A>> = None;
    for range in table {
        if ip & range.mask == range.net && best.is_none_or(|b| range.len > b.len) {
            best = Some(range);
        }
    }
    best
}

fn refused<A>(range: &Special<A>) -> Refused {
    Refused {
        kind: range.kind,
        name: range.name,
        rfc: range.rfc,
        embedded_in: None,
    }
}

/// Why `ip` is never an origin, if it is not.
fn special_purpose(ip: IpAddr) -> Option<Refused> {
    match ip {
        IpAddr::V4(v4) => special_purpose_v4(v4),
        IpAddr::V6(v6) => special_purpose_v6(v6),
    }
}

fn special_purpose_v4(ip: Ipv4Addr) -> Option<Refused> {
    let range = most_specific(SPECIAL_V4, u32::from(ip))?;
    match range.treat {
        Refuse => Some(refused(range)),
        Allow | Embedded(_) => None,
    }
}

fn special_purpose_v6(ip: Ipv6Addr) -> Option<Refused> {
    let bits = u128::from(ip);
    let range = most_specific(SPECIAL_V6, bits)?;
    match range.treat {
        Refuse => Some(refused(range)),
        Allow => None,
        Embedded(at) => {
            let v4 = Ipv4Addr::from((bits >> at) as u32);
            special_purpose_v4(v4).map(|inner| Refused {
                embedded_in: Some((range.kind, v4)),
                ..inner
            })
        }
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
    /// Request headers never passed to an origin (`upstream.strip_request_headers`).
    stripped: Vec<HeaderName>,
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
            // Validated with the config.
            stripped: config
                .strip_request_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
                .collect(),
        }
    }

    /// The request headers removed before a request goes to its origin.
    pub fn stripped_headers(&self) -> &[HeaderName] {
        &self.stripped
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
                ErrorCode::DestinationForbidden,
                format!("{own} is one of the gateway's own listeners; it is never an origin"),
            ));
        }
        let mut refused = None;
        for addr in &candidates {
            match self.guard.refusal(addr.ip()) {
                None => return Ok(*addr),
                Some(why) => refused = refused.or(Some((addr.ip(), why))),
            }
        }
        match refused {
            Some((ip, why)) => {
                let what = match &target.host {
                    Host::Ip(_) => format!("{ip} is {why}"),
                    Host::Name(name) => format!("{name} resolves to {ip}, {why}"),
                };
                Err(Refusal::new(
                    ErrorCode::DestinationForbidden,
                    format!(
                        "{what}; the gateway does not connect to internal networks unless \
                         upstream.allow_networks lists them"
                    ),
                ))
            }
            None => Err(Refusal::new(
                ErrorCode::UpstreamUnresolvable,
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
                ErrorCode::UpstreamUnresolvable,
                format!("cannot resolve {name}: {e}"),
            )),
            Err(_) => Err(Refusal::new(
                ErrorCode::UpstreamTimeout,
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
            ErrorCode::UpstreamReset,
            format!("{target} reset the connection before it answered"),
        );
    }
    match e.etype() {
        ConnectTimedout => Refusal::new(
            ErrorCode::UpstreamTimeout,
            format!("connecting to {target} timed out"),
        ),
        ReadTimedout | WriteTimedout => Refusal::new(
            ErrorCode::UpstreamTimeout,
            format!("{target} did not answer in time"),
        ),
        ConnectRefused => Refusal::new(
            ErrorCode::UpstreamRefused,
            format!("{target} refused the connection"),
        ),
        ConnectNoRoute | ConnectError | BindError | SocketError => Refusal::new(
            ErrorCode::UpstreamUnreachable,
            format!("cannot connect to {target} ({})", root_cause_text(e)),
        ),
        TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError => Refusal::new(
            ErrorCode::UpstreamTlsFailed,
            format!(
                "TLS to {target} failed ({}); the origin's certificate must be valid for \
                     its name and issued by a trusted CA",
                root_cause_text(e)
            ),
        ),
        InvalidHTTPHeader | H1Error | InvalidH2 => Refusal::new(
            ErrorCode::UpstreamBadResponse,
            format!(
                "{target} sent a malformed response ({}); none of it was passed on",
                e.etype().as_str()
            ),
        ),
        _ => Refusal::new(
            ErrorCode::UpstreamError,
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

/// Headers that describe one hop, not the message: never passed on to the sandbox. Names,
/// not strings: looking one up then hashes it without parsing it first (twice per request).
static HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::UPGRADE,
];

/// The hop-by-hop headers present in `headers`: the fixed list plus any named in
/// `Connection`. (`Transfer-Encoding` is left to pingora, which re-frames bodies itself.)
pub fn hop_by_hop_headers(headers: &http::HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = HOP_BY_HOP
        .iter()
        .filter(|n| headers.contains_key(*n))
        .cloned()
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
            // Those of the fixed list are in already ("keep-alive", the common one).
            if HOP_BY_HOP
                .iter()
                .any(|n| token.eq_ignore_ascii_case(n.as_str()))
            {
                continue;
            }
            // `from_bytes` lowers the case itself.
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
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

    /// What a registry entry makes of its range.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Expect {
        Refused,
        Allowed,
        /// Judged by the IPv4 address it embeds.
        Embedded,
    }
    use Expect::{Allowed, Embedded as ByEmbedded, Refused as Refuse_};

    /// The IANA IPv4 Special-Purpose Address Registry as text, written down independently of
    /// the table's encoding: address block, name, and Globally Reachable (False or empty:
    /// refused; True: allowed). Then what the guard adds to it.
    const IANA_V4: &[(&str, &str, Expect)] = &[
        ("0.0.0.0/8", "\"This network\"", Refuse_),
        ("0.0.0.0/32", "\"This host on this network\"", Refuse_),
        ("10.0.0.0/8", "Private-Use", Refuse_),
        ("100.64.0.0/10", "Shared Address Space", Refuse_),
        ("127.0.0.0/8", "Loopback", Refuse_),
        ("169.254.0.0/16", "Link Local", Refuse_),
        ("172.16.0.0/12", "Private-Use", Refuse_),
        ("192.0.0.0/24", "IETF Protocol Assignments", Refuse_),
        ("192.0.0.0/29", "IPv4 Service Continuity Prefix", Refuse_),
        ("192.0.0.8/32", "IPv4 dummy address", Refuse_),
        ("192.0.0.9/32", "Port Control Protocol Anycast", Allowed),
        (
            "192.0.0.10/32",
            "Traversal Using Relays around NAT Anycast",
            Allowed,
        ),
        ("192.0.0.170/32", "NAT64/DNS64 Discovery", Refuse_),
        ("192.0.0.171/32", "NAT64/DNS64 Discovery", Refuse_),
        ("192.0.2.0/24", "Documentation (TEST-NET-1)", Refuse_),
        ("192.31.196.0/24", "AS112-v4", Allowed),
        ("192.52.193.0/24", "AMT", Allowed),
        ("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", Refuse_),
        ("192.88.99.2/32", "6a44-relay anycast address", Refuse_),
        ("192.168.0.0/16", "Private-Use", Refuse_),
        (
            "192.175.48.0/24",
            "Direct Delegation AS112 Service",
            Allowed,
        ),
        ("198.18.0.0/15", "Benchmarking", Refuse_),
        ("198.51.100.0/24", "Documentation (TEST-NET-2)", Refuse_),
        ("203.0.113.0/24", "Documentation (TEST-NET-3)", Refuse_),
        ("240.0.0.0/4", "Reserved", Refuse_),
        ("255.255.255.255/32", "Limited Broadcast", Refuse_),
        // Not in the registry.
        ("224.0.0.0/4", "Multicast", Refuse_),
    ];

    /// The IANA IPv6 Special-Purpose Address Registry likewise (N/A: refused, but for 6to4),
    /// then what the guard adds to it.
    const IANA_V6: &[(&str, &str, Expect)] = &[
        ("::1/128", "Loopback Address", Refuse_),
        ("::/128", "Unspecified Address", Refuse_),
        ("::ffff:0:0/96", "IPv4-mapped Address", Refuse_),
        ("64:ff9b::/96", "IPv4-IPv6 Translat.", ByEmbedded),
        ("64:ff9b:1::/48", "IPv4-IPv6 Translat.", Refuse_),
        ("100::/64", "Discard-Only Address Block", Refuse_),
        ("100:0:0:1::/64", "Dummy IPv6 Prefix", Refuse_),
        ("2001::/23", "IETF Protocol Assignments", Refuse_),
        ("2001::/32", "TEREDO", Refuse_),
        ("2001:1::1/128", "Port Control Protocol Anycast", Allowed),
        (
            "2001:1::2/128",
            "Traversal Using Relays around NAT Anycast",
            Allowed,
        ),
        (
            "2001:1::3/128",
            "DNS-SD Service Registration Protocol Anycast",
            Allowed,
        ),
        ("2001:2::/48", "Benchmarking", Refuse_),
        ("2001:3::/32", "AMT", Allowed),
        ("2001:4:112::/48", "AS112-v6", Allowed),
        ("2001:10::/28", "Deprecated (previously ORCHID)", Refuse_),
        ("2001:20::/28", "ORCHIDv2", Allowed),
        (
            "2001:30::/28",
            "Drone Remote ID Protocol Entity Tags (DETs) Prefix",
            Allowed,
        ),
        ("2001:db8::/32", "Documentation", Refuse_),
        ("2002::/16", "6to4", ByEmbedded),
        (
            "2620:4f:8000::/48",
            "Direct Delegation AS112 Service",
            Allowed,
        ),
        ("3fff::/20", "Documentation", Refuse_),
        ("5f00::/16", "Segment Routing (SRv6) SIDs", Refuse_),
        ("fc00::/7", "Unique-Local", Refuse_),
        ("fe80::/10", "Link-Local Unicast", Refuse_),
        // Not in the registry.
        (
            "::/96",
            "IPv4-Compatible IPv6 Address (deprecated)",
            Refuse_,
        ),
        ("fec0::/10", "Site-Local (deprecated)", Refuse_),
        ("ff00::/8", "Multicast", Refuse_),
        ("::/0", "Reserved by IETF", Refuse_),
        ("2000::/3", "Global Unicast", Allowed),
    ];

    fn registry() -> Vec<(IpNet, &'static str, Expect)> {
        IANA_V4
            .iter()
            .chain(IANA_V6)
            .map(|&(net, name, expect)| (net.parse().unwrap(), name, expect))
            .collect()
    }

    fn expect_of(treat: Treat) -> Expect {
        match treat {
            Treat::Refuse => Refuse_,
            Treat::Allow => Allowed,
            Treat::Embedded(_) => ByEmbedded,
        }
    }

    #[test]
    fn the_tables_hold_every_registry_entry_under_its_registry_name_and_nothing_else() {
        assert_eq!(SPECIAL_V4.len(), IANA_V4.len());
        assert_eq!(SPECIAL_V6.len(), IANA_V6.len());
        for (net, name, expect) in registry() {
            let found = match net {
                IpNet::V4(n) => SPECIAL_V4
                    .iter()
                    .find(|s| s.net == u32::from(n.network()) && s.len == n.prefix_len())
                    .map(|s| (s.name, expect_of(s.treat), s.mask == u32::from(n.netmask()))),
                IpNet::V6(n) => SPECIAL_V6
                    .iter()
                    .find(|s| s.net == u128::from(n.network()) && s.len == n.prefix_len())
                    .map(|s| {
                        (
                            s.name,
                            expect_of(s.treat),
                            s.mask == u128::from(n.netmask()),
                        )
                    }),
            };
            assert_eq!(found, Some((name, expect, true)), "{net}");
        }
    }

    /// The most specific range of the textual registry that holds `ip`.
    fn registry_entry(
        registry: &[(IpNet, &'static str, Expect)],
        ip: IpAddr,
    ) -> Option<(IpNet, &'static str, Expect)> {
        registry
            .iter()
            .filter(|(net, _, _)| net.contains(&ip))
            .max_by_key(|(net, _, _)| net.prefix_len())
            .copied()
    }

    /// The IPv4 address a NAT64 (last 32 bits) or 6to4 (bits 16..47) address embeds.
    fn embedded(ip: IpAddr) -> Ipv4Addr {
        let IpAddr::V6(v6) = ip else {
            panic!("{ip} embeds nothing")
        };
        let s = v6.segments();
        if s[0] == 0x2002 {
            Ipv4Addr::from((u32::from(s[1]) << 16) | u32::from(s[2]))
        } else {
            Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]))
        }
    }

    /// Checks the guard's verdict on `ip` against the textual registry; false if `ip` is not
    /// `net`'s to decide (a more specific entry holds it).
    fn check(
        guard: &NetworkGuard,
        registry: &[(IpNet, &'static str, Expect)],
        ip: IpAddr,
    ) -> Option<IpNet> {
        let verdict = guard.refusal(ip);
        match registry_entry(registry, ip) {
            None => assert_eq!(verdict, None, "{ip} is in no special range: allowed"),
            Some((net, name, Refuse_)) => {
                let why = verdict.unwrap_or_else(|| panic!("{ip} ({net} {name}) must be refused"));
                assert_eq!((why.name, why.embedded_in), (name, None), "{ip}");
            }
            Some((net, name, Allowed)) => {
                assert_eq!(verdict, None, "{ip} ({net} {name}) must be allowed")
            }
            Some((net, _, ByEmbedded)) => {
                let v4 = embedded(ip);
                let inner = guard.refusal(IpAddr::V4(v4));
                assert_eq!(verdict.is_some(), inner.is_some(), "{ip} is judged by {v4}");
                if let (Some(why), Some(inner)) = (verdict, inner) {
                    assert_eq!(why.name, inner.name, "{ip}");
                    assert_eq!(why.embedded_in.map(|(_, a)| a), Some(v4), "{ip} in {net}");
                }
            }
        }
        registry_entry(registry, ip).map(|(net, _, _)| net)
    }

    fn step(ip: IpAddr, up: bool) -> Option<IpAddr> {
        match ip {
            IpAddr::V4(a) => {
                let n = u32::from(a);
                let n = if up {
                    n.checked_add(1)
                } else {
                    n.checked_sub(1)
                };
                n.map(|n| IpAddr::V4(Ipv4Addr::from(n)))
            }
            IpAddr::V6(a) => {
                let n = u128::from(a);
                let n = if up {
                    n.checked_add(1)
                } else {
                    n.checked_sub(1)
                };
                n.map(|n| IpAddr::V6(Ipv6Addr::from(n)))
            }
        }
    }

    fn middle(net: IpNet) -> IpAddr {
        match net {
            IpNet::V4(n) => {
                let (first, last) = (u32::from(n.network()), u32::from(n.broadcast()));
                IpAddr::V4(Ipv4Addr::from(first + (last - first) / 2))
            }
            IpNet::V6(n) => {
                let (first, last) = (u128::from(n.network()), u128::from(n.broadcast()));
                IpAddr::V6(Ipv6Addr::from(first + (last - first) / 2))
            }
        }
    }

    #[test]
    fn every_special_purpose_range_of_the_iana_registries_is_refused() {
        let guard = NetworkGuard::default();
        let registry = registry();
        for &(net, name, expect) in &registry {
            // Its first, middle and last address: refused, allowed or judged by the embedded
            // IPv4 address as the registry says — unless a more specific entry holds the
            // address (that entry decides, and is checked in its own turn).
            let mut decided = 0;
            for ip in [net.network(), middle(net), net.broadcast()] {
                if check(&guard, &registry, ip) == Some(net) {
                    decided += 1;
                }
            }
            assert!(decided > 0, "{net} ({name}) decided none of its samples");
            // Just outside a refused range: whatever the registry says there (public space
            // most often, e.g. 198.17.255.255 and 198.20.0.0 around 198.18.0.0/15).
            if expect == Refuse_ {
                for ip in [step(net.network(), false), step(net.broadcast(), true)]
                    .into_iter()
                    .flatten()
                {
                    check(&guard, &registry, ip);
                }
            }
        }
    }

    #[test]
    fn the_ranges_the_issue_names_are_refused_and_public_addresses_are_not() {
        let guard = NetworkGuard::default();
        for (address, kind) in [
            ("::127.0.0.1", "IPv4-compatible IPv6"),
            ("::10.0.0.1", "IPv4-compatible IPv6"),
            ("::8.8.8.8", "IPv4-compatible IPv6"),
            ("64:ff9b:1::a00:1", "NAT64 local-use"),
            ("64:ff9b:1::101:101", "NAT64 local-use"),
            ("2001::1", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2002:0a00:0001::1", "private-use"),
            ("2002:c000:8::1", "IPv4 dummy"),
            ("2002:c000:0208::1", "documentation"),
            ("64:ff9b::c612:1", "benchmarking"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("192.0.0.8", "IPv4 dummy"),
            ("192.0.0.1", "IPv4 service continuity"),
            ("192.0.0.100", "IETF protocol assignment"),
            ("192.88.99.1", "deprecated 6to4 relay anycast"),
            ("2001:2::1", "benchmarking"),
            ("5f00::1", "SRv6 SID"),
            ("3fff::1", "documentation"),
            ("fec0::1", "site-local"),
            ("ff0e::1", "multicast"),
            ("4000::1", "reserved"),
            ("::ffff:1.1.1.1", "IPv4-mapped"),
            ("169.254.169.254", "link-local"),
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private-use"),
        ] {
            assert_eq!(guard.refuses(ip(address)), Some(kind), "{address}");
        }
        for public in [
            "1.1.1.1",
            "2606:4700::1111",
            "2002:0101:0101::1",
            "64:ff9b::101:101",
            "198.17.255.255",
            "198.20.0.0",
            "192.0.0.9",
            "192.0.0.10",
            "192.0.1.0",
            "2001:1::1",
            "2001:3::1",
            "2001:4:112::1",
            "2620:4f:8000::1",
            "2001:200::1",
        ] {
            assert_eq!(guard.refuses(ip(public)), None, "{public} must be allowed");
        }
    }

    #[tokio::test]
    async fn a_refusal_names_the_registry_entry_and_the_embedded_address() {
        let up = Upstream::new(&UpstreamConfig::default());
        let t = Target::from_url_authority(Scheme::Http, "[2002:a00:1::1]").unwrap();
        let r = up.resolve(&t).await.unwrap_err();
        assert_eq!((r.status, r.error), (403, "destination_forbidden"));
        assert!(
            r.detail.starts_with(
                "2002:a00:1::1 is a 6to4 address embedding 10.0.0.1, a private-use address \
                 (Private-Use, RFC 1918);"
            ),
            "{}",
            r.detail
        );
        let t = Target::from_url_authority(Scheme::Http, "198.18.0.1").unwrap();
        let r = up.resolve(&t).await.unwrap_err();
        assert!(
            r.detail
                .starts_with("198.18.0.1 is a benchmarking address (Benchmarking, RFC 2544);"),
            "{}",
            r.detail
        );
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
            "close, X-Secret-Hop, Transfer-Encoding, Keep-Alive"
                .parse()
                .unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authorization", "Basic abc".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        let names = hop_by_hop_headers(&h);
        assert!(names.contains(&HeaderName::from_static("connection")));
        assert!(names.contains(&HeaderName::from_static("x-secret-hop")));
        assert!(names.contains(&HeaderName::from_static("proxy-authorization")));
        assert!(!names.contains(&HeaderName::from_static("transfer-encoding")));
        assert!(!names.contains(&HeaderName::from_static("accept")));
        // Named twice (the fixed list, and `Connection`), listed once.
        let keep_alive = HeaderName::from_static("keep-alive");
        assert_eq!(names.iter().filter(|n| **n == keep_alive).count(), 1);
    }
}
