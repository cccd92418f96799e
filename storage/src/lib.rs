//! Durable state of the Tollgate gateway, in one fjall database under the data directory.
//!
//! # Layout
//!
//! - [`Store`] (`store`) — opens the database and owns its keyspaces: `agents` (the registry);
//!   one keyspace per agent (`agent.<id>`) holding that agent's audit trail, so two agents'
//!   records are never mixed and removing an agent drops its trail at once; `approvals`, every
//!   agent's approval records under the agent's id; and `audit-heads`, where each agent's
//!   audit chain ends. Approvals and heads are kept apart from the trail so that its keys only
//!   ever grow, and compaction moves its tables down untouched instead of rewriting them.
//! - [`ApprovalRecord`] (`approval`) — one request held for a person, and the state machine
//!   it moves through (pending → approved / denied / expired / abandoned). Every state change
//!   is fsync'd before the call returns: the gateway acts on a change only after it is durable.
//! - [`AuditRecord`] (`audit`) — the summary of one request (never its body or credentials),
//!   appended per agent, hash-chained to the agent's previous record so that an edited or
//!   deleted record is detected ([`Store::verify_audit`]), and pruned by age.
//!
//! This crate knows nothing of HTTP or pingora: it stores and returns records, and the
//! gateway decides what they mean.

mod approval;
mod audit;
mod store;

pub use approval::{ApprovalFilter, ApprovalKind, ApprovalRecord, ApprovalState, Settlement};
pub use audit::{verify_chain, AuditRecord, BrokenLink, ChainHead, ChainReport, GENESIS};
pub use store::{Store, StoreError, StoreMemory};

/// Milliseconds since the Unix epoch: the one time unit of every stored record.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
