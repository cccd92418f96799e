//! Shared pieces of Tollgate's benchmark drivers, each a binary of this crate:
//! `tollgate-e2e-bench` (`src/e2e.rs`: throughput and latency, direct vs. through the
//! gateway) and `tollgate-held-bench` (`src/held.rs`: memory of requests held for approval,
//! and the latency of releasing one).
//!
//! What is where:
//!
//! - [`gateway`]: the `tollgate` binary under test as a child process on ephemeral loopback
//!   ports ([`Gateway`]: start with a caller's configuration, stop, CPU time, memory,
//!   open-files limit), a client for its admin API ([`gateway::AdminApi`]), and the
//!   [`TempDir`] its configuration, data and log live in;
//! - [`origin`]: the origin server both benchmarks send their requests to;
//! - [`http`]: the few HTTP/1.1 parsing helpers the hand-written clients need;
//! - [`procfs`]: what Linux's `/proc` says about a process (CPU time, resident memory,
//!   open-files limit, clock ticks).

pub mod gateway;
pub mod http;
pub mod load;
pub mod origin;
pub mod procfs;
pub mod squid;
pub mod tls;

pub use gateway::{Gateway, TempDir};
