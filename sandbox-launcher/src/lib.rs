//! Tollgate's sandbox launcher: one sandbox per agent (a microVM, or a process on hosts
//! without QEMU) whose only network route is the gateway.
//!
//! This is the first part of it: [`network`], the per-sandbox network namespaces and the
//! firewall that makes the gateway the only way out. The launcher binary (`up`, `down`,
//! `list`, `logs`), the guest image and QEMU come next (issue 7).

pub mod network;
