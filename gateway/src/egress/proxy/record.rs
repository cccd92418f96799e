//! The request's end: one summary of it (never a body, a query or a header value) becomes its
//! log line, its metrics, its span and — for a known agent — its audit record.

use std::time::Duration;

use pingora::proxy::Session;

use tollgate_policy::Outcome;
use tollgate_storage::AuditRecord;

use crate::agent::Agent;
use crate::observe::telemetry::{RequestLine, RequestTrace, SpanExtras};
use crate::target::Target;

use super::{Egress, RequestCtx, Shared};

impl Egress {
    /// Ends a request, however it went: its summary, recorded everywhere by
    /// [`record_request`].
    pub(super) fn record_end(
        &self,
        session: &Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        // A parked request is recorded once, at the end of its turn with the verdict.
        if ctx.parked {
            return;
        }
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
    let elapsed_us = u64::try_from(end.elapsed.as_micros()).unwrap_or(u64::MAX);
    let (decision, policies) = match end.outcome {
        Some(outcome) => (outcome.as_str(), r.policies.join(",")),
        None => ("-", String::new()),
    };
    let (tool_call, credential) = (
        r.tool_call.as_deref().unwrap_or("-"),
        r.credential.as_deref().unwrap_or("-"),
    );
    RequestLine {
        agent: &r.agent,
        tool_call,
        method: &r.method,
        host: &r.host,
        path: &r.path,
        decision,
        credential,
        policies: &policies,
        approval: r.approval.as_deref().unwrap_or("-"),
        status: r.status,
        elapsed_us,
        trace_id: &r.trace_id,
        refusal: r.error.as_deref().zip(end.detail),
        error: r.error.as_deref().filter(|_| end.detail.is_none()),
    }
    .log();
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

/// Records a request head refused before pingora parsed it ([`crate::egress::head`]): it is a request
/// like any other for the log, the metrics, the span and — from `agent` — the audit trail,
/// with what of its request line could be read (the path without its query). `tunnel` is the
/// origin of the intercepted connection it came through, if any.
pub fn record_refused_head(
    shared: &Shared,
    agent: Option<&Agent>,
    session: Option<&str>,
    tunnel: Option<&Target>,
    refused: &crate::egress::head::RefusedHead,
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
