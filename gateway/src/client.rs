//! The gateway's own small HTTP client, on pingora's connector: token endpoints (with the
//! same trusted roots as origin TLS), and the `tollgate` CLI's calls to the admin API.
//!
//! Its requests are the gateway's, never a sandbox's, so they do not pass the SSRF guard (the
//! managed-identity endpoint is 169.254.169.254; the admin API is on loopback). Errors name
//! the kind of failure only: never a header value sent, never the peer's body.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use tollgate_policy::target::{Host, Scheme, Target};

/// Why a request got no answer.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    /// The URL is not an absolute http(s) URL, or a header value is invalid.
    #[error("the URL or a header is invalid")]
    BadRequest,
    /// The host could not be resolved.
    #[error("the host cannot be resolved")]
    Unresolvable,
    /// Connecting, sending or reading failed.
    #[error("the server cannot be reached")]
    Unreachable,
    /// The whole exchange took longer than the caller's timeout.
    #[error("the server did not answer in time")]
    Timeout,
    /// The answer is larger than the caller accepts.
    #[error("the answer is too large")]
    TooLarge,
}

/// One request the gateway sends on its own behalf (token endpoint, admin API).
pub struct Request<'a> {
    /// The method, e.g. GET or POST.
    pub method: &'a str,
    /// The absolute URL, query included.
    pub url: &'a str,
    /// Extra headers (names and values); values are marked sensitive (never logged).
    pub headers: Vec<(Cow<'static, str>, String)>,
    /// A body and its content type (`Content-Type`); `None` sends no body.
    pub body: Option<(Cow<'static, str>, Bytes)>,
}

/// Sends `request` and returns the status and body (at most `max_response` bytes; with 0,
/// the status alone: the body is not read and the connection not reused).
pub async fn send(
    connector: &Connector,
    request: Request<'_>,
    timeout: Duration,
    max_response: usize,
) -> Result<(u16, Bytes), ClientError> {
    match tokio::time::timeout(timeout, exchange(connector, request, timeout, max_response)).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout),
    }
}

async fn exchange(
    connector: &Connector,
    request: Request<'_>,
    timeout: Duration,
    max_response: usize,
) -> Result<(u16, Bytes), ClientError> {
    let (target, path) = Target::from_url(request.url).map_err(|_| ClientError::BadRequest)?;
    let addr = resolve(&target).await?;
    let sni = match &target.host {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    };
    let mut peer = HttpPeer::new(addr, target.scheme == Scheme::Https, sni);
    peer.options.connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    peer.options.write_timeout = Some(timeout);
    let (mut session, _reused) = connector
        .get_http_session(&peer)
        .await
        .map_err(|_| ClientError::Unreachable)?;
    let mut header = RequestHeader::build(request.method, path.as_bytes(), None)
        .map_err(|_| ClientError::BadRequest)?;
    let unreachable = |_| ClientError::Unreachable;
    header
        .insert_header("host", target.host_header())
        .map_err(unreachable)?;
    header
        .insert_header("accept", "application/json")
        .map_err(unreachable)?;
    for (name, value) in request.headers {
        let mut value = http::HeaderValue::from_str(&value).map_err(|_| ClientError::BadRequest)?;
        value.set_sensitive(true);
        header
            .insert_header(name.into_owned(), value)
            .map_err(unreachable)?;
    }
    if let Some((content_type, body)) = &request.body {
        header
            .insert_header("content-type", content_type.to_string())
            .map_err(unreachable)?;
        header
            .insert_header("content-length", body.len().to_string())
            .map_err(unreachable)?;
    }
    session
        .write_request_header(Box::new(header))
        .await
        .map_err(unreachable)?;
    if let Some((_, body)) = request.body {
        session
            .write_request_body(body, true)
            .await
            .map_err(unreachable)?;
    }
    session.finish_request_body().await.map_err(unreachable)?;
    session.read_response_header().await.map_err(unreachable)?;
    let status = session
        .response_header()
        .map(|h| h.status.as_u16())
        .ok_or(ClientError::Unreachable)?;
    if max_response == 0 {
        return Ok((status, Bytes::new()));
    }
    let mut response = Vec::new();
    while let Some(chunk) = session.read_response_body().await.map_err(unreachable)? {
        if response.len() + chunk.len() > max_response {
            return Err(ClientError::TooLarge);
        }
        response.extend_from_slice(&chunk);
    }
    connector.release_http_session(session, &peer, None).await;
    Ok((status, Bytes::from(response)))
}

async fn resolve(target: &Target) -> Result<SocketAddr, ClientError> {
    match &target.host {
        Host::Ip(ip) => Ok(SocketAddr::new(*ip, target.port)),
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
            .await
            .map_err(|_| ClientError::Unresolvable)?
            .next()
            .ok_or(ClientError::Unresolvable),
    }
}
