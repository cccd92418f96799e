//! Step 5 of the data path: a request that needs approval waits here for a person.
//!
//! The request is bound to a durable [`ApprovalRecord`] (method, full URL, SHA-256 of the
//! body, tool call, credential) that is fsync'd before the request is held. Then one of four
//! things ends the wait, and whichever settles the record first wins (the store settles a
//! record once):
//!
//! - an approver approves → the held request is released, once;
//! - an approver denies → 403 with the approver's reason;
//! - the timeout passes → 403 "approval expired";
//! - the client goes away → the record is abandoned and nothing is sent;
//! - the request's tool call ends ([`Approvals::end_tool_call`]) → the record is abandoned
//!   and the request refused (403 `tool_call_closed`): a token is never made for a tool call
//!   that is over.
//!
//! Held requests cost a waiter entry and the buffered body; the store does the rest. Store
//! writes (with their fsync) run on the blocking pool, off the proxy's worker threads.
//!
//! Every change of an approval's state is published on the [`feed`], once it is durable.
//! What approvers are shown of an approval is made in [`view`]: the record, what an Azure
//! Resource Manager request would do (`operation`), and a preview of the held body
//! (`preview`, from memory only).

pub mod feed;
mod operation;
mod preview;
pub mod view;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tollgate_storage::{
    now_millis, ApprovalFilter, ApprovalKind, ApprovalRecord, ApprovalState, Settlement, Store,
    StoreError,
};

use crate::config::ApprovalsConfig;
use crate::egress::credentials::{Credentials, Secret};
use crate::egress::identity::AgentRegistry;
use crate::egress::obo::OboSealer;
use crate::reply::{ErrorCode, Refusal};

/// The request to hold, as the approval record will describe it.
pub struct HoldRequest {
    /// The approval's id (from [`new_approval_id`]), known to the caller whatever the outcome.
    pub id: String,
    /// The agent.
    pub agent: String,
    /// How many of the agent's requests may be held at once (its `pending_approvals`).
    pub max_pending: usize,
    /// Its tool call, if one is open.
    pub tool_call: Option<String>,
    /// The session it came from, on that session's own listener.
    pub session: Option<String>,
    /// The agent's run mode now.
    pub run_mode: String,
    /// What its tool call runs, if its opener said.
    pub command: Option<String>,
    /// Why it is held.
    pub kind: ApprovalKind,
    /// HTTP method.
    pub method: String,
    /// Full URL.
    pub url: String,
    /// The whole body.
    pub body: bytes::Bytes,
    /// The credential class ("provider audience"), if a rule covers the destination.
    pub credential: Option<String>,
    /// For an on-behalf-of approval: the audience the approver's token is lent for.
    pub obo_audience: Option<String>,
    /// The policies that asked for approval.
    pub policies: Vec<String>,
}

/// An approval that released a held request.
pub struct Released {
    /// The settled record.
    pub record: ApprovalRecord,
    /// The token the approver lent (on-behalf-of), in the clear for this process only.
    pub obo_token: Option<Secret>,
}

/// What the approver's decision hands the held request.
type Verdict = (ApprovalRecord, Option<Secret>);

/// A held request, waiting for its verdict.
struct Waiter {
    /// Where the verdict goes, once it is durable.
    verdict: oneshot::Sender<Verdict>,
    /// Whose request it is.
    agent: String,
    /// The tool call it belongs to, if any.
    tool_call: Option<String>,
    /// The held body (shared, not copied): approvers may be shown a preview of it, from
    /// memory only.
    body: bytes::Bytes,
}

/// How a wait ended.
enum Ending {
    /// Someone settled the record — an approver, or the end of its tool call.
    Decided(Verdict),
    /// The hold settled it itself: it expired, or its client left.
    Gateway(ApprovalRecord),
}

/// How a hold ended without a release.
#[derive(Debug)]
pub enum HoldEnd {
    /// Refused before an approval was recorded (too many pending, the store failed): there
    /// is no approval to name. Answer the sandbox with this.
    NotRecorded(Refusal),
    /// Answer the sandbox with this.
    Refused(Refusal),
    /// The client went away; there is nobody to answer.
    ClientGone,
}

/// Why an approver's decision was not taken.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No such approval.
    #[error("no approval {0:?}")]
    NotFound(String),
    /// The approval lends the approver's identity, so it needs their token.
    #[error("approval {0:?} is on-behalf-of: approve it with your token (obo_token)")]
    OboTokenRequired(String),
    /// A token was offered where none can be used.
    #[error("{0}")]
    OboTokenRefused(String),
    /// It was settled already (approved, denied, expired or abandoned).
    #[error("approval {id:?} is already {state}; a decision is final", state = state.as_str())]
    AlreadySettled {
        /// The approval.
        id: String,
        /// Its state.
        state: ApprovalState,
    },
    /// The store failed; nothing changed.
    #[error("the approval store failed: {0}")]
    Store(String),
}

impl From<StoreError> for DecideError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoApproval(id) => DecideError::NotFound(id),
            StoreError::AlreadySettled { id, state } => DecideError::AlreadySettled { id, state },
            other => DecideError::Store(other.to_string()),
        }
    }
}

/// A fresh approval id: 128 random bits, in hex.
pub fn new_approval_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Held requests and the decisions that release them.
pub struct Approvals {
    store: Arc<Store>,
    settings: ApprovalsConfig,
    /// The held requests of this process, by approval id: the approver's decision is sent
    /// through the channel after it is durable.
    waiters: Mutex<HashMap<String, Waiter>>,
    /// Seals lent tokens before they are stored.
    sealer: OboSealer,
    /// How many requests each agent has held.
    held: Mutex<HashMap<String, usize>>,
    /// The agents, for their RBAC scopes (an ARM request's summary says whether they cover
    /// it).
    registry: Arc<AgentRegistry>,
    /// Where each change of state is published.
    feed: feed::Feed,
}

impl Approvals {
    /// Approvals recorded in `store`, with the limits of `settings`, of the agents in
    /// `registry`.
    pub fn new(
        store: Arc<Store>,
        settings: ApprovalsConfig,
        sealer: OboSealer,
        registry: Arc<AgentRegistry>,
    ) -> Self {
        Approvals {
            feed: feed::Feed::new(settings.feed_events, settings.feed_bytes),
            store,
            settings,
            sealer,
            waiters: Mutex::default(),
            held: Mutex::default(),
            registry,
        }
    }

    /// The live feed of approval events.
    pub fn feed(&self) -> &feed::Feed {
        &self.feed
    }

    /// How many listeners the feed takes at once (`approvals.feed_listeners`).
    pub fn feed_listeners(&self) -> usize {
        self.settings.feed_listeners
    }

    /// `record` as approvers see it ([`view::detailed`]): with what an ARM request would do
    /// for its agent's scopes now, and a preview of its body while this process holds it.
    pub fn view(&self, record: &ApprovalRecord) -> serde_json::Value {
        let body = self.held_body(&record.id);
        self.view_with(record, body.as_deref())
    }

    fn view_with(&self, record: &ApprovalRecord, body: Option<&[u8]>) -> serde_json::Value {
        let scopes = self
            .registry
            .get(&record.agent)
            .map(|agent| agent.scopes.clone())
            .unwrap_or_default();
        view::detailed(record, &scopes, body, self.settings.preview_bytes)
    }

    /// Publishes `record`'s settled state on the feed.
    fn announce(&self, record: &ApprovalRecord) {
        self.feed.publish(
            record.state,
            &record.id,
            &record.agent,
            &self.view_with(record, None),
        );
    }

    /// Publishes that `record` is pending, with a preview of its held `body` — unless it was
    /// settled already (an approver can act as soon as it is stored): its waiter is gone
    /// then. Under the waiters' lock, so that a settlement (which removes the waiter first)
    /// is always published after it.
    fn announce_pending(&self, record: &ApprovalRecord, body: &[u8]) {
        let view = self.view_with(record, Some(body));
        let waiters = self.waiters.lock();
        if waiters.contains_key(&record.id) {
            self.feed
                .publish(record.state, &record.id, &record.agent, &view);
        }
    }

    /// The largest body a held request may have.
    pub fn max_body_bytes(&self) -> usize {
        self.settings.max_body_bytes
    }

    /// The body of a request this process holds, for approvers' eyes: from memory only (the
    /// store has its hash, never its bytes). `None` once it is settled, or after a restart.
    pub fn held_body(&self, id: &str) -> Option<bytes::Bytes> {
        self.waiters.lock().get(id).map(|w| w.body.clone())
    }

    /// How much of a held body approvers are shown (`approvals.preview_bytes`).
    pub fn preview_bytes(&self) -> usize {
        self.settings.preview_bytes
    }

    /// Refuses up front if `agent` already has the maximum of held requests (checked again
    /// when the hold starts; this early check spares buffering a body for nothing).
    pub fn check_capacity(&self, agent: &str, max_pending: usize) -> Result<(), Refusal> {
        let held = self.held.lock().get(agent).copied().unwrap_or(0);
        if held >= max_pending {
            return Err(too_many(max_pending));
        }
        Ok(())
    }

    /// How long a lent token may be used (within its tool call).
    pub fn obo_lifetime(&self) -> Duration {
        Duration::from_secs(self.settings.obo_token_lifetime_secs)
    }

    /// Records `request` as pending, holds it until it is settled, and returns the approval
    /// — or how the hold ended otherwise. `client_gone` resolves when the sandbox's
    /// connection closes.
    pub async fn hold(
        &self,
        request: HoldRequest,
        client_gone: impl Future<Output = ()>,
    ) -> Result<Released, HoldEnd> {
        let requested_at = now_millis();
        let timeout = Duration::from_secs(self.settings.timeout_secs);
        let record = ApprovalRecord {
            id: request.id,
            agent: request.agent,
            tool_call: request.tool_call,
            session: request.session,
            run_mode: Some(request.run_mode),
            command: request.command,
            kind: request.kind,
            method: request.method,
            url: request.url,
            body_sha256: body_sha256(&request.body),
            body_bytes: request.body.len() as u64,
            credential: request.credential,
            policies: request.policies,
            requested_at,
            expires_at: requested_at + timeout.as_millis() as u64,
            state: ApprovalState::Pending,
            decided_at: None,
            approver: None,
            reason: None,
            sealed_obo_token: None,
            obo_audience: request.obo_audience,
            not_sent: None,
        };
        let (slot, decided) = self.reserve(&record, request.max_pending, request.body.clone())?;
        let store = self.store.clone();
        let stored = record.clone();
        match tokio::task::spawn_blocking(move || store.insert_approval(&stored)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(HoldEnd::NotRecorded(store_unavailable(&e.to_string()))),
            Err(e) => return Err(HoldEnd::NotRecorded(store_unavailable(&e.to_string()))),
        }
        tracing::info!(
            agent = record.agent, approval = record.id, method = record.method,
            kind = ?record.kind, "request held for approval"
        );
        self.announce_pending(&record, &request.body);
        let settled = self.wait(&record.id, decided, timeout, client_gone).await;
        drop(slot);
        match settled {
            Ok(Ending::Decided((record, obo_token))) if record.state == ApprovalState::Approved => {
                Ok(Released { record, obo_token })
            }
            Ok(Ending::Decided((record, _))) => {
                Err(end_for(&record, self.settings.timeout_secs, false))
            }
            Ok(Ending::Gateway(record)) => Err(end_for(&record, self.settings.timeout_secs, true)),
            Err(e) => Err(HoldEnd::Refused(store_unavailable(&e.to_string()))),
        }
    }

    /// Takes a held-request slot for the record's agent and registers its waiter.
    fn reserve(
        &self,
        record: &ApprovalRecord,
        max_pending: usize,
        body: bytes::Bytes,
    ) -> Result<(HeldSlot<'_>, oneshot::Receiver<Verdict>), HoldEnd> {
        {
            let mut held = self.held.lock();
            let count = held.entry(record.agent.clone()).or_default();
            if *count >= max_pending {
                return Err(HoldEnd::NotRecorded(too_many(max_pending)));
            }
            *count += 1;
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().insert(
            record.id.clone(),
            Waiter {
                verdict: tx,
                agent: record.agent.clone(),
                tool_call: record.tool_call.clone(),
                body,
            },
        );
        Ok((
            HeldSlot {
                approvals: self,
                agent: record.agent.clone(),
                id: record.id.clone(),
            },
            rx,
        ))
    }

    async fn wait(
        &self,
        id: &str,
        mut decided: oneshot::Receiver<Verdict>,
        timeout: Duration,
        client_gone: impl Future<Output = ()>,
    ) -> Result<Ending, StoreError> {
        let by_gateway = tokio::select! {
            verdict = &mut decided => match verdict {
                Ok(verdict) => return Ok(Ending::Decided(verdict)),
                // The sender is dropped only with its waiter entry: read what was stored.
                Err(_) => return self.current(id).map(|r| Ending::Decided((r, None))),
            },
            _ = tokio::time::sleep(timeout) => ApprovalState::Expired,
            _ = client_gone => ApprovalState::Abandoned,
        };
        match self.settle(id, Settlement::by_gateway(by_gateway)).await {
            Ok(record) => {
                // Settled: the slot has nothing left to abandon when it is dropped.
                self.waiters.lock().remove(id);
                self.announce(&record);
                tracing::info!(
                    approval = id,
                    state = by_gateway.as_str(),
                    "approval settled by the gateway"
                );
                Ok(Ending::Gateway(record))
            }
            // An approver got there first; their decision is on its way.
            Err(StoreError::AlreadySettled { .. }) => match decided.await {
                Ok(verdict) => Ok(Ending::Decided(verdict)),
                Err(_) => self.current(id).map(|r| Ending::Decided((r, None))),
            },
            Err(e) => Err(e),
        }
    }

    fn current(&self, id: &str) -> Result<ApprovalRecord, StoreError> {
        self.store
            .approval(id)?
            .ok_or_else(|| StoreError::NoApproval(id.to_string()))
    }

    async fn settle(&self, id: &str, settlement: Settlement) -> Result<ApprovalRecord, StoreError> {
        let store = self.store.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || store.settle(&id, settlement))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::NoApproval(format!(
                    "(settling task failed: {e})"
                )))
            })
    }

    /// Approves a pending request; it is released once the approval is durable. An
    /// on-behalf-of approval needs the approver's token, which is stored only sealed.
    /// `may_lend` says whether the agent may act on a person's behalf at all (ReadOnly agents
    /// may not).
    pub async fn approve(
        &self,
        id: &str,
        approver: &str,
        obo_token: Option<Secret>,
        may_lend: impl FnOnce(&ApprovalRecord) -> bool,
    ) -> Result<ApprovalRecord, DecideError> {
        let pending = self.get(id)?;
        if let Some(token) = &obo_token {
            if pending.obo_audience.is_none() || !may_lend(&pending) {
                return Err(DecideError::OboTokenRefused(format!(
                    "approval {id:?} cannot take a token: it is not an on-behalf-of approval, \
                     or its agent may not act on a person's behalf"
                )));
            }
            if token.expose().is_empty() {
                return Err(DecideError::OboTokenRequired(id.to_string()));
            }
        } else if pending.kind == ApprovalKind::OnBehalfOf
            && pending.state == ApprovalState::Pending
        {
            return Err(DecideError::OboTokenRequired(id.to_string()));
        }
        let sealed = obo_token.as_ref().map(|token| self.sealer.seal(token, id));
        self.decide(
            id,
            Settlement {
                state: ApprovalState::Approved,
                approver: Some(approver.to_string()),
                reason: None,
                sealed_obo_token: sealed,
            },
            obo_token,
        )
        .await
    }

    /// Denies a pending request with the approver's reason.
    pub async fn deny(
        &self,
        id: &str,
        approver: &str,
        reason: &str,
    ) -> Result<ApprovalRecord, DecideError> {
        self.decide(
            id,
            Settlement {
                state: ApprovalState::Denied,
                approver: Some(approver.to_string()),
                reason: Some(reason.to_string()),
                sealed_obo_token: None,
            },
            None,
        )
        .await
    }

    /// Settles durably, then hands the verdict (and a lent token) to the held request.
    async fn decide(
        &self,
        id: &str,
        settlement: Settlement,
        obo_token: Option<Secret>,
    ) -> Result<ApprovalRecord, DecideError> {
        let record = self.settle(id, settlement).await?;
        if let Some(waiter) = self.waiters.lock().remove(id) {
            let _ = waiter.verdict.send((record.clone(), obo_token));
        }
        self.announce(&record);
        tracing::info!(
            approval = id,
            agent = record.agent,
            state = record.state.as_str(),
            approver = record.approver.as_deref().unwrap_or("-"),
            "approval decided"
        );
        Ok(record)
    }

    /// Records on approval `id` why its approved request was not sent after all (the
    /// decision at release refused it). Logged, never fatal: the request is refused anyway.
    pub async fn not_sent(&self, id: &str, why: &str) {
        let store = self.store.clone();
        let (owned_id, owned_why) = (id.to_string(), why.to_string());
        let noted =
            tokio::task::spawn_blocking(move || store.not_sent(&owned_id, &owned_why)).await;
        match noted {
            Ok(Ok(_)) => tracing::info!(approval = id, why, "approved request not sent"),
            Ok(Err(e)) => {
                tracing::warn!(approval = id, error = %e, "could not record why an approved request was not sent")
            }
            Err(e) => {
                tracing::warn!(approval = id, error = %e, "could not record why an approved request was not sent")
            }
        }
    }

    /// Denies every pending request of `agent` (the agent is being removed).
    pub async fn deny_all(&self, agent: &str, reason: &str) {
        let pending = self.list(&ApprovalFilter {
            agent: Some(agent.to_string()),
            state: Some(ApprovalState::Pending),
        });
        for record in pending.unwrap_or_default() {
            let _ = self.deny(&record.id, "gateway", reason).await;
        }
    }

    /// Approvals matching `filter`.
    pub fn list(&self, filter: &ApprovalFilter) -> Result<Vec<ApprovalRecord>, DecideError> {
        Ok(self.store.approvals(filter)?)
    }

    /// One approval.
    pub fn get(&self, id: &str) -> Result<ApprovalRecord, DecideError> {
        self.store
            .approval(id)?
            .ok_or_else(|| DecideError::NotFound(id.to_string()))
    }

    /// Everything that ends with a tool call (closed, or past its TTL): its cached and lent
    /// tokens are dropped, its requests still held for approval are abandoned and refused
    /// (403 `tool_call_closed`), and the tokens lent within it are deleted from the store.
    pub async fn end_tool_call(
        &self,
        credentials: &Credentials,
        agent: &str,
        serial: u64,
        tool_call: &str,
    ) {
        credentials.evict_tool_call(agent, serial);
        let held: Vec<String> = self
            .waiters
            .lock()
            .iter()
            .filter(|(_, w)| w.agent == agent && w.tool_call.as_deref() == Some(tool_call))
            .map(|(id, _)| id.clone())
            .collect();
        for id in held {
            let ended = Settlement {
                state: ApprovalState::Abandoned,
                approver: None,
                reason: Some(format!(
                    "tool call {tool_call:?} ended before a decision; nothing was forwarded"
                )),
                sealed_obo_token: None,
            };
            match self.decide(&id, ended, None).await {
                Ok(_) | Err(DecideError::AlreadySettled { .. }) | Err(DecideError::NotFound(_)) => {
                }
                Err(e) => {
                    tracing::warn!(approval = id, error = %e, "could not abandon a held request of an ended tool call")
                }
            }
        }
        self.forget_tool_call(agent, tool_call).await;
    }

    /// Deletes the sealed tokens lent within a tool call that ended.
    async fn forget_tool_call(&self, agent: &str, tool_call: &str) {
        let (store, agent, tool_call) =
            (self.store.clone(), agent.to_string(), tool_call.to_string());
        let forgotten = tokio::task::spawn_blocking(move || {
            store.forget_obo_tokens(Some(&agent), |r| {
                r.tool_call.as_deref() == Some(tool_call.as_str())
            })
        })
        .await;
        match forgotten {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not delete the tokens lent in a closed tool call")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not delete the tokens lent in a closed tool call")
            }
        }
    }

    /// Deletes sealed tokens lent longer ago than their lifetime (or, with `all`, every one:
    /// at start, when no tool call has survived).
    pub fn forget_expired_tokens(&self, all: bool) -> Result<usize, StoreError> {
        let cutoff = now_millis().saturating_sub(self.obo_lifetime().as_millis() as u64);
        self.store
            .forget_obo_tokens(None, |r| all || r.decided_at.is_none_or(|at| at < cutoff))
    }

    /// How many requests are held right now, over all agents.
    pub fn held(&self) -> usize {
        self.waiters.lock().len()
    }
}

/// A held request's place: released when the hold ends, however it ends (including the
/// request's task being dropped, e.g. at shutdown — then the record is abandoned too).
struct HeldSlot<'a> {
    approvals: &'a Approvals,
    agent: String,
    id: String,
}

impl Drop for HeldSlot<'_> {
    fn drop(&mut self) {
        let waiter = self.approvals.waiters.lock().remove(&self.id);
        if let Some(count) = self.approvals.held.lock().get_mut(&self.agent) {
            *count = count.saturating_sub(1);
        }
        // The waiter is still registered only if nothing settled the record: the request's
        // task was dropped mid-hold. Abandon the record so it never stays pending.
        if waiter.is_some() {
            match self
                .approvals
                .store
                .settle(&self.id, Settlement::by_gateway(ApprovalState::Abandoned))
            {
                Ok(record) => self.approvals.announce(&record),
                Err(StoreError::AlreadySettled { .. }) | Err(StoreError::NoApproval(_)) => {}
                Err(e) => {
                    tracing::warn!(approval = self.id, error = %e, "could not abandon a dropped hold")
                }
            }
        }
    }
}

/// Hex SHA-256 of a request body.
pub fn body_sha256(body: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, body))
}

fn too_many(max: usize) -> Refusal {
    Refusal::new(
        ErrorCode::TooManyPendingApprovals,
        format!(
            "this agent already has {max} requests waiting for approval, its limit \
             (limits.pending_approvals, default approvals.max_pending_per_agent); wait for a \
             decision before sending more"
        ),
    )
}

fn store_unavailable(why: &str) -> Refusal {
    tracing::error!(error = why, "approval store failed; refusing the request");
    Refusal::new(
        ErrorCode::StorageUnavailable,
        "the request needs approval but the approval could not be recorded; nothing was forwarded",
    )
}

/// How a hold that was not approved ends; `settled_here` when the hold settled the record
/// itself (it expired, or its client left).
fn end_for(record: &ApprovalRecord, timeout_secs: u64, settled_here: bool) -> HoldEnd {
    let refusal = match record.state {
        ApprovalState::Denied => Refusal::new(
            ErrorCode::ApprovalDenied,
            format!(
                "denied by {}: {}",
                record.approver.as_deref().unwrap_or("an approver"),
                record.reason.as_deref().unwrap_or("no reason given")
            ),
        ),
        ApprovalState::Expired => Refusal::new(
            ErrorCode::ApprovalExpired,
            format!(
                "approval expired: nobody decided within {timeout_secs} s; nothing was forwarded"
            ),
        ),
        ApprovalState::Abandoned if settled_here => return HoldEnd::ClientGone,
        // Abandoned by someone else while the client waits: its tool call ended.
        ApprovalState::Abandoned => Refusal::new(
            ErrorCode::ToolCallClosed,
            record
                .reason
                .clone()
                .unwrap_or_else(|| "the request's tool call ended before a decision".into()),
        ),
        ApprovalState::Pending | ApprovalState::Approved => Refusal::new(
            ErrorCode::InternalError,
            "the approval ended in an unexpected state",
        ),
    };
    HoldEnd::Refused(refusal.with_extra("approval", record.id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An approver can settle a record as soon as it is stored, before the hold has
    /// published it as pending: the feed must then never say `pending` after the settlement.
    #[tokio::test]
    async fn a_pending_event_never_follows_its_settlement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let sealer = OboSealer::load(&dir.path().join("obo-key")).expect("key");
        let registry = Arc::new(AgentRegistry::new(std::iter::empty()).expect("registry"));
        let approvals = Approvals::new(store.clone(), ApprovalsConfig::default(), sealer, registry);
        let now = now_millis();
        let record = ApprovalRecord {
            id: new_approval_id(),
            agent: "a".into(),
            tool_call: None,
            session: None,
            run_mode: Some("Review".into()),
            command: None,
            kind: ApprovalKind::Request,
            method: "POST".into(),
            url: "http://example.test/".into(),
            body_sha256: body_sha256(b"{}"),
            body_bytes: 2,
            credential: None,
            policies: Vec::new(),
            requested_at: now,
            expires_at: now + 60_000,
            state: ApprovalState::Pending,
            decided_at: None,
            approver: None,
            reason: None,
            sealed_obo_token: None,
            obo_audience: None,
            not_sent: None,
        };
        // What `hold` does up to its announcement: reserve, store…
        let (slot, _decided) = approvals
            .reserve(&record, 4, bytes::Bytes::from_static(b"{}"))
            .map_err(|_| "reserve")
            .expect("room");
        store.insert_approval(&record).expect("stored");
        // …an approver is faster than the announcement…
        approvals
            .deny(&record.id, "alice", "too fast")
            .await
            .expect("denied");
        // …and the announcement comes too late.
        approvals.announce_pending(&record, b"{}");
        drop(slot);
        let names: Vec<&str> = approvals
            .feed()
            .after(0)
            .expect("kept")
            .iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec!["denied"]);

        // Announced in time, it comes first.
        let mut second = record.clone();
        second.id = new_approval_id();
        let (slot, _decided) = approvals
            .reserve(&second, 4, bytes::Bytes::from_static(b"{}"))
            .map_err(|_| "reserve")
            .expect("room");
        store.insert_approval(&second).expect("stored");
        approvals.announce_pending(&second, b"{}");
        approvals
            .deny(&second.id, "alice", "no")
            .await
            .expect("denied");
        drop(slot);
        let names: Vec<&str> = approvals
            .feed()
            .after(1)
            .expect("kept")
            .iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec!["pending", "denied"]);
    }
}
