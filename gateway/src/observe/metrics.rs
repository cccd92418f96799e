//! Prometheus metrics: counters the data path bumps, and the text exposition the admin
//! listener serves at `/metrics`.
//!
//! Recording is a few atomic adds and one short lock (requests by agent, decision and
//! status); everything else — held approvals, cache sizes, the policy version — is read
//! from its owner when scraped, so it costs requests nothing.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tollgate_storage::{Store, StoreMemory};

use crate::egress::approval::Approvals;
use crate::egress::ca::LeafCerts;
use crate::egress::credentials::Credentials;
use crate::egress::decide::PolicyStore;
use crate::observe::audit::AuditTrail;

/// Upper bounds of the latency buckets, in seconds. Held requests wait for a person, so the
/// buckets reach to the approval timeout.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
    900.0,
];

/// The decisions requests are labelled with (`none`: refused before a decision).
const DECISIONS: [&str; 4] = ["allow", "deny", "needs_approval", "none"];

/// Request latencies of one decision, in the [`LATENCY_BUCKETS`] (count and sum in µs).
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        if let Some(at) = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[at].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }
}

/// One agent's request counts: (decision, status) → requests.
type AgentRequests = HashMap<(&'static str, u16), u64>;

/// The counters the gateway keeps.
#[derive(Default)]
pub struct Metrics {
    /// agent → its request counts.
    requests: Mutex<HashMap<String, AgentRequests>>,
    /// Latency by decision (index into [`DECISIONS`]).
    latency: [Histogram; DECISIONS.len()],
}

/// Values read from their owners at scrape time.
pub struct Gauges {
    /// Requests held for approval now.
    pub held_approvals: usize,
    /// Listeners connected to the live feed of approval events now.
    pub approval_feed_listeners: usize,
    /// Approval events a webhook was not given (tries used up, or left the feed), since start.
    pub webhook_events_failed: u64,
    /// Token cache hits, misses, and failed token requests, since start.
    pub token_cache_hits: u64,
    /// See `token_cache_hits`.
    pub token_cache_misses: u64,
    /// See `token_cache_hits`.
    pub token_endpoint_errors: u64,
    /// Answers not relayed because they carried the token injected into their request.
    pub credential_reflections: u64,
    /// Panics caught while serving requests (each a bug, answered 502 and recorded).
    pub panics: u64,
    /// Minted TLS leaf certificates cached.
    pub tls_leaf_cache_entries: u64,
    /// The version (content hash) of the policy set in force, the `tollgate_policy_info` label.
    pub policy_version: String,
    /// Audit records dropped because the writer was behind or the store failed.
    pub audit_records_dropped: u64,
    /// The most audit records waiting for the writer at once.
    pub audit_queue_peak: u64,
    /// Store writes that failed (disk full, read-only, I/O error).
    pub storage_write_errors: u64,
    /// The store's memory by kind, in bytes, and its table count: the `tollgate_storage_*` gauges.
    pub storage_memory: StoreMemory,
    /// Spans dropped because the OTLP exporter was behind.
    pub telemetry_spans_dropped: u64,
    /// Log events dropped because the OTLP exporter was behind.
    pub telemetry_logs_dropped: u64,
    /// Log lines dropped because stderr did not take them.
    pub log_lines_dropped: u64,
}

/// What the OTLP exporter dropped so far (its queues were full), read when the gauges are.
pub trait TelemetryDrops: Send + Sync {
    /// Spans dropped since start because the span queue was full.
    fn spans(&self) -> u64;
    /// Log events dropped since start because the log queue was full.
    fn logs(&self) -> u64;
}

/// The owners the [`Gauges`] are read from.
pub struct GaugeSources {
    /// How many requests are held for approval.
    pub approvals: Arc<Approvals>,
    /// The token cache's hits, misses, endpoint errors and reflections.
    pub credentials: Arc<Credentials>,
    /// How many TLS leaf certificates are cached.
    pub leaves: Arc<LeafCerts>,
    /// The version of the policy set in force.
    pub policies: Arc<PolicyStore>,
    /// The audit writer's dropped records, queue peak and write errors.
    pub audit: Arc<AuditTrail>,
    /// The store's memory (memtables, block cache, pinned blocks).
    pub store: Arc<Store>,
    /// What the OTLP exporter dropped.
    pub telemetry: Arc<dyn TelemetryDrops>,
}

impl GaugeSources {
    /// Reads every value now, for one scrape or one OTLP export.
    pub fn read(&self) -> Gauges {
        let tokens = self.credentials.counters();
        Gauges {
            held_approvals: self.approvals.held(),
            approval_feed_listeners: self.approvals.feed().listeners(),
            webhook_events_failed: crate::observe::webhook::failed(),
            token_cache_hits: tokens.hits,
            token_cache_misses: tokens.misses,
            token_endpoint_errors: tokens.errors,
            credential_reflections: tokens.reflections,
            panics: crate::egress::panics::caught(),
            tls_leaf_cache_entries: self.leaves.cached(),
            policy_version: self.policies.status().version,
            audit_records_dropped: self.audit.dropped(),
            audit_queue_peak: self.audit.peak_queued(),
            storage_write_errors: self.audit.write_errors(),
            storage_memory: self.store.memory(),
            telemetry_spans_dropped: self.telemetry.spans(),
            telemetry_logs_dropped: self.telemetry.logs(),
            log_lines_dropped: crate::observe::telemetry::log_lines_dropped(),
        }
    }
}

/// One single-valued metric, under its Prometheus and its OpenTelemetry name.
pub struct Scalar {
    /// The name at `/metrics` (counters end in `_total`).
    pub name: &'static str,
    /// The OpenTelemetry instrument name.
    pub otel_name: &'static str,
    /// Counter (since start) or gauge (now).
    pub counter: bool,
    /// One sentence for the `# HELP` line and the OpenTelemetry description.
    pub help: &'static str,
    /// Picks its value out of a reading of the [`Gauges`].
    pub read: fn(&Gauges) -> u64,
}

/// The single-valued metrics, exposed at `/metrics` and exported over OTLP alike.
pub const SCALARS: [Scalar; 19] = [
    Scalar {
        name: "tollgate_held_approvals",
        otel_name: "tollgate.approvals.held",
        counter: false,
        help: "Requests held for approval now.",
        read: |g| g.held_approvals as u64,
    },
    Scalar {
        name: "tollgate_approval_feed_listeners",
        otel_name: "tollgate.approvals.feed_listeners",
        counter: false,
        help: "Listeners connected to the live feed of approval events.",
        read: |g| g.approval_feed_listeners as u64,
    },
    Scalar {
        name: "tollgate_webhook_events_failed_total",
        otel_name: "tollgate.approvals.webhook_events_failed",
        counter: true,
        help: "Approval events a webhook was not given: tries used up, or left the feed first.",
        read: |g| g.webhook_events_failed,
    },
    Scalar {
        name: "tollgate_token_cache_hits_total",
        otel_name: "tollgate.token_cache.hits",
        counter: true,
        help: "Token requests answered from the cache.",
        read: |g| g.token_cache_hits,
    },
    Scalar {
        name: "tollgate_token_cache_misses_total",
        otel_name: "tollgate.token_cache.misses",
        counter: true,
        help: "Token requests that had to ask an identity provider.",
        read: |g| g.token_cache_misses,
    },
    Scalar {
        name: "tollgate_token_endpoint_errors_total",
        otel_name: "tollgate.token_endpoint.errors",
        counter: true,
        help: "Failed requests to identity providers.",
        read: |g| g.token_endpoint_errors,
    },
    Scalar {
        name: "tollgate_credential_reflections_total",
        otel_name: "tollgate.credentials.reflected",
        counter: true,
        help: "Origin answers not relayed because they carried the token injected into their request back (header or body).",
        read: |g| g.credential_reflections,
    },
    Scalar {
        name: "tollgate_panics_total",
        otel_name: "tollgate.panics",
        counter: true,
        help: "Panics caught while serving requests: each a bug, answered 502 and recorded.",
        read: |g| g.panics,
    },
    Scalar {
        name: "tollgate_tls_leaf_cache_entries",
        otel_name: "tollgate.tls.leaf_cache.entries",
        counter: false,
        help: "Minted TLS leaf certificates in the cache.",
        read: |g| g.tls_leaf_cache_entries,
    },
    Scalar {
        name: "tollgate_audit_records_dropped_total",
        otel_name: "tollgate.audit.dropped",
        counter: true,
        help: "Audit records dropped because the writer was behind or the store failed.",
        read: |g| g.audit_records_dropped,
    },
    Scalar {
        name: "tollgate_audit_queue_peak_records",
        otel_name: "tollgate.audit.queue_peak",
        counter: false,
        help: "The most audit records that waited for the writer at once since start (the writer waits while the store throttles writes; past the queue's capacity, records are dropped).",
        read: |g| g.audit_queue_peak,
    },
    Scalar {
        name: "tollgate_storage_write_errors_total",
        otel_name: "tollgate.storage.write_errors",
        counter: true,
        help: "Writes to the data directory's store that failed (disk full, read-only, I/O error).",
        read: |g| g.storage_write_errors,
    },
    Scalar {
        name: "tollgate_storage_write_buffer_bytes",
        otel_name: "tollgate.storage.write_buffer",
        counter: false,
        help: "Store writes in memory, not yet flushed to disk (bounded per keyspace).",
        read: |g| g.storage_memory.write_buffer,
    },
    Scalar {
        name: "tollgate_storage_block_cache_bytes",
        otel_name: "tollgate.storage.block_cache",
        counter: false,
        help: "Store blocks cached for reads (bounded by the cache's capacity).",
        read: |g| g.storage_memory.block_cache,
    },
    Scalar {
        name: "tollgate_storage_pinned_bytes",
        otel_name: "tollgate.storage.pinned",
        counter: false,
        help: "Store index and filter blocks kept in memory for the upper levels' tables.",
        read: |g| g.storage_memory.pinned,
    },
    Scalar {
        name: "tollgate_storage_tables",
        otel_name: "tollgate.storage.tables",
        counter: false,
        help: "Store tables on disk, over all keyspaces.",
        read: |g| g.storage_memory.tables,
    },
    Scalar {
        name: "tollgate_telemetry_spans_dropped_total",
        otel_name: "tollgate.telemetry.spans_dropped",
        counter: true,
        help: "Spans dropped because the OTLP exporter was behind (collector slow or down).",
        read: |g| g.telemetry_spans_dropped,
    },
    Scalar {
        name: "tollgate_telemetry_logs_dropped_total",
        otel_name: "tollgate.telemetry.logs_dropped",
        counter: true,
        help: "Log events dropped because the OTLP exporter was behind (collector slow or down).",
        read: |g| g.telemetry_logs_dropped,
    },
    Scalar {
        name: "tollgate_log_lines_dropped_total",
        otel_name: "tollgate.log.lines_dropped",
        counter: true,
        help: "Log lines dropped because stderr did not take them (its reader slow or stopped); requests go on, and the audit trail keeps them.",
        read: |g| g.log_lines_dropped,
    },
];

impl Metrics {
    /// Counts one finished request.
    pub fn record_request(&self, agent: &str, decision: &str, status: u16, latency: Duration) {
        let decision = DECISIONS
            .iter()
            .position(|d| *d == decision)
            .unwrap_or(DECISIONS.len() - 1);
        self.latency[decision].observe(latency);
        let mut requests = self.requests.lock();
        let by_agent = match requests.get_mut(agent) {
            Some(by_agent) => by_agent,
            None => requests.entry(agent.to_string()).or_default(),
        };
        *by_agent.entry((DECISIONS[decision], status)).or_default() += 1;
    }

    /// Calls `each` with every (agent, decision, status) and its request count.
    pub fn request_counts(&self, mut each: impl FnMut(&str, &'static str, u16, u64)) {
        let requests = self.requests.lock();
        for (agent, rows) in requests.iter() {
            for ((decision, status), count) in rows {
                each(agent, decision, *status, *count);
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP tollgate_requests_total Requests by agent, policy decision and the status sent.\n");
        out.push_str("# TYPE tollgate_requests_total counter\n");
        {
            let requests = self.requests.lock();
            let mut agents: Vec<&String> = requests.keys().collect();
            agents.sort();
            for agent in agents {
                let mut rows: Vec<(&(&str, u16), &u64)> = requests[agent].iter().collect();
                rows.sort();
                for ((decision, status), count) in rows {
                    let _ = writeln!(
                        out,
                        "tollgate_requests_total{{agent=\"{}\",decision=\"{decision}\",status=\"{status}\"}} {count}",
                        escape(agent)
                    );
                }
            }
        }
        out.push_str("# HELP tollgate_request_duration_seconds Time from a request's arrival to the end of its answer, approval waits included.\n");
        out.push_str("# TYPE tollgate_request_duration_seconds histogram\n");
        for (decision, histogram) in DECISIONS.iter().zip(&self.latency) {
            let mut cumulative = 0;
            for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&histogram.buckets) {
                cumulative += bucket.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "tollgate_request_duration_seconds_bucket{{decision=\"{decision}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let count = histogram.count.load(Ordering::Relaxed);
            let sum = histogram.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "tollgate_request_duration_seconds_bucket{{decision=\"{decision}\",le=\"+Inf\"}} {count}\n\
                 tollgate_request_duration_seconds_sum{{decision=\"{decision}\"}} {sum}\n\
                 tollgate_request_duration_seconds_count{{decision=\"{decision}\"}} {count}"
            );
        }
        let g = gauges;
        for scalar in &SCALARS {
            let kind = if scalar.counter { "counter" } else { "gauge" };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}",
                name = scalar.name,
                help = scalar.help,
                value = (scalar.read)(g),
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_policy_info The policy set in force (its content hash).\n\
             # TYPE tollgate_policy_info gauge\n\
             tollgate_policy_info{{version=\"{}\"}} 1",
            escape(&g.policy_version)
        );
        out
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            held_approvals: 2,
            approval_feed_listeners: 4,
            webhook_events_failed: 0,
            token_cache_hits: 5,
            token_cache_misses: 1,
            token_endpoint_errors: 0,
            credential_reflections: 0,
            panics: 0,
            tls_leaf_cache_entries: 3,
            policy_version: "abc".into(),
            audit_records_dropped: 0,
            audit_queue_peak: 0,
            storage_write_errors: 0,
            storage_memory: StoreMemory::default(),
            telemetry_spans_dropped: 7,
            telemetry_logs_dropped: 0,
            log_lines_dropped: 9,
        }
    }

    #[test]
    fn requests_are_counted_by_label_and_latency_is_cumulative() {
        let m = Metrics::default();
        m.record_request("a", "allow", 200, Duration::from_micros(700));
        m.record_request("a", "allow", 200, Duration::from_millis(30));
        m.record_request("b\"x", "deny", 403, Duration::from_millis(2));
        m.record_request("a", "-", 403, Duration::from_millis(1));
        let text = m.render(&gauges());
        assert!(
            text.contains(
                "tollgate_requests_total{agent=\"a\",decision=\"allow\",status=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tollgate_requests_total{agent=\"b\\\"x\",decision=\"deny\",status=\"403\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tollgate_requests_total{agent=\"a\",decision=\"none\",status=\"403\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tollgate_request_duration_seconds_bucket{decision=\"allow\",le=\"0.001\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tollgate_request_duration_seconds_bucket{decision=\"allow\",le=\"0.05\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("tollgate_request_duration_seconds_count{decision=\"allow\"} 2"),
            "{text}"
        );
        assert!(text.contains("tollgate_held_approvals 2"), "{text}");
        assert!(
            text.contains("tollgate_approval_feed_listeners 4"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tollgate_telemetry_spans_dropped_total counter\ntollgate_telemetry_spans_dropped_total 7"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tollgate_log_lines_dropped_total counter\ntollgate_log_lines_dropped_total 9"),
            "{text}"
        );
        assert!(
            text.contains("tollgate_policy_info{version=\"abc\"} 1"),
            "{text}"
        );
    }
}
