//! What one agent may use of the gateway at once, so that no agent can starve another:
//! open connections, requests per second, request body size, and held requests.
//!
//! `[limits]` sets the defaults for every agent; an agent's own `limits` (in `[[agents]]` or
//! its admin API record) overrides them field by field. Usage is counted per agent id, so it
//! survives an agent's record being replaced; each agent has its own counters and bucket, and
//! nothing one agent does touches another's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::agent::{Agent, Effective};
use crate::reply::{ErrorCode, Refusal};

/// One agent's usage.
#[derive(Debug)]
struct Usage {
    connections: AtomicUsize,
    bucket: Mutex<Bucket>,
}

/// A token bucket: `tokens` requests may start now; it refills at the agent's rate.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Usage {
    /// Whether this usage says nothing a fresh one would not: no connection open and a
    /// bucket that has had time to fill up again.
    fn is_idle(&self) -> bool {
        self.connections.load(Ordering::Acquire) == 0
            && self.bucket.lock().refilled.elapsed() >= Duration::from_secs(1)
    }
}

/// Every agent's usage against its limits.
#[derive(Debug)]
pub struct Quotas {
    defaults: Effective,
    usage: Mutex<Table>,
}

/// The usage of agents seen lately. Agents come and go (one per sandbox), so idle entries
/// are dropped whenever the table has doubled since the last sweep.
#[derive(Debug, Default)]
struct Table {
    agents: HashMap<String, Arc<Usage>>,
    sweep_at: usize,
}

/// The table size below which no sweep happens.
const MIN_SWEEP: usize = 1024;

/// One open connection of an agent; the count goes down when it is dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    usage: Arc<Usage>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.usage.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Quotas {
    /// Usage counters for limits that default to `defaults`.
    pub fn new(defaults: Effective) -> Self {
        Quotas {
            defaults,
            usage: Mutex::new(Table {
                agents: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        }
    }

    /// The limits that apply to `agent`.
    pub fn of(&self, agent: &Agent) -> Effective {
        self.defaults.with(&agent.limits)
    }

    fn usage(&self, agent: &str) -> Arc<Usage> {
        let mut table = self.usage.lock();
        if let Some(usage) = table.agents.get(agent) {
            return usage.clone();
        }
        if table.agents.len() >= table.sweep_at {
            table.agents.retain(|_, usage| !usage.is_idle());
            table.sweep_at = (table.agents.len() * 2).max(MIN_SWEEP);
        }
        let usage = Arc::new(Usage {
            connections: AtomicUsize::new(0),
            bucket: Mutex::new(Bucket {
                tokens: f64::MAX,
                refilled: Instant::now(),
            }),
        });
        table.agents.insert(agent.to_string(), usage.clone());
        usage
    }

    /// Counts a new connection of `agent`, or refuses it (429) when the agent has its
    /// maximum open.
    pub fn open_connection(&self, agent: &Agent) -> Result<ConnectionPermit, Refusal> {
        let max = self.of(agent).connections;
        let usage = self.usage(&agent.id);
        let open = usage.connections.fetch_add(1, Ordering::AcqRel);
        let permit = ConnectionPermit { usage };
        if open >= max {
            return Err(Refusal::new(
                ErrorCode::TooManyConnections,
                format!(
                    "agent {:?} has {max} connections open, its limit (limits.connections): \
                     reuse connections or close idle ones",
                    agent.id
                ),
            ));
        }
        Ok(permit)
    }

    /// Takes one request from `agent`'s rate, or refuses it (429) when the agent is over its
    /// requests per second.
    pub fn start_request(&self, agent: &Agent) -> Result<(), Refusal> {
        let rate = self.of(agent).requests_per_second;
        if rate == 0 {
            return Ok(());
        }
        let usage = self.usage(&agent.id);
        let mut bucket = usage.bucket.lock();
        let now = Instant::now();
        let burst = f64::from(rate);
        let refill = now.duration_since(bucket.refilled).as_secs_f64() * burst;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.refilled = now;
        if bucket.tokens < 1.0 {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!(
                    "agent {:?} is over its limit of {rate} requests per second \
                     (limits.requests_per_second): slow down and retry",
                    agent.id
                ),
            )
            .with_retry_after(1));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// Refuses (413) a body of `len` bytes (declared, or streamed so far) larger than `agent`
    /// may send.
    pub fn check_body(&self, agent: &Agent, declared: Option<u64>) -> Result<(), Refusal> {
        let max = self.of(agent).request_body_bytes;
        match declared {
            Some(len) if max > 0 && len > max => Err(body_too_large(&agent.id, max)),
            _ => Ok(()),
        }
    }
}

fn body_too_large(agent: &str, max: u64) -> Refusal {
    Refusal::new(
        ErrorCode::BodyTooLarge,
        format!(
            "agent {agent:?} may send request bodies of at most {max} bytes \
             (limits.request_body_bytes)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentLimits;

    fn agent(id: &str, limits: AgentLimits) -> Agent {
        let mut agent: Agent =
            serde_json::from_str(r#"{"run_mode": "Autonomous"}"#).expect("agent");
        agent.id = id.into();
        agent.limits = limits;
        agent
    }

    const DEFAULTS: Effective = Effective {
        connections: 2,
        requests_per_second: 0,
        request_body_bytes: 0,
        pending_approvals: 16,
        open_tool_calls: 4,
    };

    #[test]
    fn connections_are_counted_per_agent_and_given_back() {
        let quotas = Quotas::new(DEFAULTS);
        let (a, b) = (
            agent("a", AgentLimits::default()),
            agent("b", AgentLimits::default()),
        );
        let first = quotas.open_connection(&a).unwrap();
        let _second = quotas.open_connection(&a).unwrap();
        let refused = quotas.open_connection(&a).unwrap_err();
        assert_eq!(
            (refused.status, refused.error),
            (429, "too_many_connections")
        );
        assert!(quotas.open_connection(&b).is_ok(), "b has its own count");
        drop(first);
        assert!(quotas.open_connection(&a).is_ok(), "a closed one");
    }

    #[test]
    fn the_rate_allows_a_burst_of_one_second_then_refuses() {
        let quotas = Quotas::new(DEFAULTS);
        let a = agent(
            "a",
            AgentLimits {
                requests_per_second: Some(5),
                ..Default::default()
            },
        );
        let b = agent("b", AgentLimits::default());
        let allowed = (0..20).filter(|_| quotas.start_request(&a).is_ok()).count();
        assert!((5..=6).contains(&allowed), "{allowed}");
        let refused = quotas.start_request(&a).unwrap_err();
        assert_eq!((refused.status, refused.error), (429, "rate_limited"));
        assert!(
            (0..100).all(|_| quotas.start_request(&b).is_ok()),
            "b has no limit"
        );
    }

    #[test]
    fn idle_agents_are_forgotten_busy_ones_are_not() {
        let quotas = Quotas::new(DEFAULTS);
        let busy = agent("busy", AgentLimits::default());
        let _open = quotas.open_connection(&busy).unwrap();
        for i in 0..MIN_SWEEP {
            let usage = quotas.usage(&format!("gone-{i}"));
            usage.bucket.lock().refilled -= Duration::from_secs(2);
        }
        // The last insert found the table full and swept it: the busy agent stayed, the idle
        // ones went, and the one that triggered the sweep came in after it.
        let table = quotas.usage.lock();
        let mut left: Vec<&str> = table.agents.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["busy", &format!("gone-{}", MIN_SWEEP - 1)]);
    }

    #[test]
    fn an_agents_own_limits_override_the_defaults_field_by_field() {
        let quotas = Quotas::new(DEFAULTS);
        let own = AgentLimits {
            request_body_bytes: Some(10),
            ..Default::default()
        };
        let limits = quotas.of(&agent("a", own));
        assert_eq!(limits.request_body_bytes, 10);
        assert_eq!(limits.connections, DEFAULTS.connections);
        let a = agent("a", own);
        assert_eq!(quotas.check_body(&a, Some(11)).unwrap_err().status, 413);
        assert!(quotas.check_body(&a, Some(10)).is_ok());
        assert!(quotas.check_body(&a, None).is_ok());
        let unlimited = agent("b", AgentLimits::default());
        assert!(quotas.check_body(&unlimited, Some(u64::MAX)).is_ok());
        assert!(AgentLimits {
            connections: Some(0),
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
