//! An agent's tool calls over the API: open one (tokens are made for it from then on, and
//! its requests are attributed to it), list them, close one (its tokens dropped at once).

use http::{Method, Response, StatusCode};
use pingora::protocols::http::ServerSession;

use crate::egress::toolcall::ToolCallError;
use crate::reply::{ErrorCode, Refusal};

use super::respond::{empty, json, method_not_allowed, no_agent, read_body};
use super::AdminApi;

impl AdminApi {
    /// `/v1/agents/{id}/tool-calls`: list (`GET`) or open (`POST`) the agent's tool calls.
    pub(super) async fn tool_calls_route(
        &self,
        session: &mut ServerSession,
        method: &Method,
        id: &str,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        self.registry.get(id).ok_or_else(|| no_agent(id))?;
        match *method {
            Method::GET => Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "tool_calls": self.tool_calls.list(id) }),
            )),
            Method::POST => self.open_tool_call(session, id).await,
            _ => Err(method_not_allowed(&[Method::GET, Method::POST])),
        }
    }

    /// `DELETE /v1/agents/{id}/tool-calls/{tc}`: closes the tool call. Its tokens go at once,
    /// not when they expire, lent ones from the store too, and its requests still held for
    /// approval are refused.
    pub(super) async fn close_tool_call(
        &self,
        id: &str,
        tool_call: &str,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        let Some(serial) = self.tool_calls.close(id, tool_call) else {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                format!("no open tool call {tool_call:?} for agent {id:?}"),
            ));
        };
        self.approvals
            .end_tool_call(&self.credentials, id, serial, tool_call)
            .await;
        tracing::info!(agent = %id, tool_call = %tool_call, "tool call closed");
        Ok(empty(StatusCode::NO_CONTENT))
    }

    /// Opens a tool call: `{"id", "ttl_secs", "session", "command"}`.
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
            /// What it runs (a command, or code), shown to approvers of its requests.
            #[serde(default)]
            command: Option<String>,
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
                    ErrorCode::NotFound,
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
            request.command.as_deref(),
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
                Err(Refusal::new(ErrorCode::Conflict, e.to_string()))
            }
            Err(e @ ToolCallError::TooMany(_)) => {
                Err(Refusal::new(ErrorCode::TooManyToolCalls, e.to_string()))
            }
            Err(e) => Err(Refusal::bad_request(e.to_string())),
        }
    }
}
