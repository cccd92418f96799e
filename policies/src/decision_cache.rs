//! The decisions an engine has made, kept for the same inputs asked again.
//!
//! Every request looks here first, so a hit must cost little: one shared lock on one of a
//! few shards and one probe of its map. (A general-purpose cache — moka's, which this
//! replaced — also hashes the key again, pins an epoch, reads the clock and queues the read
//! for its eviction policy: about 1.8 µs of a gateway request's CPU in a profile, a hit.)
//!
//! Keys are hashes of everything a decision reads, keyed at random per engine (SipHash), so
//! the maps use them as they are, and a sandbox cannot aim its requests at one shard or one
//! bucket: it does not know the key. A full shard lets go of its oldest entry to make room
//! (first in, first out): an evicted decision is made again when next asked, at the cost of
//! evaluating it, and kept again (so a sandbox sending many distinct requests can push out
//! decisions others use: it costs them an evaluation each time, never a wrong decision).
//! The engine compares the whole input before it uses an entry, so a colliding key is a
//! miss, never a wrong decision.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use parking_lot::RwLock;

/// Shards: enough that the request threads seldom wait on one another's insert.
const SHARDS: usize = 16;

/// A bounded map from a random 64-bit key to a value, cheap to read.
pub(crate) struct DecisionCache<V> {
    shards: Box<[RwLock<Shard<V>>]>,
    /// Most entries in one shard.
    per_shard: usize,
}

/// One shard: its map, and its keys in the order they came, for eviction.
struct Shard<V> {
    /// Values boxed: a table's empty buckets then take a pointer's room, not a value's.
    map: HashMap<u64, Box<V>, KeyIsHash>,
    /// Every key of `map`, each in the slot it took when it came.
    order: Vec<u64>,
    /// Once the shard is full: the slot of the oldest key, the next to go.
    oldest: usize,
}

impl<V> DecisionCache<V> {
    /// A cache of at most `entries` values (rounded up to a multiple of the shard count).
    pub(crate) fn new(entries: usize) -> Self {
        let shard = || {
            RwLock::new(Shard {
                map: HashMap::default(),
                order: Vec::new(),
                oldest: 0,
            })
        };
        DecisionCache {
            shards: (0..SHARDS).map(|_| shard()).collect(),
            per_shard: entries.div_ceil(SHARDS).max(1),
        }
    }

    /// What `read` makes of the value under `key`, if there is one; `read` runs under the
    /// shard's shared lock (other readers go on; an insert into the shard waits).
    pub(crate) fn get<R>(&self, key: u64, read: impl FnOnce(&V) -> Option<R>) -> Option<R> {
        self.shard(key).read().map.get(&key).and_then(|v| read(v))
    }

    /// Keeps `value` under `key`, in place of what was there; a full shard first lets go of
    /// its oldest entry (first in, first out).
    pub(crate) fn insert(&self, key: u64, value: V) {
        let mut shard = self.shard(key).write();
        let shard = &mut *shard;
        if let Some(kept) = shard.map.get_mut(&key) {
            // Replaced: the key keeps its place in the order.
            **kept = value;
            return;
        }
        if shard.order.len() < self.per_shard {
            shard.order.push(key);
        } else {
            let evicted = std::mem::replace(&mut shard.order[shard.oldest], key);
            shard.map.remove(&evicted);
            shard.oldest = (shard.oldest + 1) % self.per_shard;
        }
        shard.map.insert(key, Box::new(value));
    }

    /// How many values are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.read().map.len()).sum()
    }

    fn shard(&self, key: u64) -> &RwLock<Shard<V>> {
        // Bits the maps do not use for themselves: they take a bucket from the low bits and
        // a tag from the top seven.
        &self.shards[(key >> 32) as usize % SHARDS]
    }
}

/// The "hash" of a key that is a random hash already: the key itself.
#[derive(Default)]
struct KeyIsHashHasher(u64);

type KeyIsHash = BuildHasherDefault<KeyIsHashHasher>;

impl Hasher for KeyIsHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here (`write_u64`); anything else is folded in whole.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_read_under_its_key_only() {
        let cache = DecisionCache::new(100);
        cache.insert(7, "seven");
        assert_eq!(cache.get(7, |v| Some(*v)), Some("seven"));
        assert_eq!(cache.get(8, |v| Some(*v)), None);
        // `read` decides whether the entry serves (the engine compares the whole input).
        assert_eq!(cache.get(7, |_| None::<&str>), None);
        cache.insert(7, "again");
        assert_eq!(cache.get(7, |v| Some(*v)), Some("again"));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn it_never_holds_more_than_its_bound_and_keeps_what_was_just_put() {
        let cache = DecisionCache::new(64);
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for i in 0..10_000u64 {
            // Keys spread over every bit, as random hashes are.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cache.insert(x, i);
            assert_eq!(cache.get(x, |v| Some(*v)), Some(i));
            assert!(cache.len() <= 64, "{} entries", cache.len());
        }
        // Full, shard by shard, with most of its room used.
        assert!(cache.len() > 48, "{} entries", cache.len());
    }

    #[test]
    fn a_full_cache_keeps_what_came_last_and_lets_the_oldest_go() {
        let per_shard = 50;
        let cache = DecisionCache::new(per_shard * SHARDS);
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut keys = Vec::new();
        for i in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cache.insert(x, i);
            keys.push(x);
        }
        // Each shard keeps its last `per_shard` keys: every key of the last `per_shard`
        // inserts is there (none of their shards took more since), the first ones are not.
        for &key in &keys[keys.len() - per_shard..] {
            assert!(cache.get(key, |_| Some(())).is_some());
        }
        let first_kept = keys[..1000]
            .iter()
            .filter(|&&key| cache.get(key, |_| Some(())).is_some())
            .count();
        assert_eq!(first_kept, 0);
        assert_eq!(cache.len(), per_shard * SHARDS);
    }

    #[test]
    fn replacing_a_key_in_a_full_shard_evicts_nothing() {
        let cache = DecisionCache::new(SHARDS);
        // One key per shard: every shard is full.
        for shard in 0..SHARDS as u64 {
            cache.insert(shard << 32, shard);
        }
        assert_eq!(cache.len(), SHARDS);
        cache.insert(3 << 32, 33);
        assert_eq!(cache.len(), SHARDS);
        assert_eq!(cache.get(3 << 32, |v| Some(*v)), Some(33));
        assert_eq!(cache.get(4 << 32, |v| Some(*v)), Some(4));
    }
}
