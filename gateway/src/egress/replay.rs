//! The gateway's own send path: requests it sends itself, and answers it reads before the
//! sandbox sees any of them.
//!
//! pingora's proxy path streams the body from the sandbox to the origin and relays the answer
//! as it comes, header first. Three kinds of request need more, and are sent here instead,
//! with pingora's connector and the same peer settings, header shaping and response filtering:
//!
//! - one released by an approval: its body was read in full before the hold, to bind its hash
//!   to the approval, and exactly those bytes are sent;
//! - one sent with the agent's own token whose 401/403 answer may turn into an on-behalf-of
//!   approval and be sent again (its body is held for that, when it is small enough);
//! - every request that carries an injected token: its answer is scanned for that token
//!   before it is relayed ([`crate::egress::credentials::reflection`]), which pingora's proxy path,
//!   relaying the header at once, cannot do. Its body, when not held, is streamed;
//! - a protocol upgrade (WebSocket): once the origin answers 101, [`Answer::pipe`] passes
//!   bytes both ways until either side closes, and counts them. (pingora's proxy path can end
//!   an upgraded connection at once when the 101 arrives before it has passed on the end of
//!   the handshake request: seen under load.)

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;

use crate::egress::credentials::reflection::ReflectionScan;
use crate::egress::credentials::upgraded::{Cut, UpgradeScan};
use crate::egress::upstream;
use crate::reply::{ErrorCode, Refusal};

/// Interim (1xx) answers read and dropped before an answer, at most.
const MAX_INTERIM_ANSWERS: usize = 16;

/// What a relayed answer amounted to.
pub struct Relayed {
    /// The origin's status.
    pub status: u16,
    /// Response body bytes relayed.
    pub bytes_out: u64,
}

/// The request body the gateway sends.
pub enum Outgoing<'s> {
    /// A body the gateway holds whole (released by an approval, or kept for a retry).
    Held(Bytes),
    /// The sandbox's body, read as it arrives and passed on; `within` is asked, with the
    /// bytes read so far, whether the agent's body limit still allows them.
    Streamed {
        /// The sandbox's session.
        session: &'s mut Session,
        /// The agent's body limit.
        within: &'s (dyn Fn(u64) -> Result<(), Refusal> + Sync),
    },
}

/// The origin's answer, read up to its header (and, once [screened](Answer::screen), some of
/// its body): not yet seen by the sandbox.
pub struct Answer<'a> {
    connector: &'a Connector,
    peer: HttpPeer,
    origin: HttpSession,
    header: ResponseHeader,
    /// Body read ahead by [`Answer::screen`], relayed first.
    early: Vec<Bytes>,
    /// Whether the origin's body ended within what was read ahead.
    ended: bool,
}

/// Why an answer was not relayed after [`Answer::screen`].
pub enum Screened {
    /// It carries the token back.
    Reflected,
    /// Reading ahead failed; the sandbox gets this.
    Failed(Refusal),
}

/// What an upgraded connection carried, once both ends are closed.
pub struct Piped {
    /// Bytes from the sandbox to the origin.
    pub bytes_in: u64,
    /// Bytes from the origin to the sandbox.
    pub bytes_out: u64,
    /// Why it ended.
    pub end: PipeEnd,
}

/// How an upgraded connection ended.
pub enum PipeEnd {
    /// One side closed it.
    Closed,
    /// Reading or writing failed (pingora's error).
    Failed(pingora::BError),
    /// The origin sent the injected token: the connection was cut before those bytes.
    Reflected,
    /// The origin sent what the token scan cannot read as the sandbox would (says what): the
    /// connection was cut before it.
    Unreadable(&'static str),
    /// The tool call whose token opened it ended.
    Ended,
}

/// Why relaying an answer stopped before its end.
pub enum RelayError {
    /// The connection to the sandbox or to the origin failed (pingora's error).
    Broken(pingora::BError),
    /// A later part of the body carried the token back: the answer was cut short there.
    Reflected,
}

/// Sends `request` with `body` to `peer` and reads the answer's header. Failures are
/// refusals for the sandbox (`target` names the origin in them). Returns, with the answer,
/// the request body bytes sent.
pub async fn exchange<'a>(
    connector: &'a Connector,
    peer: HttpPeer,
    mut request: RequestHeader,
    mut body: Outgoing<'_>,
    target: &str,
) -> Result<(Answer<'a>, u64), Refusal> {
    let refusal = |e: pingora::BError| upstream::refusal_for_upstream_error(&e, target);
    let (mut origin, _reused) = connector.get_http_session(&peer).await.map_err(refusal)?;
    // The connector leaves timeouts to its caller (pingora's proxy path sets them per
    // request): without these an origin that stalls would hold the sandbox forever.
    origin.set_read_timeout(peer.options.read_timeout);
    origin.set_write_timeout(peer.options.write_timeout);
    // The sandbox may have spoken HTTP/2 to the gateway; the origin connection speaks
    // whatever was negotiated with the origin.
    let h2 = origin.as_http2().is_some();
    request.set_version(if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    });
    // Nothing waits for the origin's `100 Continue`: the body follows the head at once.
    request.remove_header(&http::header::EXPECT);
    request.remove_header(&http::header::TRANSFER_ENCODING);
    match &mut body {
        // The body goes whole, so its length is known (a request without one announces none).
        Outgoing::Held(body) => {
            if !body.is_empty() || request.headers.contains_key(http::header::CONTENT_LENGTH) {
                request
                    .insert_header(http::header::CONTENT_LENGTH, body.len().to_string())
                    .map_err(refusal)?;
            }
        }
        // A declared length is passed on (pingora checked it); otherwise HTTP/1.1 chunks it.
        Outgoing::Streamed { session, .. } => {
            if !request.headers.contains_key(http::header::CONTENT_LENGTH)
                && !h2
                && !session.is_body_empty()
            {
                request
                    .insert_header(http::header::TRANSFER_ENCODING, "chunked")
                    .map_err(refusal)?;
            }
        }
    }
    origin
        .write_request_header(Box::new(request))
        .await
        .map_err(refusal)?;
    let sent = match body {
        Outgoing::Held(body) => {
            let len = body.len() as u64;
            if !body.is_empty() {
                origin
                    .write_request_body(body, true)
                    .await
                    .map_err(refusal)?;
            }
            len
        }
        Outgoing::Streamed { session, within } => {
            stream_body(session, &mut origin, within, target).await?
        }
    };
    origin.finish_request_body().await.map_err(refusal)?;
    // Interim answers (100 Continue, 103 Early Hints, …) come before the answer: they are
    // read and dropped — the whole body went at once, and the sandbox gets one answer, which
    // is scanned — up to a bound, so an origin cannot keep the exchange going with them.
    let mut interim = 0;
    let mut header = loop {
        origin.read_response_header().await.map_err(refusal)?;
        let header = origin.response_header().cloned().ok_or_else(|| {
            Refusal::new(
                ErrorCode::UpstreamError,
                format!("{target} sent no response"),
            )
        })?;
        if !header.status.is_informational()
            || header.status == http::StatusCode::SWITCHING_PROTOCOLS
        {
            break header;
        }
        interim += 1;
        if interim > MAX_INTERIM_ANSWERS {
            return Err(Refusal::new(
                ErrorCode::UpstreamBadResponse,
                format!(
                    "{target} sent more than {MAX_INTERIM_ANSWERS} interim (1xx) answers; none \
                     of them was passed on"
                ),
            ));
        }
    };
    // A 101 keeps the headers that complete the upgrade's handshake.
    let switching = header.status == http::StatusCode::SWITCHING_PROTOCOLS;
    for name in upstream::hop_by_hop_headers(&header.headers) {
        if switching && (name == http::header::UPGRADE || name == http::header::CONNECTION) {
            continue;
        }
        header.remove_header(&name);
    }
    let answer = Answer {
        connector,
        peer,
        origin,
        header,
        early: Vec::new(),
        ended: false,
    };
    Ok((answer, sent))
}

/// Passes the sandbox's body on as it arrives; returns the bytes sent.
async fn stream_body(
    session: &mut Session,
    origin: &mut HttpSession,
    within: &(dyn Fn(u64) -> Result<(), Refusal> + Sync),
    target: &str,
) -> Result<u64, Refusal> {
    // A client waiting for `100 Continue` is told to send.
    if expects_continue(session) {
        session
            .downstream_session
            .write_continue_response()
            .await
            .map_err(|e| {
                Refusal::bad_request(format!(
                    "could not ask for the request body: {}",
                    e.etype().as_str()
                ))
            })?;
    }
    let mut sent = 0u64;
    loop {
        let chunk = session.read_request_body().await.map_err(|e| {
            Refusal::bad_request(format!(
                "could not read the request body: {}",
                e.etype().as_str()
            ))
        })?;
        let Some(chunk) = chunk else {
            return Ok(sent);
        };
        sent += chunk.len() as u64;
        // Over the limit, the origin has part of the body but never its end.
        within(sent)?;
        origin
            .write_request_body(chunk, false)
            .await
            .map_err(|e| upstream::refusal_for_upstream_error(&e, target))?;
    }
}

/// Whether the sandbox waits for `100 Continue` before it sends the body.
pub fn expects_continue(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

impl Answer<'_> {
    /// The origin's status code.
    pub fn status(&self) -> u16 {
        self.header.status.as_u16()
    }

    /// Removes a header from the answer before it is relayed.
    pub fn remove_header(&mut self, name: &http::HeaderName) {
        self.header.remove_header(name);
    }

    /// Whether the answer's body is as the origin has it: no `Content-Encoding` but
    /// `identity`.
    pub fn uncompressed(&self) -> bool {
        self.header
            .headers
            .get_all(http::header::CONTENT_ENCODING)
            .iter()
            .all(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"))
    }

    /// The protocol the origin switched to (its `Upgrade` header), if it names one in text.
    pub fn upgrade(&self) -> Option<&str> {
        self.header
            .headers
            .get(http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
    }

    /// Whether the origin accepted a WebSocket extension. One such as `permessage-deflate`
    /// transforms every message's payload, so a scan of the raw stream would not see a token
    /// in it.
    pub fn extended(&self) -> bool {
        self.header
            .headers
            .contains_key(http::header::SEC_WEBSOCKET_EXTENSIONS)
    }

    /// Drops the answer unseen (its connection is not reused).
    pub fn discard(self) {}

    /// Reads up to `window` bytes of the body ahead and scans them and the header for the
    /// token; if it is there, nothing of the answer is relayed.
    pub async fn screen(
        &mut self,
        scan: &mut ReflectionScan,
        window: usize,
    ) -> Result<(), Screened> {
        if scan.header_reflects(&self.header) {
            return Err(Screened::Reflected);
        }
        let mut read = 0;
        while read < window {
            match self.origin.read_response_body().await {
                Ok(Some(chunk)) => {
                    read += chunk.len();
                    let pieces = scan.pass(chunk, 1).map_err(|_| Screened::Reflected)?;
                    self.early
                        .extend(pieces.into_iter().filter(|p| !p.is_empty()));
                }
                Ok(None) => {
                    self.ended = true;
                    break;
                }
                Err(e) => {
                    return Err(Screened::Failed(upstream::refusal_for_upstream_error(
                        &e,
                        &self.peer.sni,
                    )))
                }
            }
        }
        Ok(())
    }

    /// Relays the answer to the sandbox: what was read ahead, then the rest, each later
    /// chunk scanned first when `scan` is given (and bytes that could be the token's start
    /// withheld until the next chunk shows they are not). A failure here leaves the sandbox
    /// with part of an answer, and its connection is closed.
    pub async fn relay(
        mut self,
        session: &mut Session,
        mut scan: Option<&mut ReflectionScan>,
    ) -> Result<Relayed, RelayError> {
        let status = self.status();
        session
            .write_response_header(Box::new(self.header), false)
            .await
            .map_err(RelayError::Broken)?;
        crate::egress::panics::inject(session.req_header().uri.path(), "relay");
        let mut bytes_out = 0;
        for chunk in std::mem::take(&mut self.early) {
            bytes_out += chunk.len() as u64;
            session
                .write_response_body(Some(chunk), false)
                .await
                .map_err(RelayError::Broken)?;
        }
        if !self.ended {
            while let Some(chunk) = self
                .origin
                .read_response_body()
                .await
                .map_err(RelayError::Broken)?
            {
                let pieces = match scan.as_mut() {
                    Some(scan) => scan.pass(chunk, 1).map_err(|_| RelayError::Reflected)?,
                    None => [chunk, Bytes::new()],
                };
                for piece in pieces.into_iter().filter(|p| !p.is_empty()) {
                    bytes_out += piece.len() as u64;
                    session
                        .write_response_body(Some(piece), false)
                        .await
                        .map_err(RelayError::Broken)?;
                }
            }
        }
        if let Some(scan) = scan {
            let rest = scan.end().map_err(|_| RelayError::Reflected)?;
            if !rest.is_empty() {
                bytes_out += rest.len() as u64;
                session
                    .write_response_body(Some(rest), false)
                    .await
                    .map_err(RelayError::Broken)?;
            }
        }
        session
            .write_response_body(None, true)
            .await
            .map_err(RelayError::Broken)?;
        self.connector
            .release_http_session(self.origin, &self.peer, None)
            .await;
        Ok(Relayed { status, bytes_out })
    }

    /// Relays a 101 answer to an upgrade request, then passes bytes both ways, uninspected
    /// but for `scan`: what the origin sends is searched for the token injected into the
    /// handshake (an origin could echo its request's headers as a message), and the connection
    /// cut before it. It runs until either side closes (or fails), or `until` is ready; the
    /// other side is then closed too. The origin's read timeout no longer applies: an upgraded
    /// connection may idle.
    pub async fn pipe(
        mut self,
        session: &mut Session,
        mut scan: Option<UpgradeScan<'_>>,
        until: impl std::future::Future<Output = ()>,
    ) -> Piped {
        let mut until = std::pin::pin!(until);
        let mut pieces = Vec::with_capacity(4);
        let mut piped = Piped {
            bytes_in: 0,
            bytes_out: 0,
            end: PipeEnd::Closed,
        };
        if let Err(e) = session
            .write_response_header(Box::new(self.header), false)
            .await
        {
            piped.end = PipeEnd::Failed(e);
            return piped;
        }
        self.origin.set_read_timeout(None);
        if let HttpSession::H1(h1) = &mut self.origin {
            h1.maybe_upgrade_body_writer();
        }
        piped.end = loop {
            tokio::select! {
                _ = &mut until => break PipeEnd::Ended,
                from_sandbox = session.read_request_body() => match from_sandbox {
                    Ok(Some(bytes)) => {
                        piped.bytes_in += bytes.len() as u64;
                        if let Err(e) = self.origin.write_request_body(bytes, false).await {
                            break PipeEnd::Failed(e);
                        }
                    }
                    Ok(None) => break PipeEnd::Closed,
                    Err(e) => break PipeEnd::Failed(e),
                },
                from_origin = self.origin.read_response_body() => match from_origin {
                    Ok(Some(bytes)) => {
                        pieces.clear();
                        match scan.as_mut() {
                            Some(scan) => match scan.pass(bytes, &mut pieces) {
                                Ok(()) => {}
                                Err(Cut::Reflected) => break PipeEnd::Reflected,
                                Err(Cut::Unreadable(what)) => break PipeEnd::Unreadable(what),
                            },
                            None => pieces.push(bytes),
                        }
                        let mut failed = None;
                        for piece in pieces.drain(..) {
                            piped.bytes_out += piece.len() as u64;
                            if let Err(e) = session.write_response_body(Some(piece), false).await {
                                failed = Some(e);
                                break;
                            }
                        }
                        if let Some(e) = failed {
                            break PipeEnd::Failed(e);
                        }
                    }
                    Ok(None) => break PipeEnd::Closed,
                    Err(e) => break PipeEnd::Failed(e),
                },
            }
        };
        // The sandbox's side is closed by the proxy (an upgraded connection is not reused);
        // the origin's is dropped here.
        if matches!(piped.end, PipeEnd::Closed) {
            let _ = session.write_response_body(None, true).await;
        }
        piped
    }
}
