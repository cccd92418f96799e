//! The admin API: the control plane's way in, on its own host-only listener.
//!
//! Every route except `/healthz` needs `Authorization: Bearer <token>`, compared in constant
//! time: the admin token opens every route; a named approver's token (`[[admin.approvers]]`)
//! opens the approval routes only, and the approver's name is recorded on what they decide.
//! Sandboxes never reach this listener, so an agent cannot approve its own request. Bodies are JSON, errors are the gateway's usual
//! `{"error", "detail"}` (see [`crate::reply`]).
//!
//! | route | does |
//! |---|---|
//! | `GET /healthz` | liveness, no authentication |
//! | `GET /ui/approvals` | the approvers' web page (static; it asks for a token) |
//! | `GET /readyz` | readiness: listeners bound |
//! | `GET /metrics` | Prometheus text: requests, latency, held approvals, token cache, TLS leaves, dropped audit records and telemetry, policy version |
//! | `GET /v1/agents` | every agent |
//! | `GET /v1/agents/{id}` | one agent |
//! | `PUT /v1/agents/{id}` | create (201) or replace (200) an agent |
//! | `DELETE /v1/agents/{id}` | remove an agent (204) |
//! | `GET /v1/agents/{id}/tool-calls` | the agent's open tool calls |
//! | `POST /v1/agents/{id}/tool-calls` | open one: `{"id": "...", "ttl_secs": 600, "session": "...", "command": "..."}` (201) |
//! | `DELETE /v1/agents/{id}/tool-calls/{tc}` | close it (204) |
//! | `GET /v1/agents/{id}/audit?since=SEQ&limit=N` | the agent's audit trail from position SEQ (`next` continues it) |
//! | `GET /v1/agents/{id}/audit/verify` | check the trail's hash chain: `{records, first_seq, last_seq, broken: {seq, reason} \| null}` |
//! | `GET /v1/policies` | the policy set in force: version, policies, rejected problems |
//! | `POST /v1/policies/reload` | reload the policy directory now |
//! | `GET /v1/approvals?state=pending&agent=ID` | approvals, oldest first (both filters optional) |
//! | `GET /v1/approvals/events?agent=ID` | the live feed: Server-Sent Events `pending`, `approved`, `denied`, `expired`, `abandoned` (resumable with `Last-Event-ID`) |
//! | `GET /v1/approvals/{id}` | one approval: the held request's method, URL, body hash, … |
//! | `POST /v1/approvals/{id}/approve` | release the held request (once); `{"obo_token": "..."}` lends the approver's token (required for on-behalf-of approvals) |
//! | `POST /v1/approvals/{id}/deny` | refuse it: `{"reason": "..."}` (required) |
//!
//! The routes, by module: `auth` (who is calling: the admin token or an approver's),
//! `status` (`/metrics`, `/readyz`), `agents` (the registry and agents' own listeners),
//! `audit` (agents' audit trails), `sessions` (a conversation thread's listener),
//! `tool_calls`, `approvals` (list, approve, deny), `policies` (the set in force, and
//! reloading it), `page` (the approvers' web page); `respond` holds what they share
//! (body reading, JSON answers, method checks); `events` streams the live feed of approval
//! events. [`shown`] makes text from a sandbox safe to show a person.

pub mod shown;

mod agents;
mod approvals;
mod audit;
mod auth;
mod events;
mod page;
mod policies;
mod respond;
mod sessions;
mod status;
mod tool_calls;

pub use auth::Approvers;

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use tollgate_storage::Store;

use crate::egress::agent_listener::AgentListeners;
use crate::egress::approval::Approvals;
use crate::egress::credentials::Credentials;
use crate::egress::decide::PolicyStore;
use crate::egress::head::HeadDeadlines;
use crate::egress::identity::AgentRegistry;
use crate::egress::toolcall::ToolCalls;
use crate::observe::metrics::{GaugeSources, Metrics};
use crate::reply::{ErrorCode, Refusal};

use respond::{json, only, refusal_response};

/// The live feed's route (streamed, so served apart from the JSON routes).
const EVENTS_PATH: &str = "/v1/approvals/events";

/// The admin API application: the state it reads and changes.
pub struct AdminApi {
    /// Who may call, and as whom.
    pub callers: Approvers,
    /// The agents: read, registered, replaced and removed here.
    pub registry: Arc<AgentRegistry>,
    /// The policy set in force: shown and reloaded here.
    pub policies: Arc<PolicyStore>,
    /// Open tool calls: opened and closed here.
    pub tool_calls: Arc<ToolCalls>,
    /// Agents' limits (how many tool calls each may have open).
    pub quotas: Arc<crate::egress::quota::Quotas>,
    /// Tokens to drop when tool calls close or agents go.
    pub credentials: Arc<Credentials>,
    /// Held requests: listed, approved and denied here.
    pub approvals: Arc<Approvals>,
    /// The durable store (registry, audit).
    pub store: Arc<Store>,
    /// Request counters, rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Where the values `/metrics` reports at scrape time live.
    pub gauges: Arc<GaugeSources>,
    /// The agents' own listeners (opened for agents registered with one).
    pub listeners: Arc<AgentListeners>,
    /// Set once start-up has started every listener; until then `/readyz` answers 503.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

impl AdminApi {
    /// Finds a request's route and calls it: the open routes first, then — with a token —
    /// the approval routes (open to approvers too), then the rest (the admin token only).
    async fn route(&self, session: &mut ServerSession) -> Result<Response<Vec<u8>>, Refusal> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        if path == "/healthz" {
            return only(&method, &[Method::GET])
                .map(|_| json(StatusCode::OK, &serde_json::json!({ "status": "ok" })));
        }
        if path == "/ui/approvals" {
            // The page holds no data: it asks for a token and calls the approval routes.
            only(&method, &[Method::GET])?;
            return Ok(page::approvals_page());
        }
        let caller = self.authorized(session)?;
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let ["v1", "approvals", rest @ ..] = segments.as_slice() {
            return self.approvals_route(session, &method, rest, &caller).await;
        }
        if !caller.admin {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!(
                    "approver {:?} may use the approval routes only",
                    caller.name
                ),
            ));
        }
        match segments.as_slice() {
            ["metrics"] => {
                only(&method, &[Method::GET])?;
                Ok(self.metrics_text())
            }
            ["readyz"] => {
                only(&method, &[Method::GET])?;
                self.readiness()
            }
            ["v1", "agents"] => {
                only(&method, &[Method::GET])?;
                Ok(self.list_agents())
            }
            ["v1", "agents", id] => self.agent_route(session, &method, id).await,
            ["v1", "agents", id, "audit"] => {
                only(&method, &[Method::GET])?;
                self.audit_page(session, id).await
            }
            ["v1", "agents", id, "audit", "verify"] => {
                only(&method, &[Method::GET])?;
                self.verify_audit(id).await
            }
            ["v1", "agents", id, "sessions"] => {
                only(&method, &[Method::GET])?;
                self.list_sessions(id)
            }
            ["v1", "agents", id, "sessions", thread] => {
                self.session_route(session, &method, id, thread).await
            }
            ["v1", "agents", id, "tool-calls"] => self.tool_calls_route(session, &method, id).await,
            ["v1", "agents", id, "tool-calls", tool_call] => {
                only(&method, &[Method::DELETE])?;
                self.close_tool_call(id, tool_call).await
            }
            ["v1", "policies"] => {
                only(&method, &[Method::GET])?;
                Ok(json(StatusCode::OK, &self.policies.status()))
            }
            ["v1", "policies", "reload"] => {
                only(&method, &[Method::POST])?;
                self.reload_policies().await
            }
            _ => Err(Refusal::new(
                ErrorCode::NotFound,
                format!("no route for {path}"),
            )),
        }
    }
}

/// The admin listener: each request head read and checked with the egress listener's
/// deadlines ([`crate::egress::head::serve_http1`]): a connection that sends nothing, or a head too
/// slowly, is closed, so a slow client cannot hold the admin API's connections open.
pub struct AdminApp {
    api: Arc<AdminApi>,
    deadlines: HeadDeadlines,
}

impl AdminApp {
    /// `api`, behind the head deadlines.
    pub fn new(api: AdminApi, deadlines: HeadDeadlines) -> Self {
        AdminApp {
            api: Arc::new(api),
            deadlines,
        }
    }
}

#[async_trait]
impl ServerApp for AdminApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        crate::egress::head::serve_http1(&self.api, stream, self.deadlines, shutdown, |refused| {
            let refusal = &refused.refusal;
            tracing::info!(
                status = refusal.status,
                error = refusal.error,
                detail = %refusal.detail,
                "admin request head refused"
            );
        })
        .await;
        None
    }
}

#[async_trait]
impl HttpServerApp for AdminApi {
    /// One request: the feed's stream, or one JSON answer (and the connection kept for the
    /// next request).
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) | Err(_) => return None,
        }
        session.set_keepalive((!*shutdown.borrow()).then_some(60));
        let answer = if session.req_header().uri.path() == EVENTS_PATH {
            match self.stream_events(&mut session, shutdown).await {
                // The stream ran; its connection is not reused.
                Ok(()) => return None,
                Err(refusal) => Err(refusal),
            }
        } else {
            self.route(&mut session).await
        };
        let response = answer.unwrap_or_else(|refusal| {
            let method = &session.req_header().method;
            let path = session.req_header().uri.path();
            tracing::info!(%method, path, status = refusal.status, error = refusal.error, detail = %refusal.detail, "admin request refused");
            refusal_response(&refusal)
        });
        let (parts, body) = response.into_parts();
        let head: ResponseHeader = parts.into();
        if session.write_response_header(Box::new(head)).await.is_err() {
            return None;
        }
        if !body.is_empty()
            && session
                .write_response_body(body.into(), true)
                .await
                .is_err()
        {
            return None;
        }
        let kept = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(stream) => stream.map(|s| ReusedHttpStream::from_reusable_stream(s, kept)),
            Err(_) => None,
        }
    }
}
