//! Held requests over the API: approvers list them, read one (what it would do: method,
//! URL, body hash), approve it (once; lending their own token for an on-behalf-of
//! approval) or deny it with a reason.

use http::{Method, Response, StatusCode};
use pingora::protocols::http::ServerSession;
use tollgate_storage::{ApprovalFilter, ApprovalRecord, ApprovalState};

use crate::agent::RunMode;
use crate::egress::approval::DecideError;
use crate::egress::credentials::Secret;
use crate::reply::{ErrorCode, Refusal};

use super::auth::Caller;
use super::respond::{json, only, read_body, store_failed};
use super::AdminApi;
use super::{operation, preview};

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
                    approvals.iter().map(|a| self.approval_view(a)).collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "approvals": views }),
                ))
            }
            [id] => {
                only(method, &[Method::GET])?;
                let record = self.approvals.get(id).map_err(decide_refusal)?;
                Ok(json(StatusCode::OK, &self.approval_view(&record)))
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
                Ok(json(StatusCode::OK, &settled_view(&record)))
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
                Ok(json(StatusCode::OK, &settled_view(&record)))
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

impl AdminApi {
    /// An approval as approvers see it: the record without its sealed token; for an Azure
    /// Resource Manager request, what it would do ([`operation`]); and — while this process
    /// holds the request — a preview of its body, from memory.
    fn approval_view(&self, record: &ApprovalRecord) -> serde_json::Value {
        let mut view = settled_view(record);
        let preview = self
            .approvals
            .held_body(&record.id)
            .and_then(|body| preview::of(&body, self.approvals.preview_bytes()));
        let scopes = self
            .registry
            .get(&record.agent)
            .map(|agent| agent.scopes.clone())
            .unwrap_or_default();
        let arm = operation::of(&record.method, &record.url, &scopes);
        if let Some(fields) = view.as_object_mut() {
            if let Some(preview) = preview {
                fields.insert(
                    "body_preview".into(),
                    serde_json::to_value(preview).unwrap_or_default(),
                );
            }
            if let Some(arm) = arm {
                fields.insert("arm".into(), serde_json::to_value(arm).unwrap_or_default());
            }
        }
        view
    }
}

/// An approval record as approvers see it: without its sealed token (they see only whether
/// one is held).
fn settled_view(record: &ApprovalRecord) -> serde_json::Value {
    let obo_token_held = record.sealed_obo_token.is_some();
    let mut view = serde_json::to_value(record).unwrap_or_default();
    if let Some(fields) = view.as_object_mut() {
        fields.remove("sealed_obo_token");
        fields.insert("obo_token_held".into(), obo_token_held.into());
    }
    view
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
