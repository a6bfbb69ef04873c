//! The claim a running request holds on its key, and what happens to it when the
//! request ends or is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{Either, select};

use crate::idempotency::Fingerprint;
use crate::idempotency::store::{
    Begin, IdempotencyStore, OwnerToken, RecordKey, StoreError, StoredResponse,
};
use crate::metrics::names::IDEMPOTENCY_STORE_ERRORS_TOTAL;

/// A claim on a key, which is released or completed when dropped unfinished.
pub(super) struct Lease<St: IdempotencyStore> {
    store: Arc<St>,
    key: RecordKey,
    owner: OwnerToken,
    lock_ttl: Duration,
    replay_ttl: Duration,
    pub(super) on_drop: Option<OnDrop>,
}

pub(super) enum OnDrop {
    Release,
    Complete(StoredResponse),
}

impl<St: IdempotencyStore> Lease<St> {
    pub(super) fn new(
        store: Arc<St>,
        key: RecordKey,
        owner: OwnerToken,
        lock_ttl: Duration,
        replay_ttl: Duration,
    ) -> Self {
        Lease {
            store,
            key,
            owner,
            lock_ttl,
            replay_ttl,
            on_drop: Some(OnDrop::Release),
        }
    }

    /// Runs `future` to completion while renewing the lease every third of the lock TTL,
    /// so a duplicate cannot take the key over while the request is still running.
    ///
    /// Renewal uses the Tokio timer, so the runtime needs its time driver.
    pub(super) async fn renew_while<F: Future>(&self, future: F) -> F::Output {
        let period = self.lock_ttl / 3;
        if period.is_zero() {
            return future.await;
        }
        match select(pin!(future), pin!(self.renew_forever(period))).await {
            Either::Left((output, _)) => output,
            Either::Right((never, _)) => match never {},
        }
    }

    async fn renew_forever(&self, period: Duration) -> Infallible {
        loop {
            tokio::time::sleep(period).await;
            let Err(error) = self
                .store
                .renew(&self.key, &self.owner, self.lock_ttl)
                .await
            else {
                continue;
            };
            if !error.is_stale_owner() {
                count_store_error("renew");
                tracing::warn!(
                    key = self.key.key(),
                    error = &error as &dyn std::error::Error,
                    "failed to renew the idempotency lease, retrying at the next period"
                );
                continue;
            }
            tracing::error!(
                key = self.key.key(),
                "lost the claim on the idempotency key while the request runs, so a duplicate \
                 may run it again"
            );
            return std::future::pending().await;
        }
    }

    pub(super) fn key(&self) -> &RecordKey {
        &self.key
    }

    /// Claims the key with this lease's owner token and lock TTL.
    pub(super) async fn begin(&self, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        self.store
            .begin(&self.key, fingerprint, &self.owner, self.lock_ttl)
            .await
    }

    /// Makes dropping the lease do nothing, for a request that did not claim the key.
    pub(super) fn disarm(&mut self) {
        self.on_drop = None;
    }

    /// Makes dropping the lease release the key again, before another `begin`.
    pub(super) fn rearm(&mut self) {
        self.on_drop = Some(OnDrop::Release);
    }

    // `release` and `complete` keep the drop action until the store returns, so a future
    // dropped while a remote store works still releases or completes the key.

    pub(super) async fn release(mut self) {
        self.on_drop = Some(OnDrop::Release);
        release(&*self.store, &self.key, &self.owner).await;
        self.on_drop = None;
    }

    /// Stores the response. When the store fails, the response is stored again in the
    /// background until it succeeds, so the caller is not kept waiting.
    pub(super) async fn complete(mut self, response: StoredResponse) {
        self.on_drop = Some(OnDrop::Complete(response.clone()));
        let stored = self
            .store
            .complete(&self.key, &self.owner, response.clone(), self.replay_ttl)
            .await;
        self.on_drop = None;

        match stored {
            Ok(()) => {}
            Err(error) if error.is_stale_owner() => lost_claim(&self.key),
            Err(error) => {
                count_store_error("complete");
                tracing::warn!(
                    key = self.key.key(),
                    error = &error as &dyn std::error::Error,
                    "failed to store the response of a processed request, retrying in the \
                     background while the key stays claimed"
                );
                let store = Arc::clone(&self.store);
                let (key, owner) = (self.key.clone(), self.owner.clone());
                let (lock_ttl, replay_ttl) = (self.lock_ttl, self.replay_ttl);
                tokio::spawn(async move {
                    keep_completing(&*store, &key, &owner, response, lock_ttl, replay_ttl).await;
                });
            }
        }
    }
}

impl<St: IdempotencyStore> Drop for Lease<St> {
    fn drop(&mut self) {
        let Some(action) = self.on_drop.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                key = self.key.key(),
                "request dropped outside a Tokio runtime, so its key stays claimed until the \
                 lock TTL expires"
            );
            return;
        };

        let store = Arc::clone(&self.store);
        let key = self.key.clone();
        let owner = self.owner.clone();
        let (lock_ttl, replay_ttl) = (self.lock_ttl, self.replay_ttl);
        runtime.spawn(async move {
            match action {
                OnDrop::Release => release(&*store, &key, &owner).await,
                OnDrop::Complete(response) => {
                    keep_completing(&*store, &key, &owner, response, lock_ttl, replay_ttl).await;
                }
            }
        });
    }
}

async fn release<St: IdempotencyStore>(store: &St, key: &RecordKey, owner: &OwnerToken) {
    if let Err(error) = store.release(key, owner).await {
        count_store_error("release");
        tracing::warn!(
            key = key.key(),
            error = &error as &dyn std::error::Error,
            "failed to release the idempotency key, so it stays claimed until the lock TTL \
             expires"
        );
    }
}

/// Stores the response of a processed request until the store accepts it, renewing the
/// claim between tries so that no duplicate runs the request while the store is failing.
///
/// Gives up, with an ERROR, when another owner took the key over or after the replay
/// TTL, after which a stored response would have expired anyway.
async fn keep_completing<St: IdempotencyStore>(
    store: &St,
    key: &RecordKey,
    owner: &OwnerToken,
    response: StoredResponse,
    lock_ttl: Duration,
    replay_ttl: Duration,
) {
    let period = (lock_ttl / 3).max(Duration::from_millis(10));
    let give_up = tokio::time::Instant::now() + replay_ttl;
    let mut tries: u32 = 0;
    loop {
        tries += 1;
        match store
            .complete(key, owner, response.clone(), replay_ttl)
            .await
        {
            Ok(()) => {
                if tries > 1 {
                    tracing::info!(key = key.key(), tries, "stored the response after retrying");
                }
                return;
            }
            Err(error) if error.is_stale_owner() => return lost_claim(key),
            Err(error) if tokio::time::Instant::now() >= give_up => {
                count_store_error("complete");
                tracing::error!(
                    key = key.key(),
                    tries,
                    error = &error as &dyn std::error::Error,
                    "gave up storing the response of a processed request after the replay TTL"
                );
                return;
            }
            Err(_) => count_store_error("complete"),
        }
        tokio::time::sleep(period).await;
        // Keep the claim while the store recovers; a failure here shows in the next try.
        let _ = store.renew(key, owner, lock_ttl).await;
    }
}

/// Counts a failed store call in `idempotency_store_errors_total`.
fn count_store_error(operation: &'static str) {
    metrics::counter!(IDEMPOTENCY_STORE_ERRORS_TOTAL, "operation" => operation).increment(1);
}

/// Logs that another owner took the key over, so this request's response is not stored.
fn lost_claim(key: &RecordKey) {
    tracing::error!(
        key = key.key(),
        "lost the claim on the idempotency key before the response was stored, so a \
         duplicate may run the request again"
    );
}
