//! Audit records: what an agent's request was and what became of it, summarized.

use serde::{Deserialize, Serialize};

/// The summary of one request. It deliberately has no field for a body, a query string or a
/// header value: the audit trail says what happened without copying what was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the agent's trail (assigned by the store, increasing).
    #[serde(default)]
    pub seq: u64,
    /// When the request arrived (ms since the epoch).
    pub at: u64,
    /// The agent that sent it.
    pub agent: String,
    /// Its tool call, if one was open.
    pub tool_call: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Destination host (and port when not the default).
    pub host: String,
    /// Path without the query.
    pub path: String,
    /// allow / deny / needs_approval, or empty if the request never reached a decision.
    pub decision: String,
    /// The policies that decided.
    pub policies: Vec<String>,
    /// The approval that held it, if any.
    pub approval: Option<String>,
    /// The credential provider used (never the token).
    pub credential: Option<String>,
    /// The status sent to the agent (0 if none was).
    pub status: u16,
    /// Why the gateway refused or failed, as a short error code.
    pub error: Option<String>,
    /// Request body bytes received.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Time from arrival to the end of the response, in microseconds.
    pub latency_us: u64,
}
