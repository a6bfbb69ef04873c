use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fastrand::Rng;

use super::error::InvalidPolicy;
use super::replay::HttpReplay;
use crate::backoff::Backoff;
use crate::budget::RetryBudget;
use crate::classify::HttpClassifier;

/// What to retry, how often and how long to wait: a validated set of values shared by
/// every request that goes through one [`RetryLayer`](super::RetryLayer).
///
/// | setting | default |
/// |---|---|
/// | classifier | [`HttpClassifier`] |
/// | replay | [`HttpReplay`] |
/// | `max_attempts` (counts the first attempt) | 3 |
/// | `backoff` | exponential, base 100 ms, factor 2, cap 20 s, full jitter |
/// | `deadline` (whole logical request, sleeps included) | none |
/// | `attempt_timeout` | none |
/// | `max_retry_after` | 30 s |
/// | `budget` | none |
/// | `seed` | none (a random seed per request) |
///
/// ```
/// use std::time::Duration;
/// use tower_safe_retry::RetryPolicy;
///
/// let policy = RetryPolicy::builder()
///     .max_attempts(4)
///     .attempt_timeout(Duration::from_secs(2))
///     .deadline(Duration::from_secs(10))
///     .build()
///     .expect("valid policy");
/// assert_eq!(policy.max_attempts(), 4);
///
/// let error = RetryPolicy::builder().max_attempts(0).build().unwrap_err();
/// assert!(error.to_string().contains("max_attempts is 0"));
/// ```
pub struct RetryPolicy<C = HttpClassifier, R = HttpReplay> {
    pub(crate) classifier: C,
    pub(crate) replay: R,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) deadline: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) max_retry_after: Duration,
    pub(crate) budget: Option<RetryBudget>,
    seed: Option<u64>,
    /// Requests that have drawn a random source from a seeded policy.
    seeded_requests: AtomicU64,
}

impl RetryPolicy {
    /// The HTTP policy with every default.
    pub fn http() -> Self {
        RetryPolicy::builder()
            .build()
            .expect("the default policy is valid")
    }

    /// A builder that starts from the HTTP defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            classifier: HttpClassifier::new(),
            replay: HttpReplay::new(),
            max_attempts: 3,
            backoff: Backoff::exponential(Duration::from_millis(100), Duration::from_secs(20)),
            deadline: None,
            attempt_timeout: None,
            max_retry_after: Duration::from_secs(30),
            budget: None,
            seed: None,
        }
    }
}

impl<C, R> RetryPolicy<C, R> {
    /// The maximum number of attempts, the first one included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// A random source for one logical request: reproducible for a seeded policy (the
    /// n-th request to draw one gets the same source in every run), random otherwise.
    pub(crate) fn rng(&self) -> Rng {
        match self.seed {
            Some(seed) => {
                let request = self.seeded_requests.fetch_add(1, Ordering::Relaxed);
                Rng::with_seed(seed ^ request.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
            None => Rng::new(),
        }
    }
}

impl<C, R> fmt::Debug for RetryPolicy<C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("classifier", &std::any::type_name::<C>())
            .field("replay", &std::any::type_name::<R>())
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("deadline", &self.deadline)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("max_retry_after", &self.max_retry_after)
            .field("budget", &self.budget)
            .field("seed", &self.seed)
            .finish()
    }
}

/// Builds a [`RetryPolicy`], checking every value in [`build`](Self::build).
#[derive(Clone, Debug)]
#[must_use]
pub struct RetryPolicyBuilder<C = HttpClassifier, R = HttpReplay> {
    classifier: C,
    replay: R,
    max_attempts: u32,
    backoff: Backoff,
    deadline: Option<Duration>,
    attempt_timeout: Option<Duration>,
    max_retry_after: Duration,
    budget: Option<RetryBudget>,
    seed: Option<u64>,
}

impl<C, R> RetryPolicyBuilder<C, R> {
    /// Sets the classifier that turns each attempt's outcome into a decision.
    pub fn classifier<C2>(self, classifier: C2) -> RetryPolicyBuilder<C2, R> {
        RetryPolicyBuilder {
            classifier,
            replay: self.replay,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            deadline: self.deadline,
            attempt_timeout: self.attempt_timeout,
            max_retry_after: self.max_retry_after,
            budget: self.budget,
            seed: self.seed,
        }
    }

    /// Sets how requests are copied and which are idempotent; use
    /// [`CloneReplay`](super::CloneReplay) for request types other than `http::Request`.
    pub fn replay<R2>(self, replay: R2) -> RetryPolicyBuilder<C, R2> {
        RetryPolicyBuilder {
            classifier: self.classifier,
            replay,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            deadline: self.deadline,
            attempt_timeout: self.attempt_timeout,
            max_retry_after: self.max_retry_after,
            budget: self.budget,
            seed: self.seed,
        }
    }

    /// Sets the maximum number of attempts, the first one included (at least 1; 1 turns
    /// retries off).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets the delay schedule between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the overall deadline of a logical request, backoff sleeps included.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets the timeout of each attempt. An attempt that times out is classified as
    /// [`RetryReason::Timeout`](crate::classify::RetryReason::Timeout).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Sets the longest server-given delay (`Retry-After`) the layer waits for. A longer
    /// one ends the retries at once and returns that response.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Limits retries to a share of requests. Clones of one [`RetryBudget`] share their
    /// balance, so policies that call the same upstream can share one budget.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Seeds the random source of the jitter, so that runs repeat exactly.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks every value and builds the policy.
    ///
    /// # Errors
    ///
    /// [`InvalidPolicy`], naming the value and the fix, when `max_attempts` is 0, the
    /// backoff base is above its cap or its factor is below 1, or the deadline or the
    /// per-attempt timeout is zero.
    pub fn build(self) -> Result<RetryPolicy<C, R>, InvalidPolicy> {
        let invalid = |message: String| Err(InvalidPolicy { message });

        if self.max_attempts == 0 {
            return invalid(
                "max_attempts is 0; it counts the first attempt, so use at least 1 (1 turns \
                 retries off)"
                    .to_owned(),
            );
        }
        if let Err(message) = self.backoff.validate() {
            return invalid(message);
        }
        if self.deadline == Some(Duration::ZERO) {
            return invalid(
                "deadline is 0s, which fails every request; use a positive deadline or none"
                    .to_owned(),
            );
        }
        if self.attempt_timeout == Some(Duration::ZERO) {
            return invalid(
                "attempt_timeout is 0s, which fails every attempt; use a positive timeout or \
                 none"
                    .to_owned(),
            );
        }

        Ok(RetryPolicy {
            classifier: self.classifier,
            replay: self.replay,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            deadline: self.deadline,
            attempt_timeout: self.attempt_timeout,
            max_retry_after: self.max_retry_after,
            budget: self.budget,
            seed: self.seed,
            seeded_requests: AtomicU64::new(0),
        })
    }
}
