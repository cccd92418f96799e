//! One HTTP/1.1 exchange per connection between the sandbox service and the guest agent: the
//! request read whole (head and `Content-Length` body, both bounded), the answer written with
//! its length, and the connection closed. The service is the only client, so nothing more of
//! HTTP is needed here.

use std::io::{Read, Write};

/// Largest request head accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A request as the agent needs it.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `PUT`, `POST`, …
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string, undecoded (empty without one).
    pub query: String,
    /// Header fields, names lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The whole body, read before the request is handled (`Content-Length` bytes).
    pub body: Vec<u8>,
}

impl Request {
    /// The value of header `name` (lower-case), if sent.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The decoded value of query parameter `name`, if present.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then(|| {
                let value = value.replace('+', " ");
                percent_encoding::percent_decode_str(&value)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
    }
}

/// Why a request could not be read; the answer to give, if the connection still takes one.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection closed or failed before a whole request came.
    #[error("the connection ended before a whole request: {0}")]
    Io(#[from] std::io::Error),
    /// Not a request this agent takes: answered with this status.
    #[error("{1}")]
    Bad(u16, String),
    /// Its head lacks what `admit` wants (the secret): answered 401, its body never read.
    #[error("not admitted")]
    Unauthorized,
}

/// Reads one request, its body at most `max_body` bytes — once `admit` accepted its header
/// fields: a client without the secret gets nothing read or held beyond the head.
pub fn read_request(
    stream: &mut impl Read,
    max_body: usize,
    admit: impl FnOnce(&[(String, Vec<u8>)]) -> bool,
) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_len, method, target, headers) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut fields);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let headers: Vec<(String, Vec<u8>)> = parsed
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                    .collect();
                break (
                    len,
                    parsed.method.unwrap_or_default().to_string(),
                    parsed.path.unwrap_or_default().to_string(),
                    headers,
                );
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) => {
                return Err(ReadError::Bad(431, "the request head is too large".into()))
            }
            Err(e) => return Err(ReadError::Bad(400, format!("not an HTTP request: {e}"))),
        }
    };
    if !admit(&headers) {
        return Err(ReadError::Unauthorized);
    }
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(ReadError::Bad(
            411,
            "send the body with a Content-Length".into(),
        ));
    }
    let length = match headers.iter().find(|(n, _)| n == "content-length") {
        None => 0,
        Some((_, v)) => std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| ReadError::Bad(400, "the Content-Length is not a number".into()))?,
    };
    if length > max_body {
        return Err(ReadError::Bad(
            413,
            format!("the body is larger than {max_body} bytes"),
        ));
    }
    let mut body = buf.split_off(head_len);
    if body.len() > length {
        return Err(ReadError::Bad(
            400,
            "more bytes than the Content-Length".into(),
        ));
    }
    let mut rest = vec![0u8; length - body.len()];
    stream.read_exact(&mut rest)?;
    body.extend_from_slice(&rest);
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_string(), query.to_string()),
        None => (target, String::new()),
    };
    Ok(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

/// Writes an answer with `body` and closes the exchange (`Connection: close`).
pub fn write_response(
    stream: &mut impl Write,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// Writes `{"error": code, "detail": detail}` with `status`.
pub fn write_error(
    stream: &mut impl Write,
    status: u16,
    code: &str,
    detail: &str,
) -> std::io::Result<()> {
    let body = serde_json::json!({ "error": code, "detail": detail }).to_string();
    write_response(stream, status, "application/json", body.as_bytes())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_read_whole_and_bounded() {
        let raw =
            b"PUT /files?path=a%20b%2Fc HTTP/1.1\r\nX-Secret: s\r\nContent-Length: 5\r\n\r\nhello";
        let req = read_request(&mut &raw[..], 10, |_| true).unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("PUT", "/files"));
        assert_eq!(req.query_param("path").as_deref(), Some("a b/c"));
        assert_eq!(req.header("x-secret"), Some(&b"s"[..]));
        assert_eq!(req.body, b"hello");
        assert!(matches!(
            read_request(&mut &raw[..], 4, |_| true),
            Err(ReadError::Bad(413, _))
        ));
        // Not admitted: refused from the head alone, before any of the (huge) body is read.
        let huge = b"PUT /files HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n";
        let mut admitted_headers = 0;
        assert!(matches!(
            read_request(&mut &huge[..], usize::MAX, |h| {
                admitted_headers = h.len();
                false
            }),
            Err(ReadError::Unauthorized)
        ));
        assert_eq!(admitted_headers, 1);
        let chunked = b"POST /exec HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(
            read_request(&mut &chunked[..], 10, |_| true),
            Err(ReadError::Bad(411, _))
        ));
    }
}
