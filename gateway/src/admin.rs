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
//! | `POST /v1/agents/{id}/tool-calls` | open one: `{"id": "...", "ttl_secs": 600}` (201) |
//! | `DELETE /v1/agents/{id}/tool-calls/{tc}` | close it (204) |
//! | `GET /v1/agents/{id}/audit?since=SEQ&limit=N` | the agent's audit trail from position SEQ (`next` continues it) |
//! | `GET /v1/agents/{id}/audit/verify` | check the trail's hash chain: `{records, first_seq, last_seq, broken: {seq, reason} \| null}` |
//! | `GET /v1/policies` | the policy set in force: version, policies, rejected problems |
//! | `POST /v1/policies/reload` | reload the policy directory now |
//! | `GET /v1/approvals?state=pending&agent=ID` | approvals, oldest first (both filters optional) |
//! | `GET /v1/approvals/{id}` | one approval: the held request's method, URL, body hash, … |
//! | `POST /v1/approvals/{id}/approve` | release the held request (once); `{"obo_token": "..."}` lends the approver's token (required for on-behalf-of approvals) |
//! | `POST /v1/approvals/{id}/deny` | refuse it: `{"reason": "..."}` (required) |

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::apps::ServerApp;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use subtle::ConstantTimeEq;

use tollgate_policy::LoadError;

use tollgate_storage::{ApprovalFilter, ApprovalRecord, ApprovalState, Store};

use crate::agent_listener::AgentListeners;
use crate::approval::{Approvals, DecideError};
use crate::credentials::{Credentials, Secret};
use crate::decide::PolicyStore;
use crate::head::HeadDeadlines;
use crate::identity::{Agent, AgentRegistry, RegistryError, RunMode};
use crate::metrics::{GaugeSources, Metrics};
use crate::reply::Refusal;
use crate::toolcall::{ToolCallError, ToolCalls};

/// Largest request body the admin API reads.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Who may call the admin API: the admin token, and the named approvers' tokens.
pub struct Approvers {
    admin_token: String,
    named: Vec<(String, String)>,
}

impl Approvers {
    /// The admin token plus `(name, token)` pairs of approvers.
    pub fn new(admin_token: String, named: Vec<(String, String)>) -> Self {
        Approvers { admin_token, named }
    }

    /// The caller a bearer token belongs to. Every token is compared (in constant time), so
    /// the time taken does not tell which one nearly matched.
    fn caller(&self, presented: &str) -> Option<Caller> {
        let mut found = None;
        if bool::from(presented.as_bytes().ct_eq(self.admin_token.as_bytes())) {
            found = Some(Caller {
                name: "admin".to_string(),
                admin: true,
            });
        }
        for (name, token) in &self.named {
            if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) && found.is_none() {
                found = Some(Caller {
                    name: name.clone(),
                    admin: false,
                });
            }
        }
        found
    }
}

/// An authenticated caller.
struct Caller {
    /// Recorded on approvals they settle.
    name: String,
    /// Whether every route is open to them (else only approvals).
    admin: bool,
}

/// The admin API application: the state it reads and changes.
pub struct AdminApi {
    /// Who may call, and as whom.
    pub callers: Approvers,
    /// The agents.
    pub registry: Arc<AgentRegistry>,
    /// The policy set in force.
    pub policies: Arc<PolicyStore>,
    /// Open tool calls.
    pub tool_calls: Arc<ToolCalls>,
    /// Agents' limits (how many tool calls each may have open).
    pub quotas: Arc<crate::quota::Quotas>,
    /// Tokens to drop when tool calls close or agents go.
    pub credentials: Arc<Credentials>,
    /// Held requests.
    pub approvals: Arc<Approvals>,
    /// The durable store (registry, audit).
    pub store: Arc<Store>,
    /// Request counters.
    pub metrics: Arc<Metrics>,
    /// Where the values `/metrics` reports at scrape time live.
    pub gauges: Arc<GaugeSources>,
    /// The agents' own listeners (opened for agents registered with one).
    pub listeners: Arc<AgentListeners>,
    /// What `/readyz` reports.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

impl AdminApi {
    fn authorized(&self, session: &ServerSession) -> Result<Caller, Refusal> {
        let header = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(header) = header else {
            return Err(Refusal::new(
                401,
                "unauthorized",
                "send the admin token as 'Authorization: Bearer <token>' (see admin-token in the data directory)",
            ));
        };
        let presented = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .unwrap_or("");
        self.callers.caller(presented).ok_or_else(|| {
            Refusal::new(
                401,
                "unauthorized",
                "the token is neither the admin token nor an approver's",
            )
        })
    }

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
            return Ok(approvals_page());
        }
        let caller = self.authorized(session)?;
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let ["v1", "approvals", rest @ ..] = segments.as_slice() {
            return self.approvals_route(session, &method, rest, &caller).await;
        }
        if !caller.admin {
            return Err(Refusal::new(
                403,
                "forbidden",
                format!(
                    "approver {:?} may use the approval routes only",
                    caller.name
                ),
            ));
        }
        match segments.as_slice() {
            ["metrics"] => {
                only(&method, &[Method::GET])?;
                let mut response =
                    Response::new(self.metrics.render(&self.gauges.read()).into_bytes());
                let len = response.body().len();
                let headers = response.headers_mut();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                headers.insert(http::header::CONTENT_LENGTH, len.into());
                Ok(response)
            }
            ["readyz"] => {
                only(&method, &[Method::GET])?;
                if let Some(why) = self.store.write_failure() {
                    return Err(Refusal::new(
                        503,
                        "storage_unavailable",
                        format!(
                            "the store cannot write ({why}); requests are refused until it \
                             takes writes again (it is reopened every {} s)",
                            crate::audit::REOPEN_INTERVAL.as_secs()
                        ),
                    ));
                }
                if self.ready.load(std::sync::atomic::Ordering::Acquire) {
                    Ok(json(
                        StatusCode::OK,
                        &serde_json::json!({ "status": "ready" }),
                    ))
                } else {
                    Err(Refusal::new(
                        503,
                        "not_ready",
                        "the gateway is still starting",
                    ))
                }
            }
            ["v1", "agents"] => {
                only(&method, &[Method::GET])?;
                let agents: Vec<Agent> = self
                    .registry
                    .list()
                    .iter()
                    .map(|a| Agent::clone(a))
                    .collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "agents": agents }),
                ))
            }
            ["v1", "agents", id] => {
                let id = id.to_string();
                match method {
                    Method::GET => self
                        .registry
                        .get(&id)
                        .map(|a| json(StatusCode::OK, &*a))
                        .ok_or_else(|| no_agent(&id)),
                    Method::PUT => self.put_agent(session, id).await,
                    Method::DELETE => match self.registry.remove(&id) {
                        Some(removed) => {
                            self.approvals
                                .deny_all(&removed.id, "the agent was removed")
                                .await;
                            let store = self.store.clone();
                            let gone = removed.id.clone();
                            match tokio::task::spawn_blocking(move || store.remove_agent(&gone))
                                .await
                            {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => return Err(store_failed(&e.to_string())),
                                Err(e) => return Err(store_failed(&e.to_string())),
                            }
                            self.tool_calls.close_all(&removed.id);
                            self.credentials.evict_agent(&removed.id);
                            self.listeners.close_all(&removed.id);
                            tracing::info!(agent = %removed.id, "agent removed");
                            Ok(empty(StatusCode::NO_CONTENT))
                        }
                        None => Err(no_agent(&id)),
                    },
                    _ => Err(method_not_allowed(&[
                        Method::GET,
                        Method::PUT,
                        Method::DELETE,
                    ])),
                }
            }
            ["v1", "agents", id, "audit"] => {
                only(&method, &[Method::GET])?;
                let (since, limit) = audit_window(session.req_header().uri.query().unwrap_or(""))?;
                let records = self
                    .read_agent_data(id, move |store, agent| store.audit(agent, since, limit))
                    .await?
                    .unwrap_or_default();
                let next = records.last().map_or(since, |r| r.seq + 1);
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "records": records, "next": next }),
                ))
            }
            ["v1", "agents", id, "audit", "verify"] => {
                only(&method, &[Method::GET])?;
                let report = self
                    .read_agent_data(id, |store, agent| store.verify_audit(agent))
                    .await?
                    .unwrap_or_default();
                Ok(json(StatusCode::OK, &report))
            }
            ["v1", "agents", id, "sessions"] => {
                only(&method, &[Method::GET])?;
                let id = id.to_string();
                self.registry.get(&id).ok_or_else(|| no_agent(&id))?;
                let sessions: Vec<serde_json::Value> = self
                    .listeners
                    .sessions(&id)
                    .into_iter()
                    .map(|(session, address)| serde_json::json!({ "session": session, "address": address }))
                    .collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "sessions": sessions }),
                ))
            }
            ["v1", "agents", id, "sessions", thread] => {
                let (id, thread) = (id.to_string(), thread.to_string());
                self.registry.get(&id).ok_or_else(|| no_agent(&id))?;
                match method {
                    Method::PUT => self.open_session(session, &id, &thread).await,
                    Method::DELETE => self.end_session(&id, &thread).await,
                    _ => Err(method_not_allowed(&[Method::PUT, Method::DELETE])),
                }
            }
            ["v1", "agents", id, "tool-calls"] => {
                let id = id.to_string();
                self.registry.get(&id).ok_or_else(|| no_agent(&id))?;
                match method {
                    Method::GET => Ok(json(
                        StatusCode::OK,
                        &serde_json::json!({ "tool_calls": self.tool_calls.list(&id) }),
                    )),
                    Method::POST => self.open_tool_call(session, &id).await,
                    _ => Err(method_not_allowed(&[Method::GET, Method::POST])),
                }
            }
            ["v1", "agents", id, "tool-calls", tool_call] => {
                only(&method, &[Method::DELETE])?;
                if let Some(serial) = self.tool_calls.close(id, tool_call) {
                    // Its tokens go at once, not when they expire, lent ones from the store too,
                    // and its requests still held for approval are refused.
                    self.approvals
                        .end_tool_call(&self.credentials, id, serial, tool_call)
                        .await;
                    tracing::info!(agent = %id, tool_call = %tool_call, "tool call closed");
                    Ok(empty(StatusCode::NO_CONTENT))
                } else {
                    Err(Refusal::new(
                        404,
                        "not_found",
                        format!("no open tool call {tool_call:?} for agent {id:?}"),
                    ))
                }
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
                404,
                "not_found",
                format!("no route for {path}"),
            )),
        }
    }

    async fn open_tool_call(
        &self,
        session: &mut ServerSession,
        agent: &str,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct OpenToolCall {
            id: String,
            #[serde(default)]
            ttl_secs: Option<u64>,
            /// The session it runs in (which must have its listener): only requests on that
            /// session's listener belong to it.
            #[serde(default)]
            session: Option<String>,
        }
        let body = read_body(session).await?;
        let request: OpenToolCall = serde_json::from_slice(&body)
            .map_err(|e| Refusal::bad_request(format!("invalid tool call JSON: {e}")))?;
        let ttl = request.ttl_secs.map(std::time::Duration::from_secs);
        let max_open = self
            .registry
            .get(agent)
            .map(|a| self.quotas.of(&a).open_tool_calls)
            .ok_or_else(|| no_agent(agent))?;
        if let Some(session) = &request.session {
            if !self
                .listeners
                .sessions(agent)
                .iter()
                .any(|(s, _)| s == session)
            {
                return Err(Refusal::new(
                    404,
                    "not_found",
                    format!("agent {agent:?} has no session {session:?}: open it first (PUT /v1/agents/{agent}/sessions/{session})"),
                ));
            }
        }
        match self.tool_calls.open(
            agent,
            request.session.as_deref(),
            &request.id,
            ttl,
            max_open,
        ) {
            Ok(opened) => {
                if let Some((serial, id)) = &opened.ended {
                    self.approvals
                        .end_tool_call(&self.credentials, agent, *serial, id)
                        .await;
                }
                let info = opened.info;
                tracing::info!(agent, tool_call = %info.id, ttl_secs = ?request.ttl_secs, "tool call opened");
                Ok(json(StatusCode::CREATED, &info))
            }
            Err(e @ ToolCallError::AlreadyOpen(_)) => {
                Err(Refusal::new(409, "conflict", e.to_string()))
            }
            Err(e @ ToolCallError::TooMany(_)) => {
                Err(Refusal::new(429, "too_many_tool_calls", e.to_string()))
            }
            Err(e) => Err(Refusal::bad_request(e.to_string())),
        }
    }

    /// Opens the listener of `agent`'s session `thread` (`{"listen": {"address", "netns"}}`):
    /// every connection to it is the agent's, in that session. Idempotent.
    async fn open_session(
        &self,
        session: &mut ServerSession,
        agent: &str,
        thread: &str,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct OpenSession {
            listen: crate::config::AgentListenConfig,
        }
        crate::toolcall::validate_id(thread).map_err(|_| {
            Refusal::bad_request(format!(
                "session id {thread:?} is invalid: use 1 to 128 characters of A-Z a-z 0-9 . _ : -"
            ))
        })?;
        let body = read_body(session).await?;
        let request: OpenSession = serde_json::from_slice(&body)
            .map_err(|e| Refusal::bad_request(format!("invalid session JSON: {e}")))?;
        let existed = self
            .listeners
            .sessions(agent)
            .iter()
            .any(|(s, _)| s == thread);
        let listeners = self.listeners.clone();
        let (id, name) = (agent.to_string(), thread.to_string());
        let listen = request.listen;
        let opened =
            tokio::task::spawn_blocking(move || listeners.open_session(&id, &name, &listen)).await;
        match opened {
            Ok(Ok(address)) => {
                tracing::info!(agent, session = thread, %address, "session opened");
                let status = if existed {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                };
                Ok(json(
                    status,
                    &serde_json::json!({ "session": thread, "address": address }),
                ))
            }
            Ok(Err(e)) => Err(Refusal::bad_request(format!(
                "cannot open the session's listener: {e}"
            ))),
            Err(e) => Err(Refusal::new(500, "internal_error", e.to_string())),
        }
    }

    /// Ends `agent`'s session `thread`: its listener closes, and its tool calls end (their
    /// tokens dropped, their held requests refused).
    async fn end_session(&self, agent: &str, thread: &str) -> Result<Response<Vec<u8>>, Refusal> {
        if !self.listeners.close_session(agent, thread) {
            return Err(Refusal::new(
                404,
                "not_found",
                format!("agent {agent:?} has no session {thread:?}"),
            ));
        }
        for (serial, id) in self.tool_calls.close_session(agent, thread) {
            self.approvals
                .end_tool_call(&self.credentials, agent, serial, &id)
                .await;
        }
        tracing::info!(agent, session = thread, "session ended");
        Ok(empty(StatusCode::NO_CONTENT))
    }

    async fn reload_policies(&self) -> Result<Response<Vec<u8>>, Refusal> {
        let store = self.policies.clone();
        // Reading and validating the files is blocking work: keep it off the runtime.
        let result = tokio::task::spawn_blocking(move || store.reload())
            .await
            .map_err(|_| Refusal::new(500, "internal_error", "the reload task failed"))?;
        match result {
            Ok(reloaded) => Ok(json(StatusCode::OK, &reloaded)),
            Err(LoadError::Invalid { problems, .. }) => {
                let mut refusal = Refusal::new(
                    422,
                    "invalid_policies",
                    format!(
                        "the new policy set is invalid ({} problem(s)); the set in force ({}) stays",
                        problems.len(),
                        self.policies.engine().version()
                    ),
                );
                let mut extra = serde_json::Map::new();
                extra.insert(
                    "problems".into(),
                    serde_json::to_value(&problems).unwrap_or_default(),
                );
                refusal.extra = Some(Box::new(extra));
                Err(refusal)
            }
            Err(e @ LoadError::Io { .. }) => {
                Err(Refusal::new(500, "policy_dir_unreadable", e.to_string()))
            }
        }
    }

    async fn put_agent(
        &self,
        session: &mut ServerSession,
        id: String,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        let body = read_body(session).await?;
        let mut agent: Agent = serde_json::from_slice(&body)
            .map_err(|e| Refusal::bad_request(format!("invalid agent JSON: {e}")))?;
        if agent.listen.as_ref().is_some_and(|l| l.netns.is_none()) {
            return Err(Refusal::bad_request(
                "an agent's own listener registered over the API must name the network \
                 namespace of its sandbox (listen.netns); one in the gateway's own namespace \
                 can only be configured in the config file",
            ));
        }
        if agent.id.is_empty() {
            agent.id = id.clone();
        } else if agent.id != id {
            return Err(Refusal::bad_request(format!(
                "the body names agent {:?} but the path names {id:?}",
                agent.id
            )));
        }
        let previous = self.registry.get(&id);
        let listen = agent.listen.clone();
        match self.registry.put(agent) {
            Ok(created) => {
                let stored = self.registry.get(&id).ok_or_else(|| no_agent(&id))?;
                // Durable before it is acknowledged; undone if it cannot be stored.
                let store = self.store.clone();
                let record = stored.clone();
                let persisted =
                    tokio::task::spawn_blocking(move || store.put_agent(&record.id, &*record))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(e) = persisted {
                    self.restore(&id, previous.as_deref()).await;
                    return Err(store_failed(&e));
                }
                // Its own listener, in its sandbox's namespace: bound before the answer, so
                // the launcher may start the sandbox as soon as it has it.
                if let Err(refusal) = self.apply_listener(&id, listen.as_ref()).await {
                    self.restore(&id, previous.as_deref()).await;
                    return Err(refusal);
                }
                tracing::info!(agent = %id, created, "agent registered");
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok(json(status, &*stored))
            }
            Err(e @ (RegistryError::InvalidId(_) | RegistryError::InvalidLimits { .. })) => {
                Err(Refusal::bad_request(e.to_string()))
            }
            Err(e @ RegistryError::PeerTaken { .. }) => {
                Err(Refusal::new(409, "conflict", e.to_string()))
            }
        }
    }
}

/// The admin listener: each request head read and checked with the egress listener's
/// deadlines ([`crate::head::serve_http1`]): a connection that sends nothing, or a head too
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
        crate::head::serve_http1(&self.api, stream, self.deadlines, shutdown, |refused| {
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
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match self.route(session).await {
            Ok(response) => response,
            Err(refusal) => {
                let method = session.req_header().method.clone();
                let path = session.req_header().uri.path().to_string();
                tracing::info!(%method, path, status = refusal.status, error = refusal.error, detail = %refusal.detail, "admin request refused");
                refusal_response(&refusal)
            }
        }
    }
}

impl AdminApi {
    /// Opens, moves or closes `agent`'s own listener as its record now says.
    async fn apply_listener(
        &self,
        agent: &str,
        listen: Option<&crate::config::AgentListenConfig>,
    ) -> Result<(), Refusal> {
        let Some(listen) = listen.cloned() else {
            self.listeners.close(agent);
            return Ok(());
        };
        let listeners = self.listeners.clone();
        let id = agent.to_string();
        match tokio::task::spawn_blocking(move || listeners.open(&id, &listen)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Refusal::bad_request(format!(
                "cannot open the agent's listener: {e}"
            ))),
            Err(e) => Err(Refusal::new(500, "internal_error", e.to_string())),
        }
    }

    /// Puts `agent` back as it was before a registration that failed half-way: its previous
    /// record (stored, with its listener) or nothing.
    async fn restore(&self, agent: &str, previous: Option<&Agent>) {
        match previous {
            Some(previous) => {
                let _ = self.registry.put(previous.clone());
                let store = self.store.clone();
                let record = previous.clone();
                let _ =
                    tokio::task::spawn_blocking(move || store.put_agent(&record.id, &record)).await;
                let _ = self.apply_listener(agent, previous.listen.as_ref()).await;
            }
            None => {
                self.registry.remove(agent);
                let store = self.store.clone();
                let id = agent.to_string();
                let _ = tokio::task::spawn_blocking(move || store.remove_agent(&id)).await;
                self.listeners.close(agent);
            }
        }
    }

    /// Reads an agent's stored data on the blocking pool: `None` for a registered agent that
    /// has none yet, 404 for an unknown one.
    async fn read_agent_data<T: Send + 'static>(
        &self,
        id: &str,
        read: impl FnOnce(&Store, &str) -> Result<T, tollgate_storage::StoreError> + Send + 'static,
    ) -> Result<Option<T>, Refusal> {
        let store = self.store.clone();
        let agent = id.to_string();
        let result = tokio::task::spawn_blocking(move || read(&store, &agent))
            .await
            .map_err(|e| store_failed(&e.to_string()))?;
        match result {
            Ok(data) => Ok(Some(data)),
            Err(tollgate_storage::StoreError::NoAgent(_)) => {
                self.registry.get(id).ok_or_else(|| no_agent(id))?;
                Ok(None)
            }
            Err(e) => Err(store_failed(&e.to_string())),
        }
    }

    async fn approvals_route(
        &self,
        session: &mut ServerSession,
        method: &Method,
        rest: &[&str],
        caller: &Caller,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        match rest {
            [] => {
                only(method, &[Method::GET])?;
                let filter = approval_filter(session.req_header().uri.query().unwrap_or(""))?;
                let approvals = self.approvals.list(&filter).map_err(decide_refusal)?;
                let views: Vec<serde_json::Value> = approvals.iter().map(approval_view).collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "approvals": views }),
                ))
            }
            [id] => {
                only(method, &[Method::GET])?;
                let record = self.approvals.get(id).map_err(decide_refusal)?;
                Ok(json(StatusCode::OK, &approval_view(&record)))
            }
            [id, "approve"] => {
                only(method, &[Method::POST])?;
                let body = read_body(session).await?;
                let approval: Approval = if body.iter().all(u8::is_ascii_whitespace) {
                    Approval::default()
                } else {
                    serde_json::from_slice(&body).map_err(|e| {
                        Refusal::bad_request(format!(
                            "an approval takes no body or {{\"obo_token\": \"...\"}}: {e}"
                        ))
                    })?
                };
                let obo_token = approval
                    .obo_token
                    .map(|t| Secret::new(t.trim().to_string()));
                // ReadOnly agents never act on a person's behalf.
                let registry = &self.registry;
                let may_lend = |record: &ApprovalRecord| {
                    registry
                        .get(&record.agent)
                        .is_some_and(|agent| agent.run_mode != RunMode::ReadOnly)
                };
                let record = self
                    .approvals
                    .approve(id, &caller.name, obo_token, may_lend)
                    .await
                    .map_err(decide_refusal)?;
                Ok(json(StatusCode::OK, &approval_view(&record)))
            }
            [id, "deny"] => {
                only(method, &[Method::POST])?;
                let body = read_body(session).await?;
                let denial: Denial = serde_json::from_slice(&body).map_err(|e| {
                    Refusal::bad_request(format!(
                        "a denial needs a JSON body {{\"reason\": \"...\"}}: {e}"
                    ))
                })?;
                if denial.reason.trim().is_empty() {
                    return Err(Refusal::bad_request(
                        "a denial needs a reason: the agent is told why",
                    ));
                }
                let record = self
                    .approvals
                    .deny(id, &caller.name, denial.reason.trim())
                    .await
                    .map_err(decide_refusal)?;
                Ok(json(StatusCode::OK, &approval_view(&record)))
            }
            _ => Err(Refusal::new(
                404,
                "not_found",
                "approval routes: /v1/approvals, /v1/approvals/{id}, …/approve, …/deny",
            )),
        }
    }
}

/// An approval's body (optional).
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Approval {
    /// The approver's own token, lent for an on-behalf-of approval.
    obo_token: Option<String>,
}

/// A denial's body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Denial {
    reason: String,
}

/// An approval as approvers see it: the record without its sealed token (they see only
/// whether one is held).
fn approval_view(record: &ApprovalRecord) -> serde_json::Value {
    let obo_token_held = record.sealed_obo_token.is_some();
    let mut view = serde_json::to_value(record).unwrap_or_default();
    if let Some(fields) = view.as_object_mut() {
        fields.remove("sealed_obo_token");
        fields.insert("obo_token_held".into(), obo_token_held.into());
    }
    view
}

/// Most audit records one call returns.
const MAX_AUDIT_PAGE: usize = 1000;

/// `since=<seq>&limit=<n>` from a query string (defaults: from the start, 100 records).
fn audit_window(query: &str) -> Result<(u64, usize), Refusal> {
    let (mut since, mut limit) = (0, 100);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = |what: &str| {
            value.parse::<u64>().map_err(|_| {
                Refusal::bad_request(format!(
                    "{what} must be a non-negative integer, not {value:?}"
                ))
            })
        };
        match key {
            "since" => since = number("since")?,
            "limit" => limit = (number("limit")? as usize).clamp(1, MAX_AUDIT_PAGE),
            other => {
                return Err(Refusal::bad_request(format!(
                    "unknown parameter {other:?}: use since and limit"
                )))
            }
        }
    }
    Ok((since, limit))
}

/// `state=…&agent=…` from a query string.
fn approval_filter(query: &str) -> Result<ApprovalFilter, Refusal> {
    let mut filter = ApprovalFilter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .to_string();
        match key {
            "state" => {
                filter.state = Some(ApprovalState::parse(&value).ok_or_else(|| {
                    Refusal::bad_request(format!(
                    "unknown state {value:?}: use pending, approved, denied, expired or abandoned"
                ))
                })?)
            }
            "agent" => filter.agent = Some(value),
            other => {
                return Err(Refusal::bad_request(format!(
                    "unknown filter {other:?}: use state and agent"
                )))
            }
        }
    }
    Ok(filter)
}

/// The approvers' page. It is served without a token because it contains nothing but code;
/// the data it shows comes from the token-guarded routes. Its policy forbids loading or
/// sending anything anywhere but this listener.
fn approvals_page() -> Response<Vec<u8>> {
    let mut response = Response::new(include_str!("ui/approvals.html").as_bytes().to_vec());
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-type", "text/html; charset=utf-8"),
        (
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; form-action 'none'; frame-ancestors 'none'",
        ),
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("x-content-type-options", "nosniff"),
    ] {
        headers.insert(name, http::HeaderValue::from_static(value));
    }
    let len = response.body().len();
    response
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, len.into());
    response
}

fn decide_refusal(e: DecideError) -> Refusal {
    match e {
        DecideError::NotFound(_) => Refusal::new(404, "not_found", e.to_string()),
        DecideError::AlreadySettled { .. } => Refusal::new(409, "already_settled", e.to_string()),
        DecideError::OboTokenRequired(_) | DecideError::OboTokenRefused(_) => {
            Refusal::bad_request(e.to_string())
        }
        DecideError::Store(why) => store_failed(&why),
    }
}

fn store_failed(why: &str) -> Refusal {
    tracing::error!(error = why, "the store failed");
    Refusal::new(
        503,
        "store_unavailable",
        "the change could not be stored durably, so it was not made; see the gateway log",
    )
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Refusal> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(Refusal::new(
                        413,
                        "payload_too_large",
                        format!("admin request bodies are limited to {MAX_BODY_BYTES} bytes"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(Refusal::bad_request(format!(
                    "cannot read the request body: {e}"
                )))
            }
        }
    }
}

fn only(method: &Method, allowed: &[Method]) -> Result<(), Refusal> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(method_not_allowed(allowed))
    }
}

fn method_not_allowed(allowed: &[Method]) -> Refusal {
    let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    Refusal::new(
        405,
        "method_not_allowed",
        format!("this route accepts {}", names.join(", ")),
    )
}

fn no_agent(id: &str) -> Refusal {
    Refusal::new(404, "not_found", format!("no agent {id:?} is registered"))
}

fn json<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    response(status, body)
}

fn empty(status: StatusCode) -> Response<Vec<u8>> {
    response(status, Vec::new())
}

fn refusal_response(refusal: &Refusal) -> Response<Vec<u8>> {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = response(status, refusal.body().to_vec());
    if refusal.status == 401 {
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
        );
    }
    r
}

fn response(status: StatusCode, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let len = r.body().len();
    let headers = r.headers_mut();
    if len > 0 {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}
