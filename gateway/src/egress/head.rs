//! Step 0 of the data path: each HTTP/1 request head, read and checked by the gateway before
//! pingora sees it.
//!
//! pingora reads a request head with a timeout per read (60 s) but none for the head as a
//! whole (slowloris), and answers a head it cannot take — a `Host` that differs from the
//! absolute URL, a NUL in a header, conflicting lengths — with an empty 400 that no phase of
//! the proxy sees: no log line, no audit record. So the egress listener reads every HTTP/1
//! head itself, plain and inside an intercepted tunnel:
//!
//! - a connection waits at most [`KEEPALIVE_IDLE`] for a head to start; from its first byte,
//!   the head must be complete within `limits.request_head_timeout_ms`, or the connection is
//!   closed (the body and the time between requests are not counted);
//! - the head is parsed once and checked ([`framing::check_head`]);
//! - a head that fails is answered here with a JSON refusal, recorded like every other
//!   request (log line, metrics, span, and for a known agent an audit record), and the
//!   connection is closed;
//! - a head that passes goes to pingora as the start of its parse buffer (its "pipelined
//!   prefix"), so no byte is read twice, and pingora serves the request and the connection's
//!   next ones, each of whose heads comes back here first.
//!
//! HTTP/2 frames its own heads, with its own limits (`agent_listener`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncReadExt;

use crate::egress::framing::{self, Head, RequestLine};
use crate::egress::h2_watch::RefusedStream;
use crate::egress::panics;
use crate::egress::pipeline::Pipeline;
use crate::egress::proxy::park;
use crate::reply::{self, ErrorCode, Refusal};

/// How long a connection may wait for its next request head (pingora's keep-alive default).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// A request answered here rather than in pingora's phases — a head refused before pingora
/// saw it, or a request whose serving panicked (`panics`): the answer, what of the request
/// could be read, and when its first byte came.
#[derive(Debug)]
pub struct RefusedHead {
    /// The answer the client got.
    pub refusal: Refusal,
    /// Its method and target, as far as they could be read.
    pub line: RequestLine,
    /// When the head's first byte arrived.
    pub started: Instant,
}

impl RefusedHead {
    /// The record of an HTTP/2 stream the HTTP/2 layer refused by itself
    /// ([`crate::egress::h2_watch`]): what it was answered, with no request line to show.
    pub fn of_http2(refused: RefusedStream) -> RefusedHead {
        let detail = match refused {
            RefusedStream::BadRequest(id) => format!(
                "HTTP/2 stream {id} was answered 400 by the HTTP/2 layer: its authority was \
                 missing or ambiguous (a Host that differs from :authority); nothing was forwarded"
            ),
            RefusedStream::Reset(id) => format!(
                "HTTP/2 stream {id} was reset by the HTTP/2 layer as malformed (conflicting \
                 lengths, a forbidden byte, a broken header block); nothing was forwarded"
            ),
        };
        RefusedHead {
            refusal: Refusal::new(ErrorCode::BadRequest, detail),
            line: RequestLine::default(),
            started: Instant::now(),
        }
    }
}

/// How long a connection may take over its request heads.
#[derive(Debug, Clone, Copy)]
pub struct HeadDeadlines {
    /// For the first byte of the connection's first head (later ones: [`KEEPALIVE_IDLE`]).
    pub first_byte: Duration,
    /// For a head, from its first byte to its blank line (`limits.request_head_timeout_ms`).
    pub head: Duration,
}

/// Serves the HTTP/1 requests of one connection: each head read and checked here, then the
/// request handed to `app` (the egress proxy, or the admin API); `refused` records a head
/// that failed, and a request whose serving panicked.
pub async fn serve_http1<A>(
    app: &Arc<A>,
    stream: Stream,
    deadlines: HeadDeadlines,
    shutdown: &ShutdownWatch,
    refused: impl Fn(&RefusedHead),
) where
    A: HttpServerApp + Send + Sync + 'static,
{
    // pingora is given one request at a time; bytes of the next, sent before the answer,
    // wait in `pipeline` and start the next head.
    let (mut stream, pipeline) = Pipeline::wrap(stream);
    let mut settings: Option<HttpPersistentSettings> = None;
    let mut idle = deadlines.first_byte;
    // A request parked while it waited for approval (`park`), to be served again.
    let mut unparked: Option<park::Unparked> = None;
    loop {
        let next = match unparked.take() {
            // Its head was read and checked when it came: the same bytes pass again.
            Some(unparked) => match framing::check_head(&unparked.bytes) {
                Ok(Some(head)) => {
                    let (bytes, ctx) = unparked.into_ctx();
                    Ok(Some((bytes, head, Instant::now(), Some(ctx))))
                }
                _ => {
                    let failed = not_served_again(RequestLine::default());
                    unparked.give_up(&failed.refusal.detail).await;
                    refused(&failed);
                    reply::answer_raw_and_close(&mut stream, &failed.refusal).await;
                    return;
                }
            },
            None => {
                let Some(sent_ahead) = pipeline.next_head() else {
                    return;
                };
                let next = next_head(&mut stream, sent_ahead, idle, deadlines.head, shutdown);
                next.await
                    .map(|read| read.map(|(buf, head, started)| (buf, head, started, None)))
            }
        };
        idle = KEEPALIVE_IDLE;
        let (request, line, started, resumed) = match next {
            Ok(Some((buf, head, started, resumed))) => (
                pipeline.serve(buf, head.len, head.body),
                head.line,
                started,
                resumed,
            ),
            Ok(None) => return,
            Err(head) => {
                refused(&head);
                reply::answer_raw_and_close(&mut stream, &head.refusal).await;
                return;
            }
        };
        let mut session = ServerSession::new_http1(stream);
        match settings.take() {
            // What pingora kept of the connection (keep-alive time, requests left). It would
            // also carry bytes read past the last request if its pipelining were on; it is
            // not, and `pipeline` keeps such bytes from it.
            Some(kept) => kept.apply_to_session(&mut session),
            None => {
                session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_IDLE.as_secs()));
                session.set_keepalive_reuses_remaining(
                    app.server_options().and_then(|o| o.keepalive_request_limit),
                );
            }
        }
        session.set_pipelined_prefix(request);
        // A panic while pingora serves the request (a bug) still gets the request answered
        // (502, unless part of an answer went out) and recorded (`panics`).
        let turn = panics::catching(
            "an HTTP/1 connection",
            app.process_new_http(session, shutdown),
        );
        let park::Turn {
            served,
            parked,
            not_taken,
        } = park::serving(&pipeline, resumed, turn).await;
        // A parked request this turn was to serve again, and its turn ended first (the
        // gateway stopping): not sent, and recorded so.
        if let Some(unparked) = not_taken {
            let failed = not_served_again(line);
            unparked.give_up(&failed.refusal.detail).await;
            refused(&failed);
            if let Ok(Some(reused)) = served {
                let (mut connection, _) = reused.consume();
                reply::answer_raw_and_close(&mut connection, &failed.refusal).await;
            }
            return;
        }
        let reused = match served {
            Ok(Some(reused)) => reused,
            Ok(None) => {
                // pingora did not keep the connection of a request it had parked (a client
                // that reset it): nothing was recorded, nothing can be answered.
                if parked.is_some() {
                    refused(&RefusedHead {
                        refusal: Refusal::new(
                            ErrorCode::InternalError,
                            "the connection was not kept while its request was to be held \
                             for approval (the client left, or it could not be read to its \
                             end); no approval was recorded and nothing was sent",
                        ),
                        line,
                        started,
                    });
                }
                return;
            }
            Err(()) => {
                let failed = RefusedHead {
                    refusal: panics::refusal(),
                    line,
                    started,
                };
                if let Some(mut connection) = pipeline.unanswered_after_panic() {
                    reply::answer_raw_and_close(&mut connection, &failed.refusal).await;
                }
                refused(&failed);
                return;
            }
        };
        let (next, kept) = reused.consume();
        stream = next;
        settings = kept;
        if let Some(parked) = parked {
            pipeline.shrink_held();
            // Boxed: only a parked request's connection carries the wait's state. A panic
            // while it waits (a bug) still gets the request answered and recorded; its hold,
            // dropped, abandons its approval if it was still pending.
            let wait = Box::pin(parked.wait(&mut stream));
            match panics::catching("a request waiting for approval", wait).await {
                Ok(waited) => unparked = Some(waited),
                Err(()) => {
                    let failed = RefusedHead {
                        refusal: panics::refusal(),
                        line,
                        started,
                    };
                    refused(&failed);
                    reply::answer_raw_and_close(&mut stream, &failed.refusal).await;
                    return;
                }
            }
        }
    }
}

/// The record of a request held for approval that its connection could not serve again
/// once its approval was settled (the gateway stopping, or a bug): nothing was sent.
fn not_served_again(line: RequestLine) -> RefusedHead {
    RefusedHead {
        refusal: Refusal::new(
            ErrorCode::InternalError,
            "the request's approval was settled, but the gateway could not serve the request \
             again (it is stopping, or failed); nothing was sent",
        ),
        line,
        started: Instant::now(),
    }
}

/// Reads the next request head, after the bytes `buf` already has (sent ahead, pipelined),
/// waiting up to `idle` for its first byte:
/// the bytes read (the head and whatever followed it) and the head, `None` when the
/// connection closes, idles out or the gateway shuts down before one starts, or when a
/// started head is not complete in time (the connection is then just closed).
async fn next_head(
    stream: &mut Stream,
    mut buf: BytesMut,
    idle: Duration,
    head_timeout: Duration,
    shutdown: &ShutdownWatch,
) -> Result<Option<(BytesMut, Head, Instant)>, Box<RefusedHead>> {
    if buf.is_empty() {
        buf.reserve(4096);
        let mut stopping = shutdown.clone();
        let first = tokio::select! {
            read = tokio::time::timeout(idle, stream.read_buf(&mut buf)) => read,
            _ = stopping.wait_for(|stop| *stop) => return Ok(None),
        };
        if !matches!(first, Ok(Ok(n)) if n > 0) {
            return Ok(None);
        }
    }
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + head_timeout;
    // Parsed only once a blank line may have come (or the head is too large), so a head
    // dribbled a byte at a time costs one scan of each new byte, not a parse per byte.
    let mut scanned: usize = 0;
    loop {
        let ended = blank_line_from(&buf, scanned);
        scanned = buf.len();
        if ended || buf.len() > framing::MAX_HEAD_BYTES {
            match framing::check_head(&buf) {
                Ok(Some(head)) => return Ok(Some((buf, head, started))),
                Ok(None) => {}
                Err(unframed) => {
                    let framing::Unframed { refusal, line } = *unframed;
                    return Err(Box::new(RefusedHead {
                        refusal,
                        line,
                        started,
                    }));
                }
            }
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // Closed or failed mid-head: nobody to answer.
            Ok(_) => return Ok(None),
            Err(_) => {
                tracing::info!(
                    limit_ms = head_timeout.as_millis() as u64,
                    "request head not complete in time; connection closed"
                );
                return Ok(None);
            }
        }
    }
}

/// Whether `buf` has a blank line (`\n\r\n` or `\n\n`: the end of a head) that ends past
/// `from`, the bytes before which were looked at already. Each line end is one byte search;
/// the bytes after it are compared in place (a substring searcher would be built per call).
fn blank_line_from(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(2);
    memchr::memchr_iter(b'\n', &buf[start..]).any(|at| {
        let after = &buf[start + at + 1..];
        after.starts_with(b"\n") || after.starts_with(b"\r\n")
    })
}

#[cfg(test)]
mod tests {
    use super::blank_line_from;

    #[test]
    fn a_blank_line_is_found_however_the_head_was_cut_into_reads() {
        let heads: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        ];
        for head in heads {
            let blank_at = head.len();
            // Every way of reading the head in two parts: the blank line is seen by the
            // read that completes it, never before.
            for cut in 1..head.len() {
                assert!(!blank_line_from(&head[..cut], 0), "{head:?} cut at {cut}");
                assert!(
                    blank_line_from(&head[..blank_at], cut),
                    "{head:?} read on from {cut}"
                );
            }
        }
        assert!(!blank_line_from(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
        assert!(!blank_line_from(b"\r\n\r", 0));
    }
}
