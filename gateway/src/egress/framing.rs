//! Is this one well-framed request head? Checked on the bytes as sent, before pingora parses
//! them (`head` reads them).
//!
//! A gateway and the origin behind it must agree where each request ends; where a head is
//! ambiguous, a request could hide inside another (request smuggling). pingora parses
//! leniently in places (a bare LF ends a line; `Content-Length` beside `Transfer-Encoding`
//! is resolved in favour of the latter; equal `Content-Length`s are merged; heads up to
//! 1 MiB), and refuses other heads with an empty 400 that nothing records. So the gateway
//! refuses, itself and with a reason, what RFC 9112 lets a server refuse and everything pingora
//! would refuse, and closes the connection after answering:
//!
//! - a request target over [`MAX_TARGET_BYTES`] → 414;
//! - a head over [`MAX_HEAD_BYTES`] or with more than [`MAX_HEADERS`] fields → 431;
//! - a head httparse cannot parse (obs-fold, a space before a colon, a control character in a
//!   field, …) → 400;
//! - a line ended by a bare LF (§2.2) → 400;
//! - `Content-Length` together with `Transfer-Encoding` (§6.1), given more than once or as a
//!   list (`5, 5`, even of equal values), or not a number → 400;
//! - `Transfer-Encoding` on HTTP/1.0, or whose last coding is not `chunked` (§6.3) → 400;
//! - a `Host` that names another authority than an absolute request target, more than one
//!   `Host`, or user information in either (pingora's own authority check) → 400;
//! - `CONNECT` anywhere but as the first request on a connection to the proxy → 405.

use pingora::http::RequestHeader;
use pingora::protocols::http::authority::{
    is_http_family_scheme, raw_target_authority, RawTargetAuthority,
};

use crate::reply::{ErrorCode, Refusal};

/// How the body of a request ends, as its head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// No body (neither `Content-Length` nor `Transfer-Encoding`).
    Empty,
    /// After this many bytes.
    Length(u64),
    /// At the last chunk and its trailer section.
    Chunked,
    /// Never: the connection may be upgraded, and then carries another protocol.
    Open,
}

/// Longest request target accepted (the URL as sent), in bytes.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// Largest request head accepted (request line and header fields), in bytes.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Most header fields accepted.
pub const MAX_HEADERS: usize = 100;

/// The request line of a head that was parsed, for the record of a refusal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestLine {
    /// The method as sent.
    pub method: String,
    /// The request target as sent (at most [`MAX_TARGET_BYTES`] of it).
    pub target: String,
}

/// A head that cannot be taken: the answer, and its request line as far as it could be read.
#[derive(Debug)]
pub struct Unframed {
    /// The answer to the client.
    pub refusal: Refusal,
    /// The request line.
    pub line: RequestLine,
}

/// A complete, well-framed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Its length in bytes, blank line included.
    pub len: usize,
    /// Where the request's body ends.
    pub body: BodyEnd,
    /// Its method and target.
    pub line: RequestLine,
}

/// How far a head in `buf` has arrived: the head once complete and well framed; `Ok(None)`
/// while more is needed; why it cannot be taken.
pub fn check_head(buf: &[u8]) -> Result<Option<Head>, Box<Unframed>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = request.parse(buf);
    let line = RequestLine {
        method: request.method.unwrap_or_default().to_string(),
        target: request
            .path
            .map(|path| path[..path.floor_char_boundary(MAX_TARGET_BYTES)].to_string())
            .unwrap_or_default(),
    };
    let refuse = |refusal: Refusal, line: RequestLine| Err(Box::new(Unframed { refusal, line }));
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return refuse(
                too_large(format!("a head larger than {MAX_HEAD_BYTES} bytes")),
                line,
            )
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return refuse(
                too_large(format!("more than {MAX_HEADERS} header fields")),
                line,
            )
        }
        Err(e) => {
            return refuse(
                Refusal::bad_request(format!("the request head is not valid HTTP/1.1: {e}")),
                line,
            )
        }
    };
    match refusal(&request, &buf[..len]) {
        Some(refusal) => refuse(refusal, line),
        None => Ok(Some(Head {
            len,
            body: body_end(&request),
            line,
        })),
    }
}

/// Where the body of a request whose framing [`refusal`] accepted ends.
fn body_end(req: &httparse::Request<'_, '_>) -> BodyEnd {
    let mut end = BodyEnd::Empty;
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("upgrade") {
            return BodyEnd::Open;
        }
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            end = BodyEnd::Chunked;
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            end = match std::str::from_utf8(header.value).map(str::parse::<u64>) {
                Ok(Ok(0)) => BodyEnd::Empty,
                Ok(Ok(n)) => BodyEnd::Length(n),
                // Refused before this is asked.
                _ => BodyEnd::Open,
            };
        }
    }
    end
}

fn refusal(req: &httparse::Request<'_, '_>, head: &[u8]) -> Option<Refusal> {
    let target = req.path.unwrap_or_default();
    if target.len() > MAX_TARGET_BYTES {
        return Some(Refusal::new(
            ErrorCode::UriTooLong,
            format!("the request target is longer than {MAX_TARGET_BYTES} bytes"),
        ));
    }
    if head.len() > MAX_HEAD_BYTES {
        return Some(too_large(format!(
            "a head larger than {MAX_HEAD_BYTES} bytes"
        )));
    }
    if has_bare_lf(head) {
        return Some(Refusal::bad_request(
            "a line of the request head ends in LF without CR",
        ));
    }
    if req.method == Some("CONNECT") {
        return Some(Refusal::new(
            ErrorCode::MethodNotAllowed,
            "CONNECT opens a tunnel only as the first request on a connection to the proxy, \
             never inside one",
        ));
    }
    let values = |name: &'static str| -> Vec<&[u8]> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    let lengths = values("content-length");
    let codings = values("transfer-encoding");
    if !lengths.is_empty() && !codings.is_empty() {
        return Some(Refusal::bad_request(
            "the request has both Content-Length and Transfer-Encoding: its end is ambiguous",
        ));
    }
    match lengths.as_slice() {
        [] => {}
        [one]
            if std::str::from_utf8(one).is_ok_and(|n| {
                n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u64>().is_ok()
            }) => {}
        [one] if one.contains(&b',') => {
            return Some(Refusal::bad_request(
                "the request gives Content-Length as a list: send one length",
            ))
        }
        [_] => return Some(Refusal::bad_request("the Content-Length is not a number")),
        _ => {
            return Some(Refusal::bad_request(
                "the request gives Content-Length more than once: send one length",
            ))
        }
    }
    if !codings.is_empty() {
        if req.version == Some(0) {
            return Some(Refusal::bad_request(
                "an HTTP/1.0 request cannot use Transfer-Encoding",
            ));
        }
        let last = codings
            .last()
            .and_then(|v| v.rsplit(|&b| b == b',').next())
            .map(<[u8]>::trim_ascii)
            .unwrap_or_default();
        if !last.eq_ignore_ascii_case(b"chunked") {
            return Some(Refusal::bad_request(
                "the request's last Transfer-Encoding is not chunked: its end is ambiguous",
            ));
        }
    }
    authority_refusal(req, target)
}

/// pingora's own rules for the `Host` header and an absolute request target (RFC 9112
/// §3.2.2), with pingora's own classification of the target, so that a request pingora would
/// refuse is refused here first, with a reason: one `Host`, no user information in it or in the
/// target, a target whose authority parses one way only, and a `Host` that names it exactly.
fn authority_refusal(req: &httparse::Request<'_, '_>, target: &str) -> Option<Refusal> {
    let refuse = |why: &str| {
        Some(Refusal::bad_request(format!(
            "{why}: the Host header and the request's URL must name the same origin, once"
        )))
    };
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value);
    let host = hosts.next();
    if hosts.next().is_some() {
        return refuse("more than one Host header field");
    }
    if host.is_some_and(|h| h.contains(&b'@')) {
        return refuse("userinfo in the Host header");
    }
    match raw_target_authority(target.as_bytes()) {
        RawTargetAuthority::None => None,
        RawTargetAuthority::AmbiguousAuthority => refuse("an ambiguous absolute request target"),
        RawTargetAuthority::Absolute {
            scheme, authority, ..
        } => {
            if authority.contains(&b'@') {
                return refuse("userinfo in the request target");
            }
            if is_http_family_scheme(scheme) && http::uri::Authority::try_from(authority).is_err() {
                return refuse("an authority in the request target that does not parse");
            }
            if host.is_some_and(|h| h != authority) {
                return refuse("the Host header differs from the request target's authority");
            }
            None
        }
    }
}

/// The same bounds for a request whose head HTTP/2 framed (and so never passed through
/// [`check_head`]): its target length and its number of header fields.
pub fn check_decoded(req: &RequestHeader) -> Result<(), Refusal> {
    if req.raw_path().len() > MAX_TARGET_BYTES {
        return Err(Refusal::new(
            ErrorCode::UriTooLong,
            format!("the request target is longer than {MAX_TARGET_BYTES} bytes"),
        ));
    }
    if req.headers.len() > MAX_HEADERS {
        return Err(too_large(format!("more than {MAX_HEADERS} header fields")));
    }
    Ok(())
}

fn too_large(what: String) -> Refusal {
    Refusal::new(
        ErrorCode::RequestHeaderFieldsTooLarge,
        format!("the request has {what}"),
    )
}

/// Whether any LF in `head` is not preceded by CR.
pub fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(head: &str) -> Refusal {
        check_head(head.as_bytes()).expect_err(head).refusal
    }

    #[test]
    fn only_crlf_line_endings_pass() {
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\n"));
        assert!(has_bare_lf(b"\nGET / HTTP/1.1\r\n\r\n"));
    }

    #[test]
    fn a_well_framed_head_passes_and_says_where_it_and_its_body_end() {
        let head =
            "POST http://a.test/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello";
        let checked = check_head(head.as_bytes()).unwrap().unwrap();
        assert_eq!(checked.len, head.len() - 5);
        assert_eq!(checked.body, BodyEnd::Length(5));
        let body_of = |extra: &str| {
            let head = format!("POST http://a.test/x HTTP/1.1\r\nHost: a.test\r\n{extra}\r\n");
            check_head(head.as_bytes()).unwrap().unwrap().body
        };
        assert_eq!(body_of(""), BodyEnd::Empty);
        assert_eq!(body_of("Content-Length: 0\r\n"), BodyEnd::Empty);
        assert_eq!(body_of("Transfer-Encoding: chunked\r\n"), BodyEnd::Chunked);
        assert_eq!(
            body_of("Upgrade: websocket\r\nConnection: upgrade\r\n"),
            BodyEnd::Open
        );
        let line = check_head(b"POST http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n")
            .expect_err("another host")
            .line;
        assert_eq!(
            (line.method.as_str(), line.target.as_str()),
            ("POST", "http://a.test/x")
        );
        assert!(check_head(b"GET http://a.test/ HTTP/1.1\r\nHost: a.te")
            .unwrap()
            .is_none());
        let chunked =
            "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert!(check_head(chunked.as_bytes()).unwrap().is_some());
    }

    #[test]
    fn ambiguous_lengths_and_codings_are_refused() {
        for head in [
            "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5, 5\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: +5\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST http://a.test/ HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(refused(head).status, 400, "{head:?}");
        }
    }

    #[test]
    fn what_pingora_would_refuse_is_refused_with_a_reason() {
        for (head, why) in [
            (
                "GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n",
                "Host",
            ),
            (
                "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
                "Host",
            ),
            (
                "GET http://u@a.test/ HTTP/1.1\r\nHost: u@a.test\r\n\r\n",
                "userinfo",
            ),
            (
                "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX-A: a\0b\r\n\r\n",
                "not valid",
            ),
            (
                "GET http://a.test/ HTTP/1.1\r\nHost : a.test\r\n\r\n",
                "not valid",
            ),
        ] {
            let refusal = refused(head);
            assert_eq!(refusal.status, 400, "{head:?}");
            assert!(refusal.detail.contains(why), "{head:?}: {}", refusal.detail);
        }
        assert_eq!(
            refused("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n").status,
            405
        );
    }

    #[test]
    fn oversized_heads_are_refused() {
        let long_target = format!(
            "GET http://a.test/{} HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "a".repeat(MAX_TARGET_BYTES)
        );
        assert_eq!(refused(&long_target).status, 414);
        // Its record keeps the target's first MAX_TARGET_BYTES bytes.
        let line = check_head(long_target.as_bytes()).expect_err("414").line;
        assert_eq!(line.method, "GET");
        assert_eq!(line.target.len(), MAX_TARGET_BYTES);
        assert!(long_target.contains(&line.target));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let head = format!("GET http://a.test/ HTTP/1.1\r\n{many}\r\n");
        assert_eq!(refused(&head).status, 431);
        let partial = format!(
            "GET http://a.test/ HTTP/1.1\r\nX: {}",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(refused(&partial).status, 431);
    }
}
