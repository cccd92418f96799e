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
//! takes no more writes until the gateway is restarted, and [`AuditTrail::unwritable`] says
//! so: the egress pipeline refuses every request from then on (`503 storage_unavailable`),
//! because every request it forwards must leave an audit record.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tollgate_storage::{AuditRecord, Store};

use crate::queue::DropQueue;

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

    /// Records dropped so far because the writer was behind or the store failed.
    pub fn dropped(&self) -> u64 {
        self.shared.queue.dropped() + self.shared.lost.load(Ordering::Relaxed)
    }
}

impl Drop for AuditTrail {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
    }
}

fn write_batches(store: &Store, shared: &Shared) {
    loop {
        std::thread::sleep(FLUSH_INTERVAL);
        let closing = shared.closing.load(Ordering::Acquire);
        let batch = shared.queue.take();
        let written = batch.len();
        if written > 0 {
            if let Err(e) = store.append_audit_batch(batch) {
                let before = shared.lost.fetch_add(written as u64, Ordering::Relaxed);
                // Once: every later batch fails the same way until the restart.
                if before == 0 {
                    tracing::error!(
                        records = written, error = %e,
                        "could not write audit records; they are lost, and requests are refused until the gateway is restarted on a writable store"
                    );
                } else {
                    tracing::debug!(records = written, error = %e, "could not write audit records");
                }
            }
        }
        if closing {
            return;
        }
    }
}
