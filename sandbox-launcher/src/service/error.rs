//! What the sandbox service answers when it cannot do what was asked: a status, a stable
//! code and a message a user can act on, as `{"error": code, "detail": message}` (the
//! gateway's shape).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::gateway_api::ApiError;

/// Why a call to the sandbox service failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed (its JSON, an id, a parameter).
    #[error("{0}")]
    BadRequest(String),
    /// No or a wrong bearer token.
    #[error("this API needs `Authorization: Bearer <token>` with the service's token (its file is printed at start)")]
    Unauthorized,
    /// The agent has no session for this thread (never made, or deleted).
    #[error("agent {agent:?} has no session {thread:?}: create it with PUT /v1/sessions/{agent}/{thread}")]
    NoSession {
        /// The agent named in the call.
        agent: String,
        /// The thread named in the call, which the agent has no session for.
        thread: String,
    },
    /// An execution is already running in the session.
    #[error("session {thread:?} of agent {agent:?} is running an execution; executions in a session run one at a time: retry when it ends")]
    Busy {
        /// The agent whose session is busy.
        agent: String,
        /// The thread whose execution is still running.
        thread: String,
    },
    /// A session limit is reached.
    #[error("{0}")]
    TooManySessions(String),
    /// The gateway does not know the agent.
    #[error("agent {0:?} is not registered on the gateway: register it there first (PUT /v1/agents/{0} on the gateway's admin API); its run mode and scopes are the gateway's to decide")]
    AgentNotRegistered(String),
    /// The tool call id is already open on the gateway.
    #[error("{0}")]
    ToolCallConflict(String),
    /// The gateway refused or could not be reached.
    #[error("the gateway: {0}")]
    Gateway(ApiError),
    /// The session's sandbox could not be started (or stopped).
    #[error("the session's sandbox: {0}")]
    Sandbox(String),
    /// The guest agent answered with an error of its own.
    #[error("{detail}")]
    Guest {
        /// The status the guest agent answered with, passed on (a 4xx: the caller's fault).
        status: u16,
        /// The guest agent's stable code (`file`, `bad_request`, …).
        code: String,
        /// The guest agent's reason, for the caller.
        detail: String,
    },
    /// The guest agent could not be reached or broke off.
    #[error("the session's guest agent: {0}")]
    GuestUnreachable(String),
    /// The guest did not end an execution within its timeout plus the grace (seconds): its
    /// sandbox is taken for hung and stopped.
    #[error("the session's sandbox did not end the execution within its timeout plus {0} s; it was stopped as hung (its files are kept) and starts again with the next execution")]
    GuestUnresponsive(u64),
    /// Something in the service itself failed.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// The HTTP status it is answered with (a guest agent's own is passed on).
    pub fn status(&self) -> StatusCode {
        let code = match self {
            ServiceError::BadRequest(_) => 400,
            ServiceError::Unauthorized => 401,
            ServiceError::NoSession { .. } => 404,
            ServiceError::Busy { .. }
            | ServiceError::AgentNotRegistered(_)
            | ServiceError::ToolCallConflict(_) => 409,
            ServiceError::TooManySessions(_) => 429,
            ServiceError::Gateway(_) | ServiceError::GuestUnreachable(_) => 502,
            ServiceError::Sandbox(_) => 503,
            ServiceError::GuestUnresponsive(_) => 504,
            ServiceError::Guest { status, .. } => *status,
            ServiceError::Internal(_) => 500,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)
    }

    /// The stable code in the body's `error` field, for programs to match on.
    pub fn code(&self) -> &str {
        match self {
            ServiceError::BadRequest(_) => "bad_request",
            ServiceError::Unauthorized => "unauthorized",
            ServiceError::NoSession { .. } => "not_found",
            ServiceError::Busy { .. } => "session_busy",
            ServiceError::TooManySessions(_) => "too_many_sessions",
            ServiceError::AgentNotRegistered(_) => "agent_not_registered",
            ServiceError::ToolCallConflict(_) => "tool_call_conflict",
            ServiceError::Gateway(_) => "gateway_error",
            ServiceError::Sandbox(_) => "sandbox_unavailable",
            ServiceError::Guest { code, .. } => code,
            ServiceError::GuestUnreachable(_) => "guest_unreachable",
            ServiceError::GuestUnresponsive(_) => "guest_unresponsive",
            ServiceError::Internal(_) => "internal_error",
        }
    }

    /// The JSON body: `{"error": code, "detail": message}`, the gateway's shape.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.code(), "detail": self.to_string() })
    }

    /// A gateway refusal of a call made for `agent`, in the service's terms.
    pub fn from_gateway(agent: &str, error: ApiError) -> ServiceError {
        match &error {
            ApiError::Refused {
                status: 404, body, ..
            } if body.contains("no agent") => ServiceError::AgentNotRegistered(agent.to_string()),
            ApiError::Refused {
                status: 409, body, ..
            } => ServiceError::ToolCallConflict(format!(
                "the gateway already has this tool call open: {body}"
            )),
            _ => ServiceError::Gateway(error),
        }
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), "{self}");
        } else {
            tracing::info!(code = self.code(), "{self}");
        }
        (status, axum::Json(self.body())).into_response()
    }
}
