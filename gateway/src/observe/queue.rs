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

/// Most items the room made for the next batch holds. A batch larger than this (a burst)
/// grows its vector as it fills, and does not leave the next ones holding its size.
const ROOM_MAX: usize = 4096;

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
        // Room for as many in the next batch, made here on the writer's thread and outside
        // the lock: pushes then fill it without growing it, which would copy every item
        // waiting, on a request's thread, while the others wait for the lock.
        let mut room = Vec::with_capacity(items.len().min(ROOM_MAX));
        let mut waiting = self.items.lock();
        // What was pushed while the room was made goes first in it, in order.
        room.append(&mut waiting);
        *waiting = room;
        drop(waiting);
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

    #[test]
    fn the_next_batch_has_room_for_as_many_as_the_last_up_to_a_bound() {
        let queue = DropQueue::new(10_000);
        for i in 0..100 {
            queue.push(i).expect("room");
        }
        assert_eq!(queue.take().len(), 100);
        queue.push(0).expect("room");
        // Made before the push: the batch did not grow to hold it.
        assert!(queue.take().capacity() >= 100);
        // A small batch leaves a small room.
        queue.push(0).expect("room");
        assert!(queue.take().capacity() < 100);
        for i in 0..super::ROOM_MAX + 1 {
            queue.push(i).expect("room");
        }
        queue.take();
        queue.push(0).expect("room");
        // The room made after a burst is bounded (the burst's own vector grew).
        let after = queue.take();
        assert!(after.capacity() >= super::ROOM_MAX && after.capacity() < 2 * super::ROOM_MAX);
    }
}
