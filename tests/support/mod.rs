//! Real parts for end-to-end tests: the `tollgate` binary as a child process, origin servers
//! (plain HTTP and HTTPS with their own test CA) on loopback, token endpoints, and curl as the
//! client.
//!
//! Nothing here is mocked: the gateway is the release artefact users run, the origins are
//! pingora HTTP servers on real sockets, and curl is the system's curl. By concept:
//!
//! - [`gateway`] — the gateway as a child process, its configuration and admin API;
//! - [`origin`] — origins that echo and record what they were sent;
//! - [`ca`] — the test CA behind the origins' certificates;
//! - [`tokens`] — token endpoints (client credentials, managed identity);
//! - [`curl`] — the client, and raw exchanges;
//! - [`approvals`] — requests held for approval;
//! - [`netns`] — network namespaces, for tests that need root;
//! - [`tunnel`] — CONNECT tunnels by hand; [`webdriver`] — headless Chromium.

#![allow(dead_code)] // each test binary uses a different part of this module

// Before the parts, so that they can use it too.
/// Builds an argument vector from anything string-like.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$($a.to_string()),*] };
}

pub mod approvals;
pub mod ca;
pub mod curl;
pub mod gateway;
pub mod netns;
pub mod origin;
pub mod tokens;
pub mod tunnel;
pub mod webdriver;

// Each test binary uses a different part: a part one of them leaves unused is not a fault.
#[allow(unused_imports)]
pub use approvals::*;
#[allow(unused_imports)]
pub use ca::*;
#[allow(unused_imports)]
pub use curl::*;
#[allow(unused_imports)]
pub use gateway::*;
#[allow(unused_imports)]
pub use netns::*;
#[allow(unused_imports)]
pub use origin::*;
#[allow(unused_imports)]
pub use tokens::*;
