use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fastrand::Rng;
use http::{HeaderName, HeaderValue};

use super::error::InvalidPolicy;
use super::replay::{HttpReplay, Replay};
use crate::backoff::Backoff;
use crate::budget::RetryBudget;
use crate::classify::{HttpClassifier, RetryReason};

/// A validated set of retry settings (what to retry, how often and how long to wait),
/// shared by every request that goes through one [`RetryLayer`](super::RetryLayer).
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
/// | `attempt_header` | none |
/// | `on_retry` | none |
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
    pub(crate) on_retry: Option<OnRetry>,
    attempt_header: Option<HeaderName>,
    seed: Option<u64>,
    /// Requests that have drawn a random source from a seeded policy.
    seeded_requests: AtomicU64,
}

/// A callback run before each retry.
pub(crate) type OnRetry = Arc<dyn Fn(&RetryEvent) + Send + Sync>;

/// A retry about to happen, passed to the [`on_retry`](RetryPolicyBuilder::on_retry)
/// callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryEvent {
    /// The number of the attempt that failed, starting at 1.
    pub attempt: u32,
    /// The cause of the failure.
    pub reason: RetryReason,
    /// The delay before the next attempt.
    pub delay: Duration,
}

impl RetryPolicy {
    /// Returns the HTTP policy with every default.
    pub fn http() -> Self {
        RetryPolicy::builder()
            .build()
            .expect("the default policy is valid")
    }

    /// Returns a builder that starts from the HTTP defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            classifier: HttpClassifier::new(),
            replay: HttpReplay::new(),
            settings: Settings {
                max_attempts: 3,
                backoff: Backoff::exponential(Duration::from_millis(100), Duration::from_secs(20)),
                deadline: None,
                attempt_timeout: None,
                max_retry_after: Duration::from_secs(30),
                budget: None,
                on_retry: None,
                attempt_header: None,
                seed: None,
            },
        }
    }
}

impl<C, R> RetryPolicy<C, R> {
    /// Returns the maximum number of attempts, the first one included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Returns a random source for one logical request: reproducible for a seeded policy (the
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

    /// Writes the attempt number into the attempt's header, when the policy names one.
    #[inline]
    pub(crate) fn stamp<Req>(&self, attempt: &mut R::Attempt, number: u32)
    where
        R: Replay<Req>,
    {
        let Some(name) = &self.attempt_header else {
            return;
        };
        if let Some(headers) = self.replay.attempt_headers_mut(attempt) {
            headers.insert(name.clone(), HeaderValue::from(number));
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
            .field("on_retry", &self.on_retry.is_some())
            .field("attempt_header", &self.attempt_header)
            .field("seed", &self.seed)
            .finish()
    }
}

/// Builds a [`RetryPolicy`], checking every value in [`build`](Self::build).
#[derive(Clone)]
#[must_use]
pub struct RetryPolicyBuilder<C = HttpClassifier, R = HttpReplay> {
    classifier: C,
    replay: R,
    settings: Settings,
}

/// The builder's values that do not depend on its type parameters.
#[derive(Clone)]
struct Settings {
    max_attempts: u32,
    backoff: Backoff,
    deadline: Option<Duration>,
    attempt_timeout: Option<Duration>,
    max_retry_after: Duration,
    budget: Option<RetryBudget>,
    on_retry: Option<OnRetry>,
    attempt_header: Option<HeaderName>,
    seed: Option<u64>,
}

impl<C, R> RetryPolicyBuilder<C, R> {
    /// Sets the classifier that turns each attempt's outcome into a decision.
    pub fn classifier<C2>(self, classifier: C2) -> RetryPolicyBuilder<C2, R> {
        RetryPolicyBuilder {
            classifier,
            replay: self.replay,
            settings: self.settings,
        }
    }

    /// Sets how requests become attempts and which are idempotent: [`BodyReplay`] for
    /// streaming bodies, [`CloneReplay`] for request types other than `http::Request`.
    ///
    /// [`BodyReplay`]: super::BodyReplay
    /// [`CloneReplay`]: super::CloneReplay
    pub fn replay<R2>(self, replay: R2) -> RetryPolicyBuilder<C, R2> {
        RetryPolicyBuilder {
            classifier: self.classifier,
            replay,
            settings: self.settings,
        }
    }

    /// Sets the maximum number of attempts, the first one included (at least 1; 1 turns
    /// retries off).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.settings.max_attempts = max_attempts;
        self
    }

    /// Sets the delay schedule between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.settings.backoff = backoff;
        self
    }

    /// Sets the overall deadline of a logical request, backoff sleeps included.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.settings.deadline = Some(deadline);
        self
    }

    /// Sets the timeout of each attempt. An attempt that times out is classified as
    /// [`RetryReason::Timeout`].
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.settings.attempt_timeout = Some(timeout);
        self
    }

    /// Sets the longest server-given delay (`Retry-After`, `grpc-retry-pushback-ms`) the
    /// layer waits for. A longer one ends the retries at once and returns that response.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.settings.max_retry_after = max;
        self
    }

    /// Limits retries to a share of requests. Clones of one [`RetryBudget`] share their
    /// balance, so policies that call the same upstream can share one budget.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.settings.budget = Some(budget);
        self
    }

    /// Runs `callback` before each retry, with the failed attempt's number, the reason
    /// and the delay. The callback runs inside the request's future, so it must be quick.
    pub fn on_retry(mut self, callback: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        self.settings.on_retry = Some(Arc::new(callback));
        self
    }

    /// Sends the attempt number (1 for the first attempt) in the header `name` of every
    /// attempt, for servers and proxies that log or limit retries.
    pub fn attempt_header(mut self, name: HeaderName) -> Self {
        self.settings.attempt_header = Some(name);
        self
    }

    /// Seeds the random source of the jitter, so that runs repeat exactly.
    pub fn seed(mut self, seed: u64) -> Self {
        self.settings.seed = Some(seed);
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
        let settings = self.settings;
        let invalid = |message: &str| {
            Err(InvalidPolicy {
                message: message.to_owned(),
            })
        };

        if settings.max_attempts == 0 {
            return invalid(
                "max_attempts is 0; it counts the first attempt, so use at least 1 (1 turns \
                 retries off)",
            );
        }
        if let Err(message) = settings.backoff.validate() {
            return Err(InvalidPolicy { message });
        }
        if settings.deadline == Some(Duration::ZERO) {
            return invalid(
                "deadline is 0s, which fails every request; use a positive deadline or none",
            );
        }
        if settings.attempt_timeout == Some(Duration::ZERO) {
            return invalid(
                "attempt_timeout is 0s, which fails every attempt; use a positive timeout or \
                 none",
            );
        }

        Ok(RetryPolicy {
            classifier: self.classifier,
            replay: self.replay,
            max_attempts: settings.max_attempts,
            backoff: settings.backoff,
            deadline: settings.deadline,
            attempt_timeout: settings.attempt_timeout,
            max_retry_after: settings.max_retry_after,
            budget: settings.budget,
            on_retry: settings.on_retry,
            attempt_header: settings.attempt_header,
            seed: settings.seed,
            seeded_requests: AtomicU64::new(0),
        })
    }
}

impl<C: fmt::Debug, R: fmt::Debug> fmt::Debug for RetryPolicyBuilder<C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicyBuilder")
            .field("classifier", &self.classifier)
            .field("replay", &self.replay)
            .field("max_attempts", &self.settings.max_attempts)
            .field("backoff", &self.settings.backoff)
            .field("deadline", &self.settings.deadline)
            .field("attempt_timeout", &self.settings.attempt_timeout)
            .field("max_retry_after", &self.settings.max_retry_after)
            .field("budget", &self.settings.budget)
            .field("attempt_header", &self.settings.attempt_header)
            .field("seed", &self.settings.seed)
            .finish_non_exhaustive()
    }
}
