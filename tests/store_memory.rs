//! The store conformance suite against `MemoryStore`, in real time.

mod conformance;

use tower_safe_retry::MemoryStore;

async fn memory_store() -> Option<MemoryStore> {
    Some(MemoryStore::new())
}

conformance::store_tests!(memory_store);
