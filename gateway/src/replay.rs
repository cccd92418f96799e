//! Sending a request whose whole body the gateway holds: a request released by an approval.
//!
//! pingora's proxy path streams the body from the sandbox to the origin and can replay at most
//! 64 KiB of it, but a held request's body (up to `approvals.max_body_bytes`) was read in full
//! before the hold, to bind its hash to the approval. So the released request is sent here,
//! with pingora's connector and the same peer settings, header shaping and response filtering
//! as the proxy path, and the answer is relayed to the sandbox.

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;

use crate::reply::Refusal;
use crate::upstream;

/// What the exchange did: the status relayed and the response body bytes.
pub struct Relayed {
    /// The origin's status.
    pub status: u16,
    /// Response body bytes relayed.
    pub bytes_out: u64,
}

/// Sends `request` with `body` to `peer` and relays the response to the sandbox.
///
/// Errors before any response byte was written come back as a refusal for the sandbox
/// (`target` names the origin in it); after that, the connection is simply closed.
pub async fn send(
    connector: &Connector,
    peer: &HttpPeer,
    mut request: RequestHeader,
    body: Bytes,
    session: &mut Session,
    target: &str,
) -> Result<Relayed, Refusal> {
    let refusal = |e: pingora::BError| upstream::refusal_for_upstream_error(&e, target);
    let (mut origin, _reused) = connector.get_http_session(peer).await.map_err(refusal)?;
    request
        .insert_header(http::header::CONTENT_LENGTH, body.len().to_string())
        .map_err(refusal)?;
    request.remove_header(&http::header::TRANSFER_ENCODING);
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
    let mut response = origin
        .response_header()
        .cloned()
        .ok_or_else(|| Refusal::new(502, "upstream_error", format!("{target} sent no response")))?;
    for name in upstream::hop_by_hop_headers(&response.headers) {
        response.remove_header(&name);
    }
    let status = response.status.as_u16();
    // From here on the sandbox has part of the answer: failures close the connection.
    let closed = |_| {
        Refusal::new(
            0,
            "connection_closed",
            "the exchange broke off mid-response",
        )
    };
    session
        .write_response_header(Box::new(response), false)
        .await
        .map_err(closed)?;
    let mut bytes_out = 0;
    while let Some(chunk) = origin.read_response_body().await.map_err(closed)? {
        bytes_out += chunk.len() as u64;
        session
            .write_response_body(Some(chunk), false)
            .await
            .map_err(closed)?;
    }
    session
        .write_response_body(None, true)
        .await
        .map_err(closed)?;
    connector.release_http_session(origin, peer, None).await;
    Ok(Relayed { status, bytes_out })
}
