//! HTTP/2 streams that pingora's HTTP/2 layer refuses on its own, recorded.
//!
//! Inside an intercepted tunnel speaking HTTP/2, pingora checks each new stream before any
//! phase of the proxy sees it, and refuses a malformed one itself: a `Host` that disagrees
//! with `:authority` (or no authority at all) gets a 400 without a body; conflicting lengths
//! or a forbidden byte in the path get the stream reset (`PROTOCOL_ERROR`), as does a stream
//! the h2 codec finds malformed. Nothing is forwarded, but nothing would be recorded either,
//! and pingora 0.9 offers no hook there. So the gateway watches the frames the HTTP/2 layer
//! writes to the sandbox — only watches: no byte is changed or held back — and records each
//! such refusal as a request of the tunnel's agent (log line, metrics, span, audit record).
//! It has no method or path: those are in the refused stream's header block, which the
//! gateway does not decode. (The 400 still has no body: changing the frames would mean
//! taking over HTTP/2 flow control from pingora.)
//!
//! Recognised, on the write side only:
//! - HEADERS with END_STREAM and END_HEADERS whose whole block is `0x8c` — `:status: 400`,
//!   HPACK static entry 12, and nothing else: pingora's refusal. Every other answer carries
//!   more (the gateway's own refusals a content type and length; relayed ones at least their
//!   length when they end with their header).
//! - RST_STREAM with `PROTOCOL_ERROR` (the gateway itself resets streams only with other
//!   codes: `REFUSED_STREAM` over the stream limit, `CANCEL`, `INTERNAL_ERROR`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use pingora::protocols::{Peek, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream the HTTP/2 layer refused by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedStream {
    /// Answered 400 without a body (its authority was missing or ambiguous).
    BadRequest(u32),
    /// Reset with `PROTOCOL_ERROR` (malformed framing or header block).
    Reset(u32),
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const PROTOCOL_ERROR: [u8; 4] = [0, 0, 0, 1];
/// `:status: 400`, indexed from the HPACK static table.
const STATUS_400: u8 = 0x8c;
/// The most payload bytes a recognised frame has.
const KEPT: usize = 4;

/// Follows the frames written on one HTTP/2 connection, a byte at a time if need be.
#[derive(Debug, Default)]
struct Frames {
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame not yet seen.
    left: usize,
    /// The current frame's first payload bytes (a recognised frame has at most `KEPT`).
    kept: Vec<u8>,
}

impl Frames {
    /// Takes the next written bytes; calls `found` for each refusal they complete.
    fn feed(&mut self, mut bytes: &[u8], found: &mut impl FnMut(RefusedStream)) {
        while !bytes.is_empty() {
            if self.head_len < self.head.len() {
                let take = (self.head.len() - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
                self.head_len += take;
                bytes = &bytes[take..];
                if self.head_len == self.head.len() {
                    let h = self.head;
                    self.left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    self.kept.clear();
                    if self.left == 0 {
                        self.finish(found);
                    }
                }
                continue;
            }
            let take = self.left.min(bytes.len());
            let room = KEPT.saturating_sub(self.kept.len()).min(take);
            self.kept.extend_from_slice(&bytes[..room]);
            self.left -= take;
            bytes = &bytes[take..];
            if self.left == 0 {
                self.finish(found);
            }
        }
    }

    /// The current frame is complete.
    fn finish(&mut self, found: &mut impl FnMut(RefusedStream)) {
        let h = self.head;
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let ends = END_STREAM | END_HEADERS;
        match kind {
            HEADERS
                if len == 1
                    && flags & ends == ends
                    && flags & (PADDED | PRIORITY) == 0
                    && self.kept == [STATUS_400] =>
            {
                found(RefusedStream::BadRequest(stream))
            }
            RST_STREAM if len == 4 && self.kept == PROTOCOL_ERROR => {
                found(RefusedStream::Reset(stream))
            }
            _ => {}
        }
        self.head_len = 0;
    }
}

/// The decrypted stream of an HTTP/2 tunnel, watched for streams the HTTP/2 layer refuses.
pub struct H2Watch {
    inner: Stream,
    frames: Frames,
    refused: Arc<dyn Fn(RefusedStream) + Send + Sync>,
}

impl std::fmt::Debug for H2Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Watch")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl H2Watch {
    /// Wraps `inner`; `refused` is told of each refusal once its frame is written.
    pub fn wrap(inner: Stream, refused: Arc<dyn Fn(RefusedStream) + Send + Sync>) -> Stream {
        Box::new(H2Watch {
            inner,
            frames: Frames::default(),
            refused,
        })
    }

    fn written(&mut self, bufs: &[&[u8]], mut n: usize) {
        let refused = &self.refused;
        let mut found = |stream| refused(stream);
        for buf in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(buf.len());
            self.frames.feed(&buf[..take], &mut found);
            n -= take;
        }
    }
}

impl AsyncRead for H2Watch {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for H2Watch {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written(&[buf], n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            let slices: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
            self.written(&slices, n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

crate::wrapped_stream::delegate_stream_interface!(H2Watch, inner);

#[async_trait]
impl Peek for H2Watch {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn found_in(bytes: &[u8], chunk: usize) -> Vec<RefusedStream> {
        let mut frames = Frames::default();
        let mut found = Vec::new();
        for part in bytes.chunks(chunk) {
            frames.feed(part, &mut |r| found.push(r));
        }
        found
    }

    #[test]
    fn refusals_are_recognised_however_the_frames_are_split() {
        let mut written = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]); // SETTINGS
        written.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &[STATUS_400]));
        written.extend(frame(0x0, 0, 3, &[b'x'; 300])); // DATA
        written.extend(frame(RST_STREAM, 0, 5, &PROTOCOL_ERROR));
        written.extend(frame(RST_STREAM, 0, 7, &[0, 0, 0, 7])); // REFUSED_STREAM
        written.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            9,
            &[STATUS_400, 0x5f, 1, b'0'],
        ));
        written.extend(frame(HEADERS, END_HEADERS, 11, &[STATUS_400]));
        written.extend(frame(HEADERS, END_STREAM | END_HEADERS, 13, &[0x88])); // 200
        for chunk in [1, 2, 7, 9, 10, 64, 1 << 20] {
            assert_eq!(
                found_in(&written, chunk),
                [RefusedStream::BadRequest(1), RefusedStream::Reset(5)],
                "written {chunk} bytes at a time"
            );
        }
    }
}
