//! Step 5, while a person decides: an HTTP/1 request held for approval waits outside pingora.
//!
//! A request in pingora's hands keeps pingora's whole state for it while it waits — the
//! proxy's future for the request, the session with its head buffer and header map, the
//! phases' futures — some 30 KiB that a held request does not need: it has been decided,
//! and its body read whole. So once its approval is ready to be recorded, an HTTP/1 request
//! is *parked*: its context, what admission decided and the held request move here, the
//! request's turn in pingora ends without an answer (the connection is kept), and the
//! connection's loop ([`crate::egress::head::serve_http1`]) waits for the verdict, watching
//! the connection for the client leaving. Then the request is served again: its head and
//! body, exactly as held, are given to pingora as the next request, whose context is the
//! parked one carrying the verdict (`Egress::admit` goes on from there). So the
//! verdict is acted on by the same code whether the request was parked or held in place,
//! and the request gets one record, at its end.
//!
//! A request is held in place instead where parking cannot keep its connection: over HTTP/2
//! (pingora serves each stream in a task of its own), or when the connection cannot be read
//! past its body (a chunked body the gateway cannot follow, [`crate::egress::pipeline`]).
//! A request held a second time, for an on-behalf-of approval after the origin refused the
//! agent's own token, is held in place too: it is past admission, in the gateway's own send
//! path.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

use crate::egress::approval::{Approvals, HoldRequest};
use crate::egress::framing::{self, BodyEnd};
use crate::egress::pipeline::PipelineControl;

use super::hold::{Decided, Waited};
use super::RequestCtx;

tokio::task_local! {
    /// The parking of the connection whose request is being served in this task.
    static PARKING: RefCell<Parking>;
}

/// What one turn of pingora on a connection may park, or resume.
struct Parking {
    /// The connection, to see that the request's bytes have all been read.
    pipeline: PipelineControl,
    /// The request that this turn parked.
    parked: Option<Box<Parked>>,
    /// The context of a parked request served again in this turn, with its verdict.
    resumed: Option<Box<RequestCtx>>,
}

/// A request parked while it waits for its approval.
pub struct Parked {
    /// The request's context, as admission left it.
    pub(super) ctx: RequestCtx,
    /// What admission decided, needed again at the release.
    pub(super) decided: Decided,
    /// The approval to record and wait for (its body is the request's).
    pub(super) hold: HoldRequest,
    /// Where it is recorded.
    pub(super) approvals: Arc<Approvals>,
    /// The request's head as the client sent it (pingora parsed it; it is given the same
    /// bytes again).
    pub(super) head: Bytes,
}

/// How a parked request's hold ended, carried by its context into the turn that serves it
/// again.
pub(super) struct Resumed {
    /// What admission decided.
    pub(super) decided: Decided,
    /// The verdict, the held body and the wait.
    pub(super) waited: Waited,
    /// Where the approval is recorded (to mark it not sent if the request cannot be).
    approvals: Arc<Approvals>,
}

/// A parked request whose wait has ended: to be served again.
pub struct Unparked {
    /// Its head and body, to give pingora again.
    pub bytes: BytesMut,
    /// Its context, which carries the verdict.
    ctx: Box<RequestCtx>,
}

/// What one turn of the connection loop left: what pingora returned, the request it parked,
/// and a parked request it was to serve again but never took up (its turn ended before the
/// request's context was asked for).
pub struct Turn<T> {
    /// What pingora returned.
    pub served: T,
    /// The request parked in this turn.
    pub parked: Option<Box<Parked>>,
    /// The request this turn was to serve again and did not.
    pub not_taken: Option<Unparked>,
}

/// Serves one request of a connection (`serve`, pingora's turn) where it may park.
/// `unparked` is a parked request that this turn serves again (its bytes are the turn's).
pub async fn serving<F: Future>(
    pipeline: &PipelineControl,
    unparked: Option<Box<RequestCtx>>,
    serve: F,
) -> Turn<F::Output> {
    let parking = RefCell::new(Parking {
        pipeline: pipeline.clone(),
        parked: None,
        resumed: unparked,
    });
    let mut turn = std::pin::pin!(PARKING.scope(parking, serve));
    let served = turn.as_mut().await;
    let left = turn.take_value().map(RefCell::into_inner);
    let (parked, not_taken) = match left {
        Some(left) => (left.parked, left.resumed),
        None => (None, None),
    };
    Turn {
        served,
        parked,
        not_taken: not_taken.map(|ctx| Unparked {
            bytes: BytesMut::new(),
            ctx,
        }),
    }
}

/// The context of the parked request this turn serves again, if it is one.
pub(super) fn take_resumed() -> Option<Box<RequestCtx>> {
    PARKING
        .try_with(|p| p.borrow_mut().resumed.take())
        .ok()
        .flatten()
}

/// Whether a request served in this task can be parked now: it came through the connection
/// loop and all its bytes have been read.
pub(super) fn can_park() -> bool {
    PARKING
        .try_with(|p| {
            let p = p.borrow();
            p.parked.is_none() && p.pipeline.request_ended()
        })
        .unwrap_or(false)
}

/// Parks `parked` for the connection loop (after [`can_park`] said it can).
pub(super) fn park(parked: Box<Parked>) {
    let parked_here = PARKING.try_with(|p| p.borrow_mut().parked = Some(parked));
    if parked_here.is_err() {
        // `can_park` said this task has a slot: not reached.
        tracing::error!("a request was parked outside the connection loop; it is dropped");
    }
}

impl Parked {
    /// Records the approval and waits for its verdict, or for the client to leave
    /// (`connection` ends). Returns the request to serve again, with the verdict.
    pub async fn wait(self: Box<Self>, connection: &mut Stream) -> Unparked {
        let Parked {
            mut ctx,
            decided,
            hold,
            approvals,
            head,
        } = *self;
        crate::egress::panics::inject(&ctx.path_and_query, "parked");
        let body = hold.body.clone();
        let client_gone = async {
            // The request's bytes are all read: a read returns only when the client closes
            // its side or the connection fails (what it sends meanwhile waits in the pipeline).
            let mut byte = [0u8; 1];
            while let Ok(1..) = connection.read(&mut byte).await {}
        };
        let held_at = Instant::now();
        let outcome = approvals.hold(hold, client_gone).await;
        let bytes = replay_bytes(&head, &body);
        ctx.resumed = Some(Box::new(Resumed {
            decided,
            waited: Waited {
                body,
                outcome,
                took: held_at.elapsed(),
            },
            approvals,
        }));
        Unparked {
            bytes,
            ctx: Box::new(ctx),
        }
    }
}

impl Unparked {
    /// Its context, for the turn that serves it.
    pub fn into_ctx(self) -> (BytesMut, Box<RequestCtx>) {
        (self.bytes, self.ctx)
    }

    /// Gives it up: the connection loop could not serve it again (the gateway stopping, a
    /// failure). An approved request is marked not sent, with `why`; nothing was sent.
    pub async fn give_up(self, why: &str) {
        let Some(resumed) = &self.ctx.resumed else {
            return;
        };
        tracing::warn!(
            approval = self.ctx.approval.as_deref().unwrap_or("-"),
            why,
            "a request held for approval was not served again"
        );
        if let (Ok(_), Some(id)) = (&resumed.waited.outcome, &self.ctx.approval) {
            resumed.approvals.not_sent(id, why).await;
        }
    }
}

/// The request as it is given to pingora again: its head, and its body framed as the head
/// says (a chunked body, held decoded, goes as one chunk).
fn replay_bytes(head: &[u8], body: &[u8]) -> BytesMut {
    let end = match framing::check_head(head) {
        Ok(Some(parsed)) => parsed.body,
        // The head was checked when it arrived; it parses the same now.
        _ => BodyEnd::Empty,
    };
    let mut bytes = BytesMut::with_capacity(head.len() + body.len() + 32);
    bytes.put_slice(head);
    match end {
        BodyEnd::Chunked => {
            if !body.is_empty() {
                bytes.put_slice(format!("{:x}\r\n", body.len()).as_bytes());
                bytes.put_slice(body);
                bytes.put_slice(b"\r\n");
            }
            bytes.put_slice(b"0\r\n\r\n");
        }
        BodyEnd::Length(_) => bytes.put_slice(body),
        BodyEnd::Empty | BodyEnd::Open => {}
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_body_is_replayed_framed_as_its_head_says() {
        let head = b"POST http://a.test/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(
            &replay_bytes(head, b"abc")[..],
            [&head[..], b"abc"].concat()
        );
        let head =
            b"POST http://a.test/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n";
        let replayed = replay_bytes(head, b"0123456789abcdefg");
        assert_eq!(
            &replayed[..],
            [&head[..], b"11\r\n0123456789abcdefg\r\n0\r\n\r\n"].concat()
        );
        // The chunked framing ends where the gateway's own reader says it does.
        let parsed = framing::check_head(&replayed).unwrap().unwrap();
        assert_eq!(parsed.body, BodyEnd::Chunked);
        assert_eq!(
            &replay_bytes(head, b"")[..],
            [&head[..], b"0\r\n\r\n"].concat()
        );
        let head = b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n";
        assert_eq!(&replay_bytes(head, b"")[..], &head[..]);
    }
}
