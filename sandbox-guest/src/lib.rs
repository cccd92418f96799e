//! Tollgate's guest agent: the control process inside a session's sandbox (a microVM, or a
//! network namespace), reached by the sandbox service over the session's own network, never
//! by the workload's.
//!
//! The data path, in module order: [`http`] reads one request from the service and writes
//! its answer; [`server`] checks the session's secret and routes it; [`exec`] runs an
//! execution in the session's persistent shell state (environment and working directory
//! carried from one execution to the next), bounded in time and output; [`python`] keeps the
//! session's Python interpreter, whose state carries from one call to the next; [`files`] reads,
//! writes and lists files confined to the session's workspace; [`procs`] finds and ends a
//! user's processes.
//!
//! It is deliberately small and synchronous (a thread per connection, one execution at a
//! time): it runs inside every sandbox, next to the workload it serves.

pub mod exec;
pub mod files;
pub mod http;
pub mod procs;
pub mod python;
pub mod server;
