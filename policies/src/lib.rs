//! Tollgate's authorization model: who may send which request where.
//!
//! # Layout
//!
//! - [`target`] — where a request goes: a strictly parsed host and port (the Cedar resource).
//! - [`agent`] — the principal: run mode, RBAC scopes, tags.
//! - [`classify`] — what the request asks: read or write, and the Azure Resource Manager
//!   target parsed from the path.
//! - [`entities`] — those facts as Cedar entities and context.
//! - [`engine`] — a validated policy set (schema in `tollgate.cedarschema`, policies in
//!   `*.cedar` files) and the three-outcome decision: allow, deny, needs approval.
//! - [`testcases`] — expected decisions stored beside the policies.
//!
//! This crate knows nothing of HTTP servers or pingora: the gateway hands it facts and gets
//! a [`Decision`] back. Anything unexpected — an evaluation error, a value of the wrong
//! shape — denies.

pub mod agent;
pub mod classify;
mod decision_cache;
pub mod engine;
pub mod entities;
pub mod target;
pub mod testcases;

pub use agent::{AgentFacts, RunMode};
pub use classify::{canonical_path, Action, ArmTarget, PathError, RequestFacts};
pub use engine::{Decision, LoadError, Outcome, PolicyEngine, PolicySources, Problem};
