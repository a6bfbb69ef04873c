//! The [`IdempotencyStore`] operations of [`PostgresStore`]: claim, complete, release and
//! renew, each conditional on the row's state and owner.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio_postgres::Row;

use super::PostgresStore;
use super::headers;
use super::sql::{COMPLETED, IN_FLIGHT};
use crate::idempotency::Fingerprint;
use crate::idempotency::store::{
    Begin, IdempotencyStore, OwnerToken, RecordKey, StoreError, StoredResponse,
};

/// How many times [`PostgresStore::begin`] tries to claim a key or read the row that
/// blocks the claim before it gives up.
///
/// Another round is needed only when the row that blocked the claim is deleted or expires
/// before the read that follows, so a second round almost always settles it.
const CLAIM_ROUNDS: usize = 4;

impl IdempotencyStore for PostgresStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        let client = self.client().await?;
        let claim = client
            .prepare_cached(&self.statements.claim)
            .await
            .map_err(StoreError::backend)?;
        let read = client
            .prepare_cached(&self.statements.read)
            .await
            .map_err(StoreError::backend)?;
        let fingerprint_bytes = &fingerprint.as_bytes()[..];
        let ttl = micros(lock_ttl);

        for _ in 0..CLAIM_ROUNDS {
            let claimed = client
                .query_opt(
                    &claim,
                    &[
                        &key.scope(),
                        &key.key(),
                        &fingerprint_bytes,
                        &owner.as_str(),
                        &ttl,
                    ],
                )
                .await
                .map_err(StoreError::backend)?;
            if claimed.is_some() {
                return Ok(Begin::Claimed);
            }

            let row = client
                .query_opt(&read, &[&key.scope(), &key.key()])
                .await
                .map_err(StoreError::backend)?;
            if let Some(row) = row
                && let Some(begin) = existing(&row, fingerprint)?
            {
                return Ok(begin);
            }
            // The row was deleted or expired after the claim saw it, so claim again.
        }
        Err(StoreError::backend(ClaimContended))
    }

    async fn complete(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        response: StoredResponse,
        replay_ttl: Duration,
    ) -> Result<(), StoreError> {
        let status = i16::try_from(response.status.as_u16()).expect("a status is at most 999");
        let encoded_headers = headers::encode(&response.headers);
        let body = response.body.as_deref();
        let ttl = micros(replay_ttl);
        let changed = self
            .execute(
                &self.statements.complete,
                &[
                    &key.scope(),
                    &key.key(),
                    &owner.as_str(),
                    &status,
                    &encoded_headers,
                    &body,
                    &ttl,
                ],
            )
            .await?;
        owned(changed)
    }

    async fn release(&self, key: &RecordKey, owner: &OwnerToken) -> Result<(), StoreError> {
        let changed = self
            .execute(
                &self.statements.release,
                &[&key.scope(), &key.key(), &owner.as_str()],
            )
            .await?;
        owned(changed)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        let ttl = micros(lock_ttl);
        let changed = self
            .execute(
                &self.statements.renew,
                &[&key.scope(), &key.key(), &owner.as_str(), &ttl],
            )
            .await?;
        owned(changed)
    }
}

/// Returns what `begin` reports for a row read after a failed claim, or `None` when the
/// row has expired and the key may be claimed again.
fn existing(row: &Row, fingerprint: &Fingerprint) -> Result<Option<Begin>, StoreError> {
    let expires_in: i64 = row.try_get("expires_in").map_err(StoreError::backend)?;
    if expires_in <= 0 {
        return Ok(None);
    }
    let stored: &[u8] = row.try_get("fingerprint").map_err(StoreError::backend)?;
    if stored != fingerprint.as_bytes() {
        return Ok(Some(Begin::Mismatch));
    }

    let state: &str = row.try_get("state").map_err(StoreError::backend)?;
    match state {
        IN_FLIGHT => Ok(Some(Begin::InFlight {
            expires_in: Duration::from_micros(expires_in.unsigned_abs()),
        })),
        COMPLETED => stored_response(row).map(|response| Some(Begin::Completed(response))),
        other => Err(StoreError::backend(CorruptRow(format!(
            "unknown state {other:?}"
        )))),
    }
}

fn stored_response(row: &Row) -> Result<StoredResponse, StoreError> {
    let status: Option<i16> = row.try_get("status").map_err(StoreError::backend)?;
    let status = status
        .and_then(|status| u16::try_from(status).ok())
        .and_then(|status| StatusCode::from_u16(status).ok())
        .ok_or_else(|| StoreError::backend(CorruptRow(format!("invalid status {status:?}"))))?;
    let encoded_headers: Option<&[u8]> = row.try_get("headers").map_err(StoreError::backend)?;
    let encoded_headers = encoded_headers
        .ok_or_else(|| StoreError::backend(CorruptRow("missing headers".to_owned())))?;
    let headers = headers::decode(encoded_headers).map_err(StoreError::backend)?;
    let body: Option<&[u8]> = row.try_get("body").map_err(StoreError::backend)?;

    Ok(StoredResponse {
        status,
        headers,
        body: body.map(Bytes::copy_from_slice),
    })
}

/// Maps the number of rows an owner-conditional statement changed to its result.
fn owned(changed: u64) -> Result<(), StoreError> {
    if changed == 0 {
        Err(StoreError::stale_owner())
    } else {
        Ok(())
    }
}

/// `ttl` in whole microseconds, capped at about 30 years as in `MemoryStore`.
fn micros(ttl: Duration) -> i64 {
    const MAX_TTL: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);
    i64::try_from(ttl.min(MAX_TTL).as_micros()).expect("30 years in microseconds fit an i64")
}

/// A completed row whose status, headers or state cannot be read back.
#[derive(Debug)]
struct CorruptRow(String);

impl fmt::Display for CorruptRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stored idempotency record is corrupt: {}", self.0)
    }
}

impl Error for CorruptRow {}

/// The claim and read of [`PostgresStore::begin`] kept finding a row that changed before
/// it could be used.
#[derive(Debug)]
struct ClaimContended;

impl fmt::Display for ClaimContended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the record for this idempotency key was deleted or expired {CLAIM_ROUNDS} times \
             between a claim and a read, so the claim gave up; retry the request"
        )
    }
}

impl Error for ClaimContended {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_caps_ttl() {
        assert_eq!(micros(Duration::from_millis(300)), 300_000);
        assert_eq!(micros(Duration::from_nanos(1500)), 1);
        assert_eq!(
            micros(Duration::MAX),
            micros(Duration::from_secs(30 * 365 * 86_400))
        );
    }

    #[test]
    fn zero_rows_is_stale_owner() {
        assert!(owned(0).unwrap_err().is_stale_owner());
        assert!(owned(1).is_ok());
    }
}
