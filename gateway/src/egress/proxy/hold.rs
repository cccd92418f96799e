//! Step 5 of the data path, on the request's side: a request that needs approval is read
//! whole, recorded ([`crate::egress::approval`]) and held until a person decides, it expires
//! or its client leaves; at its release it is decided again with what is in force then.

use std::sync::Arc;
use std::time::Instant;

use pingora::proxy::Session;

use bytes::Bytes;
use tollgate_policy::{Decision, Outcome};
use tollgate_storage::ApprovalKind;

use crate::agent::Agent;
use crate::egress::approval::{new_approval_id, HoldEnd, HoldRequest, Released};
use crate::egress::replay::{self};
use crate::reply::{ErrorCode, Refusal};

use super::park;
use super::{Egress, RequestCtx, Stop};

/// A held request, released: the agent as it is now, the body that was held, and the token
/// an approver lent with it (on-behalf-of), with the approver's name.
pub(super) struct Release {
    pub(super) agent: Arc<Agent>,
    pub(super) body: Bytes,
    pub(super) lent: Option<(crate::egress::credentials::Secret, String)>,
}

/// What admission decided for a request that needs approval: what its release is decided
/// against again, and what admission goes on with after it.
pub(super) struct Decided {
    pub(super) agent: Arc<Agent>,
    pub(super) request: tollgate_policy::RequestFacts,
    pub(super) decision: Decision,
    pub(super) policy_version: String,
}

impl Decided {
    /// A refused hold (denied, expired, too many) still says which policies asked.
    fn explain(&self, stop: Stop) -> Stop {
        match stop {
            Stop::Refuse(refusal) => {
                Stop::Refuse(refusal.with_decision(&self.decision, &self.policy_version))
            }
            other => other,
        }
    }
}

/// How a hold's wait ended: the body held, the verdict (or why there is none), and how long
/// it took.
pub(super) struct Waited {
    pub(super) body: Bytes,
    pub(super) outcome: Result<Released, HoldEnd>,
    pub(super) took: std::time::Duration,
}

/// Where a request that needs approval stands after [`Egress::hold_for_approval`].
pub(super) enum Held {
    /// Released, with what admission decided.
    Released(Box<Decided>, Release),
    /// Parked for the connection loop to wait on ([`super::park`]); its turn in pingora ends
    /// here, without an answer.
    Parked,
}

impl Egress {
    /// Step 5: holds a request that needs approval — its body read whole (within the smaller
    /// of the approvals' and the agent's body limits), its approval recorded — until a
    /// person decides, then decides it again with what is in force at its release. An ARM
    /// write outside the agent's RBAC scopes asks for the approver's own identity
    /// (on-behalf-of). An HTTP/1 request is parked for the wait ([`super::park`]).
    pub(super) async fn hold_for_approval(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        decided: Decided,
    ) -> Result<Held, Stop> {
        let hold = match self.prepare_hold(session, ctx, &decided).await {
            Ok(hold) => hold,
            Err(stop) => return Err(decided.explain(stop)),
        };
        if park::can_park() && keep_connection(session) {
            let head = session
                .as_http1()
                .map(|h1| Bytes::copy_from_slice(&h1.get_headers_raw_bytes()))
                .unwrap_or_default();
            let parked = super::park::Parked {
                ctx: std::mem::replace(ctx, RequestCtx::parked()),
                decided,
                hold,
                approvals: self.shared.approvals.clone(),
                head,
            };
            park::park(Box::new(parked));
            return Ok(Held::Parked);
        }
        let waited = self.wait_in_place(session, hold).await;
        let (decided, release) = self.end_hold(ctx, decided, waited).await?;
        Ok(Held::Released(decided, release))
    }

    /// The hold's end, wherever it waited: the wait accounted for, the verdict taken, and
    /// the request decided again at its release (`decide_at_release`).
    pub(super) async fn end_hold(
        &self,
        ctx: &mut RequestCtx,
        decided: Decided,
        waited: Waited,
    ) -> Result<(Box<Decided>, Release), Stop> {
        let released = match account_wait(ctx, waited.outcome, waited.took) {
            Ok(released) => released,
            Err(stop) => return Err(decided.explain(stop)),
        };
        // 5a. Decided again at release, with what is in force now: while it waited, the
        //     policies may have been reloaded, the agent's run mode changed, or the agent
        //     removed; an approval lifts only what asked for it.
        let agent = self
            .decide_at_release(&decided.agent, &decided.request, ctx)
            .await?;
        let release = Release {
            agent,
            body: waited.body,
            lent: released.obo_token.zip(released.record.approver),
        };
        Ok((Box::new(decided), release))
    }

    /// Checks the agent's room for another held request, reads the body whole and
    /// describes the approval to record.
    async fn prepare_hold(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        decided: &Decided,
    ) -> Result<HoldRequest, Stop> {
        let agent = &decided.agent;
        let kind = if self.may_act_on_behalf(agent, &decided.request.target)
            && decided.request.outside_scopes(&agent.scopes)
        {
            ApprovalKind::OnBehalfOf
        } else {
            ApprovalKind::Request
        };
        let approvals = &self.shared.approvals;
        let limits = self.shared.quotas.of(agent);
        // The held body is kept in memory: the smaller of the two limits applies.
        let body_limit = match limits.request_body_bytes {
            0 => approvals.max_body_bytes(),
            own => approvals
                .max_body_bytes()
                .min(own.try_into().unwrap_or(usize::MAX)),
        };
        approvals.check_capacity(&agent.id, limits.pending_approvals)?;
        let body = read_whole_body(session, body_limit).await?;
        Ok(self.hold_request(session, ctx, agent, kind, body, limits.pending_approvals))
    }

    /// The agent record in force at the release of its approved request, if the policies in
    /// force then, asked again (with `approved = true`), still allow the request. Otherwise
    /// the request is refused — 403 with the deciding policies, or `agent_removed` — and its
    /// approval record says why it was not sent.
    pub(super) async fn decide_at_release(
        &self,
        agent: &Agent,
        request: &tollgate_policy::RequestFacts,
        ctx: &mut RequestCtx,
    ) -> Result<Arc<Agent>, Stop> {
        let refusal = match self.shared.registry.get(&agent.id) {
            None => Refusal::new(
                ErrorCode::AgentRemoved,
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
                    ErrorCode::Denied,
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

    /// Records the approval for the request whose `body` the gateway holds, and waits for
    /// it in place. Returns the body and the approval that released it.
    pub(super) async fn hold(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        agent: &Agent,
        kind: ApprovalKind,
        body: Bytes,
        max_pending: usize,
    ) -> Result<(Bytes, Released), Stop> {
        let hold = self.hold_request(session, ctx, agent, kind, body, max_pending);
        let Waited {
            body,
            outcome,
            took,
        } = self.wait_in_place(session, hold).await;
        Ok((body, account_wait(ctx, outcome, took)?))
    }

    /// The approval to record for the request whose `body` the gateway holds; the request's
    /// context names it from now on.
    fn hold_request(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        agent: &Agent,
        kind: ApprovalKind,
        body: Bytes,
        max_pending: usize,
    ) -> HoldRequest {
        ctx.bytes_in = body.len() as u64;
        let id = new_approval_id();
        ctx.approval = Some(id.clone());
        let target = ctx.target.as_ref();
        HoldRequest {
            id,
            agent: agent.id.clone(),
            max_pending,
            tool_call: ctx.tool_call.as_ref().map(|tc| tc.id.clone()),
            session: self.binding.session().map(str::to_string),
            run_mode: agent.run_mode.as_str().to_string(),
            command: ctx
                .tool_call
                .as_ref()
                .and_then(|tc| tc.command.as_deref().map(str::to_string)),
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
            body,
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
        }
    }

    /// Records `hold` and waits for its verdict within pingora's session.
    async fn wait_in_place(&self, session: &mut Session, hold: HoldRequest) -> Waited {
        let body = hold.body.clone();
        let client_gone = async {
            // The body is read, so this returns only when the client closes or resets.
            let _ = session.downstream_session.read_body_or_idle(true).await;
        };
        let held_at = Instant::now();
        let outcome = self.shared.approvals.hold(hold, client_gone).await;
        Waited {
            body,
            outcome,
            took: held_at.elapsed(),
        }
    }
}

/// Counts a hold's wait in the request's context, and turns how it ended into the release
/// or the reason there is none. A hold refused before it was recorded names no approval.
fn account_wait(
    ctx: &mut RequestCtx,
    outcome: Result<Released, HoldEnd>,
    took: std::time::Duration,
) -> Result<Released, Stop> {
    ctx.approval_wait += took;
    if let Err(HoldEnd::NotRecorded(_)) = &outcome {
        ctx.approval = None;
    }
    Ok(outcome?)
}

/// Keeps the connection open past a request that is about to be parked: its turn in pingora
/// ends without an answer, and the answer comes in the next (whose head, the same one, says
/// again whether the connection is kept after it). Whether it could be kept.
fn keep_connection(session: &mut Session) -> bool {
    if session.as_http1().is_none() {
        return false;
    }
    session.set_keepalive(Some(crate::egress::head::KEEPALIVE_IDLE.as_secs()));
    session.as_http1().is_some_and(|h1| h1.will_keepalive())
}

/// Whether the request's body can be held whole: none, or a declared length within `limit`.
pub(super) fn body_fits(session: &mut Session, limit: usize) -> bool {
    session.is_body_empty() || declared_length(session).is_some_and(|n| n <= limit as u64)
}

/// The request's `Content-Length`, if it has a valid one.
pub(super) fn declared_length(session: &Session) -> Option<u64> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Reads the request body into memory, refusing (413) one larger than `limit`.
pub(super) async fn read_whole_body(session: &mut Session, limit: usize) -> Result<Bytes, Refusal> {
    let too_large = || {
        Refusal::new(
            ErrorCode::BodyTooLarge,
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
