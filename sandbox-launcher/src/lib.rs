//! Tollgate's sandbox launcher: one sandbox per agent — a QEMU microVM, or a process on hosts
//! without QEMU — whose only network route is the gateway.
//!
//! The data path, in module order: [`image`] builds the guest (kernel + initramfs, whose init
//! is [`guest`], written with [`cpio`]); [`network`] makes the sandbox's namespace, device
//! ([`tap`] for a VM) and firewall; [`gateway_api`] registers the agent with its listener in
//! that namespace; [`vmm`] runs QEMU, or [`workload`] the process; [`sandbox`] ties these
//! into `up` and `down`, remembering each sandbox in [`state`].
//!
//! The sandbox service ([`service`], `tollgate-launcher serve`) runs sessions — one sandbox
//! per agent and conversation thread — behind an HTTP API; [`client`] is the command line's
//! side of that API.

pub mod client;
pub mod cpio;
pub mod gateway_api;
pub mod guest;
pub mod image;
pub mod network;
pub mod sandbox;
pub mod service;
pub mod state;
pub mod tap;
pub mod vmm;
pub mod workload;
