//! An agent's audit trail over the API: read it a page at a time, and verify its hash chain.

use http::{Response, StatusCode};
use pingora::protocols::http::ServerSession;
use tollgate_storage::Store;

use crate::reply::Refusal;

use super::respond::{json, no_agent, store_failed};
use super::AdminApi;

impl AdminApi {
    /// `GET /v1/agents/{id}/audit?since=SEQ&limit=N`: the agent's trail from position SEQ.
    pub(super) async fn audit_page(
        &self,
        session: &ServerSession,
        id: &str,
    ) -> Result<Response<Vec<u8>>, Refusal> {
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

    /// `GET /v1/agents/{id}/audit/verify`: whether the trail's hash chain holds.
    pub(super) async fn verify_audit(&self, id: &str) -> Result<Response<Vec<u8>>, Refusal> {
        let report = self
            .read_agent_data(id, |store, agent| store.verify_audit(agent))
            .await?
            .unwrap_or_default();
        Ok(json(StatusCode::OK, &report))
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
