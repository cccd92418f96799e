//! The egress pipeline: pingora's request phases, each delegating to one step of the data
//! path (`docs/design.md`, "Data path"). Plain HTTP and intercepted HTTPS both arrive here.
//!
//! `request_filter` does everything that must happen before a byte is forwarded — who is
//! asking, where to, and whether that destination may be reached — so that nothing reaches
//! an origin until every check has passed (`Egress::admit`, steps 1–7 in order). The later
//! phases only shape the forwarded request and response; `logging` ends every request with
//! its record.
//!
//! - `destination` — step 2 for a request: its target, from the tunnel or the absolute URL;
//! - `hold` — step 5: a request that needs approval, held with its body until a person
//!   decides, and decided again at its release;
//! - `send` — the gateway's own send path for requests it must see the answer to first
//!   (an injected token, a held body, an upgrade, an on-behalf-of retry);
//! - [`record`] — the request's end: its log line, metrics, span and audit record.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};

use bytes::Bytes;
use pingora::connectors::http::Connector;
use tollgate_policy::{Decision, Outcome};

use crate::agent::{Agent, RunMode};
use crate::egress::approval::{Approvals, HoldEnd};
use crate::egress::classify;
use crate::egress::credentials::{Credentials, Injection};
use crate::egress::decide::PolicyStore;
use crate::egress::identity::{self, AgentRegistry, IdentityError, ListenerBinding};
use crate::egress::panics;
use crate::egress::quota::Quotas;
use crate::egress::replay::{self};
use crate::egress::toolcall::{ToolCallRef, ToolCalls, TOOL_CALL_HEADER};
use crate::egress::upstream::{self, Upstream};
use crate::observe::audit::AuditTrail;
use crate::observe::metrics::Metrics;
use crate::observe::telemetry::{RequestTrace, Telemetry};
use crate::reply::{ErrorCode, Refusal};
use crate::target::Target;
use hold::{Decided, Held};

mod destination;
mod hold;
pub mod park;
pub mod record;
mod send;

pub use record::{record_refused_head, record_request, RequestEnd};

/// State shared by every listener's pipeline: what each step of the data path reads.
pub struct Shared {
    /// Step 1: who is speaking (agents by listener or source address).
    pub registry: Arc<AgentRegistry>,
    /// Step 4: the policy set in force, swapped whole on reload.
    pub policies: Arc<PolicyStore>,
    /// Step 3: the agents' open tool calls, which requests are attributed to.
    pub tool_calls: Arc<ToolCalls>,
    /// Step 6: credential rules, providers and the token cache.
    pub credentials: Arc<Credentials>,
    /// Step 7: resolution, the SSRF guard and how origins are reached.
    pub upstream: Upstream,
    /// Step 5: requests held until a person decides.
    pub approvals: Arc<Approvals>,
    /// The gateway's own send path: same trust and pool settings as the proxy's own.
    pub connector: Connector,
    /// Where each request's audit record goes; also whether the store still takes writes.
    pub audit: Arc<AuditTrail>,
    /// Each request's counters and latency, for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Each request's span and log line, exported over OTLP.
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
    /// ([`crate::egress::classify::Classified::overridden`]).
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
    /// For a parked request served again ([`park`]): what admission decided, and how its
    /// hold ended.
    resumed: Option<Box<park::Resumed>>,
    /// Left in pingora's hands by a request that was parked: it ends this turn with no
    /// answer and no record (the request gets both when it is served again).
    parked: bool,
}

impl RequestCtx {
    /// A request's context, from its arrival.
    fn new(trace: RequestTrace) -> RequestCtx {
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
            trace,
            resumed: None,
            parked: false,
        }
    }

    /// What stays in pingora's hands when a request is parked.
    fn parked() -> RequestCtx {
        RequestCtx {
            parked: true,
            ..RequestCtx::new(RequestTrace::default())
        }
    }
}

/// Why the pipeline stopped before forwarding.
enum Stop {
    /// Answer the sandbox with this.
    Refuse(Refusal),
    /// The sandbox went away while its request was held: nothing to answer, nothing sent.
    ClientGone,
    /// The request was parked while it waits for approval ([`park`]): its turn ends without
    /// an answer, and it is served again with the verdict.
    Parked,
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

#[async_trait]
impl ProxyHttp for Egress {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        // A parked request served again goes on with its own context.
        match park::take_resumed() {
            Some(resumed) => *resumed,
            None => RequestCtx::new(self.shared.telemetry.start_request()),
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
                    ErrorType::Custom(ErrorCode::BodyTooLarge.as_str()),
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
        send::shape_upstream_request(
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
                    ErrorCode::InternalError,
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
        self.record_end(session, e, ctx);
    }
}

impl Egress {
    /// Steps 1–7 up to the connection: identity, destination, classification, decision, and
    /// the network guard. Nothing is forwarded unless every step admits the request.
    async fn admit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Admitted, Stop> {
        // A parked request served again goes on from its hold's end (its head and body are
        // the same bytes, and were admitted when they first came).
        if let Some(resumed) = ctx.resumed.take() {
            let park::Resumed {
                decided, waited, ..
            } = *resumed;
            // Boxed, as the hold below: approval's state is large and rare, and every
            // request's pipeline state (boxed and copied per request) would carry it.
            let (decided, release) = Box::pin(self.end_hold(ctx, decided, waited)).await?;
            // The body sent is the one held; the same bytes, given to pingora again, are read
            // past here (pingora keeps a connection only if the request was read whole before
            // its answer).
            if let Err(e) = session.downstream_session.drain_request_body().await {
                let refusal = Refusal::bad_request(format!(
                    "could not read the request body again: {}",
                    e.etype().as_str()
                ));
                if let Some(id) = &ctx.approval {
                    self.shared.approvals.not_sent(id, &refusal.detail).await;
                }
                return Err(refusal.into());
            }
            let Decided {
                request, decision, ..
            } = *decided;
            return self
                .admit_decided(session, ctx, request, decision, Some(release))
                .await;
        }
        // 0. The head arrived in time, one well-framed request with nothing hidden in it:
        //    checked before pingora parsed it (`head`), or — HTTP/2 frames its own — here.
        if session.as_http1().is_none() {
            crate::egress::framing::check_decoded(session.req_header())?;
        }
        // 1. Who is asking.
        let agent = identity::identify(&self.shared.registry, &self.binding, client_ip(session))
            .map_err(|e| identity_refusal(&e))?;
        ctx.agent = Some(agent.clone());
        // 1a. Within what this agent may use: its request rate and body size.
        self.shared.quotas.start_request(&agent)?;
        self.shared
            .quotas
            .check_body(&agent, hold::declared_length(session))?;
        // 1b. Nothing leaves that cannot be recorded: with the store failing, refuse.
        if let Some(why) = self.shared.audit.unwritable() {
            return Err(storage_unavailable(&why).into());
        }
        // 2. Where to (interception already happened on the socket), and — for a host that
        //    gets credentials — only over TLS to the credential rule's ports.
        let (target, path) = destination::request_target(session)?;
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
        if outcome == Outcome::NeedsApproval {
            ctx.decision = Some(decision.clone());
            let decided = Decided {
                agent,
                request,
                decision,
                policy_version: engine.version().to_string(),
            };
            // Boxed: a hold's state is several KiB, which the allowed path need not carry.
            return match Box::pin(self.hold_for_approval(session, ctx, decided)).await? {
                Held::Parked => Err(Stop::Parked),
                Held::Released(decided, release) => {
                    let Decided {
                        request, decision, ..
                    } = *decided;
                    self.admit_decided(session, ctx, request, decision, Some(release))
                        .await
                }
            };
        }
        self.admit_decided(session, ctx, request, decision, None)
            .await
    }

    /// Steps 6–7, for a request the policies allow (after its approval, if it needed one:
    /// `release`): credentials, resolution, and how it is sent.
    async fn admit_decided(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        request: tollgate_policy::RequestFacts,
        decision: Decision,
        release: Option<hold::Release>,
    ) -> Result<Admitted, Stop> {
        let (agent, mut body, lent) = match (release, &ctx.agent) {
            (Some(released), _) => (released.agent, Some(released.body), released.lent),
            (None, Some(agent)) => (agent.clone(), None, None),
            (None, None) => {
                return Err(Refusal::new(ErrorCode::InternalError, "no identified agent").into())
            }
        };
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
            if hold::body_fits(session, limit) {
                body = Some(hold::read_whole_body(session, limit).await?);
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
            // Its turn ends here; `park` serves it again with the verdict.
            Stop::Parked => Ok(true),
            Stop::ClientGone => Err(pingora::Error::explain(
                ErrorType::ConnectionClosed,
                "the client left before its answer was complete",
            )
            .into_down()),
        }
    }
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
        ErrorCode::StorageUnavailable,
        "the gateway cannot write its audit trail (is its data directory's disk full or \
         read-only?), so it forwards nothing; it serves again by itself once the disk takes writes",
    )
}

/// The refusal for a connection no agent owns.
pub fn identity_refusal(e: &IdentityError) -> Refusal {
    Refusal::new(
        ErrorCode::UnknownAgent,
        format!("{e}; the gateway forwards requests only for registered agents"),
    )
}

/// The refusal for a request whose tool call closed before it could be sent.
fn tool_call_closed(tool_call: &str) -> Refusal {
    Refusal::new(
        ErrorCode::ToolCallClosed,
        format!(
            "tool call {tool_call:?} closed before this request could be sent; its credentials \
             are gone, and nothing was forwarded"
        ),
    )
}

/// The admitted target and its resolved address (both set once admission passed).
fn admitted(ctx: &RequestCtx) -> Result<(&Target, SocketAddr), Refusal> {
    match (&ctx.target, ctx.addr) {
        (Some(target), Some(addr)) => Ok((target, addr)),
        _ => Err(Refusal::new(ErrorCode::InternalError, "no admitted target")),
    }
}
