//! What happens after an attempt that the classifier did not call a success: whether
//! another attempt follows, after what delay, and what is recorded when none does.

use std::time::Duration;

use fastrand::Rng;
use tokio::time::Instant;

use super::{BackoffSource, Replay, RetryPolicy, SuppressReason};
use crate::BoxError;
use crate::classify::Decision;
use crate::metrics::AttemptObserver;

/// The state of a request that is being retried.
pub(super) struct Retrying<A, T> {
    /// The next attempt, made when the retry was planned.
    pub(super) next: Option<A>,
    /// The outcome of the previous attempt, returned if no further attempt is made.
    pub(super) last: Option<Result<T, BoxError>>,
    pub(super) rng: Rng,
    pub(super) previous_delay: Duration,
}

/// Takes the outcome kept from the previous attempt.
pub(super) fn take_last<A, T>(retrying: &mut Option<Box<Retrying<A, T>>>) -> Result<T, BoxError> {
    retrying
        .as_mut()
        .and_then(|retrying| retrying.last.take())
        .expect("the ready state is only entered after an attempt")
}

/// A planned retry: the delay, where it came from, and the retry state with the next
/// attempt in it.
pub(super) type Planned<'a, A, T> = (Duration, BackoffSource, &'a mut Retrying<A, T>);

/// Decides whether another attempt follows, after what delay, and makes it into the
/// retry state; or returns why not.
///
/// `Err(None)` means the classifier did not ask for a retry; `Err(Some(reason))` means it
/// did and the layer declined.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_retry<'a, Req, T, C, R: Replay<Req>>(
    decision: Decision,
    policy: &RetryPolicy<C, R>,
    attempts: u32,
    max_attempts: u32,
    idempotent: bool,
    source: Option<&R::Source>,
    deadline: Option<Instant>,
    retrying: &'a mut Option<Box<Retrying<R::Attempt, T>>>,
) -> Result<Planned<'a, R::Attempt, T>, Option<SuppressReason>> {
    let Decision::Retry { reason, after } = decision else {
        return Err(None);
    };

    if !idempotent && !reason.proves_not_processed() {
        return Err(Some(SuppressReason::NotIdempotent));
    }
    if attempts >= max_attempts {
        return Err(Some(SuppressReason::MaxAttempts));
    }
    if after.is_some_and(|after| after > policy.max_retry_after) {
        return Err(Some(SuppressReason::RetryAfter));
    }

    let retrying = retrying.get_or_insert_with(|| {
        Box::new(Retrying {
            next: None,
            last: None,
            rng: policy.rng(),
            previous_delay: Duration::ZERO,
        })
    });
    let planned = policy
        .backoff
        .delay(attempts, retrying.previous_delay, &mut retrying.rng);
    let (delay, origin) = match after {
        Some(after) if after >= planned => (after, BackoffSource::RetryAfter),
        _ => (planned, BackoffSource::Policy),
    };
    if deadline.is_some_and(|deadline| Instant::now() + delay >= deadline) {
        return Err(Some(SuppressReason::Deadline));
    }

    let source = source.ok_or(Some(SuppressReason::NotReplayable))?;
    let next = policy.replay.next(source).map_err(Some)?;
    // Last, so that a token is spent only on a retry that is made.
    if policy
        .budget
        .as_ref()
        .is_some_and(|budget| !budget.withdraw())
    {
        return Err(Some(SuppressReason::Budget));
    }
    retrying.next = Some(next);
    Ok((delay, origin, retrying))
}

/// Records and logs the end of a logical request that is not retried further.
pub(super) fn finish(
    decision: Decision,
    suppressed: Option<SuppressReason>,
    attempts: u32,
    observer: &Option<AttemptObserver>,
) {
    let reason = decision.reason().map_or("none", |reason| reason.as_str());
    if let Some(suppressed) = suppressed {
        tracing::debug!(attempt = attempts, reason, %suppressed, "not retrying request");
        if let Some(observer) = observer {
            observer.suppressed(suppressed);
        }
    }
    if attempts > 1 && !decision.is_success() {
        tracing::warn!(attempts, reason, "request failed after retries");
    }
}
