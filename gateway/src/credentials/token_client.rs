//! The gateway's own HTTP client for token endpoints.
//!
//! Token requests are made by the gateway, never by a sandbox, so they do not pass the SSRF
//! guard (the managed-identity endpoint is 169.254.169.254). They use pingora's connector,
//! with the same trusted roots as origin TLS.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use tollgate_policy::target::{Host, Scheme, Target};

/// Largest token response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why a token request failed. The messages name the kind of failure only: never the
/// secret sent, never the endpoint's body.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    /// The token URL is not an absolute http(s) URL.
    #[error("the token endpoint URL is invalid")]
    BadUrl,
    /// The endpoint's host could not be resolved.
    #[error("the token endpoint's host cannot be resolved")]
    Unresolvable,
    /// Connecting, sending or reading failed.
    #[error("the token endpoint cannot be reached")]
    Unreachable,
    /// No answer in time.
    #[error("the token endpoint did not answer in time")]
    Timeout,
    /// A non-2xx status.
    #[error("the token endpoint answered HTTP {0}")]
    Status(u16),
    /// A 2xx answer without a usable token.
    #[error("the token endpoint's answer holds no usable token")]
    BadResponse,
    /// The provider is misconfigured or a secret is missing.
    #[error("{0}")]
    Config(String),
}

/// A token endpoint request.
pub struct TokenRequest<'a> {
    /// GET or POST.
    pub method: &'a str,
    /// The absolute URL, query included.
    pub url: &'a str,
    /// Extra headers (names and values).
    pub headers: Vec<(&'static str, String)>,
    /// A form body, for POST.
    pub form: Option<String>,
}

/// Sends `request` and returns the 2xx body.
pub async fn send(
    connector: &Connector,
    request: TokenRequest<'_>,
    timeout: Duration,
) -> Result<Bytes, FetchError> {
    match tokio::time::timeout(timeout, exchange(connector, request, timeout)).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout),
    }
}

async fn exchange(
    connector: &Connector,
    request: TokenRequest<'_>,
    timeout: Duration,
) -> Result<Bytes, FetchError> {
    let (target, path) = Target::from_url(request.url).map_err(|_| FetchError::BadUrl)?;
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
        .map_err(|_| FetchError::Unreachable)?;
    let mut header = RequestHeader::build(request.method, path.as_bytes(), None)
        .map_err(|_| FetchError::BadUrl)?;
    let unreachable = |_| FetchError::Unreachable;
    header
        .insert_header("host", target.host_header())
        .map_err(unreachable)?;
    header
        .insert_header("accept", "application/json")
        .map_err(unreachable)?;
    for (name, value) in request.headers {
        let mut value = http::HeaderValue::from_str(&value)
            .map_err(|_| FetchError::Config(format!("the {name} header value is not valid")))?;
        value.set_sensitive(true);
        header.insert_header(name, value).map_err(unreachable)?;
    }
    let body = request.form.map(Bytes::from);
    if let Some(body) = &body {
        header
            .insert_header("content-type", "application/x-www-form-urlencoded")
            .map_err(unreachable)?;
        header
            .insert_header("content-length", body.len().to_string())
            .map_err(unreachable)?;
    }
    session
        .write_request_header(Box::new(header))
        .await
        .map_err(unreachable)?;
    if let Some(body) = body {
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
        .ok_or(FetchError::Unreachable)?;
    let mut response = Vec::new();
    while let Some(chunk) = session.read_response_body().await.map_err(unreachable)? {
        if response.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(FetchError::BadResponse);
        }
        response.extend_from_slice(&chunk);
    }
    connector.release_http_session(session, &peer, None).await;
    if !(200..300).contains(&status) {
        return Err(FetchError::Status(status));
    }
    Ok(Bytes::from(response))
}

async fn resolve(target: &Target) -> Result<SocketAddr, FetchError> {
    match &target.host {
        Host::Ip(ip) => Ok(SocketAddr::new(*ip, target.port)),
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
            .await
            .map_err(|_| FetchError::Unresolvable)?
            .next()
            .ok_or(FetchError::Unresolvable),
    }
}
