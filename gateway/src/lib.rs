//! Tollgate: the egress gateway for AI-agent sandboxes.
//!
//! # Map
//!
//! The crate is cut by layer; each folder's root documents its own modules in reading order
//! (the design page, `docs/design.md`, draws the same picture):
//!
//! - [`egress`] — the data path: one module per step a sandbox's request meets, from the
//!   socket to the origin (connection, head, identity, interception, classification,
//!   decision, approval, credentials, upstream), and [`egress::proxy`], the pingora phases
//!   that call them in order.
//! - [`admin`] — the control plane: the authenticated admin API (agents, tool calls,
//!   approvals, policies, audit trails) and the approvers' web page.
//! - [`observe`] — what every request leaves behind: its audit record, its metrics, its span
//!   and log line (OpenTelemetry).
//! - Shared by all of them: [`agent`] (an agent's definition: identity, run mode, listener,
//!   limits), [`config`] (the configuration file and its defaults),
//!   [`datadir`] (files on disk and the secrets in them), [`reply`] (every answer the
//!   gateway gives itself, as JSON `{error, detail}`), [`client`] (the gateway's own HTTP
//!   client: token endpoints, the CLI), and [`server`] (start-up: from a [`Config`] to
//!   running listeners).
//!
//! The `tollgate` binary (`main.rs`, with its subcommands in `cli/`) is a thin command-line
//! layer over this library.

// In the map's order: the data path, the control plane, what requests leave behind, and
// what they all share.
pub mod egress;

pub mod admin;

pub mod observe;

pub mod agent;
pub mod client;
pub mod config;
pub mod datadir;
pub mod reply;
pub mod server;

pub use config::Config;
pub use server::{start, RunningGateway, StartError};
/// Where a request goes (shared with the policy model).
pub use tollgate_policy::target;
