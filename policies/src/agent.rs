//! The principal: an agent as the policies see it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How much an agent may do on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunMode {
    /// Reads only.
    ReadOnly,
    /// Reads; writes once a person approves them.
    Review,
    /// Reads, and writes within the agent's RBAC scopes; other writes with approval.
    Autonomous,
}

impl RunMode {
    /// The value of `principal.run_mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::ReadOnly => "ReadOnly",
            RunMode::Review => "Review",
            RunMode::Autonomous => "Autonomous",
        }
    }
}

/// What a decision knows about the agent asking: a borrowed view of its registry record, so
/// the hot path copies nothing it does not put into the Cedar entity.
#[derive(Debug, Clone, Copy)]
pub struct AgentFacts<'a> {
    /// The agent's id (`Agent::"<id>"`).
    pub id: &'a str,
    /// Changes whenever the agent's facts change (the registry numbers every update); the
    /// engine caches the agent's Cedar entity under (id, revision).
    pub revision: u64,
    /// Its run mode, which policies read as `principal.run_mode`.
    pub run_mode: RunMode,
    /// The Azure RBAC scopes its identity holds.
    pub scopes: &'a [String],
    /// Its tags, which policies read as the principal's Cedar tags (`principal.getTag("team")`).
    pub tags: &'a BTreeMap<String, String>,
}

/// An RBAC scope in the form policies compare: lower-case, no trailing slash.
pub fn normalize_scope(scope: &str) -> String {
    scope.trim().trim_end_matches('/').to_ascii_lowercase()
}
