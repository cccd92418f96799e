//! Every answer the gateway itself gives instead of the origin, in one place.
//!
//! A refusal is a status code plus a JSON body `{"error": <stable code>, "detail": <what
//! happened and what to do>}`. The same shape is used on the egress listener (proxy and
//! CONNECT) and on the admin API, so clients and operators parse one format. Details never
//! contain secrets: they are built from the gateway's own knowledge (host names, agent ids,
//! error kinds), not from credentials or payloads.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// Every error code the gateway answers with (the `error` of its JSON body), each with its one
/// HTTP status. Codes are stable: clients match on them. The table in
/// `docs/operations.md` ("Error codes") lists them all (a test checks it does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: the request is malformed: its URL, a header, its body or its framing (the detail says which).
    BadRequest,
    /// 400: method-override headers disagree, so what the request would do is unclear.
    AmbiguousMethod,
    /// 400: an Azure Resource Manager path that could name two scopes (encoded slashes, dot segments).
    AmbiguousPath,
    /// 401: admin API: no token, or a token that is neither the admin token nor an approver's.
    Unauthorized,
    /// 403: the policies deny the request (the body names the deciding policies).
    Denied,
    /// 403: no registered agent owns the connection's listener or source address.
    UnknownAgent,
    /// 403: the agent was removed while its request waited for approval; nothing was sent.
    AgentRemoved,
    /// 403: the request's tool call closed before it could be sent; nothing was sent.
    ToolCallClosed,
    /// 403: a person denied the held request (the detail has their reason).
    ApprovalDenied,
    /// 403: nobody decided on the held request in time.
    ApprovalExpired,
    /// 403: a host a credential rule covers was asked for over plain HTTP, or on a port the rule does not name.
    CredentialRequiresTls,
    /// 403: the origin resolves to an internal network, or is one of the gateway's own listeners (SSRF guard).
    DestinationForbidden,
    /// 403: admin API: an approver's token used outside the approval routes.
    Forbidden,
    /// 404: admin API: no such route, agent, session, tool call or approval.
    NotFound,
    /// 405: a method the route or the gateway does not take (e.g. `TRACE`).
    MethodNotAllowed,
    /// 408: a CONNECT head that took too long.
    RequestTimeout,
    /// 409: admin API: a tool call already open, a peer address another agent has.
    Conflict,
    /// 409: admin API: the approval was decided before.
    AlreadySettled,
    /// 413: a request body over the agent's limit, over the held-body limit of a request that needs approval, or over the admin API's 64 KiB.
    BodyTooLarge,
    /// 414: a request target over the limit.
    UriTooLong,
    /// 421: a request inside a tunnel that names another host than the CONNECT did.
    MisdirectedRequest,
    /// 422: admin API: a policy reload found problems; the set in force stays.
    InvalidPolicies,
    /// 429: the agent has as many connections open as its limit allows.
    TooManyConnections,
    /// 429: the agent is over its request rate (`Retry-After` says when to try again).
    RateLimited,
    /// 429: the agent has as many requests held for approval as its limit allows.
    TooManyPendingApprovals,
    /// 429: admin API: the agent has as many tool calls open as its limit allows.
    TooManyToolCalls,
    /// 431: a request head (or a CONNECT head) over the size limit.
    RequestHeaderFieldsTooLarge,
    /// 500: the gateway failed (a bug; logged); after a panic the status is 502, as the request may have reached its origin.
    InternalError,
    /// 500: admin API: the policy directory could not be read on reload.
    PolicyDirUnreadable,
    /// 502: no token could be obtained for the request (the provider failed or is not configured).
    CredentialUnavailable,
    /// 502: the origin's answer carried the injected token back; it was not relayed (or cut short).
    CredentialReflected,
    /// 502: the origin's answer could not be relayed (malformed, compressed when identity was asked for a tokened request, an unasked-for upgrade).
    UpstreamBadResponse,
    /// 502: the origin's name does not resolve.
    UpstreamUnresolvable,
    /// 502: the origin reset the connection.
    UpstreamReset,
    /// 502: the origin refused the connection.
    UpstreamRefused,
    /// 502: no route to the origin.
    UpstreamUnreachable,
    /// 502: the origin's TLS could not be verified or negotiated.
    UpstreamTlsFailed,
    /// 502: another failure talking to the origin.
    UpstreamError,
    /// 503: the data directory's store cannot write: nothing is forwarded (every request must leave an audit record) and nothing is changed over the admin API.
    StorageUnavailable,
    /// 503: `/readyz`: the gateway is still starting.
    NotReady,
    /// 503: admin API: the live feed has as many listeners as `approvals.feed_listeners` allows.
    TooManyListeners,
    /// 504: the origin (or its name resolution) did not answer in time.
    UpstreamTimeout,
    /// 505: a CONNECT head that is not HTTP/1.x.
    HttpVersionNotSupported,
}

impl ErrorCode {
    /// Every code, in the order of the docs' table.
    pub const ALL: &[ErrorCode] = &[
        ErrorCode::BadRequest,
        ErrorCode::AmbiguousMethod,
        ErrorCode::AmbiguousPath,
        ErrorCode::Unauthorized,
        ErrorCode::Denied,
        ErrorCode::UnknownAgent,
        ErrorCode::AgentRemoved,
        ErrorCode::ToolCallClosed,
        ErrorCode::ApprovalDenied,
        ErrorCode::ApprovalExpired,
        ErrorCode::CredentialRequiresTls,
        ErrorCode::DestinationForbidden,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::Conflict,
        ErrorCode::AlreadySettled,
        ErrorCode::BodyTooLarge,
        ErrorCode::UriTooLong,
        ErrorCode::MisdirectedRequest,
        ErrorCode::InvalidPolicies,
        ErrorCode::TooManyConnections,
        ErrorCode::RateLimited,
        ErrorCode::TooManyPendingApprovals,
        ErrorCode::TooManyToolCalls,
        ErrorCode::RequestHeaderFieldsTooLarge,
        ErrorCode::InternalError,
        ErrorCode::PolicyDirUnreadable,
        ErrorCode::CredentialUnavailable,
        ErrorCode::CredentialReflected,
        ErrorCode::UpstreamBadResponse,
        ErrorCode::UpstreamUnresolvable,
        ErrorCode::UpstreamReset,
        ErrorCode::UpstreamRefused,
        ErrorCode::UpstreamUnreachable,
        ErrorCode::UpstreamTlsFailed,
        ErrorCode::UpstreamError,
        ErrorCode::StorageUnavailable,
        ErrorCode::NotReady,
        ErrorCode::UpstreamTimeout,
        ErrorCode::HttpVersionNotSupported,
    ];

    /// The code as clients see it in the body's `error` field, e.g. `unknown_agent`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::AmbiguousMethod => "ambiguous_method",
            ErrorCode::AmbiguousPath => "ambiguous_path",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Denied => "denied",
            ErrorCode::UnknownAgent => "unknown_agent",
            ErrorCode::AgentRemoved => "agent_removed",
            ErrorCode::ToolCallClosed => "tool_call_closed",
            ErrorCode::ApprovalDenied => "approval_denied",
            ErrorCode::ApprovalExpired => "approval_expired",
            ErrorCode::CredentialRequiresTls => "credential_requires_tls",
            ErrorCode::DestinationForbidden => "destination_forbidden",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::AlreadySettled => "already_settled",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::MisdirectedRequest => "misdirected_request",
            ErrorCode::InvalidPolicies => "invalid_policies",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyPendingApprovals => "too_many_pending_approvals",
            ErrorCode::TooManyToolCalls => "too_many_tool_calls",
            ErrorCode::RequestHeaderFieldsTooLarge => "request_header_fields_too_large",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::PolicyDirUnreadable => "policy_dir_unreadable",
            ErrorCode::CredentialUnavailable => "credential_unavailable",
            ErrorCode::CredentialReflected => "credential_reflected",
            ErrorCode::UpstreamBadResponse => "upstream_bad_response",
            ErrorCode::UpstreamUnresolvable => "upstream_unresolvable",
            ErrorCode::UpstreamReset => "upstream_reset",
            ErrorCode::UpstreamRefused => "upstream_refused",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamTlsFailed => "upstream_tls_failed",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::TooManyListeners => "too_many_listeners",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::HttpVersionNotSupported => "http_version_not_supported",
        }
    }

    /// The HTTP status the code is answered with.
    pub const fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::AmbiguousMethod | ErrorCode::AmbiguousPath => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied
            | ErrorCode::UnknownAgent
            | ErrorCode::AgentRemoved
            | ErrorCode::ToolCallClosed
            | ErrorCode::ApprovalDenied
            | ErrorCode::ApprovalExpired
            | ErrorCode::CredentialRequiresTls
            | ErrorCode::DestinationForbidden
            | ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::Conflict | ErrorCode::AlreadySettled => 409,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::UriTooLong => 414,
            ErrorCode::MisdirectedRequest => 421,
            ErrorCode::InvalidPolicies => 422,
            ErrorCode::TooManyConnections
            | ErrorCode::RateLimited
            | ErrorCode::TooManyPendingApprovals
            | ErrorCode::TooManyToolCalls => 429,
            ErrorCode::RequestHeaderFieldsTooLarge => 431,
            ErrorCode::InternalError | ErrorCode::PolicyDirUnreadable => 500,
            ErrorCode::CredentialUnavailable
            | ErrorCode::CredentialReflected
            | ErrorCode::UpstreamBadResponse
            | ErrorCode::UpstreamUnresolvable
            | ErrorCode::UpstreamReset
            | ErrorCode::UpstreamRefused
            | ErrorCode::UpstreamUnreachable
            | ErrorCode::UpstreamTlsFailed
            | ErrorCode::UpstreamError => 502,
            ErrorCode::StorageUnavailable | ErrorCode::NotReady | ErrorCode::TooManyListeners => {
                503
            }
            ErrorCode::UpstreamTimeout => 504,
            ErrorCode::HttpVersionNotSupported => 505,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A response the gateway gives on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status code; usually [`ErrorCode::status`] of its code (see `with_status`).
    pub status: u16,
    /// Its code ([`ErrorCode::as_str`]), e.g. `unknown_agent`.
    pub error: &'static str,
    /// A sentence for the person reading the log or the client output.
    pub detail: String,
    /// More fields for the body (e.g. the policy decision), merged beside error and detail.
    /// (Boxed: most refusals have none, and a small `Refusal` keeps `Result`s small.)
    pub extra: Option<Box<serde_json::Map<String, serde_json::Value>>>,
    /// Seconds after which trying again makes sense (`Retry-After`), for limits that refill.
    pub retry_after_secs: Option<u32>,
}

impl Refusal {
    /// A refusal with this code (and its status) and detail.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Refusal {
            status: code.status(),
            error: code.as_str(),
            detail: detail.into(),
            extra: None,
            retry_after_secs: None,
        }
    }

    /// The same refusal with another status: only a panic's `internal_error` (502, as the
    /// request may have reached its origin) needs one.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// The same refusal, telling the client when to try again.
    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The refusal for a policy decision that denies: 403 with the decision, the policies
    /// that made it and any evaluation errors.
    pub fn for_decision(decision: &tollgate_policy::Decision, policy_version: &str) -> Self {
        Refusal::new(ErrorCode::Denied, decision.reason.clone())
            .with_decision(decision, policy_version)
    }

    /// The same refusal with the policy decision behind it (decision, policies, errors,
    /// policy version) in its body: e.g. an expired approval says which policies asked for it.
    pub fn with_decision(self, decision: &tollgate_policy::Decision, policy_version: &str) -> Self {
        self.with_extra("decision", decision.outcome.as_str())
            .with_extra("policies", decision.policies.clone())
            .with_extra("errors", decision.errors.clone())
            .with_extra("policy_version", policy_version)
    }

    /// The same refusal with one more body field.
    pub fn with_extra(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra
            .get_or_insert_with(Default::default)
            .insert(key.to_string(), value.into());
        self
    }

    /// 400: the request itself is malformed.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, detail)
    }

    /// The JSON body: `error`, `detail` and any extra fields.
    pub fn body(&self) -> Bytes {
        let mut body = serde_json::Map::new();
        body.insert("error".into(), self.error.into());
        body.insert("detail".into(), self.detail.clone().into());
        if let Some(extra) = &self.extra {
            body.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Bytes::from(serde_json::Value::Object(body).to_string())
    }

    /// A complete HTTP/1.1 response that closes the connection, for places with no HTTP
    /// session to answer through (the CONNECT handler).
    pub fn to_http1(&self) -> Vec<u8> {
        let body = self.body();
        let retry_after = self
            .retry_after_secs
            .map(|s| format!("retry-after: {s}\r\n"))
            .unwrap_or_default();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             {retry_after}connection: close\r\n\r\n",
            self.status,
            reason_phrase(self.status),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Sends this refusal as the response to the session's current request.
    pub async fn send(&self, session: &mut Session) -> pingora::Result<()> {
        let body = self.body();
        let mut header = ResponseHeader::build(self.status, Some(3))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("content-length", body.len().to_string())?;
        header.insert_header("cache-control", "no-store")?;
        if let Some(secs) = self.retry_after_secs {
            header.insert_header("retry-after", secs.to_string())?;
        }
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }
}

/// Writes `refusal` as a raw HTTP/1.1 response on a connection no HTTP session owns (a
/// CONNECT, or a connection refused before its request is parsed) and closes it. Whatever the
/// client is still sending is read and dropped for up to a second first: closing a socket with
/// unread input resets it, and the client might lose the answer.
pub async fn answer_raw_and_close<S>(io: &mut S, refusal: &Refusal)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if io.write_all(&refusal.to_http1()).await.is_err() || io.flush().await.is_err() {
        return;
    }
    let _ = io.shutdown().await;
    let drain = async {
        // On the heap: an array here would make every future that may answer this way (each
        // connection's) 4 KiB larger for as long as it lives.
        let mut sink = vec![0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.error, self.detail)
    }
}

fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_json_with_code_and_detail() {
        let r = Refusal::new(ErrorCode::UnknownAgent, "no agent for \"x\"");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "unknown_agent");
        assert_eq!(v["detail"], "no agent for \"x\"");
    }

    #[test]
    fn every_error_code_is_in_the_docs_table_with_its_status() {
        let docs = include_str!("../../docs/operations.md");
        for code in ErrorCode::ALL {
            let row = format!("| {} | `{}` |", code.status(), code.as_str());
            assert!(
                docs.contains(&row),
                "docs/operations.md lacks the row {row:?}"
            );
        }
        let codes: std::collections::HashSet<&str> =
            ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(codes.len(), ErrorCode::ALL.len(), "a code is listed twice");
    }

    #[test]
    fn the_raw_response_is_framed_and_closes() {
        let r = Refusal::bad_request("nope");
        let raw = String::from_utf8(r.to_http1()).unwrap();
        assert!(raw.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{raw}");
        assert!(raw.contains("connection: close\r\n"));
        let (_, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(raw.contains(&format!("content-length: {}\r\n", body.len())));
    }
}
