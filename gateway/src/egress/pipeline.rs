//! HTTP/1 pipelining: a client may send its next request before it has the answer to the
//! last one (RFC 9112 §9.3.2), and must get the answers in order.
//!
//! pingora, with its own pipelining off, fails the request being served when bytes of the
//! next one arrive during it ("sent data after end of body") and drops bytes that came with
//! the head; with its pipelining on, it would parse the next head itself, past the gateway's
//! head check (`head`). So the gateway keeps pingora to one request at a time: while a
//! request is served, the connection — as pingora reads it — ends where that request's body
//! ends (by its `Content-Length`, or its chunked framing). Bytes after it are kept back here,
//! and become the start of the next head, which is read and checked like any other once the
//! answer has been written. A client closing its side still shows as the end of the stream,
//! so a held request still notices a client that went away.
//!
//! A request that asks for an upgrade, and a chunked body the gateway cannot follow, are
//! passed through untouched: pingora then sees any further bytes and closes the connection
//! after its answer (the client retries, as RFC 9112 allows).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::BytesMut;
use parking_lot::Mutex;
use pingora::protocols::{Peek, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::egress::framing::{BodyEnd, MAX_HEAD_BYTES};

/// Most bytes of following requests kept back while one is served; past this, the rest is
/// dropped and the connection closed after the answer (the client sends them again, as
/// RFC 9112 §9.3.2 expects of a client whose connection closes).
pub const MAX_HELD_BYTES: usize = MAX_HEAD_BYTES;

/// Where the connection is, as pingora reads it.
#[derive(Debug)]
enum Phase {
    /// Between requests, or after an upgrade: every byte passes.
    Open,
    /// A request's body: this much of it may still pass.
    Body(Remaining),
    /// The request's bytes have all passed: what arrives now is held for the next head.
    Ended,
}

#[derive(Debug)]
enum Remaining {
    Length(u64),
    Chunked(ChunkedEnd),
}

#[derive(Debug)]
struct State {
    phase: Phase,
    held: BytesMut,
    /// Whether any byte of an answer was written since the request began being served.
    answered: bool,
    /// The connection, handed back when the [`Pipeline`] is dropped by a panic.
    orphan: Option<Stream>,
    /// More was sent ahead than is kept: the connection ends after the current answer.
    overflowed: bool,
}

/// The connection, as pingora reads it: ends where the request being served ends.
pub struct Pipeline {
    inner: Stream,
    state: Arc<Mutex<State>>,
}

/// The gateway's side of a [`Pipeline`]: says where each request ends, and takes back the
/// bytes that followed it.
#[derive(Debug, Clone)]
pub struct PipelineControl {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Wraps a connection; it passes every byte until told that a request is served.
    pub fn wrap(inner: Stream) -> (Stream, PipelineControl) {
        let state = Arc::new(Mutex::new(State {
            phase: Phase::Open,
            held: BytesMut::new(),
            answered: false,
            orphan: None,
            overflowed: false,
        }));
        let control = PipelineControl {
            state: state.clone(),
        };
        (Box::new(Pipeline { inner, state }), control)
    }
}

impl PipelineControl {
    /// The bytes of following requests read so far (the start of the next head); the
    /// connection passes every byte again. `None` when more was sent ahead than is kept:
    /// the connection is to be closed.
    pub fn next_head(&self) -> Option<BytesMut> {
        let mut state = self.state.lock();
        state.phase = Phase::Open;
        (!state.overflowed).then(|| std::mem::take(&mut state.held))
    }

    /// Lets go of the read buffer that the bytes held back share with the request's own:
    /// for a connection that waits long (a request parked for approval), only those bytes
    /// stay (between ordinary requests the buffer is reused for the next head).
    pub fn shrink_held(&self) {
        let mut state = self.state.lock();
        state.held = BytesMut::from(&state.held[..]);
    }

    /// Whether the request being served has had all its bytes read (what arrives now is
    /// held for the next head).
    pub fn request_ended(&self) -> bool {
        matches!(self.state.lock().phase, Phase::Ended)
    }

    /// Starts serving the request whose head is `buf[..head_len]` and whose body ends as
    /// `end` says: returns the request's bytes in `buf` (head and body so far); the rest of
    /// `buf` is held back, after bytes still held (those sent while a parked request waited,
    /// which follow it), and the connection ends with the request's body.
    pub fn serve(&self, mut buf: BytesMut, head_len: usize, end: BodyEnd) -> BytesMut {
        let mut state = self.state.lock();
        let after_head = &buf[head_len..];
        let (phase, taken) = match end {
            BodyEnd::Open => (Phase::Open, after_head.len()),
            BodyEnd::Empty => (Phase::Ended, 0),
            BodyEnd::Length(n) => {
                let taken = usize::try_from(n)
                    .unwrap_or(usize::MAX)
                    .min(after_head.len());
                match n - taken as u64 {
                    0 => (Phase::Ended, taken),
                    left => (Phase::Body(Remaining::Length(left)), taken),
                }
            }
            BodyEnd::Chunked => {
                let mut chunked = ChunkedEnd::default();
                match chunked.feed(after_head) {
                    Fed::EndsAfter(n) => (Phase::Ended, n),
                    Fed::Continues => (Phase::Body(Remaining::Chunked(chunked)), after_head.len()),
                    Fed::Unreadable => (Phase::Open, after_head.len()),
                }
            }
        };
        let rest = buf.split_off(head_len + taken);
        if state.held.is_empty() {
            state.held = rest;
        } else {
            state.held.extend_from_slice(&rest);
        }
        state.phase = phase;
        state.answered = false;
        buf
    }

    /// After a panic dropped the connection's [`Pipeline`] while a request was served: the
    /// connection, if nothing of an answer was written on it yet (so an answer can be).
    pub fn unanswered_after_panic(&self) -> Option<Stream> {
        let mut state = self.state.lock();
        let orphan = state.orphan.take();
        orphan.filter(|_| !state.answered)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Only while a panic unwinds: the connection goes back to the gateway's side, to be
        // answered 502 (`head`). Otherwise it closes with this.
        if std::thread::panicking() {
            let (placeholder, _) = tokio::io::duplex(1);
            let connection = std::mem::replace(&mut self.inner, Box::new(placeholder));
            self.state.lock().orphan = Some(connection);
        }
    }
}

impl AsyncRead for Pipeline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let mut state = this.state.lock();
        if let Phase::Body(remaining) = &mut state.phase {
            let before = buf.filled().len();
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            if !matches!(polled, Poll::Ready(Ok(()))) {
                return polled;
            }
            let new = &buf.filled()[before..];
            if new.is_empty() {
                return polled;
            }
            let ends_after = match remaining {
                Remaining::Length(left) => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(new.len());
                    *left -= take as u64;
                    (*left == 0).then_some(take)
                }
                Remaining::Chunked(chunked) => match chunked.feed(new) {
                    Fed::Continues => None,
                    Fed::EndsAfter(n) => Some(n),
                    // Not followed: pingora reads on, and refuses the body or closes after.
                    Fed::Unreadable => {
                        state.phase = Phase::Open;
                        return polled;
                    }
                },
            };
            // All of it belongs to the body, and more is to come.
            let Some(take) = ends_after else {
                return polled;
            };
            // The body ends within it: what follows is the next request's.
            let rest = buf.filled()[before + take..].to_vec();
            state.held.extend_from_slice(&rest);
            buf.set_filled(before + take);
            state.phase = Phase::Ended;
            if take > 0 {
                return polled;
            }
        }
        if !matches!(state.phase, Phase::Ended) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // The request's bytes have all passed. Read on to see the client close its side (the
        // end of the stream passes) or fail, and keep what it sends meanwhile for later.
        let mut scratch = [0u8; 4096];
        loop {
            let mut read = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    let room = MAX_HELD_BYTES.saturating_sub(state.held.len());
                    if state.overflowed || read.filled().len() > room {
                        // More sent ahead than the gateway keeps: what follows this answer is
                        // lost, so the connection closes after it (the client sends again).
                        state.overflowed = true;
                    } else {
                        state.held.extend_from_slice(read.filled());
                    }
                }
                other => return other,
            }
        }
    }
}

impl AsyncWrite for Pipeline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.state.lock().answered = true;
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
        self.state.lock().answered = true;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

crate::egress::wrapped_stream::delegate_stream_interface!(Pipeline, inner);

#[async_trait]
impl Peek for Pipeline {
    /// Nothing is peeked past a request the gateway serves.
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        if matches!(self.state.lock().phase, Phase::Open) {
            return self.inner.try_peek(buf).await;
        }
        Ok(false)
    }
}

/// What a chunked body's next bytes showed.
#[derive(Debug, PartialEq, Eq)]
enum Fed {
    /// The body goes on past them.
    Continues,
    /// It ends after this many of them.
    EndsAfter(usize),
    /// They do not follow the chunked framing as the gateway reads it.
    Unreadable,
}

/// Follows a chunked body (RFC 9112 §7.1) to its end: chunk sizes in hex, optional
/// extensions, the data and its CRLF, the last chunk, the trailer section.
#[derive(Debug, Default)]
struct ChunkedEnd {
    step: Step,
}

#[derive(Debug, Default, Clone, Copy)]
enum Step {
    /// In a chunk size: its value and how many digits it has.
    #[default]
    SizeStart,
    Size {
        value: u64,
        digits: u8,
    },
    /// In a chunk extension, to the end of the line.
    Extension {
        value: u64,
    },
    /// After the size line's CR.
    SizeLf {
        value: u64,
    },
    /// In the data: this many bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
}

impl ChunkedEnd {
    fn feed(&mut self, bytes: &[u8]) -> Fed {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.step = match self.step {
                Step::SizeStart => match hex(b) {
                    Some(d) => Step::Size {
                        value: d,
                        digits: 1,
                    },
                    None => return Fed::Unreadable,
                },
                Step::Size { value, digits } => match (hex(b), b) {
                    (Some(d), _) if digits < 16 => Step::Size {
                        value: value * 16 + d,
                        digits: digits + 1,
                    },
                    (Some(_), _) => return Fed::Unreadable,
                    (None, b';' | b' ' | b'\t') => Step::Extension { value },
                    (None, b'\r') => Step::SizeLf { value },
                    (None, _) => return Fed::Unreadable,
                },
                Step::Extension { value } => match b {
                    b'\r' => Step::SizeLf { value },
                    b'\n' => return Fed::Unreadable,
                    _ => Step::Extension { value },
                },
                Step::SizeLf { value } => match (b, value) {
                    (b'\n', 0) => Step::TrailerStart,
                    (b'\n', n) => Step::Data(n),
                    _ => return Fed::Unreadable,
                },
                Step::Data(left) => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += take;
                    self.step = match left - take as u64 {
                        0 => Step::DataCr,
                        left => Step::Data(left),
                    };
                    continue;
                }
                Step::DataCr if b == b'\r' => Step::DataLf,
                Step::DataLf if b == b'\n' => Step::SizeStart,
                Step::TrailerStart if b == b'\r' => Step::FinalLf,
                Step::TrailerStart | Step::TrailerLine if b != b'\r' && b != b'\n' => {
                    Step::TrailerLine
                }
                Step::TrailerLine if b == b'\r' => Step::TrailerLf,
                Step::TrailerLf if b == b'\n' => Step::TrailerStart,
                Step::FinalLf if b == b'\n' => return Fed::EndsAfter(i + 1),
                _ => return Fed::Unreadable,
            };
            i += 1;
        }
        Fed::Continues
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the body ends, fed in pieces of `piece` bytes.
    fn end_of(body: &[u8], piece: usize) -> Option<usize> {
        let mut chunked = ChunkedEnd::default();
        let mut offset = 0;
        for part in body.chunks(piece) {
            match chunked.feed(part) {
                Fed::Continues => offset += part.len(),
                Fed::EndsAfter(n) => return Some(offset + n),
                Fed::Unreadable => return None,
            }
        }
        None
    }

    #[test]
    fn a_chunked_body_ends_after_its_trailer_section_however_it_is_split() {
        let body = b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n";
        let next = b"GET / HTTP/1.1\r\n\r\n";
        let mut all = body.to_vec();
        all.extend_from_slice(next);
        for piece in 1..=all.len() {
            assert_eq!(end_of(&all, piece), Some(body.len()), "pieces of {piece}");
        }
        assert_eq!(end_of(b"0\r\n\r\nrest", 3), Some(5));
    }

    #[test]
    fn chunked_framing_it_cannot_follow_is_unreadable() {
        for body in [
            &b"x\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"11111111111111111\r\n",
            b"0\r\n\n",
        ] {
            assert_eq!(end_of(body, 1), None, "{:?}", String::from_utf8_lossy(body));
            let mut chunked = ChunkedEnd::default();
            assert_eq!(chunked.feed(body), Fed::Unreadable);
        }
    }
}
