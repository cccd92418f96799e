//! Sending a request whose whole body the gateway holds, and reading the answer before the
//! sandbox sees any of it.
//!
//! pingora's proxy path streams the body from the sandbox to the origin and can replay at most
//! 64 KiB of it. Two kinds of request need more: one released by an approval (its body was
//! read in full before the hold, to bind its hash to the approval), and one sent with the
//! agent's own token whose 401/403 answer may turn into an on-behalf-of approval and be sent
//! again. Those are sent here, with pingora's connector and the same peer settings, header
//! shaping and response filtering as the proxy path.

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;

use crate::reply::Refusal;
use crate::upstream;

/// What a relayed answer amounted to.
pub struct Relayed {
    /// The origin's status.
    pub status: u16,
    /// Response body bytes relayed.
    pub bytes_out: u64,
}

/// The origin's answer, read up to its header: not yet seen by the sandbox.
pub struct Answer<'a> {
    connector: &'a Connector,
    peer: HttpPeer,
    origin: HttpSession,
    header: ResponseHeader,
}

/// Sends `request` with `body` to `peer` and reads the answer's header. Failures are
/// refusals for the sandbox (`target` names the origin in them).
pub async fn exchange<'a>(
    connector: &'a Connector,
    peer: HttpPeer,
    mut request: RequestHeader,
    body: Bytes,
    target: &str,
) -> Result<Answer<'a>, Refusal> {
    let refusal = |e: pingora::BError| upstream::refusal_for_upstream_error(&e, target);
    let (mut origin, _reused) = connector.get_http_session(&peer).await.map_err(refusal)?;
    // The connector leaves timeouts to its caller (pingora's proxy path sets them per
    // request): without these an origin that stalls would hold the sandbox forever.
    origin.set_read_timeout(peer.options.read_timeout);
    origin.set_write_timeout(peer.options.write_timeout);
    // The sandbox may have spoken HTTP/2 to the gateway; the origin connection speaks
    // whatever was negotiated with the origin.
    request.set_version(match origin.as_http2() {
        Some(_) => http::Version::HTTP_2,
        None => http::Version::HTTP_11,
    });
    request.remove_header(&http::header::TRANSFER_ENCODING);
    // The whole body goes at once: nothing waits for the origin's `100 Continue`.
    request.remove_header(&http::header::EXPECT);
    // The body goes whole, so its length is known (a request without one announces none).
    if !body.is_empty() || request.headers.contains_key(http::header::CONTENT_LENGTH) {
        request
            .insert_header(http::header::CONTENT_LENGTH, body.len().to_string())
            .map_err(refusal)?;
    }
    origin
        .write_request_header(Box::new(request))
        .await
        .map_err(refusal)?;
    if !body.is_empty() {
        origin
            .write_request_body(body, true)
            .await
            .map_err(refusal)?;
    }
    origin.finish_request_body().await.map_err(refusal)?;
    origin.read_response_header().await.map_err(refusal)?;
    let mut header = origin
        .response_header()
        .cloned()
        .ok_or_else(|| Refusal::new(502, "upstream_error", format!("{target} sent no response")))?;
    for name in upstream::hop_by_hop_headers(&header.headers) {
        header.remove_header(&name);
    }
    Ok(Answer {
        connector,
        peer,
        origin,
        header,
    })
}

impl Answer<'_> {
    /// The origin's status code.
    pub fn status(&self) -> u16 {
        self.header.status.as_u16()
    }

    /// Drops the answer unseen (its connection is not reused).
    pub fn discard(self) {}

    /// Relays the answer to the sandbox. A failure here leaves the sandbox with part of an
    /// answer: the connection is closed, so the error is pingora's.
    pub async fn relay(mut self, session: &mut Session) -> pingora::Result<Relayed> {
        let status = self.status();
        session
            .write_response_header(Box::new(self.header), false)
            .await?;
        let mut bytes_out = 0;
        while let Some(chunk) = self.origin.read_response_body().await? {
            bytes_out += chunk.len() as u64;
            session.write_response_body(Some(chunk), false).await?;
        }
        session.write_response_body(None, true).await?;
        self.connector
            .release_http_session(self.origin, &self.peer, None)
            .await;
        Ok(Relayed { status, bytes_out })
    }
}
