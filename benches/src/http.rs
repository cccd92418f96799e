//! The few HTTP/1.1 helpers the benchmarks' hand-written clients and origin need.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The end of the head (just past `\r\n\r\n`) in `buf`, once it is complete.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The `Content-Length` of a message head.
pub fn content_length(head: &[u8]) -> Option<usize> {
    header(head, "content-length").and_then(|v| v.parse().ok())
}

/// The value of header `name` (case-insensitive) in a message head, trimmed.
pub fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(head).ok()?;
    text.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// The status code of a response head (`HTTP/1.1 200 OK` → 200).
pub fn status_code(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// A complete response.
#[derive(Debug)]
pub struct Response {
    /// Its status code.
    pub status: u16,
    /// Its status line (`HTTP/1.1 200 OK`), for messages.
    pub status_line: String,
    /// Its body.
    pub body: Vec<u8>,
}

impl Response {
    /// Parses a whole response, as read from a connection the server closed after it: the
    /// body is `Content-Length` bytes, else chunked, else everything after the head.
    pub fn parse(bytes: &[u8]) -> io::Result<Response> {
        let end = find_head_end(bytes).ok_or_else(|| invalid("no complete response head"))?;
        let head = &bytes[..end];
        let rest = &bytes[end..];
        let body = if let Some(len) = content_length(head) {
            rest.get(..len)
                .ok_or_else(|| invalid("response body shorter than its Content-Length"))?
                .to_vec()
        } else if header(head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            dechunk(rest)?
        } else {
            rest.to_vec()
        };
        Response::from_head(head, body)
    }

    fn from_head(head: &[u8], body: Vec<u8>) -> io::Result<Response> {
        let status = status_code(head).ok_or_else(|| invalid("no status code"))?;
        let status_line = String::from_utf8_lossy(head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(Response {
            status,
            status_line,
            body,
        })
    }
}

/// Reads one response with a `Content-Length` from a keep-alive connection; `buf` keeps
/// whatever follows it.
pub async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Response> {
    let mut chunk = [0u8; 2048];
    let (head_end, body_len) = loop {
        if let Some(end) = find_head_end(buf) {
            let len = content_length(&buf[..end])
                .ok_or_else(|| invalid("response without Content-Length"))?;
            break (end, len);
        }
        match stream.read(&mut chunk).await? {
            0 => return Err(closed()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    while buf.len() < head_end + body_len {
        match stream.read(&mut chunk).await? {
            0 => return Err(closed()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + body_len].to_vec();
    let response = Response::from_head(&buf[..head_end], body);
    buf.drain(..head_end + body_len);
    response
}

/// A chunked body, decoded (trailers ignored).
fn dechunk(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk size"))?;
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| invalid("bad chunk size"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).ok_or_else(|| invalid("truncated chunk"))?);
        rest = rest
            .get(size + 2..)
            .ok_or_else(|| invalid("truncated chunk"))?;
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed before the response was complete",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_close_delimited_bodies() {
        let r = Response::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokxx").expect("ok");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        let r = Response::parse(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!((r.status, r.body.as_slice()), (201, &b"abc"[..]));
        let r = Response::parse(b"HTTP/1.1 404 Not Found\r\n\r\nnope").expect("close");
        assert_eq!(
            (r.status, r.status_line.as_str()),
            (404, "HTTP/1.1 404 Not Found")
        );
        assert_eq!(r.body, b"nope");
    }
}
