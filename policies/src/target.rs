//! Where a request is going: the origin's host and port, parsed once and strictly.
//!
//! The gateway turns both the CONNECT authority and the absolute-form request target into a
//! [`Target`], and the policy model names the same normalised host as the resource, so
//! interception, policy and forwarding all compare one value:
//! host names are lower-cased without a trailing dot, IP literals are parsed (never treated
//! as names), and anything else is refused.

use std::fmt;
use std::net::IpAddr;

/// An origin host: a DNS name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower-case, no trailing dot.
    Name(String),
    /// An IP literal (`[v6]` brackets removed).
    Ip(IpAddr),
}

/// Why a host or authority was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// Not a valid DNS name or IP literal.
    #[error("{0:?} is not a valid host name or IP address")]
    BadHost(String),
    /// The port is missing, zero or not a number.
    #[error("{0:?} does not end in a valid :port")]
    BadPort(String),
    /// The request target is not `scheme://authority/path`.
    #[error("a forward proxy request needs an absolute URL (http://host/path), got {0:?}")]
    NotAbsolute(String),
    /// Only http and https are proxied.
    #[error("scheme {0:?} is not supported: use http or https")]
    BadScheme(String),
    /// The authority names a user (`name:password@host`): credentials never travel that way.
    #[error("the authority carries user information (name@host); the gateway injects credentials itself")]
    UserInfo,
}

/// A request target as messages may show it: without its query or fragment (they often
/// carry tokens) or user information (`name:password@`), and at most 256 characters.
pub fn redacted(raw: &str) -> String {
    let (scheme, rest) = match raw.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, raw),
    };
    // User information first: a malformed one may hold a `?` or `#`, which would otherwise
    // end the shown part inside it.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => format!("…@{}", &rest[at + 1..]),
        None => rest.to_string(),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let shown = match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest.to_string(),
    };
    shown.chars().take(256).collect()
}

impl Host {
    /// Whether the host is this machine: a loopback address, or `localhost`. (Only the
    /// name itself: `localhost.` is normalised to it, a sub-domain of it is not this host.)
    pub fn is_loopback(&self) -> bool {
        match self {
            Host::Ip(ip) => ip.is_loopback(),
            Host::Name(name) => name == "localhost",
        }
    }

    /// Parses a host as it appears in a URL or SNI: a DNS name or an IP literal.
    pub fn parse(raw: &str) -> Result<Host, TargetError> {
        let bad = || TargetError::BadHost(raw.chars().take(256).collect());
        if let Some(inner) = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            return inner
                .parse::<std::net::Ipv6Addr>()
                .map(|ip| Host::Ip(IpAddr::V6(ip)))
                .map_err(|_| bad());
        }
        if let Ok(ip) = raw.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
        if name.is_empty() || name.len() > 253 {
            return Err(bad());
        }
        for label in name.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(bad());
            }
        }
        // A name whose last label is a number is an IP address in disguise ("127.1",
        // "0x7f.1"): URL parsers and resolvers read it as one. No real TLD is numeric.
        let last = name.rsplit('.').next().unwrap_or_default();
        let hex = last
            .strip_prefix("0x")
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        if hex || last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Host::Name(name))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The scheme the origin is spoken to with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// The port used when the URL names none.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    /// "http" or "https".
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// An origin: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// How the origin is spoken to.
    pub scheme: Scheme,
    /// The host as policies see it: a lower-case DNS name or an IP literal.
    pub host: Host,
    /// The port; the scheme's default when the URL names none.
    pub port: u16,
}

impl Target {
    /// Parses a CONNECT authority (`host:port`, port required); the tunnel carries TLS.
    pub fn from_connect_authority(raw: &str) -> Result<Target, TargetError> {
        let (host, port) = split_host_port(raw)?;
        let port = port.ok_or_else(|| TargetError::BadPort(raw.to_string()))?;
        Ok(Target {
            scheme: Scheme::Https,
            host,
            port,
        })
    }

    /// Parses the authority of an absolute URL for `scheme` (port optional).
    pub fn from_url_authority(scheme: Scheme, raw: &str) -> Result<Target, TargetError> {
        let (host, port) = split_host_port(raw)?;
        Ok(Target {
            scheme,
            host,
            port: port.unwrap_or(scheme.default_port()),
        })
    }

    /// Parses an absolute `http://` or `https://` URL into its target and path (with query).
    pub fn from_url(url: &str) -> Result<(Target, String), TargetError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| TargetError::NotAbsolute(redacted(url)))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(TargetError::BadScheme(other.to_string())),
        };
        let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let path = match path {
            "" => "/".to_string(),
            p if p.starts_with('/') => p.to_string(),
            p => format!("/{p}"),
        };
        Ok((Target::from_url_authority(scheme, authority)?, path))
    }

    /// The value of the `Host` header for this target (port omitted when it is the default).
    ///
    /// Built without the formatting machinery for a name: every request needs it twice (its
    /// upstream `Host` and its audit record), and `format!` made it 1% of the gateway's CPU.
    pub fn host_header(&self) -> String {
        let mut header = match &self.host {
            Host::Name(name) => {
                let mut header = String::with_capacity(name.len() + 6);
                header.push_str(name);
                header
            }
            ip => ip.to_string(),
        };
        if self.port != self.scheme.default_port() {
            header.push(':');
            push_decimal(&mut header, self.port);
        }
        header
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut String, mut n: u16) {
    let mut digits = [0u8; 5];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[start..].iter().map(|&d| char::from(d)));
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
    }
}

/// Splits `host[:port]`, rejecting user info and empty or zero ports.
fn split_host_port(raw: &str) -> Result<(Host, Option<u16>), TargetError> {
    if raw.contains('@') {
        return Err(TargetError::UserInfo);
    }
    let (host, port) = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => {
                let rest = &raw[end + 1..];
                let port = match rest {
                    "" => None,
                    _ => Some(
                        rest.strip_prefix(':')
                            .ok_or_else(|| TargetError::BadPort(raw.to_string()))?,
                    ),
                };
                (&raw[..=end], port)
            }
            None => return Err(TargetError::BadHost(raw.to_string())),
        }
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return Err(TargetError::BadPort(raw.to_string())),
        },
    };
    Ok((Host::parse(host)?, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_and_ips_are_literals() {
        assert_eq!(
            Host::parse("API.GitHub.com.").unwrap(),
            Host::Name("api.github.com".into())
        );
        assert_eq!(
            Host::parse("[::1]").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            Host::parse("10.0.0.1").unwrap(),
            Host::Ip("10.0.0.1".parse().unwrap())
        );
        for bad in [
            "", "a..b", "-a.com", "a b", "127.1", "0x7f.1", "1.0x7f", "a/b", "[zz]", "é.com",
            "x.123",
        ] {
            assert!(Host::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn connect_authority_needs_a_port() {
        let t = Target::from_connect_authority("example.com:8443").unwrap();
        assert_eq!(t.port, 8443);
        assert_eq!(t.scheme, Scheme::Https);
        assert_eq!(
            Target::from_connect_authority("[::1]:443").unwrap().host,
            Host::Ip("::1".parse().unwrap())
        );
        for bad in [
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:99999",
            "example.com:+1",
            "user@example.com:443",
            "[::1]443",
        ] {
            assert!(
                Target::from_connect_authority(bad).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn messages_never_show_a_query_or_user_information() {
        assert_eq!(
            redacted("http://alice:s3cret@api.test:8080/x?token=abc#f"),
            "http://…@api.test:8080/x"
        );
        assert_eq!(redacted("/p?sig=1"), "/p");
        assert_eq!(redacted("http://u:pa#ss@c:4318/x"), "http://…@c:4318/x");
        assert_eq!(redacted("grpc://u:pa?ss@c"), "grpc://…@c");
        assert_eq!(redacted("a@b.test:443"), "…@b.test:443");
        assert_eq!(
            redacted("/x@y"),
            "/x@y",
            "an @ in the path is not user information"
        );
        let e = Target::from_url_authority(Scheme::Http, "alice:s3cret@api.test").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = Target::from_url("ftp:/x?token=abc").unwrap_err();
        assert!(!e.to_string().contains("abc"), "{e}");
    }

    #[test]
    fn urls_split_into_target_and_path() {
        let (t, path) = Target::from_url("https://API.github.com:8443/repos/x?per_page=1").unwrap();
        assert_eq!(t.host, Host::Name("api.github.com".into()));
        assert_eq!((t.port, t.scheme), (8443, Scheme::Https));
        assert_eq!(path, "/repos/x?per_page=1");
        assert_eq!(Target::from_url("http://example.com").unwrap().1, "/");
        assert_eq!(Target::from_url("http://example.com?q").unwrap().1, "/?q");
        assert!(Target::from_url("ftp://example.com/").is_err());
        assert!(Target::from_url("example.com/").is_err());
    }

    #[test]
    fn url_authority_defaults_the_port_and_host_header_omits_it() {
        let t = Target::from_url_authority(Scheme::Http, "example.com").unwrap();
        assert_eq!(t.port, 80);
        assert_eq!(t.host_header(), "example.com");
        let t = Target::from_url_authority(Scheme::Http, "example.com:8080").unwrap();
        assert_eq!(t.host_header(), "example.com:8080");
        let t = Target::from_url_authority(Scheme::Https, "[::1]:8443").unwrap();
        assert_eq!(t.host_header(), "[::1]:8443");
        // Every port's digits, against the formatter's.
        for port in [1, 9, 10, 80, 99, 100, 443, 1000, 8080, 10000, 65535] {
            for (scheme, host) in [(Scheme::Https, "h.test"), (Scheme::Http, "10.0.0.1")] {
                let t = Target::from_url_authority(scheme, &format!("{host}:{port}")).unwrap();
                let expected = if port == scheme.default_port() {
                    host.to_string()
                } else {
                    format!("{host}:{port}")
                };
                assert_eq!(t.host_header(), expected);
            }
        }
        let t = Target::from_url_authority(Scheme::Https, "[::1]").unwrap();
        assert_eq!(t.host_header(), "[::1]");
    }
}
