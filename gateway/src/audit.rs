//! The last step of the data path: every request of a known agent leaves an audit record.
//!
//! Requests hand their record to a bounded queue and go on; one writer thread appends what
//! has queued up to the store in a single batch. So a request never waits for the store, and
//! the store sees a few large writes instead of one per request. If the writer falls so far
//! behind that the queue is full, records are dropped and counted (and the count is logged)
//! rather than slowing every request down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use tollgate_storage::{AuditRecord, Store};

/// Records waiting for the writer at most.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// Records written in one batch at most.
const BATCH: usize = 1024;

/// Where requests leave their audit records.
pub struct AuditTrail {
    queue: SyncSender<AuditRecord>,
    dropped: Arc<AtomicU64>,
}

impl AuditTrail {
    /// Starts the writer thread for `store`. It ends when the trail is dropped, after writing
    /// what is queued.
    pub fn start(store: Arc<Store>) -> std::io::Result<AuditTrail> {
        let (queue, pending) = sync_channel(QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("tollgate-audit".into())
            .spawn(move || write_batches(&store, pending))?;
        Ok(AuditTrail {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queues a record; never blocks.
    pub fn record(&self, record: AuditRecord) {
        match self.queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(record)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped,
                        agent = record.agent,
                        "the audit writer is behind; audit records were dropped"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped so far because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn write_batches(store: &Store, pending: Receiver<AuditRecord>) {
    // Blocks for the first record, then takes whatever else is already queued.
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match pending.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        let written = batch.len();
        if let Err(e) = store.append_audit_batch(batch) {
            tracing::warn!(records = written, error = %e, "could not write audit records");
        }
    }
}
