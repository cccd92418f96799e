//! The `tollgate` subcommands other than `serve`, each a thin layer over the library or the
//! admin API:
//!
//! - [`policy`] — validate, test and explain policy sets offline (no gateway needed);
//! - [`approvals`] — list, approve and deny held requests over the admin API;
//! - [`audit`] — read and verify agents' audit trails over the admin API;
//! - [`admin_client`] — what the last two share: the admin API's address, token and errors.

pub mod admin_client;
pub mod approvals;
pub mod audit;
pub mod policy;
