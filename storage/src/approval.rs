//! Approval records: one held request, bound to exactly what was asked, and its fate.

use serde::{Deserialize, Serialize};

/// Why a request waits for a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalKind {
    /// The policy said the request needs approval (e.g. a write in Review mode).
    Request,
    /// The agent's own identity lacks permission: approving lends the approver's identity
    /// (an on-behalf-of token) for this request and the rest of its tool call.
    OnBehalfOf,
}

/// Where an approval is in its life. Only `Pending` ever changes, and only once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for a person; the request is held.
    Pending,
    /// A person approved; the held request was released (once).
    Approved,
    /// A person refused; the request was answered 403.
    Denied,
    /// Nobody decided before `expires_at`; the request was answered 403.
    Expired,
    /// The client went away (or the gateway restarted) while the request was held; it was
    /// never sent.
    Abandoned,
}

impl ApprovalState {
    /// The name used in the API and in query strings.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Abandoned => "abandoned",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(s: &str) -> Option<Self> {
        [
            ApprovalState::Pending,
            ApprovalState::Approved,
            ApprovalState::Denied,
            ApprovalState::Expired,
            ApprovalState::Abandoned,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

/// One request held for a person. Everything an approver needs to decide is here, and the
/// body hash binds the approval to the exact bytes that will be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// Unique, unguessable id.
    pub id: String,
    /// The agent whose request is held.
    pub agent: String,
    /// The tool call the request belongs to, if one was open.
    pub tool_call: Option<String>,
    /// The session (conversation thread) the request came from, when it came through that
    /// session's own listener: the approver sees in whose conversation it was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The agent's run mode when the request was held (`ReadOnly`, `Review`, `Autonomous`):
    /// an Autonomous agent's request is held only where it lacks permission (on-behalf-of).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_mode: Option<String>,
    /// What the request's tool call was running (the command or code the sandbox service
    /// executed), when its opener said; at most 4 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Why it is held: a policy asked for a person, or the agent lacks permission (OBO).
    pub kind: ApprovalKind,
    /// The HTTP method; with an override header, both (`GET (X-HTTP-Method-Override: DELETE)`).
    pub method: String,
    /// The full URL, as the request named it (query included: the approver must see exactly
    /// what will be sent).
    pub url: String,
    /// Hex SHA-256 of the request body.
    pub body_sha256: String,
    /// Length of the request body.
    pub body_bytes: u64,
    /// The credential the request would be sent with (provider and audience), never a token.
    pub credential: Option<String>,
    /// The policies that decided "needs approval".
    pub policies: Vec<String>,
    /// When the request arrived (ms since the epoch).
    pub requested_at: u64,
    /// When it stops waiting (ms since the epoch).
    pub expires_at: u64,
    /// Where it is in its life; only `Pending` changes, once.
    pub state: ApprovalState,
    /// When it left `Pending` (ms since the epoch); `None` while pending.
    pub decided_at: Option<u64>,
    /// The approver's name (`admin` for the admin token); `None` for expiry and abandonment.
    pub approver: Option<String>,
    /// The approver's reason (for a denial).
    pub reason: Option<String>,
    /// The approver's on-behalf-of token, sealed by the gateway (AEAD): the store never
    /// holds it in the clear. Removed when the tool call ends or the record expires.
    #[serde(default, with = "hex_opt", skip_serializing_if = "Option::is_none")]
    pub sealed_obo_token: Option<Vec<u8>>,
    /// For an on-behalf-of approval: the audience (token scope) the approver's token is
    /// lent for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obo_audience: Option<String>,
    /// Why an approved request was not sent after all: at its release the gateway decided
    /// again, with the policies and the agent record then in force, and they no longer
    /// allowed it (the policy set was reloaded, the run mode changed, the agent was removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_sent: Option<String>,
}

/// What a person (or the clock) decided about a pending approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// The new state; anything but `Pending`.
    pub state: ApprovalState,
    /// Who decided (`None` for expiry and abandonment).
    pub approver: Option<String>,
    /// Why, in the approver's words.
    pub reason: Option<String>,
    /// A sealed on-behalf-of token lent with an approval.
    pub sealed_obo_token: Option<Vec<u8>>,
}

impl Settlement {
    /// A settlement nobody made: expiry or abandonment.
    pub fn by_gateway(state: ApprovalState) -> Self {
        Settlement {
            state,
            approver: None,
            reason: None,
            sealed_obo_token: None,
        }
    }
}

/// Which approvals a listing returns.
#[derive(Debug, Clone, Default)]
pub struct ApprovalFilter {
    /// Only approvals of the agent with this id; `None`: every agent's.
    pub agent: Option<String>,
    /// Only approvals in this state; `None`: every state.
    pub state: Option<ApprovalState>,
}

impl ApprovalFilter {
    pub(crate) fn matches(&self, record: &ApprovalRecord) -> bool {
        self.state.is_none_or(|s| s == record.state)
            && self.agent.as_deref().is_none_or(|a| a == record.agent)
    }
}

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_some(&hex::encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| hex::decode(t).map_err(serde::de::Error::custom))
            .transpose()
    }
}
