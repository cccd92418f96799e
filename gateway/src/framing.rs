//! Is this one well-framed request? Checked before anything else looks at it.
//!
//! A gateway and the origin behind it must agree where each request ends; where a head is
//! ambiguous, a request could hide inside another (request smuggling). pingora parses
//! leniently in places (a bare LF ends a line; `Content-Length` beside `Transfer-Encoding`
//! is resolved in favour of the latter; heads up to 1 MiB), so the gateway refuses what RFC
//! 9112 lets a server refuse, and closes the connection after answering:
//!
//! - `Content-Length` together with `Transfer-Encoding` (RFC 9112 §6.1) → 400;
//! - `Content-Length` given more than once, or as a list (`5, 5`), even of equal values:
//!   RFC 9110 §8.6 lets a recipient take such a list as one length, but an origin that reads
//!   it another way would see another request → 400;
//! - a line ended by a bare LF (§2.2) → 400;
//! - a request target over [`MAX_TARGET_BYTES`] → 414;
//! - a head over [`MAX_HEAD_BYTES`] or with more than [`MAX_HEADERS`] fields → 431.

use pingora::proxy::Session;

use crate::reply::Refusal;

/// Longest request target accepted (the URL as sent), in bytes.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// Largest request head accepted (request line and header fields), in bytes.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Most header fields accepted.
pub const MAX_HEADERS: usize = 100;

/// Refuses a request whose head is ambiguous or too large; the connection is not reused.
pub fn check(session: &mut Session) -> Result<(), Refusal> {
    let refusal = refusal(session);
    if refusal.is_some() {
        // Whatever follows on this connection cannot be trusted to start a request.
        session.set_keepalive(None);
    }
    refusal.map_or(Ok(()), Err)
}

fn refusal(session: &Session) -> Option<Refusal> {
    let req = session.req_header();
    if req.raw_path().len() > MAX_TARGET_BYTES {
        return Some(Refusal::new(
            414,
            "uri_too_long",
            format!("the request target is longer than {MAX_TARGET_BYTES} bytes"),
        ));
    }
    if req.headers.len() > MAX_HEADERS {
        return Some(too_large(format!("more than {MAX_HEADERS} header fields")));
    }
    // The head as sent (HTTP/1; HTTP/2 has its own framing).
    let raw = session.as_http1().map(|h1| h1.get_headers_raw_bytes());
    if let Some(raw) = &raw {
        if raw.len() > MAX_HEAD_BYTES {
            return Some(too_large(format!(
                "a head larger than {MAX_HEAD_BYTES} bytes"
            )));
        }
        if has_bare_lf(raw) {
            return Some(Refusal::bad_request(
                "a line of the request head ends in LF without CR",
            ));
        }
    }
    // pingora keeps Transfer-Encoding and drops a Content-Length sent beside it: only then is
    // the head as sent read again.
    let encoded = req.headers.contains_key(http::header::TRANSFER_ENCODING);
    let length = || {
        req.headers.contains_key(http::header::CONTENT_LENGTH)
            || raw
                .as_ref()
                .is_some_and(|raw| has_field(raw, "content-length"))
    };
    if encoded && length() {
        return Some(Refusal::bad_request(
            "the request has both Content-Length and Transfer-Encoding: its end is ambiguous",
        ));
    }
    let mut lengths = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let listed = lengths.next().is_some_and(|v| v.as_bytes().contains(&b','));
    let repeated = lengths.next().is_some()
        || raw
            .as_ref()
            .is_some_and(|raw| count_fields(raw, "content-length") > 1);
    if listed || repeated {
        return Some(Refusal::bad_request(
            "the request gives Content-Length more than once or as a list: send one length",
        ));
    }
    None
}

fn too_large(what: String) -> Refusal {
    Refusal::new(
        431,
        "request_header_fields_too_large",
        format!("the request has {what}"),
    )
}

/// Whether the raw head has a field named `name` (lower case).
fn has_field(head: &[u8], name: &str) -> bool {
    count_fields(head, name) > 0
}

/// How many fields named `name` (lower case) the raw head has.
fn count_fields(head: &[u8], name: &str) -> usize {
    head.split(|&b| b == b'\n')
        .skip(1)
        .filter(|line| {
            line.iter().position(|&b| b == b':').is_some_and(|colon| {
                line[..colon]
                    .trim_ascii()
                    .eq_ignore_ascii_case(name.as_bytes())
            })
        })
        .count()
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

    #[test]
    fn fields_are_found_by_name_in_any_case_but_not_in_the_request_line() {
        let head = b"POST /content-length: HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\ncontent-LENGTH : 5\r\n\r\n";
        assert!(has_field(head, "transfer-encoding"));
        assert!(has_field(head, "content-length"));
        assert!(!has_field(
            b"GET /x HTTP/1.1\r\ncontent-length: 1\r\n\r\n",
            "transfer-encoding"
        ));
        assert!(!has_field(
            b"GET /content-length: HTTP/1.1\r\n\r\n",
            "content-length"
        ));
        assert_eq!(
            count_fields(
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length:5\r\n\r\n",
                "content-length"
            ),
            2
        );
    }

    #[test]
    fn only_crlf_line_endings_pass() {
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\n"));
        assert!(has_bare_lf(b"\nGET / HTTP/1.1\r\n\r\n"));
    }
}
