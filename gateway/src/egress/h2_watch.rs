//! The frames of an HTTP/2 connection inside a tunnel, watched both ways: streams that
//! pingora's HTTP/2 layer refuses on its own are recorded, and floods of control frames are
//! cut off.
//!
//! # Refusals (frames written to the sandbox)
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
//!
//! # Control-frame floods (frames read from the sandbox)
//!
//! Each SETTINGS and PING frame obliges the server to answer (an acknowledgement), and the
//! h2 codec answers every one, however many come (CVE-2019-9512, -9515: millions a second,
//! at the cost of every other connection's latency). So each connection has a budget of
//! them — [`H2_CONTROL_FRAME_BURST`] at once, refilled at [`H2_CONTROL_FRAMES_PER_SEC`] — and
//! a client over it gets GOAWAY with `ENHANCE_YOUR_CALM`, as servers answered after the 2019
//! advisories, and the connection is closed. The GOAWAY is written between two frames of
//! the h2 codec's (never inside one); if the codec is in the middle of one just then, the
//! connection is closed without it.

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

/// Control frames (SETTINGS and PING, not counting acknowledgements) one connection may send
/// at once; the budget refills at [`H2_CONTROL_FRAMES_PER_SEC`].
pub const H2_CONTROL_FRAME_BURST: f64 = 1000.0;

/// How fast a connection's control-frame budget refills, per second.
pub const H2_CONTROL_FRAMES_PER_SEC: f64 = 100.0;

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The client's connection preface, before its first frame.
const PREFACE_LEN: usize = 24;

/// A frame once all of it has passed.
struct Seen<'a> {
    kind: u8,
    flags: u8,
    stream: u32,
    len: usize,
    /// Its first payload bytes (at most `KEPT`).
    kept: &'a [u8],
}

/// Follows the frames passing one way on one HTTP/2 connection, a byte at a time if need be.
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
    /// Takes the next bytes; calls `seen` for each frame they complete.
    fn feed(&mut self, mut bytes: &[u8], seen: &mut impl FnMut(Seen<'_>)) {
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
                        self.finish(seen);
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
                self.finish(seen);
            }
        }
    }

    /// Whether the bytes so far end with a whole frame (none is half-way through).
    fn between_frames(&self) -> bool {
        self.head_len == 0
    }

    /// The current frame is complete.
    fn finish(&mut self, seen: &mut impl FnMut(Seen<'_>)) {
        let h = self.head;
        seen(Seen {
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
            len: (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]),
            kept: &self.kept,
        });
        self.head_len = 0;
    }
}

/// The refusal a frame written to the sandbox is, if it is one.
fn refusal(frame: &Seen<'_>) -> Option<RefusedStream> {
    let ends = END_STREAM | END_HEADERS;
    match frame.kind {
        HEADERS
            if frame.len == 1
                && frame.flags & ends == ends
                && frame.flags & (PADDED | PRIORITY) == 0
                && frame.kept == [STATUS_400] =>
        {
            Some(RefusedStream::BadRequest(frame.stream))
        }
        RST_STREAM if frame.len == 4 && frame.kept == PROTOCOL_ERROR => {
            Some(RefusedStream::Reset(frame.stream))
        }
        _ => None,
    }
}

/// What the sandbox sends on the connection, as far as floods go.
#[derive(Debug)]
struct Incoming {
    /// Preface bytes still to come.
    preface_left: usize,
    frames: Frames,
    /// Control frames it may still send now, and when that was last worked out.
    budget: f64,
    budget_at: std::time::Instant,
    /// The highest stream the client opened (for the GOAWAY).
    last_stream: u32,
    flooded: bool,
}

impl Incoming {
    fn new() -> Self {
        Incoming {
            preface_left: PREFACE_LEN,
            frames: Frames::default(),
            budget: H2_CONTROL_FRAME_BURST,
            budget_at: std::time::Instant::now(),
            last_stream: 0,
            flooded: false,
        }
    }

    /// Takes bytes read from the sandbox; returns whether they put it over its budget.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let skip = self.preface_left.min(bytes.len());
        self.preface_left -= skip;
        let Incoming {
            frames,
            budget,
            budget_at,
            last_stream,
            flooded,
            ..
        } = self;
        frames.feed(&bytes[skip..], &mut |frame| match frame.kind {
            // Past the flood nothing counts: the codec never sees these frames.
            _ if *flooded => {}
            SETTINGS | PING if frame.flags & ACK == 0 => {
                if *budget < 1.0 {
                    let now = std::time::Instant::now();
                    let refill =
                        now.duration_since(*budget_at).as_secs_f64() * H2_CONTROL_FRAMES_PER_SEC;
                    *budget = (*budget + refill).min(H2_CONTROL_FRAME_BURST);
                    *budget_at = now;
                }
                if *budget < 1.0 {
                    *flooded = true;
                } else {
                    *budget -= 1.0;
                }
            }
            HEADERS if frame.stream % 2 == 1 => *last_stream = (*last_stream).max(frame.stream),
            _ => {}
        });
        self.flooded
    }

    /// GOAWAY `ENHANCE_YOUR_CALM`, naming the last stream the client opened.
    fn goaway(&self) -> Vec<u8> {
        let mut frame = vec![0, 0, 8, GOAWAY, 0, 0, 0, 0, 0];
        frame.extend_from_slice(&self.last_stream.to_be_bytes());
        frame.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        frame
    }
}

/// The decrypted stream of an HTTP/2 tunnel, watched for streams the HTTP/2 layer refuses
/// and for floods of control frames.
pub struct H2Watch {
    inner: Stream,
    /// Frames written to the sandbox.
    frames: Frames,
    refused: Arc<dyn Fn(RefusedStream) + Send + Sync>,
    incoming: Incoming,
    /// Once a flood is seen: the GOAWAY still to write (and how much of it is written);
    /// the codec reads the end of the stream from then on.
    goaway: Option<(Vec<u8>, usize)>,
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
            incoming: Incoming::new(),
            goaway: None,
        })
    }

    fn written(&mut self, bufs: &[&[u8]], mut n: usize) {
        let refused = &self.refused;
        let mut seen = |frame: Seen<'_>| {
            if let Some(stream) = refusal(&frame) {
                refused(stream)
            }
        };
        for buf in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(buf.len());
            self.frames.feed(&buf[..take], &mut seen);
            n -= take;
        }
    }

    /// Writes what is left of the GOAWAY, if one is due, and flushes it.
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Some((frame, written)) = &mut self.goaway else {
            return Poll::Ready(Ok(()));
        };
        while *written < frame.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &frame[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

impl AsyncRead for H2Watch {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.incoming.flooded {
            let before = buf.filled().len();
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            if !matches!(polled, Poll::Ready(Ok(())))
                || !this.incoming.feed(&buf.filled()[before..])
            {
                return polled;
            }
            // Over budget: nothing more of this connection is read.
            buf.set_filled(before);
            tracing::warn!(
                "HTTP/2 control frame flood (SETTINGS or PING) inside a tunnel; connection \
                 closed with GOAWAY ENHANCE_YOUR_CALM"
            );
            if this.frames.between_frames() {
                this.goaway = Some((this.incoming.goaway(), 0));
            }
        }
        // The codec sees the connection end once the GOAWAY is out (or could not be sent).
        match this.poll_goaway(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for H2Watch {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // A GOAWAY the watch owes the client goes first, whole.
        std::task::ready!(self.poll_goaway(cx))?;
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written(&[buf], n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_goaway(cx))?;
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
        std::task::ready!(self.poll_goaway(cx))?;
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

crate::egress::wrapped_stream::delegate_stream_interface!(H2Watch, inner);

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
            frames.feed(part, &mut |frame| found.extend(refusal(&frame)));
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

    #[test]
    fn control_frames_past_the_budget_are_a_flood_and_acknowledgements_do_not_count() {
        let mut incoming = Incoming::new();
        let mut sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        sent.extend(frame(SETTINGS, 0, 0, &[]));
        sent.extend(frame(HEADERS, END_HEADERS, 5, &[0x82]));
        assert!(!incoming.feed(&sent));
        // Acknowledgements and other frames are free.
        let acks = [frame(SETTINGS, ACK, 0, &[]), frame(PING, ACK, 0, &[0; 8])].concat();
        for _ in 0..5_000 {
            assert!(!incoming.feed(&acks));
        }
        let ping = frame(PING, 0, 0, &[1; 8]);
        // The first (burst - 1) pings, a byte at a time, pass; then the budget is spent.
        for _ in 1..H2_CONTROL_FRAME_BURST as usize {
            for byte in &ping {
                assert!(!incoming.feed(std::slice::from_ref(byte)));
            }
        }
        assert!(incoming.feed(&ping.repeat(10)), "over the budget");
        assert_eq!(
            incoming.goaway(),
            frame(GOAWAY, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0xb]),
            "GOAWAY ENHANCE_YOUR_CALM after stream 5"
        );
    }

    #[test]
    fn the_budget_refills_with_time() {
        let mut incoming = Incoming::new();
        assert!(!incoming.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        let ping = frame(PING, 0, 0, &[1; 8]);
        assert!(!incoming.feed(&ping.repeat(H2_CONTROL_FRAME_BURST as usize)));
        // A tenth of a second refills about ten.
        incoming.budget_at -= std::time::Duration::from_millis(100);
        assert!(!incoming.feed(&ping.repeat(5)));
    }
}
