//! The data path: a sandbox's request from the socket to the origin, one module per step, in
//! the order a request meets them. Nothing is forwarded unless every step admits it.
//!
//! Connections:
//!
//! - [`listener`] binds the egress sockets (inside an agent's network namespace when asked)
//!   and serves them with pingora; its app sends CONNECT to [`intercept`] and everything else
//!   to [`proxy`]. [`agent_listener`] opens and closes agents' and sessions' own listeners
//!   while the gateway runs.
//!
//! Each request, in order:
//!
//! 0. [`head`], [`framing`] — each HTTP/1 request head is read by the gateway itself, in time
//!    (slowloris) and framed one way only (smuggling), before pingora parses it; [`pipeline`]
//!    keeps a pipelined client's next request from pingora until the last is answered;
//!    [`h2_watch`] records the HTTP/2 streams pingora's HTTP/2 layer refuses by itself.
//! 1. [`identity`] — which agent is speaking (its own listener, or its source address);
//!    [`quota`] — within what it may use (connections, request rate, body size, held
//!    approvals).
//! 2. [`intercept`] — CONNECT, and TLS interception with leaf certificates from [`ca`].
//! 3. [`classify`] — read, write or upgrade, by the method a request asks for (override
//!    headers included), its body and its `Upgrade`, and the ARM target; [`toolcall`] —
//!    which of the agent's open tool calls it belongs to.
//! 4. [`decide`] — the Cedar decision: allow, deny or needs approval.
//! 5. [`approval`] — a request that needs approval is recorded durably and held until a
//!    person decides, it expires, or its client leaves; [`obo`] seals the tokens approvers
//!    lend (on-behalf-of) before they are stored.
//! 6. [`credentials`] — the sandbox's credentials stripped, a token for this agent and tool
//!    call injected; answers scanned for it.
//! 7. [`upstream`] — asynchronous resolution, the SSRF guard, origin connections;
//!    [`replay`] — the gateway's own send path (a released request with its held body, an
//!    upgrade, an answer read before the sandbox sees it).
//!
//! [`proxy`] holds the pingora phases, which call the steps in this order, and the request's
//! end (its record in [`crate::observe`]). [`panics`] makes a panic while serving a request
//! end that request like any other failure.

// In the map's order: connections, then each step a request takes.
pub mod agent_listener;
pub mod listener;

pub mod framing;
pub mod h2_watch;
pub mod head;
pub mod pipeline;
mod wrapped_stream;

pub mod identity;
pub mod quota;

pub mod ca;
pub mod intercept;

pub mod classify;
pub mod toolcall;

pub mod decide;

pub mod approval;
pub mod obo;

pub mod credentials;

pub mod replay;
pub mod upstream;

pub mod panics;
pub mod proxy;
