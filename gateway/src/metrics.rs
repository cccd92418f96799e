//! Prometheus metrics: counters the data path bumps, and the text exposition the admin
//! listener serves at `/metrics`.
//!
//! Recording is a few atomic adds and one short lock (requests by agent, decision and
//! status); everything else — held approvals, cache sizes, the policy version — is read
//! from its owner when scraped, so it costs requests nothing.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Upper bounds of the latency buckets, in seconds. Held requests wait for a person, so the
/// buckets reach to the approval timeout.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
    900.0,
];

/// The decisions requests are labelled with (`none`: refused before a decision).
const DECISIONS: [&str; 4] = ["allow", "deny", "needs_approval", "none"];

/// One latency histogram.
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
    /// Token cache hits, misses, and failed token requests, since start.
    pub token_cache_hits: u64,
    /// See `token_cache_hits`.
    pub token_cache_misses: u64,
    /// See `token_cache_hits`.
    pub token_endpoint_errors: u64,
    /// Minted TLS leaf certificates cached.
    pub tls_leaf_cache_entries: u64,
    /// The policy set in force.
    pub policy_version: String,
    /// Audit records dropped because the writer was behind.
    pub audit_records_dropped: u64,
}

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
        for (name, kind, help, value) in [
            (
                "tollgate_held_approvals",
                "gauge",
                "Requests held for approval now.",
                g.held_approvals as u64,
            ),
            (
                "tollgate_token_cache_hits_total",
                "counter",
                "Token requests answered from the cache.",
                g.token_cache_hits,
            ),
            (
                "tollgate_token_cache_misses_total",
                "counter",
                "Token requests that had to ask an identity provider.",
                g.token_cache_misses,
            ),
            (
                "tollgate_token_endpoint_errors_total",
                "counter",
                "Failed requests to identity providers.",
                g.token_endpoint_errors,
            ),
            (
                "tollgate_tls_leaf_cache_entries",
                "gauge",
                "Minted TLS leaf certificates in the cache.",
                g.tls_leaf_cache_entries,
            ),
            (
                "tollgate_audit_records_dropped_total",
                "counter",
                "Audit records dropped because the writer was behind.",
                g.audit_records_dropped,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
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
            token_cache_hits: 5,
            token_cache_misses: 1,
            token_endpoint_errors: 0,
            tls_leaf_cache_entries: 3,
            policy_version: "abc".into(),
            audit_records_dropped: 0,
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
            text.contains("tollgate_policy_info{version=\"abc\"} 1"),
            "{text}"
        );
    }
}
