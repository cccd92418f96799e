//! Held requests over the API: approvers list them, read one (what it would do: method,
//! URL, body hash), approve it (once; lending their own token for an on-behalf-of
//! approval) or deny it with a reason.

use http::{Method, Response, StatusCode};
use pingora::protocols::http::ServerSession;
use tollgate_storage::{ApprovalFilter, ApprovalRecord, ApprovalState};

use crate::agent::RunMode;
use crate::egress::approval::{view, DecideError};
use crate::egress::credentials::Secret;
use crate::reply::{ErrorCode, Refusal};

use super::auth::Caller;
use super::respond::{json, only, read_body, store_failed};
use super::AdminApi;

impl AdminApi {
    /// `/v1/approvals…`: list, read, approve, deny (approvers' tokens open these too).
    pub(super) async fn approvals_route(
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
                let views: Vec<serde_json::Value> =
                    approvals.iter().map(|a| self.approvals.view(a)).collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "approvals": views }),
                ))
            }
            [id] => {
                only(method, &[Method::GET])?;
                let record = self.approvals.get(id).map_err(decide_refusal)?;
                Ok(json(StatusCode::OK, &self.approvals.view(&record)))
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
                Ok(json(StatusCode::OK, &view::settled(&record)))
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
                Ok(json(StatusCode::OK, &view::settled(&record)))
            }
            _ => Err(Refusal::new(
                ErrorCode::NotFound,
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

/// A denial's body: the reason is required, because the agent's 403 tells it why.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Denial {
    reason: String,
}

/// `state=…&agent=…` from a query string.
pub(super) fn approval_filter(query: &str) -> Result<ApprovalFilter, Refusal> {
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

/// The answer to an approval decision the approvals refused.
fn decide_refusal(e: DecideError) -> Refusal {
    match e {
        DecideError::NotFound(_) => Refusal::new(ErrorCode::NotFound, e.to_string()),
        DecideError::AlreadySettled { .. } => {
            Refusal::new(ErrorCode::AlreadySettled, e.to_string())
        }
        DecideError::OboTokenRequired(_) | DecideError::OboTokenRefused(_) => {
            Refusal::bad_request(e.to_string())
        }
        DecideError::Store(why) => store_failed(&why),
    }
}
