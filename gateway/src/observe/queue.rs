//! A bounded hand-off from the data path to a background writer: requests push and go on,
//! the writer takes everything at its own pace.
//!
//! Pushing is one short lock and never wakes a thread (a channel send would, at a context
//! switch per request); the writer polls. When the writer falls so far behind that the queue
//! is full, items are dropped and counted rather than slowing requests down: the count is
//! what operators alert on.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Items waiting for a writer, at most `capacity` of them.
pub struct DropQueue<T> {
    items: Mutex<Vec<T>>,
    capacity: usize,
    dropped: AtomicU64,
    /// The most items the writer found waiting at once.
    peak: AtomicUsize,
}

impl<T> DropQueue<T> {
    /// An empty queue holding at most `capacity` items.
    pub fn new(capacity: usize) -> DropQueue<T> {
        DropQueue {
            items: Mutex::new(Vec::new()),
            capacity,
            dropped: AtomicU64::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Queues `item` and returns how many are queued now, or drops it if the queue is full.
    /// On a drop, gives the item back with how many items this queue has dropped so far
    /// (callers log the powers of two, so a lasting backlog is reported without a log line
    /// per request).
    pub fn push(&self, item: T) -> Result<usize, (T, u64)> {
        let mut items = self.items.lock();
        if items.len() < self.capacity {
            items.push(item);
            return Ok(items.len());
        }
        drop(items);
        Err((item, self.dropped.fetch_add(1, Ordering::Relaxed) + 1))
    }

    /// Takes everything queued.
    pub fn take(&self) -> Vec<T> {
        let items = std::mem::take(&mut *self.items.lock());
        self.peak.fetch_max(items.len(), Ordering::Relaxed);
        items
    }

    /// The most items taken at once so far: how close the writer came to dropping (the
    /// queue's memory at its fullest).
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Counts `n` items the writer took but could not deliver as dropped.
    pub fn count_dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Items dropped so far: the queue was full, or the writer could not deliver them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::DropQueue;

    #[test]
    fn a_full_queue_drops_and_counts_and_taking_makes_room() {
        let queue = DropQueue::new(2);
        assert_eq!(queue.push(1), Ok(1));
        assert_eq!(queue.push(2), Ok(2));
        assert_eq!(queue.push(3), Err((3, 1)));
        assert_eq!(queue.push(4), Err((4, 2)));
        assert_eq!(queue.dropped(), 2);
        assert_eq!(queue.take(), vec![1, 2]);
        assert_eq!(queue.push(5), Ok(1));
        assert_eq!(queue.take(), vec![5]);
        assert_eq!(queue.dropped(), 2);
        assert_eq!(queue.peak(), 2);
    }
}
