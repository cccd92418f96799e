//! The gateway's own send path, on the request's side: a request whose answer must be seen
//! before the sandbox sees it (an injected token, a held body, an upgrade) is sent by the
//! gateway ([`crate::egress::replay`]) rather than by pingora's proxy path, and a 401/403 to the
//! agent's own token may turn into an on-behalf-of approval and a second try.

use std::time::Duration;

use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::ErrorType;

use bytes::Bytes;
use http::HeaderName;
use tollgate_storage::ApprovalKind;

use crate::egress::credentials::reflection::ReflectionScan;
use crate::egress::credentials::upgraded::UpgradeScan;
use crate::egress::credentials::Injection;
use crate::egress::panics;
use crate::egress::replay::{self, Outgoing, PipeEnd, RelayError, Screened};
use crate::egress::toolcall::TOOL_CALL_HEADER;
use crate::egress::upstream::{self};
use crate::reply::{ErrorCode, Refusal};
use crate::target::Target;

use super::{admitted, Egress, RequestCtx, Stop};

/// The request header sent to the origin: origin-form target, the gateway's own header
/// and `stripped` headers (those that speak for another address: `Forwarded`,
/// `X-Forwarded-For`, `Via`, …) removed, sandbox credentials stripped and the tool call's token
/// injected, and `Host` set to the admitted target. Used by the proxy path and by the
/// gateway's own send path alike.
pub(super) fn shape_upstream_request(
    upstream_request: &mut RequestHeader,
    target: &Target,
    credential: Option<&Injection>,
    stripped: &[HeaderName],
) -> pingora::Result<()> {
    // Origins get origin-form (`/path?query`), never the absolute URL sent to the proxy: the
    // path and query as parsed, shared rather than copied and parsed again.
    let path_and_query = match upstream_request.uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
        _ => http::uri::PathAndQuery::from_static("/"),
    };
    let mut origin_form = http::uri::Parts::default();
    origin_form.path_and_query = Some(path_and_query);
    let uri = http::Uri::from_parts(origin_form)
        .map_err(|e| pingora::Error::because(ErrorType::InvalidHTTPHeader, "request path", e))?;
    upstream_request.set_uri(uri);
    upstream_request.remove_header(TOOL_CALL_HEADER);
    for name in stripped {
        upstream_request.remove_header(name);
    }
    if let Some(credential) = credential {
        for name in credential.strip.iter() {
            upstream_request.remove_header(name);
        }
        if let Some((name, value)) = &credential.header {
            upstream_request.insert_header(name.clone(), value.clone())?;
            // The answer is scanned for the token as sent: ask for it whole — uncompressed,
            // not a range of it (a slice of an echo could hold part of the token), and no
            // compressed WebSocket messages.
            upstream_request.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
            for name in [
                http::header::RANGE,
                http::header::IF_RANGE,
                http::header::SEC_WEBSOCKET_EXTENSIONS,
            ] {
                upstream_request.remove_header(&name);
            }
        }
    }
    upstream_request.insert_header(http::header::HOST, target.host_header())?;
    Ok(())
}

/// The refusal for an answer that carried the injected token in its header or first bytes.
fn reflected_early() -> Refusal {
    Refusal::new(
        ErrorCode::CredentialReflected,
        "the origin's answer carries the credential the gateway injected into the request; it \
         was not relayed (the sandbox never holds a credential)",
    )
}

/// What the record says of an answer cut short because a later part carried the token.
fn reflected_late() -> Refusal {
    Refusal::new(
        ErrorCode::CredentialReflected,
        "the origin's answer carried the injected credential further on; it was cut short \
         before it",
    )
}

impl Egress {
    /// Sends a request itself and relays the answer — scanned first for an injected token —
    /// unless the agent's own token was refused (401/403) where a person may lend theirs:
    /// then the request is held for an on-behalf-of approval and sent again with the
    /// approver's token. `body` is the held body, or `None` to stream the sandbox's.
    pub(super) async fn send(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Option<Bytes>,
        obo_fallback: Option<Box<tollgate_policy::RequestFacts>>,
    ) -> Result<(), Stop> {
        let Some(agent) = ctx.agent.clone() else {
            return Err(Refusal::new(ErrorCode::InternalError, "no identified agent").into());
        };
        let request = self.upstream_request(session.req_header(), ctx)?;
        let answer = match &body {
            Some(body) => {
                self.exchange(request, ctx, Outgoing::Held(body.clone()))
                    .await?
            }
            None => {
                let quotas = &self.shared.quotas;
                let within = |sent: u64| quotas.check_body(&agent, Some(sent));
                let outgoing = Outgoing::Streamed {
                    session,
                    within: &within,
                };
                self.exchange(request, ctx, outgoing).await?
            }
        };
        let answer = match (obo_fallback, matches!(answer.status(), 401 | 403), body) {
            (Some(asked), true, Some(body)) => {
                answer.discard();
                tracing::info!(
                    agent = agent.id,
                    host = ctx.target.as_ref().map(|t| t.host_header()).unwrap_or_default(),
                    "the origin refused the agent's own identity; holding for an on-behalf-of approval"
                );
                let max_pending = self.shared.quotas.of(&agent).pending_approvals;
                let (body, released) = self
                    .hold(
                        session,
                        ctx,
                        &agent,
                        ApprovalKind::OnBehalfOf,
                        body,
                        max_pending,
                    )
                    .await?;
                // Decided again, as any held request is at its release.
                let agent = self.decide_at_release(&agent, &asked, ctx).await?;
                let (Some(token), Some(approver), Some(target)) = (
                    released.obo_token,
                    released.record.approver,
                    ctx.target.as_ref(),
                ) else {
                    return Err(Refusal::new(
                        ErrorCode::InternalError,
                        "an on-behalf-of approval came without a token",
                    )
                    .into());
                };
                self.tool_call_still_open(&agent, ctx)?;
                ctx.credential = Some(self.shared.credentials.lend(
                    &agent,
                    ctx.tool_call.as_ref(),
                    target,
                    token,
                    &approver,
                    self.shared.approvals.obo_lifetime(),
                )?);
                // A close between the check and the loan: the lent token goes with the rest.
                self.tool_call_still_open(&agent, ctx)?;
                let request = self.upstream_request(session.req_header(), ctx)?;
                self.exchange(request, ctx, Outgoing::Held(body)).await?
            }
            (_, _, _) => answer,
        };
        panics::inject(session.req_header().uri.path(), "send");
        self.relay(session, ctx, answer).await
    }

    /// Relays an answer to a request the gateway sent itself; with an injected token, only
    /// after scanning it for that token.
    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut answer: replay::Answer<'_>,
    ) -> Result<(), Stop> {
        let switching = answer.status() == 101;
        if switching && ctx.upgrade.is_none() {
            return Err(Refusal::new(
                ErrorCode::UpstreamBadResponse,
                "the origin switched protocols on a request that asked for no upgrade; none of \
                 its answer was passed on",
            )
            .into());
        }
        let mut scan = ctx
            .credential
            .as_ref()
            .and_then(|c| c.token.as_ref())
            .and_then(ReflectionScan::new);
        if let Some(scan) = scan.as_mut() {
            // A session the origin opens on the strength of the token is a credential too.
            answer.remove_header(&http::header::SET_COOKIE);
            // Compressed bytes would hide the token from the scan: the gateway asked for
            // none, so an answer that is compressed anyway is not relayed.
            if !switching && !answer.uncompressed() {
                return Err(Refusal::new(
                    ErrorCode::UpstreamBadResponse,
                    "the origin compressed its answer to a request that carries a credential, \
                     although the gateway asked for identity; it cannot be checked for the \
                     credential, so none of it was passed on",
                )
                .into());
            }
            // Nor is an upgraded stream whose messages an extension would compress: the
            // gateway offered none (the sandbox's offer was taken out of the request).
            if switching && answer.extended() {
                return Err(Refusal::new(
                    ErrorCode::UpstreamBadResponse,
                    "the origin accepted a WebSocket extension on a connection that carries a \
                     credential, although the gateway offered none; its messages could not be \
                     checked for the credential, so the connection was not opened",
                )
                .into());
            }
            // After a 101 the body is the upgraded stream: only the header is scanned.
            let window = match switching {
                true => 0,
                false => self.shared.credentials.reflection_scan_bytes(),
            };
            match answer.screen(scan, window).await {
                Ok(()) => {}
                Err(Screened::Reflected) => {
                    self.credential_reflected(ctx);
                    return Err(reflected_early().into());
                }
                Err(Screened::Failed(refusal)) => return Err(refusal.into()),
            }
        }
        if switching {
            // From here on, bytes flow both ways uninspected (but for the injected token in
            // what the origin sends); the record counts them.
            // A connection opened with a tool call's token ends with the tool call.
            let agent = ctx.agent.as_ref().map(|a| a.id.clone());
            let serial = ctx.tool_call.as_ref().map(|tc| tc.serial);
            let tool_calls = &self.shared.tool_calls;
            let tokened = scan.is_some();
            let tool_call_ended = async move {
                match (tokened, agent, serial) {
                    (true, Some(agent), Some(serial)) => {
                        while tool_calls.is_open(&agent, serial) {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    _ => std::future::pending().await,
                }
            };
            let asked = ctx.upgrade.as_deref().unwrap_or_default();
            let scan = scan
                .as_mut()
                .map(|scan| UpgradeScan::new(scan, asked, answer.upgrade()));
            let piped = answer.pipe(session, scan, tool_call_ended).await;
            ctx.bytes_in = piped.bytes_in;
            ctx.relayed = Some(replay::Relayed {
                status: 101,
                bytes_out: piped.bytes_out,
            });
            return match piped.end {
                PipeEnd::Closed => Ok(()),
                PipeEnd::Ended => {
                    tracing::info!(
                        agent = ctx.agent.as_ref().map(|a| a.id.as_str()).unwrap_or("-"),
                        "an upgraded connection opened with a tool call's token closed with the tool call"
                    );
                    Ok(())
                }
                PipeEnd::Failed(e) => {
                    tracing::debug!(error = %e, "an upgraded connection ended with an error");
                    Ok(())
                }
                PipeEnd::Reflected => {
                    self.credential_reflected(ctx);
                    ctx.refusal = Some(reflected_late());
                    Err(Stop::ClientGone)
                }
                PipeEnd::Unreadable(what) => {
                    tracing::warn!(
                        agent = ctx.agent.as_ref().map(|a| a.id.as_str()).unwrap_or("-"),
                        sent = what,
                        "an upgraded connection that carries a credential was cut: the origin \
                         sent what cannot be checked for it"
                    );
                    ctx.refusal = Some(Refusal::new(
                        ErrorCode::UpstreamBadResponse,
                        "the origin sent, inside a connection opened with a credential, what \
                         cannot be checked for the credential; the connection was cut before it",
                    ));
                    Err(Stop::ClientGone)
                }
            };
        }
        match answer.relay(session, scan.as_mut()).await {
            Ok(relayed) => {
                ctx.relayed = Some(relayed);
                Ok(())
            }
            Err(RelayError::Reflected) => {
                // The head and part of the body are out: the connection is cut short here,
                // and the record says why.
                self.credential_reflected(ctx);
                ctx.refusal = Some(reflected_late());
                Err(Stop::ClientGone)
            }
            Err(RelayError::Broken(e)) => {
                tracing::debug!(error = %e, "relaying the answer broke off");
                Err(Stop::ClientGone)
            }
        }
    }

    /// Counts and logs an answer withheld because it carried its request's token.
    fn credential_reflected(&self, ctx: &RequestCtx) {
        self.shared.credentials.count_reflection();
        tracing::warn!(
            agent = ctx.agent.as_ref().map(|a| a.id.as_str()).unwrap_or("-"),
            host = ctx
                .target
                .as_ref()
                .map(|t| t.host_header())
                .unwrap_or_default(),
            "the origin's answer carried the injected credential back; not relayed"
        );
    }

    /// One try: `request` (shaped by [`Egress::upstream_request`]) with `body`.
    async fn exchange(
        &self,
        request: RequestHeader,
        ctx: &mut RequestCtx,
        body: Outgoing<'_>,
    ) -> Result<replay::Answer<'_>, Refusal> {
        let (target, addr) = admitted(ctx)?;
        let (answer, sent) = replay::exchange(
            &self.shared.connector,
            self.shared.upstream.peer(target, addr),
            request,
            body,
            &target.host_header(),
        )
        .await?;
        ctx.bytes_in = ctx.bytes_in.max(sent);
        Ok(answer)
    }

    /// The sandbox's request head as the origin gets it, for the gateway's own send path.
    fn upstream_request(
        &self,
        head: &RequestHeader,
        ctx: &RequestCtx,
    ) -> Result<RequestHeader, Refusal> {
        let (target, _) = admitted(ctx)?;
        let mut request = head.clone();
        for name in upstream::hop_by_hop_headers(&request.headers) {
            request.remove_header(&name);
        }
        // An upgrade asks the origin for it, hop-by-hop as those headers are.
        if let Some(protocol) = head.headers.get(http::header::UPGRADE) {
            if ctx.upgrade.is_some() {
                request
                    .insert_header(http::header::UPGRADE, protocol.clone())
                    .and_then(|_| request.insert_header(http::header::CONNECTION, "upgrade"))
                    .map_err(|e| {
                        Refusal::bad_request(format!("the request cannot be sent: {e}"))
                    })?;
            }
        }
        shape_upstream_request(
            &mut request,
            target,
            ctx.credential.as_ref(),
            self.shared.upstream.stripped_headers(),
        )
        .map_err(|e| Refusal::bad_request(format!("the request cannot be sent: {e}")))?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request line an origin gets for a request sent to the proxy as `target`.
    fn sent_as(target: &[u8]) -> (String, Option<String>) {
        let mut request = RequestHeader::build("GET", target, None).expect("a request head");
        request
            .insert_header(TOOL_CALL_HEADER, "tc-1")
            .expect("a header");
        let (origin, _) = Target::from_url("http://api.github.com:8080/").expect("a URL");
        shape_upstream_request(&mut request, &origin, None, &[]).expect("shaped");
        let host = request
            .headers
            .get(http::header::HOST)
            .map(|v| v.to_str().expect("ASCII").to_string());
        assert!(request.headers.get(TOOL_CALL_HEADER).is_none());
        (
            String::from_utf8_lossy(request.raw_path()).into_owned(),
            host,
        )
    }

    #[test]
    fn origins_get_the_origin_form_and_the_admitted_host() {
        let host = Some("api.github.com:8080".to_string());
        for (sent, origin_form) in [
            (
                &b"http://api.github.com:8080/repos/o/r?per_page=1&q=a%20b"[..],
                "/repos/o/r?per_page=1&q=a%20b",
            ),
            (b"http://api.github.com:8080", "/"),
            (b"http://api.github.com:8080?q=1", "/?q=1"),
            (b"/already/origin?form", "/already/origin?form"),
            (b"//double/slash", "//double/slash"),
            (b"*", "/"),
        ] {
            assert_eq!(
                sent_as(sent),
                (origin_form.to_string(), host.clone()),
                "{}",
                String::from_utf8_lossy(sent)
            );
        }
    }
}
