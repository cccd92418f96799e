//! The last step of the data path: every request of a known agent leaves an audit record.
//!
//! Requests put their record in a bounded in-memory buffer and go on; a writer thread takes
//! the whole buffer every [`FLUSH_INTERVAL`] and appends it to the store as one batch. A
//! request never waits for the store and never wakes a thread (a channel send would, at a
//! context switch per request), and the store sees a few large writes instead of one per
//! request. If the writer falls so far behind that the buffer is full, records are dropped
//! and counted (and the count is logged) rather than slowing every request down.
//!
//! If the store cannot write (disk full, read-only, I/O error), the batch is lost: its
//! records are counted as dropped and the failure is logged as an error. The store then
//! takes no more writes until it is opened again, and [`AuditTrail::unwritable`] says so:
//! the egress pipeline refuses every request meanwhile (`503 storage_unavailable`), because
//! every request it forwards must leave an audit record. The writer reopens the store every
//! [`REOPEN_INTERVAL`] until a reopen proves the disk takes writes again; then requests flow
//! again, without a restart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_storage::{AuditRecord, Store};

use crate::observe::queue::DropQueue;
use crate::reply::Refusal;
use crate::target::Target;

/// Records waiting for the writer at most.
const CAPACITY: usize = 64 * 1024;
/// How often the writer takes what has accumulated.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Where requests leave their audit records.
pub struct AuditTrail {
    shared: Arc<Shared>,
    store: Arc<Store>,
}

struct Shared {
    queue: DropQueue<AuditRecord>,
    closing: AtomicBool,
    /// Records lost because the store failed to write their batch.
    lost: AtomicU64,
}

impl AuditTrail {
    /// Starts the writer thread for `store`. It ends when the trail is dropped, after writing
    /// what is buffered.
    pub fn start(store: Arc<Store>) -> std::io::Result<AuditTrail> {
        let shared = Arc::new(Shared {
            queue: DropQueue::new(CAPACITY),
            closing: AtomicBool::new(false),
            lost: AtomicU64::new(0),
        });
        let (writer, writer_store) = (shared.clone(), store.clone());
        std::thread::Builder::new()
            .name("tollgate-audit".into())
            .spawn(move || write_batches(&writer_store, &writer))?;
        Ok(AuditTrail { shared, store })
    }

    /// Why audit records can no longer be written, if they cannot: then nothing may be
    /// forwarded.
    pub fn unwritable(&self) -> Option<String> {
        self.store.write_failure()
    }

    /// Store writes (audit, approvals, registry) that failed since start.
    pub fn write_errors(&self) -> u64 {
        self.store.write_errors()
    }

    /// Buffers a record; never blocks on the store.
    pub fn record(&self, record: AuditRecord) {
        if let Err((record, dropped)) = self.shared.queue.push(record) {
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    agent = record.agent,
                    "the audit writer is behind; audit records were dropped"
                );
            }
        }
    }

    /// The most records that waited for the writer at once since start (at most the
    /// queue's capacity; past it records are dropped).
    pub fn peak_queued(&self) -> u64 {
        self.shared.queue.peak() as u64
    }

    /// Records dropped so far because the writer was behind or the store failed.
    pub fn dropped(&self) -> u64 {
        self.shared.queue.dropped() + self.shared.lost.load(Ordering::Relaxed)
    }
}

/// The audit record of a CONNECT refused as a whole — by the policies (every request to its
/// target would be denied: `policies` name them) or by the agent's request rate: no request
/// inside it was read, so the record names the tunnel, with its authority (`host:port`) as
/// the host and no path.
pub fn refused_tunnel(
    agent: &str,
    session: Option<&str>,
    tool_call: Option<String>,
    target: &Target,
    policies: Vec<String>,
    refusal: &Refusal,
) -> AuditRecord {
    AuditRecord {
        seq: 0,
        at: tollgate_storage::now_millis(),
        agent: agent.to_string(),
        tool_call,
        session: session.map(str::to_string),
        method: "CONNECT".into(),
        host: format!("{}:{}", target.host, target.port),
        path: String::new(),
        decision: if policies.is_empty() { "none" } else { "deny" }.into(),
        policies,
        approval: None,
        approval_wait_ms: None,
        credential: None,
        status: refusal.status,
        error: Some(refusal.error.to_string()),
        bytes_in: 0,
        bytes_out: 0,
        latency_us: 0,
        upgrade: None,
        trace_id: String::new(),
        // Linked into the agent's chain by the store.
        prev_hash: String::new(),
        hash: String::new(),
    }
}

impl Drop for AuditTrail {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
    }
}

fn write_batches(store: &Store, shared: &Shared) {
    let mut recovery = Recovery::default();
    loop {
        std::thread::sleep(FLUSH_INTERVAL);
        let closing = shared.closing.load(Ordering::Acquire);
        let batch = shared.queue.take();
        let written = batch.len();
        if written > 0 {
            if let Err(e) = store.append_audit_batch(batch) {
                shared.lost.fetch_add(written as u64, Ordering::Relaxed);
                tracing::debug!(records = written, error = %e, "could not write audit records");
            }
        }
        recovery.tick(store);
        if closing {
            return;
        }
    }
}

/// The writer's side of a store that failed a write: it logs the failure once, then tries
/// [`Store::reopen`] every [`REOPEN_INTERVAL`] until writes work again. Requests are
/// refused meanwhile (see [`AuditTrail::unwritable`]).
#[derive(Default)]
struct Recovery {
    /// When to try the next reopen, while the store is failed.
    next_try: Option<Instant>,
    /// Reopens tried in this failure.
    tries: u64,
}

/// How often a store that failed a write is opened again.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(2);

impl Recovery {
    fn tick(&mut self, store: &Store) {
        let Some(failure) = store.write_failure() else {
            return;
        };
        let now = Instant::now();
        let Some(next_try) = self.next_try else {
            tracing::error!(
                error = failure,
                "the store cannot write: audit records are lost and requests are refused (503) \
                 until it takes writes again; it is reopened every {} s",
                REOPEN_INTERVAL.as_secs()
            );
            self.next_try = Some(now + REOPEN_INTERVAL);
            return;
        };
        if now < next_try {
            return;
        }
        self.tries += 1;
        match store.reopen() {
            Ok(_) => {
                tracing::warn!(
                    tries = self.tries,
                    "the store takes writes again; requests are forwarded again"
                );
                *self = Recovery::default();
            }
            Err(e) => {
                // Every tenth try, so a long outage does not flood the log.
                if self.tries % 10 == 1 {
                    tracing::warn!(tries = self.tries, error = %e, "the store still cannot be reopened");
                }
                self.next_try = Some(now + REOPEN_INTERVAL);
            }
        }
    }
}
