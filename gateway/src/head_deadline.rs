//! A deadline for each request head a sandbox sends (slowloris).
//!
//! pingora reads a request head with a timeout per read (60 s) but none for the head as a
//! whole, so a client that sends a byte every minute holds a connection, a task and a buffer
//! for as long as it likes. The egress listener wraps every HTTP/1 client stream (plain, and
//! the decrypted side of an intercepted tunnel) in a [`HeadDeadline`]: from the first byte of
//! a request head until the proxy has it parsed, reads must finish within
//! `limits.request_head_timeout_ms`, or they fail with `TimedOut` and the connection is
//! closed. The body and the idle time between keep-alive requests do not count: they have
//! their own timeouts (`upstream.read_timeout_ms`, the keep-alive timeout).
//!
//! The proxy tells the stream where the request is: [`head_parsed`] when admission starts,
//! [`expect_next_head`] when the request is done.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::Stream;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// No head byte read yet since the last request: no deadline.
const WAITING: u8 = 0;
/// A head is arriving: the deadline runs.
const READING: u8 = 1;
/// The head is parsed: body and response are not this module's concern.
const PARSED: u8 = 2;

/// A client stream whose request heads must arrive within a deadline.
#[derive(Debug)]
pub struct HeadDeadline {
    inner: Stream,
    limit: Duration,
    phase: AtomicU8,
    /// Armed by the first byte of a head; dropped once the head is parsed.
    timer: Option<Pin<Box<Sleep>>>,
}

impl HeadDeadline {
    /// Wraps `inner`; each head gets `limit` from its first byte.
    pub fn wrap(inner: Stream, limit: Duration) -> Stream {
        Box::new(HeadDeadline {
            inner,
            limit,
            phase: AtomicU8::new(WAITING),
            timer: None,
        })
    }

    /// The wrapper under a session's client stream, if it has one.
    fn of(session: &Session) -> Option<&HeadDeadline> {
        let stream: &Stream = session.as_downstream().stream()?;
        (**stream).as_any().downcast_ref::<HeadDeadline>()
    }
}

/// The session's request head is parsed: stop its clock.
pub fn head_parsed(session: &Session) {
    if let Some(stream) = HeadDeadline::of(session) {
        stream.phase.store(PARSED, Ordering::Release);
    }
}

/// The session's request is done: the next byte read starts the next head's clock.
pub fn expect_next_head(session: &Session) {
    if let Some(stream) = HeadDeadline::of(session) {
        stream.phase.store(WAITING, Ordering::Release);
    }
}

impl AsyncRead for HeadDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match this.phase.load(Ordering::Acquire) {
            PARSED => {
                this.timer = None;
                Pin::new(&mut this.inner).poll_read(cx, buf)
            }
            WAITING => {
                this.timer = None;
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                if buf.filled().len() > before {
                    // Only if the proxy has not moved on in the meantime.
                    let _ = this.phase.compare_exchange(
                        WAITING,
                        READING,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    this.timer = Some(Box::pin(tokio::time::sleep(this.limit)));
                }
                Poll::Ready(Ok(()))
            }
            _ => {
                let limit = this.limit;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if timer.as_mut().poll(cx).is_ready() {
                    tracing::info!(
                        limit_ms = limit.as_millis() as u64,
                        "request head not complete in time; connection closed"
                    );
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "request head not complete within limits.request_head_timeout_ms",
                    )));
                }
                Pin::new(&mut this.inner).poll_read(cx, buf)
            }
        }
    }
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
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
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// The rest of pingora's stream interface is the inner stream's: peer address, TLS state and
// ALPN, timing, identity.

#[async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadDeadline {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeadDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
