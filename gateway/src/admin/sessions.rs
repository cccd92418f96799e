//! An agent's sessions (one per conversation thread) over the API: each has a listener of
//! its own in the sandbox's namespace, so every request on it belongs to that session.

use http::{Method, Response, StatusCode};
use pingora::protocols::http::ServerSession;

use crate::agent::AgentListenConfig;
use crate::reply::{ErrorCode, Refusal};

use super::respond::{empty, json, method_not_allowed, no_agent, read_body};
use super::AdminApi;

impl AdminApi {
    /// `GET /v1/agents/{id}/sessions`: the agent's sessions and their listeners' addresses.
    pub(super) fn list_sessions(&self, id: &str) -> Result<Response<Vec<u8>>, Refusal> {
        self.registry.get(id).ok_or_else(|| no_agent(id))?;
        let sessions: Vec<serde_json::Value> = self
            .listeners
            .sessions(id)
            .into_iter()
            .map(|(session, address)| serde_json::json!({ "session": session, "address": address }))
            .collect();
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "sessions": sessions }),
        ))
    }

    /// `/v1/agents/{id}/sessions/{thread}`: open (`PUT`) or end (`DELETE`) a session.
    pub(super) async fn session_route(
        &self,
        session: &mut ServerSession,
        method: &Method,
        id: &str,
        thread: &str,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        self.registry.get(id).ok_or_else(|| no_agent(id))?;
        match *method {
            Method::PUT => self.open_session(session, id, thread).await,
            Method::DELETE => self.end_session(id, thread).await,
            _ => Err(method_not_allowed(&[Method::PUT, Method::DELETE])),
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
            listen: AgentListenConfig,
        }
        crate::egress::toolcall::validate_id(thread).map_err(|_| {
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
            Err(e) => Err(Refusal::new(ErrorCode::InternalError, e.to_string())),
        }
    }

    /// Ends `agent`'s session `thread`: its listener closes, and its tool calls end (their
    /// tokens dropped, their held requests refused).
    async fn end_session(&self, agent: &str, thread: &str) -> Result<Response<Vec<u8>>, Refusal> {
        if !self.listeners.close_session(agent, thread) {
            return Err(Refusal::new(
                ErrorCode::NotFound,
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
}
