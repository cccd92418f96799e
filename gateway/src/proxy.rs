//! The egress pipeline: pingora's request phases, each delegating to one step of the data
//! path (see DESIGN.md). Plain HTTP and intercepted HTTPS both arrive here.
//!
//! `request_filter` does everything that must happen before a byte is forwarded — who is
//! asking, where to, and whether that destination may be reached — so that nothing reaches
//! an origin until every check has passed. The later phases only shape the forwarded request
//! and response.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};

use bytes::Bytes;
use http::HeaderName;
use pingora::connectors::http::Connector;
use tollgate_policy::{Decision, Outcome};
use tollgate_storage::{ApprovalKind, AuditRecord};

use crate::approval::{new_approval_id, Approvals, HoldEnd, HoldRequest, Released};
use crate::audit::AuditTrail;
use crate::classify;
use crate::credentials::reflection::ReflectionScan;
use crate::credentials::{Credentials, Injection};
use crate::decide::PolicyStore;
use crate::identity::{self, Agent, AgentRegistry, IdentityError, ListenerBinding, RunMode};
use crate::intercept::Tunnel;
use crate::metrics::Metrics;
use crate::panics;
use crate::quota::Quotas;
use crate::replay::{self, Outgoing, PipeEnd, RelayError, Screened};
use crate::reply::Refusal;
use crate::target::{Scheme, Target};
use crate::telemetry::{RequestTrace, SpanExtras, Telemetry, REQUEST_LOG_TARGET};
use crate::toolcall::{ToolCallRef, ToolCalls, TOOL_CALL_HEADER};
use crate::upstream::{self, Upstream};

/// State shared by every listener's pipeline.
pub struct Shared {
    /// The agents.
    pub registry: Arc<AgentRegistry>,
    /// The policy set in force.
    pub policies: Arc<PolicyStore>,
    /// The agents' open tool calls.
    pub tool_calls: Arc<ToolCalls>,
    /// Credential rules, providers and tokens.
    pub credentials: Arc<Credentials>,
    /// How origins are reached.
    pub upstream: Upstream,
    /// Requests held for a person.
    pub approvals: Arc<Approvals>,
    /// Sends released requests (same trust and pool settings as the proxy's own).
    pub connector: Connector,
    /// Where audit records go.
    pub audit: Arc<AuditTrail>,
    /// Request counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The span per request, exported over OTLP.
    pub telemetry: Arc<Telemetry>,
    /// What each agent may use at once (connections, rate, body size, held requests).
    pub quotas: Arc<Quotas>,
}

/// The pipeline of one listener: the shared state plus how that listener identifies agents.
pub struct Egress {
    shared: Arc<Shared>,
    binding: ListenerBinding,
}

impl Egress {
    /// The pipeline for a listener with `binding`.
    pub fn new(shared: Arc<Shared>, binding: ListenerBinding) -> Self {
        Egress { shared, binding }
    }
}

/// What the phases of one request learn and pass on.
pub struct RequestCtx {
    started: Instant,
    agent: Option<Arc<Agent>>,
    target: Option<Target>,
    tool_call: Option<ToolCallRef>,
    decision: Option<Decision>,
    credential: Option<Injection>,
    addr: Option<SocketAddr>,
    /// The path with its query, as the request named it (for approval records).
    path_and_query: String,
    /// The method as records show it when an override header named another
    /// ([`crate::classify::Classified::overridden`]).
    overridden: Option<String>,
    /// The protocol an upgrade request asked for.
    upgrade: Option<String>,
    /// The approval that held the request (the last one, if it was held twice).
    approval: Option<String>,
    /// Request body bytes the gateway read itself.
    bytes_in: u64,
    /// Request body bytes streamed to the origin so far (checked against the agent's limit
    /// when the length was not declared).
    body_streamed: u64,
    /// Set when the gateway sent the request itself and relayed the answer.
    relayed: Option<replay::Relayed>,
    /// Set when the gateway answered the request itself.
    refusal: Option<Refusal>,
    /// Time spent held for approval.
    approval_wait: Duration,
    /// The request's trace id and span.
    trace: RequestTrace,
}

/// Why the pipeline stopped before forwarding.
enum Stop {
    /// Answer the sandbox with this.
    Refuse(Refusal),
    /// The sandbox went away while its request was held: nothing to answer, nothing sent.
    ClientGone,
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Self {
        Stop::Refuse(refusal)
    }
}

impl From<HoldEnd> for Stop {
    fn from(end: HoldEnd) -> Self {
        match end {
            HoldEnd::NotRecorded(refusal) | HoldEnd::Refused(refusal) => Stop::Refuse(refusal),
            HoldEnd::ClientGone => Stop::ClientGone,
        }
    }
}

/// How an admitted request goes on.
enum Admitted {
    /// Through pingora's proxy path, body streamed, answer relayed as it comes (no token was
    /// injected, nothing held, no upgrade).
    Proxy,
    /// The gateway sends it itself ([`replay`]): it was released by an approval (its body
    /// held), or it carries an injected token, whose answer is scanned before it is relayed,
    /// or it is an upgrade (the bytes are then piped both ways), or (`obo_fallback`) a
    /// 401/403 answer to the agent's own token may turn into an on-behalf-of approval and a
    /// second try with the approver's token.
    Send {
        /// The whole request body, or `None` to stream it from the sandbox.
        body: Option<Bytes>,
        /// If a 401/403 answer becomes an on-behalf-of approval (the body is held): what the
        /// request asks, to decide it again when that approval releases it.
        obo_fallback: Option<Box<tollgate_policy::RequestFacts>>,
    },
}

/// The sandbox's address as the socket reports it.
fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The refusal while the store cannot write: every request must leave an audit record, so
/// none is forwarded (fail closed).
fn storage_unavailable(why: &str) -> Refusal {
    tracing::debug!(error = why, "the store cannot write; refusing the request");
    Refusal::new(
        503,
        "storage_unavailable",
        "the gateway cannot write its audit trail (is its data directory's disk full or \
         read-only?), so it forwards nothing; it serves again by itself once the disk takes writes",
    )
}

/// The refusal for a connection no agent owns.
pub fn identity_refusal(e: &IdentityError) -> Refusal {
    Refusal::new(
        403,
        "unknown_agent",
        format!("{e}; the gateway forwards requests only for registered agents"),
    )
}

/// Where the request goes, and its path (with query): the tunnel's origin for intercepted
/// HTTPS, the absolute URL for plain proxy requests.
fn request_target(session: &Session) -> Result<(Target, String), Refusal> {
    let tunnel = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|ssl| ssl.extension.get::<Tunnel>());
    let req = session.req_header();
    match tunnel {
        Some(tunnel) => {
            // Inside a tunnel the origin is fixed by the CONNECT; a Host header (or h2
            // :authority) naming another host is a request meant for someone else.
            let named = req
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| {
                    req.headers
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                });
            if let Some(named) = named {
                let agrees = Target::from_url_authority(Scheme::Https, &named)
                    .map(|t| t.host == tunnel.target.host && t.port == tunnel.target.port)
                    .unwrap_or(false);
                if !agrees {
                    return Err(Refusal::new(
                        421,
                        "misdirected_request",
                        format!(
                            "this tunnel leads to {}; the request names {:?}",
                            tunnel.target.host_header(),
                            crate::target::redacted(&named)
                        ),
                    ));
                }
            }
            let path = req
                .uri
                .path_and_query()
                .map(|pq| pq.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            Ok((tunnel.target.clone(), path))
        }
        None => {
            // pingora keeps the absolute-form target as sent in raw_path(); `uri` holds only
            // its path.
            let raw = String::from_utf8_lossy(req.raw_path());
            let uri: http::Uri = raw.parse().map_err(|_| {
                Refusal::bad_request(
                    crate::target::TargetError::NotAbsolute(crate::target::redacted(&raw))
                        .to_string(),
                )
            })?;
            let scheme = match uri.scheme_str() {
                Some(s) if s.eq_ignore_ascii_case("http") => Scheme::Http,
                Some(s) if s.eq_ignore_ascii_case("https") => Scheme::Https,
                Some(other) => {
                    return Err(Refusal::bad_request(
                        crate::target::TargetError::BadScheme(other.to_string()).to_string(),
                    ))
                }
                None => {
                    return Err(Refusal::bad_request(
                        crate::target::TargetError::NotAbsolute(crate::target::redacted(
                            &uri.to_string(),
                        ))
                        .to_string(),
                    ))
                }
            };
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let target = Target::from_url_authority(scheme, authority)
                .map_err(|e| Refusal::bad_request(e.to_string()))?;
            let path = uri
                .path_and_query()
                .map(|pq| pq.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            Ok((target, path))
        }
    }
}

impl Egress {
    /// Steps 1–7 up to the connection: identity, destination, classification, decision, and
    /// the network guard. Nothing is forwarded unless every step admits the request.
    async fn admit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Admitted, Stop> {
        // 0. The head arrived in time, one well-framed request with nothing hidden in it:
        //    checked before pingora parsed it (`head`), or — HTTP/2 frames its own — here.
        if session.as_http1().is_none() {
            crate::framing::check_decoded(session.req_header())?;
        }
        // 1. Who is asking.
        let mut agent =
            identity::identify(&self.shared.registry, &self.binding, client_ip(session))
                .map_err(|e| identity_refusal(&e))?;
        ctx.agent = Some(agent.clone());
        // 1a. Within what this agent may use: its request rate and body size.
        self.shared.quotas.start_request(&agent)?;
        self.shared
            .quotas
            .check_body(&agent, declared_length(session))?;
        // 1b. Nothing leaves that cannot be recorded: with the store failing, refuse.
        if let Some(why) = self.shared.audit.unwritable() {
            return Err(storage_unavailable(&why).into());
        }
        // 2. Where to (interception already happened on the socket), and — for a host that
        //    gets credentials — only over TLS to the credential rule's ports.
        let (target, path) = request_target(session)?;
        ctx.target = Some(target.clone());
        self.shared.credentials.check_transport(&target)?;
        // 3. What it asks for (the method an override names, a body, an upgrade), and in
        //    which of the agent's tool calls.
        let has_body = !session.is_body_empty();
        let req = session.req_header();
        let classified =
            classify::classify(req.method.as_str(), &req.headers, has_body, target, &path)?;
        ctx.overridden = classified.overridden;
        let mut request = classified.facts;
        ctx.upgrade = request.upgrade.clone();
        let named = req
            .headers
            .get(TOOL_CALL_HEADER)
            .and_then(|v| v.to_str().ok());
        ctx.tool_call = self
            .shared
            .tool_calls
            .current(&agent.id, self.binding.session(), named);
        request.tool_call = ctx.tool_call.as_ref().map(|tc| tc.id.clone());
        // 4. Whether it may: allow, deny, or needs approval.
        let (decision, engine) = self.shared.policies.decide(&agent, &request);
        let outcome = decision.outcome;
        if outcome == Outcome::Deny {
            let refusal = Refusal::for_decision(&decision, engine.version());
            ctx.decision = Some(decision);
            return Err(refusal.into());
        }
        ctx.path_and_query = path;
        // 5. A person decides: the request, its body included, is held until then. An ARM
        //    write outside the agent's RBAC scopes needs the approver's own identity.
        let mut body = None;
        let mut lent = None;
        if outcome == Outcome::NeedsApproval {
            // The approval record names the policies that asked for it.
            ctx.decision = Some(decision.clone());
            let kind = if self.may_act_on_behalf(&agent, &request.target)
                && request.outside_scopes(&agent.scopes)
            {
                ApprovalKind::OnBehalfOf
            } else {
                ApprovalKind::Request
            };
            let approvals = &self.shared.approvals;
            let limits = self.shared.quotas.of(&agent);
            // The held body is kept in memory: the smaller of the two limits applies.
            let body_limit = match limits.request_body_bytes {
                0 => approvals.max_body_bytes(),
                own => approvals
                    .max_body_bytes()
                    .min(own.try_into().unwrap_or(usize::MAX)),
            };
            let held = match approvals.check_capacity(&agent.id, limits.pending_approvals) {
                Ok(()) => match read_whole_body(session, body_limit).await {
                    Ok(held) => {
                        let max_pending = limits.pending_approvals;
                        self.hold(session, ctx, &agent, kind, held, max_pending)
                            .await
                    }
                    Err(refusal) => Err(refusal.into()),
                },
                Err(refusal) => Err(refusal.into()),
            };
            // A refused hold (denied, expired, too many) still says which policies asked.
            let (held, released) = held.map_err(|stop| match stop {
                Stop::Refuse(refusal) => {
                    Stop::Refuse(refusal.with_decision(&decision, engine.version()))
                }
                gone => gone,
            })?;
            body = Some(held);
            lent = released.obo_token.zip(released.record.approver);
            // 5a. Decided again at release, with what is in force now: while it waited, the
            //     policies may have been reloaded, the agent's run mode changed, or the agent
            //     removed; an approval lifts only what asked for it.
            agent = self.decide_at_release(&agent, &request, ctx).await?;
        }
        ctx.decision = Some(decision);
        // 6. Credentials: the sandbox's are stripped; a token for this tool call — or the one
        //    the approver lent — injected. Never for a tool call that has closed meanwhile
        //    (its tokens are gone, and a new one must not be made for it).
        self.tool_call_still_open(&agent, ctx)?;
        let credentials = &self.shared.credentials;
        ctx.credential = match lent {
            Some((token, approver)) => Some(credentials.lend(
                &agent,
                ctx.tool_call.as_ref(),
                &request.target,
                token,
                &approver,
                self.shared.approvals.obo_lifetime(),
            )?),
            None => {
                credentials
                    .for_request(&agent, ctx.tool_call.as_ref(), &request.target)
                    .await?
            }
        };
        // 7. Resolve asynchronously and keep internal networks out of reach.
        ctx.addr = Some(self.shared.upstream.resolve(&request.target).await?);
        // Checked again last (a fetch or a resolution takes time): a token obtained for a tool
        // call that closed meanwhile is dropped, never sent.
        self.tool_call_still_open(&agent, ctx)?;
        // An upgrade is sent by the gateway itself, which then passes the bytes both ways (it
        // carries no body: classification refused one).
        if ctx.upgrade.is_some() {
            return Ok(Admitted::Send {
                body: Some(body.unwrap_or_default()),
                obo_fallback: None,
            });
        }
        let injected = ctx.credential.as_ref().is_some_and(|c| c.token.is_some());
        // With the agent's own token on its way, a 401/403 may call for the approver's: keep
        // the body (when it is small enough) to send it again.
        let obo_fallback = injected
            && ctx.credential.as_ref().is_some_and(|c| !c.on_behalf_of)
            && agent.run_mode != RunMode::ReadOnly;
        if body.is_none() && obo_fallback {
            let limit = self.shared.approvals.max_body_bytes();
            if body_fits(session, limit) {
                body = Some(read_whole_body(session, limit).await?);
            }
        }
        Ok(match body {
            Some(body) => Admitted::Send {
                body: Some(body),
                obo_fallback: obo_fallback.then(|| Box::new(request)),
            },
            None if injected => Admitted::Send {
                body: None,
                obo_fallback: None,
            },
            None => Admitted::Proxy,
        })
    }

    /// The agent record in force at the release of its approved request, if the policies in
    /// force then, asked again (with `approved = true`), still allow the request. Otherwise
    /// the request is refused — 403 with the deciding policies, or `agent_removed` — and its
    /// approval record says why it was not sent.
    async fn decide_at_release(
        &self,
        agent: &Agent,
        request: &tollgate_policy::RequestFacts,
        ctx: &mut RequestCtx,
    ) -> Result<Arc<Agent>, Stop> {
        let refusal = match self.shared.registry.get(&agent.id) {
            None => Refusal::new(
                403,
                "agent_removed",
                format!(
                    "agent {:?} was removed while its request waited for approval; nothing \
                     was sent",
                    agent.id
                ),
            ),
            Some(now) => {
                let (decision, engine) = self.shared.policies.decide(&now, request);
                if decision.outcome != Outcome::Deny {
                    // What follows (credentials, limits, the record) uses the agent as it is.
                    ctx.agent = Some(now.clone());
                    return Ok(now);
                }
                let refusal = Refusal::new(
                    403,
                    "denied",
                    format!(
                        "approved, but no longer allowed when released (policy version {}): {}",
                        engine.version(),
                        decision.reason
                    ),
                )
                .with_decision(&decision, engine.version());
                ctx.decision = Some(decision);
                refusal
            }
        };
        if let Some(id) = &ctx.approval {
            self.shared.approvals.not_sent(id, &refusal.detail).await;
        }
        Err(refusal.into())
    }

    /// Refuses the request if its tool call closed since it was attributed to it (while it
    /// was held, or while its token was fetched): `403 tool_call_closed`. Every token of a
    /// closed tool call is dropped, and none is fetched or injected for it again.
    fn tool_call_still_open(&self, agent: &Agent, ctx: &RequestCtx) -> Result<(), Refusal> {
        let Some(tool_call) = &ctx.tool_call else {
            return Ok(());
        };
        if self.shared.tool_calls.is_open(&agent.id, tool_call.serial) {
            return Ok(());
        }
        self.shared
            .credentials
            .evict_tool_call(&agent.id, tool_call.serial);
        Err(tool_call_closed(&tool_call.id))
    }

    /// Whether a person may lend `agent` their identity for `target`: never for ReadOnly
    /// agents, and only where a credential rule says what the token is for.
    fn may_act_on_behalf(&self, agent: &Agent, target: &Target) -> bool {
        agent.run_mode != RunMode::ReadOnly && self.shared.credentials.audience(target).is_some()
    }

    /// Records the approval for the request whose `body` the gateway holds, and waits for
    /// it. Returns the body and the approval that released it.
    async fn hold(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        agent: &Agent,
        kind: ApprovalKind,
        body: Bytes,
        max_pending: usize,
    ) -> Result<(Bytes, Released), Stop> {
        ctx.bytes_in = body.len() as u64;
        let id = new_approval_id();
        ctx.approval = Some(id.clone());
        let target = ctx.target.as_ref();
        let held = HoldRequest {
            id,
            agent: agent.id.clone(),
            max_pending,
            tool_call: ctx.tool_call.as_ref().map(|tc| tc.id.clone()),
            kind,
            method: ctx
                .overridden
                .clone()
                .unwrap_or_else(|| session.req_header().method.to_string()),
            url: match target {
                Some(t) => format!(
                    "{}://{}{}",
                    t.scheme.as_str(),
                    t.host_header(),
                    ctx.path_and_query
                ),
                None => ctx.path_and_query.clone(),
            },
            body: body.clone(),
            credential: target.and_then(|t| self.shared.credentials.class(agent, t)),
            obo_audience: match kind {
                ApprovalKind::OnBehalfOf => target
                    .and_then(|t| self.shared.credentials.audience(t))
                    .map(str::to_string),
                ApprovalKind::Request => None,
            },
            policies: ctx
                .decision
                .as_ref()
                .map(|d| d.policies.clone())
                .unwrap_or_default(),
        };
        let client_gone = async {
            // The body is read, so this returns only when the client closes or resets.
            let _ = session.downstream_session.read_body_or_idle(true).await;
        };
        let held_at = Instant::now();
        let released = self.shared.approvals.hold(held, client_gone).await;
        ctx.approval_wait += held_at.elapsed();
        if let Err(HoldEnd::NotRecorded(_)) = &released {
            ctx.approval = None;
        }
        let released = released?;
        Ok((body, released))
    }
}

/// Whether the request's body can be held whole: none, or a declared length within `limit`.
fn body_fits(session: &mut Session, limit: usize) -> bool {
    session.is_body_empty() || declared_length(session).is_some_and(|n| n <= limit as u64)
}

/// The request's `Content-Length`, if it has a valid one.
fn declared_length(session: &Session) -> Option<u64> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Reads the request body into memory, refusing (413) one larger than `limit`.
async fn read_whole_body(session: &mut Session, limit: usize) -> Result<Bytes, Refusal> {
    let too_large = || {
        Refusal::new(
            413,
            "body_too_large",
            format!(
                "this request needs approval, and such requests are held whole; its body is \
                 larger than approvals.max_body_bytes ({limit} bytes)"
            ),
        )
    };
    if declared_length(session).is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    // A client waiting for `100 Continue` is told to send: the gateway takes the body whole.
    if replay::expects_continue(session) {
        if let Err(e) = session.downstream_session.write_continue_response().await {
            return Err(Refusal::bad_request(format!(
                "could not ask for the request body: {}",
                e.etype().as_str()
            )));
        }
    }
    let mut body = bytes::BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => {
                return Err(Refusal::bad_request(format!(
                    "could not read the request body: {}",
                    e.etype().as_str()
                )))
            }
        }
    }
}

/// The request header sent to the origin: origin-form target, the gateway's own header
/// and `stripped` headers (those that speak for another address: `Forwarded`,
/// `X-Forwarded-For`, `Via`, …) removed, sandbox credentials stripped and the tool call's token
/// injected, and `Host` set to the admitted target. Used by the proxy path and by the
/// gateway's own send path alike.
fn shape_upstream_request(
    upstream_request: &mut RequestHeader,
    target: &Target,
    credential: Option<&Injection>,
    stripped: &[HeaderName],
) -> pingora::Result<()> {
    // Origins get origin-form (`/path?query`), never the absolute URL sent to the proxy.
    let origin_form = upstream_request
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .filter(|pq| pq.starts_with('/'))
        .unwrap_or_else(|| "/".to_string());
    let uri = origin_form
        .parse::<http::Uri>()
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

/// The refusal for a request whose tool call closed before it could be sent.
fn tool_call_closed(tool_call: &str) -> Refusal {
    Refusal::new(
        403,
        "tool_call_closed",
        format!(
            "tool call {tool_call:?} closed before this request could be sent; its credentials \
             are gone, and nothing was forwarded"
        ),
    )
}

/// The refusal for an answer that carried the injected token in its header or first bytes.
fn reflected_early() -> Refusal {
    Refusal::new(
        502,
        "credential_reflected",
        "the origin's answer carries the credential the gateway injected into the request; it \
         was not relayed (the sandbox never holds a credential)",
    )
}

/// What the record says of an answer cut short because a later part carried the token.
fn reflected_late() -> Refusal {
    Refusal::new(
        502,
        "credential_reflected",
        "the origin's answer carried the injected credential further on; it was cut short \
         before it",
    )
}

impl Egress {
    /// Sends a request itself and relays the answer — scanned first for an injected token —
    /// unless the agent's own token was refused (401/403) where a person may lend theirs:
    /// then the request is held for an on-behalf-of approval and sent again with the
    /// approver's token. `body` is the held body, or `None` to stream the sandbox's.
    async fn send(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Option<Bytes>,
        obo_fallback: Option<Box<tollgate_policy::RequestFacts>>,
    ) -> Result<(), Stop> {
        let Some(agent) = ctx.agent.clone() else {
            return Err(Refusal::new(500, "internal_error", "no identified agent").into());
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
                        500,
                        "internal_error",
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
                502,
                "upstream_bad_response",
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
                    502,
                    "upstream_bad_response",
                    "the origin compressed its answer to a request that carries a credential, \
                     although the gateway asked for identity; it cannot be checked for the \
                     credential, so none of it was passed on",
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
            let piped = answer.pipe(session, scan.as_mut(), tool_call_ended).await;
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

/// The admitted target and its resolved address (both set once admission passed).
fn admitted(ctx: &RequestCtx) -> Result<(&Target, SocketAddr), Refusal> {
    match (&ctx.target, ctx.addr) {
        (Some(target), Some(addr)) => Ok((target, addr)),
        _ => Err(Refusal::new(500, "internal_error", "no admitted target")),
    }
}

impl Egress {
    /// Ends a request the pipeline stopped: answers a refusal, or gives up on a client that
    /// left.
    async fn stop(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        stop: Stop,
    ) -> pingora::Result<bool> {
        match stop {
            Stop::Refuse(refusal) => {
                if session.response_written().is_none() {
                    refusal.send(session).await?;
                }
                ctx.refusal = Some(refusal);
                Ok(true)
            }
            Stop::ClientGone => Err(pingora::Error::explain(
                ErrorType::ConnectionClosed,
                "the client left before its answer was complete",
            )
            .into_down()),
        }
    }
}

#[async_trait]
impl ProxyHttp for Egress {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            agent: None,
            target: None,
            tool_call: None,
            decision: None,
            credential: None,
            addr: None,
            path_and_query: String::new(),
            overridden: None,
            upgrade: None,
            approval: None,
            bytes_in: 0,
            body_streamed: 0,
            relayed: None,
            refusal: None,
            approval_wait: Duration::ZERO,
            trace: self.shared.telemetry.start_request(),
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        // A panic here (a bug) ends the request as a failure, still answered and recorded
        // (`panics`): the request may have reached its origin already.
        let served = panics::catching("the egress pipeline", async {
            match self.admit(session, ctx).await {
                Ok(Admitted::Proxy) => Ok(false),
                Ok(Admitted::Send { body, obo_fallback }) => {
                    // Boxed: this path's state is large, and the proxy path should not carry it.
                    match Box::pin(self.send(session, ctx, body, obo_fallback)).await {
                        Ok(()) => Ok(true),
                        Err(stop) => Err(stop),
                    }
                }
                Err(stop) => Err(stop),
            }
        })
        .await;
        match served {
            Ok(Ok(proxied_by_pingora)) => Ok(proxied_by_pingora),
            Ok(Err(stop)) => self.stop(session, ctx, stop).await,
            // Answered by `fail_to_proxy` (502, unless part of the answer is out already) and
            // the connection closed: an answer cut short must never look whole.
            Err(()) => {
                ctx.refusal = Some(panics::refusal());
                Err(pingora::Error::explain(
                    ErrorType::InternalError,
                    "a panic while serving the request",
                ))
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        match (&ctx.target, ctx.addr) {
            (Some(target), Some(addr)) => Ok(Box::new(self.shared.upstream.peer(target, addr))),
            // request_filter either fills both or answers the request itself.
            _ => pingora::Error::e_explain(ErrorType::InternalError, "no admitted target"),
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // A declared length was checked on admission; a chunked body is counted as it goes.
        // Over the limit, the origin has the head and part of the body but never its end, so
        // it cannot take the request as complete; the sandbox gets 413.
        if let (Some(agent), Some(chunk)) = (&ctx.agent, body.as_ref()) {
            ctx.body_streamed += chunk.len() as u64;
            if let Err(refusal) = self
                .shared
                .quotas
                .check_body(agent, Some(ctx.body_streamed))
            {
                ctx.refusal = Some(refusal);
                return Err(pingora::Error::explain(
                    ErrorType::Custom("body_too_large"),
                    "the request body is over the agent's limit",
                ));
            }
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(target) = &ctx.target else {
            return pingora::Error::e_explain(ErrorType::InternalError, "no admitted target");
        };
        // Hop-by-hop and proxy request headers (incl. those named in Connection) are already
        // gone: pingora's default upstream request policy strips them.
        shape_upstream_request(
            upstream_request,
            target,
            ctx.credential.as_ref(),
            self.shared.upstream.stripped_headers(),
        )
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        panics::inject(session.req_header().uri.path(), "response");
        // pingora strips hop-by-hop headers from requests only; the sandbox must not see the
        // origin's either (e.g. Proxy-Authenticate, or headers the origin named in Connection).
        // (No request with an injected token, and no upgrade, comes this way: see `Admitted`.)
        for name in upstream::hop_by_hop_headers(&upstream_response.headers) {
            upstream_response.remove_header(&name);
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // A refusal decided in a filter (a streamed body over its limit) explains itself.
        let refusal = match ctx.refusal.take() {
            Some(refusal) => Some(refusal),
            None => match e.esource() {
                ErrorSource::Upstream => {
                    let target = ctx
                        .target
                        .as_ref()
                        .map(|t| t.host_header())
                        .unwrap_or_else(|| "the origin".into());
                    Some(upstream::refusal_for_upstream_error(e, &target))
                }
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => {
                        None
                    }
                    _ => Some(Refusal::bad_request(format!(
                        "malformed request: {}",
                        e.etype().as_str()
                    ))),
                },
                _ => Some(Refusal::new(
                    500,
                    "internal_error",
                    "the gateway failed to handle the request",
                )),
            },
        };
        let mut error_code = 0;
        if let Some(refusal) = refusal {
            error_code = refusal.status;
            if session.response_written().is_none() {
                if let Err(send_err) = refusal.send(session).await {
                    tracing::debug!(error = %send_err, "could not send the error response");
                }
            }
            ctx.refusal = Some(refusal);
        }
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        let req = session.req_header();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let elapsed = ctx.started.elapsed();
        // The provider a token came from; never the token.
        let credential = match &ctx.credential {
            Some(c) if c.header.is_some() => Some(c.provider.clone()),
            Some(_) => Some("stripped".to_string()),
            None => None,
        };
        let error = match (&ctx.refusal, e) {
            (Some(refusal), _) => Some(refusal.error.to_string()),
            (None, Some(err)) => Some(err.etype().as_str().to_string()),
            (None, None) => None,
        };
        // The request's summary — never a body, a query or a header value.
        let record = AuditRecord {
            seq: 0,
            at: tollgate_storage::now_millis().saturating_sub(elapsed.as_millis() as u64),
            agent: ctx
                .agent
                .as_ref()
                .map_or_else(|| "-".into(), |a| a.id.clone()),
            tool_call: ctx.tool_call.as_ref().map(|tc| tc.id.clone()),
            session: self.binding.session().map(str::to_string),
            method: ctx
                .overridden
                .clone()
                .unwrap_or_else(|| req.method.to_string()),
            host: ctx
                .target
                .as_ref()
                .map_or_else(|| "-".into(), |t| t.host_header()),
            // The path without its query: query strings often carry tokens.
            path: req.uri.path().to_string(),
            decision: ctx
                .decision
                .as_ref()
                .map(|d| d.outcome.as_str().to_string())
                .unwrap_or_default(),
            policies: ctx
                .decision
                .as_ref()
                .map(|d| d.policies.clone())
                .unwrap_or_default(),
            approval: ctx.approval.clone(),
            approval_wait_ms: ctx
                .approval
                .is_some()
                .then_some(ctx.approval_wait.as_millis() as u64),
            credential,
            status,
            error,
            bytes_in: ctx.bytes_in.max(session.body_bytes_read() as u64),
            bytes_out: ctx
                .relayed
                .as_ref()
                .map_or(session.body_bytes_sent() as u64, |r| r.bytes_out),
            latency_us: elapsed.as_micros() as u64,
            // pingora passed bytes both ways after the 101, and counted them as bodies.
            upgrade: (status == 101).then(|| ctx.upgrade.clone()).flatten(),
            trace_id: String::new(),
            // Linked into the agent's chain by the store.
            prev_hash: String::new(),
            hash: String::new(),
        };
        let end = RequestEnd {
            run_mode: ctx.agent.as_ref().map(|a| a.run_mode.as_str()),
            outcome: ctx.decision.as_ref().map(|d| d.outcome),
            detail: ctx.refusal.as_ref().map(|r| r.detail.as_str()),
            known_agent: ctx.agent.is_some(),
            elapsed,
        };
        record_request(&self.shared, std::mem::take(&mut ctx.trace), record, &end);
    }
}

/// How a request ended, beside its summary.
pub struct RequestEnd<'a> {
    /// The agent's run mode, if it was identified.
    pub run_mode: Option<&'a str>,
    /// The policy decision, if one was made.
    pub outcome: Option<Outcome>,
    /// The refusal's detail, if the gateway answered with one.
    pub detail: Option<&'a str>,
    /// Whether the request came from a registered agent (only those have an audit trail).
    pub known_agent: bool,
    /// From its arrival to its end.
    pub elapsed: Duration,
}

/// The last step for every request, however it ended (forwarded, refused, failed, or refused
/// before pingora took its head): one log line, its metrics, its span and — for a known agent
/// — its audit record, all made from one summary (`record`), which never holds a body, a query
/// or a header value.
pub fn record_request(
    shared: &Shared,
    trace: RequestTrace,
    mut record: AuditRecord,
    end: &RequestEnd<'_>,
) {
    record.trace_id = trace.id();
    let r = &record;
    let elapsed_ms = end.elapsed.as_secs_f64() * 1e3;
    let (decision, policies) = match end.outcome {
        Some(outcome) => (outcome.as_str(), r.policies.join(",")),
        None => ("-", String::new()),
    };
    let (tool_call, credential) = (
        r.tool_call.as_deref().unwrap_or("-"),
        r.credential.as_deref().unwrap_or("-"),
    );
    let approval = r.approval.as_deref().unwrap_or("-");
    match (&r.error, end.detail) {
        (Some(error), Some(detail)) => tracing::info!(
            target: REQUEST_LOG_TARGET,
            agent = r.agent, tool_call, method = r.method, host = r.host, path = r.path, decision,
            credential, policies, approval, status = r.status, elapsed_ms, trace_id = r.trace_id,
            refusal = error, detail, "request refused"
        ),
        (Some(error), None) => tracing::info!(
            target: REQUEST_LOG_TARGET,
            agent = r.agent, tool_call, method = r.method, host = r.host, path = r.path, decision,
            credential, policies, approval, status = r.status, elapsed_ms, trace_id = r.trace_id,
            error, "request failed"
        ),
        (None, _) => tracing::info!(
            target: REQUEST_LOG_TARGET,
            agent = r.agent, tool_call, method = r.method, host = r.host, path = r.path, decision,
            credential, policies, approval, status = r.status, elapsed_ms, trace_id = r.trace_id,
            "request"
        ),
    }
    // The metrics' decision label ("none": refused before a decision).
    let decided = end.outcome.map_or("none", Outcome::as_str);
    let agent = if end.known_agent {
        r.agent.as_str()
    } else {
        "(unknown)"
    };
    shared
        .metrics
        .record_request(agent, decided, r.status, end.elapsed);
    shared.telemetry.finish_request(
        trace,
        &record,
        SpanExtras {
            run_mode: end.run_mode,
            decision: decided,
            latency: end.elapsed,
        },
    );
    if end.known_agent {
        shared.audit.record(record);
    }
}

/// Records a request head refused before pingora parsed it ([`crate::head`]): it is a request
/// like any other for the log, the metrics, the span and — from `agent` — the audit trail,
/// with what of its request line could be read (the path without its query). `tunnel` is the
/// origin of the intercepted connection it came through, if any.
pub fn record_refused_head(
    shared: &Shared,
    agent: Option<&Agent>,
    session: Option<&str>,
    tunnel: Option<&Target>,
    refused: &crate::head::RefusedHead,
) {
    let line = &refused.line;
    // Never more than the path: an authority that does not parse may hold user information
    // (`user:password@`), and a query often holds tokens.
    let (host, path) = match tunnel {
        Some(target) => (target.host_header(), line.target.as_str()),
        None => match Target::from_url(&line.target) {
            Ok((target, _)) => (target.host_header(), path_of(&line.target)),
            Err(_) => ("-".to_string(), path_of(&line.target)),
        },
    };
    let path = match path.split(['?', '#']).next() {
        Some(p) if p.starts_with('/') => p.to_string(),
        _ => "-".to_string(),
    };
    let elapsed = refused.started.elapsed();
    let record = AuditRecord {
        seq: 0,
        at: tollgate_storage::now_millis().saturating_sub(elapsed.as_millis() as u64),
        agent: agent.map_or_else(|| "-".into(), |a| a.id.clone()),
        tool_call: agent.and_then(|a| {
            shared
                .tool_calls
                .current(&a.id, session, None)
                .map(|tc| tc.id)
        }),
        session: session.map(str::to_string),
        method: match line.method.as_str() {
            "" => "-".to_string(),
            m => m.to_string(),
        },
        host,
        path,
        decision: String::new(),
        policies: Vec::new(),
        approval: None,
        approval_wait_ms: None,
        credential: None,
        status: refused.refusal.status,
        error: Some(refused.refusal.error.to_string()),
        bytes_in: 0,
        bytes_out: 0,
        latency_us: elapsed.as_micros() as u64,
        upgrade: None,
        trace_id: String::new(),
        prev_hash: String::new(),
        hash: String::new(),
    };
    let end = RequestEnd {
        run_mode: agent.map(|a| a.run_mode.as_str()),
        outcome: None,
        detail: Some(&refused.refusal.detail),
        known_agent: agent.is_some(),
        elapsed,
    };
    record_request(shared, shared.telemetry.start_request(), record, &end);
}

/// The path of an absolute URL (everything from the first `/` after its authority), or the
/// target itself when it is not one.
fn path_of(target: &str) -> &str {
    match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |at| &rest[at..]),
        None => target,
    }
}
