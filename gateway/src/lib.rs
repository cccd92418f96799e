//! Tollgate: the egress gateway for AI-agent sandboxes.
//!
//! # Layout
//!
//! The modules follow one request through the gateway (DESIGN.md, "Data path"):
//!
//! - [`listener`] binds the egress and admin sockets (inside an agent's network namespace when
//!   asked) and serves them with pingora; the egress app sends CONNECT to [`intercept`] and
//!   everything else to [`proxy`]. [`agent_listener`] opens and closes agents' own listeners
//!   while the gateway runs (the sandbox launcher registers them over the admin API).
//! - [`head`], [`framing`] — step 0: each HTTP/1 request head is read by the gateway itself,
//!   in time (slowloris) and framed one way only (smuggling), before pingora parses it; a
//!   head that fails is refused with a reason and recorded; [`h2_watch`] records the HTTP/2
//!   streams pingora's HTTP/2 layer refuses by itself.
//! - [`identity`] — step 1: which agent is speaking (its own listener, or its source address).
//! - [`toolcall`] — which of the agent's open tool calls a request belongs to.
//! - [`intercept`] — step 2: CONNECT, and TLS interception with leaves from [`ca`].
//! - [`target`] — where a request goes, parsed strictly and once (from the policy crate).
//! - [`classify`] — step 3: read, write or upgrade — by the method a request asks for
//!   (override headers included), its body and its `Upgrade` — and the ARM target
//!   (`tollgate_policy::classify`); `TRACE` refused.
//! - [`decide`] — step 4: the Cedar decision, and reloading the policy set.
//! - [`approval`] — step 5: a request that needs approval is recorded (durably, in
//!   `tollgate_storage`) and held until a person decides, it expires, or its client leaves;
//!   [`replay`] sends a released request with the body that was held; [`obo`] seals the
//!   tokens approvers lend (on-behalf-of) before they are stored.
//! - [`credentials`] — step 6: strip what the sandbox sent, inject a token for this agent and
//!   tool call (identity providers, token cache).
//! - [`proxy`] — the pingora request phases, which call each step in order.
//! - [`upstream`] — step 7: asynchronous resolution, the SSRF guard, origin connections.
//! - [`reply`] — every answer the gateway gives itself (JSON `{error, detail}`).
//! - [`admin`] — the authenticated control API.
//! - [`config`], [`datadir`], [`server`] — configuration, files on disk, start-up.
//! - [`client`] — the gateway's own HTTP client (token endpoints, the CLI).
//!
//! - [`audit`] — the last step: each request's summary, queued for the agent's audit trail;
//!   [`metrics`] counts it for `/metrics`; [`telemetry`] ends its span and exports spans,
//!   metrics and log events over OTLP. [`queue`] is the bounded hand-off both writers use.

pub mod admin;
pub mod agent_listener;
pub mod approval;
pub mod audit;
pub mod ca;
pub mod classify;
pub mod client;
pub mod config;
pub mod credentials;
pub mod datadir;
pub mod decide;
pub mod framing;
pub mod h2_watch;
pub mod head;
pub mod identity;
pub mod intercept;
pub mod listener;
pub mod metrics;
pub mod obo;
pub mod panics;
pub mod pipeline;
pub mod proxy;
pub mod queue;
pub mod quota;
pub mod replay;
pub mod reply;
pub mod server;
pub mod shown;
pub mod telemetry;
pub mod toolcall;
pub mod upstream;
mod wrapped_stream;

pub use config::Config;
pub use server::{start, RunningGateway, StartError};
/// Where a request goes (shared with the policy model).
pub use tollgate_policy::target;
