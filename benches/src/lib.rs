//! Shared pieces of Tollgate's benchmark drivers, each a binary of this crate:
//! `tollgate-e2e-bench` (`src/e2e.rs`: direct, a bare pingora pass-through, Squid and
//! Tollgate side by side), `tollgate-passthrough` (`src/passthrough.rs`: that pass-through),
//! `tollgate-held-bench` (`src/held.rs`: memory of requests held for approval, and the
//! latency of releasing one), `tollgate-feed-bench` (`src/feed.rs`: the live feed of
//! approvals with many listeners), `tollgate-soak` (`src/soak.rs`: memory and file descriptors
//! under long mixed load) and `tollgate-microvm-bench` (`src/microvm.rs`: sandbox start-up
//! and memory).
//!
//! What is where:
//!
//! - [`gateway`]: the `tollgate` binary under test as a child process on ephemeral loopback
//!   ports ([`Gateway`]: start with a caller's configuration, stop, CPU time, memory,
//!   open-files limit), a client for its admin API ([`gateway::AdminApi`]), and the
//!   [`TempDir`] its configuration, data and log live in;
//! - [`origin`]: the origin server (plain or TLS) the benchmarks send their requests to;
//! - [`load`]: the closed-loop load generator (in the clear, TLS, or TLS inside `CONNECT`);
//! - [`squid`]: Squid set up for the comparison;
//! - [`tls`]: the benchmark's certificates and TLS configurations;
//! - [`http`]: the few HTTP/1.1 parsing helpers the hand-written clients need;
//! - [`procfs`]: what Linux's `/proc` says about a process (CPU time, resident memory,
//!   open files and their limit, clock ticks, children).

pub mod gateway;
pub mod http;
pub mod load;
pub mod origin;
pub mod procfs;
pub mod scale;
pub mod squid;
pub mod tls;

pub use gateway::{Gateway, TempDir};

/// Prints a benchmark's Markdown table and, with `--out`, writes it there too.
pub fn report(table: &str, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    println!("{table}");
    if let Some(out) = out {
        std::fs::write(out, table).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
