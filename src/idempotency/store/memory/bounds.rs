//! The entry and byte counts behind the bounds of [`MemoryStore`].

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::{MemoryStore, Record, RecordKey, Shard};

impl MemoryStore {
    /// Counts one more record of `bytes` if both bounds allow it.
    pub(super) fn reserve(&self, bytes: usize) -> bool {
        let max = self.max_entries;
        let counted =
            self.shared
                .entries
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |entries| {
                    (entries < max).then_some(entries + 1)
                });
        if counted.is_err() {
            return false;
        }
        if !self.reserve_bytes(bytes) {
            self.shared.entries.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub(super) fn reserve_bytes(&self, bytes: usize) -> bool {
        let max = self.max_bytes;
        self.shared
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
                total.checked_add(bytes).filter(|&sum| sum <= max)
            })
            .is_ok()
    }

    pub(super) fn remove(&self, shard: &mut Shard, key: &RecordKey) {
        if let Some(record) = shard.remove(key) {
            self.uncount(&record);
        }
    }

    /// Removes the expired records of one shard.
    pub(super) fn sweep(&self, shard: &mut Shard, now: Instant) {
        shard.retain(|_, record| {
            let live = record.expires_at > now;
            if !live {
                self.uncount(record);
            }
            live
        });
    }

    fn uncount(&self, record: &Record) {
        self.shared.entries.fetch_sub(1, Ordering::Relaxed);
        self.shared.bytes.fetch_sub(record.size, Ordering::Relaxed);
    }
}
