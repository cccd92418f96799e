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

/// A response the gateway gives on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status code.
    pub status: u16,
    /// A stable, machine-readable code, e.g. `unknown_agent`.
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
    /// A refusal with this status, code and detail.
    pub fn new(status: u16, error: &'static str, detail: impl Into<String>) -> Self {
        Refusal {
            status,
            error,
            detail: detail.into(),
            extra: None,
            retry_after_secs: None,
        }
    }

    /// The same refusal, telling the client when to try again.
    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The refusal for a policy decision that denies: 403 with the decision, the policies
    /// that made it and any evaluation errors.
    pub fn for_decision(decision: &tollgate_policy::Decision, policy_version: &str) -> Self {
        Refusal::new(403, "denied", decision.reason.clone()).with_decision(decision, policy_version)
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
        Self::new(400, "bad_request", detail)
    }

    /// The JSON body.
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
        let mut sink = [0u8; 4096];
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
        let r = Refusal::new(403, "unknown_agent", "no agent for \"x\"");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "unknown_agent");
        assert_eq!(v["detail"], "no agent for \"x\"");
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
