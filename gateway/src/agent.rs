//! An agent's definition, in one place: who it is (id, run mode, RBAC scopes, tags), how its
//! requests are told apart (source addresses, or a listener of its own) and what it may use
//! (its limits). The configuration file, the admin API and the registry all read and write
//! this one record; the data path reads it on every request.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use tollgate_policy::RunMode;

/// One agent as the gateway knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// Unique id. In an admin API body it may be left out: the path names the agent.
    #[serde(default)]
    pub id: String,
    /// What the agent may do without a person; policies read it as `principal.run_mode`.
    pub run_mode: RunMode,
    /// Azure RBAC scopes the agent's managed identity holds.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Name of the identity provider the agent's tokens come from.
    #[serde(default)]
    pub identity: Option<String>,
    /// Free-form tags (e.g. `team`), which policies read as Cedar entity tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Source addresses on the shared egress listener that belong to this agent.
    #[serde(default)]
    pub peers: Vec<IpAddr>,
    /// A listener of the agent's own (config file only): every connection to it is this
    /// agent's, whatever its source address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<AgentListenConfig>,
    /// The agent's own limits (connections, request rate, body size, held requests); each
    /// one left out is the default from `[limits]`.
    #[serde(default, skip_serializing_if = "AgentLimits::is_unset")]
    pub limits: AgentLimits,
    /// Numbers this version of the record (set by the registry on every change), so caches
    /// keyed by it never serve facts of an older version. A value given in input is
    /// ignored: the registry always sets its own.
    #[serde(default)]
    pub revision: u64,
}

impl Agent {
    /// The agent as the policies see it.
    pub fn facts(&self) -> tollgate_policy::AgentFacts<'_> {
        tollgate_policy::AgentFacts {
            id: &self.id,
            revision: self.revision,
            run_mode: self.run_mode,
            scopes: &self.scopes,
            tags: &self.tags,
        }
    }
}

/// An agent id that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("agent id {0:?} is invalid: use 1 to 128 characters of A-Z a-z 0-9 . _ -")]
pub struct InvalidAgentId(pub String);

/// Checks that an agent id is usable in URLs, file names and logs.
pub fn validate_agent_id(id: &str) -> Result<(), InvalidAgentId> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidAgentId(id.to_string()))
    }
}

/// Where an agent's own listener is bound.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentListenConfig {
    /// The address the listener binds; every connection to it is this agent's.
    pub address: SocketAddr,
    /// A network namespace (e.g. `/run/netns/agent-a`) to bind the address in; the socket
    /// stays in that namespace and is served by this process.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

/// An agent's own limits; each one left out is the gateway's default from `[limits]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLimits {
    /// Client connections open at once (plain and CONNECT); more get 429 and are closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    /// Requests per second, with bursts of up to one second's worth; more get 429. 0: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    /// Largest request body in bytes; a larger one gets 413. 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_body_bytes: Option<u64>,
    /// Requests held for approval at once; more get 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_approvals: Option<usize>,
    /// Tool calls open at once; opening another gets 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_tool_calls: Option<usize>,
}

impl AgentLimits {
    /// Whether no field is set (then the record does not mention limits).
    pub fn is_unset(&self) -> bool {
        *self == AgentLimits::default()
    }

    /// Refuses a limit of zero where zero would lock the agent out rather than lift the limit.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections == Some(0) {
            return Err("limits.connections must be at least 1".into());
        }
        if self.pending_approvals == Some(0) {
            return Err("limits.pending_approvals must be at least 1".into());
        }
        if self.open_tool_calls == Some(0) {
            return Err("limits.open_tool_calls must be at least 1".into());
        }
        Ok(())
    }
}

/// Limits with every field decided: an agent's own, or the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    /// Client connections open at once (plain and CONNECT); more get 429 and are closed.
    pub connections: usize,
    /// Requests per second, with bursts of up to one second's worth; 0 means no limit.
    pub requests_per_second: u32,
    /// Largest request body in bytes (larger gets 413); 0 means no limit.
    pub request_body_bytes: u64,
    /// Requests held for approval at once; more get 429.
    pub pending_approvals: usize,
    /// Tool calls open at once; opening another gets 429.
    pub open_tool_calls: usize,
}

impl Effective {
    /// `defaults`, overridden by what `own` sets.
    pub(crate) fn with(self, own: &AgentLimits) -> Effective {
        Effective {
            connections: own.connections.unwrap_or(self.connections),
            requests_per_second: own.requests_per_second.unwrap_or(self.requests_per_second),
            request_body_bytes: own.request_body_bytes.unwrap_or(self.request_body_bytes),
            pending_approvals: own.pending_approvals.unwrap_or(self.pending_approvals),
            open_tool_calls: own.open_tool_calls.unwrap_or(self.open_tool_calls),
        }
    }
}
