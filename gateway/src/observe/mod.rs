//! What every request leaves behind, made from one summary of it (never a body, a query or a
//! header value):
//!
//! - [`audit`] — its audit record, queued for the agent's hash-chained trail in the store;
//! - [`metrics`] — its counters and histograms, and the gauges `/metrics` shows;
//! - [`telemetry`] — its span and log line, and the export of spans, metrics and logs over
//!   OTLP;
//! - [`queue`] — the bounded hand-off from the request to a background writer, which the
//!   audit trail and the exporters share.

pub mod audit;
pub mod metrics;
pub mod queue;
pub mod telemetry;
pub mod webhook;
