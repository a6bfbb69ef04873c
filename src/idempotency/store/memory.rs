//! An in-process store for one server replica.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Begin, IdempotencyStore, OwnerToken, RecordKey, StoreError, StoredResponse};
use crate::idempotency::Fingerprint;

mod bounds;
#[cfg(test)]
mod tests;

const SHARDS: usize = 16;

/// An in-memory [`IdempotencyStore`], sharded over 16 mutexes and bounded in entries and
/// bytes.
///
/// Records live in this process only, so replicas behind a load balancer do not see each
/// other's keys; use a shared store for them. Clones share the records.
///
/// Expired records are removed when their key is next used and, when the store is full,
/// by a sweep of every shard. When the store is still
/// full, [`begin`](IdempotencyStore::begin) returns a capacity error
/// ([`StoreError::is_capacity`]) instead of evicting a live record, because evicting a
/// completed record would let a retry run its request again.
///
/// The byte count covers scopes, keys, header names and values and bodies, not the
/// allocator's overhead. A completion that would pass [`max_bytes`](Self::max_bytes) is
/// stored without its body, so its replays have an empty body. Such a completion is
/// stored even when its headers take the count above the bound.
///
/// Time comes from [`tokio::time::Instant`], so tests can pause and advance it.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
    max_entries: usize,
    max_bytes: usize,
}

struct Shared {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    entries: AtomicUsize,
    bytes: AtomicUsize,
}

type Shard = HashMap<RecordKey, Record>;

struct Record {
    fingerprint: Fingerprint,
    state: State,
    expires_at: Instant,
    size: usize,
}

enum State {
    InFlight { owner: OwnerToken },
    Completed(StoredResponse),
}

impl MemoryStore {
    /// The default bound on records.
    pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
    /// The default bound on bytes, 64 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

    /// Creates an empty store with the default bounds.
    pub fn new() -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect();
        MemoryStore {
            shared: Arc::new(Shared {
                shards,
                hasher: RandomState::new(),
                entries: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
            }),
            max_entries: Self::DEFAULT_MAX_ENTRIES,
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }

    /// Sets the maximum number of records, in flight and completed together.
    ///
    /// Bounds belong to each handle, so set them before cloning the store.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max;
        self
    }

    /// Sets the maximum number of bytes the records take.
    ///
    /// Bounds belong to each handle, so set them before cloning the store.
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max;
        self
    }

    fn lock(&self, key: &RecordKey) -> MutexGuard<'_, Shard> {
        let index = self.shared.hasher.hash_one(key) as usize % SHARDS;
        lock(&self.shared.shards[index])
    }

    fn begin_now(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        if let Some(begin) = self.try_begin(key, fingerprint, owner, lock_ttl, now) {
            return Ok(begin);
        }

        for shard in &self.shared.shards {
            self.sweep(&mut lock(shard), now);
        }
        self.try_begin(key, fingerprint, owner, lock_ttl, now)
            .ok_or_else(StoreError::capacity)
    }

    /// Returns `None` when a new record is needed and there is no room for it.
    fn try_begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lock_ttl: Duration,
        now: Instant,
    ) -> Option<Begin> {
        let mut shard = self.lock(key);
        if let Some(record) = shard.get(key) {
            if record.expires_at > now {
                return Some(existing(record, fingerprint, now));
            }
            // The replay TTL passed or the lease expired: the key is free again.
            self.remove(&mut shard, key);
        }

        let size = key_size(key);
        if !self.reserve(size) {
            return None;
        }
        let record = Record {
            fingerprint: *fingerprint,
            state: State::InFlight {
                owner: owner.clone(),
            },
            expires_at: deadline(now, lock_ttl),
            size,
        };
        shard.insert(key.clone(), record);
        Some(Begin::Claimed)
    }

    fn complete_now(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        mut response: StoredResponse,
        replay_ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut shard = self.lock(key);
        let record = owned_record(&mut shard, key, owner)?;

        // The claim's bytes are already counted, so reserve only what the response adds.
        let with_body = key_size(key) + response.size();
        if !self.reserve_bytes(with_body.saturating_sub(record.size)) {
            response.body = None;
            let without_body = key_size(key) + response.size();
            let added = without_body.saturating_sub(record.size);
            self.shared.bytes.fetch_add(added, Ordering::Relaxed);
        }
        record.size = key_size(key) + response.size();
        record.state = State::Completed(response);
        record.expires_at = deadline(now, replay_ttl);
        Ok(())
    }

    fn release_now(&self, key: &RecordKey, owner: &OwnerToken) -> Result<(), StoreError> {
        let mut shard = self.lock(key);
        owned_record(&mut shard, key, owner)?;
        self.remove(&mut shard, key);
        Ok(())
    }

    fn renew_now(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut shard = self.lock(key);
        let record = owned_record(&mut shard, key, owner)?;
        record.expires_at = deadline(Instant::now(), lock_ttl);
        Ok(())
    }
}

/// Returns what `begin` reports for a live record.
fn existing(record: &Record, fingerprint: &Fingerprint, now: Instant) -> Begin {
    if record.fingerprint != *fingerprint {
        return Begin::Mismatch;
    }
    match &record.state {
        State::InFlight { .. } => Begin::InFlight {
            expires_in: record.expires_at - now,
        },
        State::Completed(response) => Begin::Completed(response.clone()),
    }
}

/// Looks up the record for `key` if it is in flight for `owner`. A claim whose lease expired is
/// still the owner's until another request takes it over or a sweep removes it.
fn owned_record<'a>(
    shard: &'a mut Shard,
    key: &RecordKey,
    owner: &OwnerToken,
) -> Result<&'a mut Record, StoreError> {
    match shard.get_mut(key) {
        Some(record) if matches!(&record.state, State::InFlight { owner: held } if held == owner) => {
            Ok(record)
        }
        _ => Err(StoreError::stale_owner()),
    }
}

fn key_size(key: &RecordKey) -> usize {
    key.scope().len() + key.key().len()
}

/// `now + ttl`, capped at about 30 years so a huge TTL cannot overflow the clock.
fn deadline(now: Instant, ttl: Duration) -> Instant {
    const MAX_TTL: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);
    now + ttl.min(MAX_TTL)
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // No code panics while holding a shard lock, so a poisoned shard is still consistent.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.shared.entries.load(Ordering::Relaxed))
            .field("bytes", &self.shared.bytes.load(Ordering::Relaxed))
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl IdempotencyStore for MemoryStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        self.begin_now(key, fingerprint, owner, lock_ttl)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        response: StoredResponse,
        replay_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.complete_now(key, owner, response, replay_ttl)
    }

    async fn release(&self, key: &RecordKey, owner: &OwnerToken) -> Result<(), StoreError> {
        self.release_now(key, owner)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.renew_now(key, owner, lock_ttl)
    }
}
