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

/// Serves one request of a connection (`serve`, pingora's turn) where it may park: returns
/// what `serve` returned and the request it parked, if it did. `resumed` is the context of
/// a parked request that this turn serves again.
pub async fn serving<F: Future>(
    pipeline: &PipelineControl,
    resumed: Option<Box<RequestCtx>>,
    serve: F,
) -> (F::Output, Option<Box<Parked>>) {
    let parking = RefCell::new(Parking {
        pipeline: pipeline.clone(),
        parked: None,
        resumed,
    });
    let mut turn = std::pin::pin!(PARKING.scope(parking, serve));
    let served = turn.as_mut().await;
    let parked = turn.take_value().and_then(|p| p.into_inner().parked);
    (served, parked)
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
    /// (`connection` ends). Returns the request's bytes to serve again and its context,
    /// which carries the verdict.
    pub async fn wait(self: Box<Self>, connection: &mut Stream) -> (BytesMut, Box<RequestCtx>) {
        let Parked {
            mut ctx,
            decided,
            hold,
            approvals,
            head,
        } = *self;
        let body = hold.body.clone();
        let client_gone = async {
            // The request's bytes are all read: a read returns only when the client closes
            // its side or the connection fails (what it sends meanwhile waits in the pipeline).
            let mut byte = [0u8; 1];
            while let Ok(1..) = connection.read(&mut byte).await {}
        };
        let held_at = Instant::now();
        let outcome = approvals.hold(hold, client_gone).await;
        let replay = replay_bytes(&head, &body);
        ctx.resumed = Some(Box::new((
            decided,
            Waited {
                body,
                outcome,
                took: held_at.elapsed(),
            },
        )));
        (replay, Box::new(ctx))
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
