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

    pub(super) async fn complete(mut self, response: StoredResponse) {
        self.on_drop = Some(OnDrop::Complete(response.clone()));
        complete(
            &*self.store,
            &self.key,
            &self.owner,
            response,
            self.replay_ttl,
        )
        .await;
        self.on_drop = None;
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
        let replay_ttl = self.replay_ttl;
        runtime.spawn(async move {
            match action {
                OnDrop::Release => release(&*store, &key, &owner).await,
                OnDrop::Complete(response) => {
                    complete(&*store, &key, &owner, response, replay_ttl).await;
                }
            }
        });
    }
}

async fn release<St: IdempotencyStore>(store: &St, key: &RecordKey, owner: &OwnerToken) {
    if let Err(error) = store.release(key, owner).await {
        tracing::warn!(
            key = key.key(),
            error = &error as &dyn std::error::Error,
            "failed to release the idempotency key, so it stays claimed until the lock TTL \
             expires"
        );
    }
}

/// Stores the response, or logs at ERROR when that fails. The caller gets the response
/// either way, because the request was processed. After a failure a retry gets `409`
/// until the lock TTL expires, and then runs the request again.
async fn complete<St: IdempotencyStore>(
    store: &St,
    key: &RecordKey,
    owner: &OwnerToken,
    response: StoredResponse,
    replay_ttl: Duration,
) {
    if let Err(error) = store.complete(key, owner, response, replay_ttl).await {
        tracing::error!(
            key = key.key(),
            error = &error as &dyn std::error::Error,
            "failed to store the response of a processed request, so a retry after the lock \
             TTL runs it again"
        );
    }
}
