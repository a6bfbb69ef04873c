//! A retry budget: retries as a bounded fraction of traffic, shared between services.
//!
//! ```
//! use std::time::Duration;
//! use tower_safe_retry::budget::RetryBudget;
//!
//! let budget = RetryBudget::builder()
//!     .ratio(0.1)
//!     .min_per_second(5)
//!     .window(Duration::from_secs(10))
//!     .build()
//!     .expect("valid budget");
//! assert_eq!(budget.reserve_cap(), 50.0);
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::retry::InvalidPolicy;

/// One token in the balance's fixed-point unit (millionths of a token).
const TOKEN: i64 = 1_000_000;

/// Limits retries to a fraction of logical requests, with a floor for low traffic.
///
/// Every logical request deposits `ratio` tokens (default 0.2) and every retry withdraws
/// one. The balance contains at most `reserve` tokens (by default what the floor allows over
/// one window: 10 per second × 10 s = 100), so a long healthy spell cannot fund a retry
/// storm. When the balance is empty, up to `min_per_second` retries per second are still
/// allowed, so a service with little traffic can retry at all.
///
/// Over any stretch of time `t`, the retries allowed are therefore at most
/// `ratio × requests + reserve + min_per_second × t`. With the defaults, a full outage at
/// 1,000 requests per second for 10 s costs the upstream at most 1.22 calls per logical
/// request instead of `max_attempts`.
///
/// Clones share one balance, so one budget can guard several services that call the same
/// upstream. Deposits and withdrawals are lock-free; a deposit reads no clock, and a
/// withdrawal reads the clock only when the balance is empty.
#[derive(Clone)]
pub struct RetryBudget {
    shared: Arc<Shared>,
}

struct Shared {
    /// Tokens, in millionths.
    balance: AtomicI64,
    deposit: i64,
    cap: i64,
    min_per_second: u32,
    /// The second (since `started`) of the floor's current slot in the high 32 bits, and
    /// the retries it allowed in that second in the low 32 bits.
    floor: AtomicU64,
    started: Instant,
}

impl RetryBudget {
    /// Creates a budget with the defaults: ratio 0.2, 10 retries per second, a 10 s window.
    pub fn new() -> Self {
        RetryBudget::builder()
            .build()
            .expect("the default budget is valid")
    }

    /// Returns a builder that starts from the defaults.
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
            reserve: None,
        }
    }

    /// Returns the maximum tokens the balance can contain.
    pub fn reserve_cap(&self) -> f64 {
        self.shared.cap as f64 / TOKEN as f64
    }

    /// Returns the tokens in the balance now.
    pub fn balance(&self) -> f64 {
        self.shared.balance.load(Ordering::Relaxed) as f64 / TOKEN as f64
    }

    /// Deposits the share of one logical request.
    pub(crate) fn deposit(&self) {
        let shared = &*self.shared;
        if shared.deposit == 0 {
            return;
        }
        let before = shared.balance.fetch_add(shared.deposit, Ordering::Relaxed);
        if before + shared.deposit > shared.cap {
            shared.balance.fetch_min(shared.cap, Ordering::Relaxed);
        }
    }

    /// Withdraws one retry; false when neither the balance nor the floor allows it.
    pub(crate) fn withdraw(&self) -> bool {
        let shared = &*self.shared;
        let from_balance =
            shared
                .balance
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| {
                    (balance >= TOKEN).then_some(balance - TOKEN)
                });
        from_balance.is_ok() || self.withdraw_from_floor()
    }

    fn withdraw_from_floor(&self) -> bool {
        let shared = &*self.shared;
        if shared.min_per_second == 0 {
            return false;
        }
        let second = u32::try_from(shared.started.elapsed().as_secs()).unwrap_or(u32::MAX);
        shared
            .floor
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |slot| {
                let (slot_second, used) = ((slot >> 32) as u32, slot as u32);
                if slot_second != second {
                    Some(u64::from(second) << 32 | 1)
                } else if used < shared.min_per_second {
                    Some(slot + 1)
                } else {
                    None
                }
            })
            .is_ok()
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("balance", &self.balance())
            .field("reserve_cap", &self.reserve_cap())
            .field("deposit", &(self.shared.deposit as f64 / TOKEN as f64))
            .field("min_per_second", &self.shared.min_per_second)
            .finish()
    }
}

/// Builds a [`RetryBudget`], checking every value in [`build`](Self::build).
#[derive(Clone, Debug)]
#[must_use]
pub struct RetryBudgetBuilder {
    ratio: f64,
    min_per_second: u32,
    window: Duration,
    reserve: Option<f64>,
}

impl RetryBudgetBuilder {
    /// Sets the tokens each logical request deposits: the share of requests that may be
    /// retried once the floor is used up. 0 leaves only the floor; above 1 allows more
    /// retries than requests, up to the policy's `max_attempts`.
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Sets the retries per second allowed even with an empty balance.
    pub fn min_per_second(mut self, min_per_second: u32) -> Self {
        self.min_per_second = min_per_second;
        self
    }

    /// Sets the window that sizes the default reserve: `min_per_second × window` tokens.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets the most tokens the balance contains, in place of `min_per_second × window`.
    /// A reserve below one token is raised to one, so that deposits can add up to a retry.
    pub fn reserve(mut self, tokens: f64) -> Self {
        self.reserve = Some(tokens);
        self
    }

    /// Checks every value and builds the budget.
    ///
    /// # Errors
    ///
    /// [`InvalidPolicy`], naming the value and the fix, when the ratio is negative, not
    /// finite or above 1000, the window is zero, or the reserve is negative or not
    /// finite.
    pub fn build(self) -> Result<RetryBudget, InvalidPolicy> {
        if !(self.ratio.is_finite() && (0.0..=1000.0).contains(&self.ratio)) {
            return Err(InvalidPolicy {
                message: format!(
                    "budget ratio {} is invalid; use a finite ratio from 0 to 1000 (0.2 allows \
                     one retry per five requests)",
                    self.ratio
                ),
            });
        }
        if self.window.is_zero() {
            return Err(InvalidPolicy {
                message: "budget window is 0s; use a positive window such as 10s".to_owned(),
            });
        }

        if let Some(reserve) = self.reserve
            && !(reserve.is_finite() && reserve >= 0.0)
        {
            return Err(InvalidPolicy {
                message: format!(
                    "budget reserve {reserve} is invalid; use a finite number of tokens, at \
                     least 0"
                ),
            });
        }

        let deposit = (self.ratio * TOKEN as f64).round() as i64;
        let reserve = self
            .reserve
            .unwrap_or(f64::from(self.min_per_second) * self.window.as_secs_f64())
            .max(1.0);
        let cap = (reserve * TOKEN as f64).min(i64::MAX as f64 / 2.0) as i64;
        Ok(RetryBudget {
            shared: Arc::new(Shared {
                balance: AtomicI64::new(0),
                deposit,
                cap,
                min_per_second: self.min_per_second,
                floor: AtomicU64::new(0),
                started: Instant::now(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::builder()
            .ratio(ratio)
            .min_per_second(min_per_second)
            .reserve(100.0)
            .build()
            .unwrap()
    }

    fn withdrawals(budget: &RetryBudget) -> u32 {
        let mut allowed = 0;
        while budget.withdraw() {
            allowed += 1;
            assert!(allowed < 1_000_000, "the budget never ran out");
        }
        allowed
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_zero_leaves_only_the_floor() {
        let budget = budget(0.0, 10);
        for _ in 0..1000 {
            budget.deposit();
        }
        assert_eq!(withdrawals(&budget), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_allows_its_share() {
        // (ratio, deposits, retries allowed); the reserve is 100 tokens.
        let cases = [
            (0.6, 100, 60),
            (1.0, 100, 100),
            (2.5, 1, 2),
            (2.5, 100, 100),
        ];
        for (ratio, deposits, expected) in cases {
            let budget = budget(ratio, 0);
            for _ in 0..deposits {
                budget.deposit();
            }
            assert_eq!(
                withdrawals(&budget),
                expected,
                "ratio {ratio}, {deposits} deposits"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_is_capped() {
        let budget = budget(1.0, 10);
        for _ in 0..10_000 {
            budget.deposit();
        }
        assert_eq!(budget.reserve_cap(), 100.0);
        assert_eq!(budget.balance(), 100.0);
        // The 100 tokens of the reserve plus the 10 of this second's floor.
        assert_eq!(withdrawals(&budget), 110);
    }

    #[tokio::test(start_paused = true)]
    async fn floor_refills_each_second() {
        let budget = budget(0.0, 3);
        assert_eq!(withdrawals(&budget), 3);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(withdrawals(&budget), 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(withdrawals(&budget), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn default_reserve_is_floor_times_window() {
        assert_eq!(RetryBudget::new().reserve_cap(), 100.0);
        let small = RetryBudget::builder().min_per_second(0).build().unwrap();
        assert_eq!(small.reserve_cap(), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_the_balance() {
        let budget = budget(1.0, 0);
        let clone = budget.clone();
        budget.deposit();
        assert!(clone.withdraw());
        assert!(!budget.withdraw());
    }

    #[test]
    fn invalid_values_are_rejected() {
        for ratio in [-0.1, f64::NAN, f64::INFINITY, 1000.5] {
            let error = RetryBudget::builder().ratio(ratio).build().unwrap_err();
            assert!(error.to_string().contains("budget ratio"), "{error}");
        }
        let error = RetryBudget::builder()
            .window(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(error.to_string().contains("window is 0s"), "{error}");
        let error = RetryBudget::builder().reserve(-1.0).build().unwrap_err();
        assert!(error.to_string().contains("budget reserve -1"), "{error}");
    }
}
