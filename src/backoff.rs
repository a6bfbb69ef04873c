//! Delays between attempts: exponential with jitter, or constant.
//!
//! ```
//! use std::time::Duration;
//! use tower_safe_retry::backoff::{Backoff, Jitter};
//!
//! let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(20))
//!     .jitter(Jitter::None);
//! let mut rng = fastrand::Rng::with_seed(7);
//! assert_eq!(backoff.delay(1, Duration::ZERO, &mut rng), Duration::from_millis(100));
//! assert_eq!(backoff.delay(4, Duration::ZERO, &mut rng), Duration::from_millis(800));
//! assert_eq!(backoff.delay(u32::MAX, Duration::ZERO, &mut rng), Duration::from_secs(20));
//! ```

use std::time::Duration;

use fastrand::Rng;

/// The way a random part is mixed into an exponential delay.
///
/// `exp` below is `min(cap, base * factor^(retry - 1))`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Jitter {
    /// Exactly `exp`.
    None,
    /// Uniform in `[0, exp]`: the least correlated choice, and the default.
    #[default]
    Full,
    /// `exp / 2` plus a uniform part in `[0, exp / 2]`.
    Equal,
    /// Uniform in `[base, 3 * previous delay]`, clamped to `cap`.
    Decorrelated,
}

/// A backoff schedule. Exponential delays never exceed the cap and never overflow, at any
/// retry number.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Exponential {
        base: Duration,
        factor: f64,
        cap: Duration,
        jitter: Jitter,
    },
    Constant(Duration),
}

impl Backoff {
    /// Exponential backoff from `base`, doubling up to `cap`, with full jitter.
    pub const fn exponential(base: Duration, cap: Duration) -> Self {
        Backoff {
            kind: Kind::Exponential {
                base,
                factor: 2.0,
                cap,
                jitter: Jitter::Full,
            },
        }
    }

    /// Creates a backoff with the same delay before every retry, without jitter.
    pub const fn constant(delay: Duration) -> Self {
        Backoff {
            kind: Kind::Constant(delay),
        }
    }

    /// Sets the growth factor of an exponential backoff (at least 1). No effect on a
    /// constant backoff.
    pub const fn factor(mut self, factor: f64) -> Self {
        if let Kind::Exponential { factor: f, .. } = &mut self.kind {
            *f = factor;
        }
        self
    }

    /// Sets the jitter of an exponential backoff. No effect on a constant backoff.
    pub const fn jitter(mut self, jitter: Jitter) -> Self {
        if let Kind::Exponential { jitter: j, .. } = &mut self.kind {
            *j = jitter;
        }
        self
    }

    /// Returns the delay before retry number `retry` (1 is the delay after the first
    /// attempt failed). `previous` is the delay before the previous retry, used by
    /// [`Jitter::Decorrelated`].
    pub fn delay(&self, retry: u32, previous: Duration, rng: &mut Rng) -> Duration {
        let (base, factor, cap, jitter) = match self.kind {
            Kind::Constant(delay) => return delay,
            Kind::Exponential {
                base,
                factor,
                cap,
                jitter,
            } => (base, factor, cap, jitter),
        };

        let exp = exponential(base, factor, cap, retry);
        match jitter {
            Jitter::None => exp,
            Jitter::Full => uniform(rng, Duration::ZERO, exp),
            Jitter::Equal => {
                let half = exp / 2;
                half + uniform(rng, Duration::ZERO, exp - half)
            }
            Jitter::Decorrelated => {
                let previous = previous.max(base);
                let high = previous.saturating_mul(3).min(cap);
                uniform(rng, base.min(high), high)
            }
        }
    }

    /// Checks the values, returning a message that names the invalid one and the fix.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let Kind::Exponential {
            base, factor, cap, ..
        } = self.kind
        else {
            return Ok(());
        };

        if base > cap {
            return Err(format!(
                "backoff base {base:?} is above its cap {cap:?}; use a base at most the cap"
            ));
        }
        if !(factor >= 1.0 && factor.is_finite()) {
            return Err(format!(
                "backoff factor {factor} is invalid; use a finite factor of at least 1.0"
            ));
        }
        Ok(())
    }
}

/// `min(cap, base * factor^(retry - 1))`, saturating instead of overflowing.
fn exponential(base: Duration, factor: f64, cap: Duration, retry: u32) -> Duration {
    let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
    let seconds = base.as_secs_f64() * factor.powi(exponent);
    Duration::try_from_secs_f64(seconds).map_or(cap, |delay| delay.min(cap))
}

/// Draws a uniform sample in `[low, high]`, at nanosecond resolution.
fn uniform(rng: &mut Rng, low: Duration, high: Duration) -> Duration {
    let low = u64::try_from(low.as_nanos()).unwrap_or(u64::MAX);
    let high = u64::try_from(high.as_nanos()).unwrap_or(u64::MAX);
    if low >= high {
        return Duration::from_nanos(high);
    }
    Duration::from_nanos(rng.u64(low..=high))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(20);

    #[test]
    fn exponential_values_without_jitter() {
        let backoff = Backoff::exponential(BASE, CAP).jitter(Jitter::None);
        let mut rng = Rng::with_seed(1);
        let cases = [
            (0, BASE),
            (1, BASE),
            (2, Duration::from_millis(200)),
            (8, Duration::from_millis(12_800)),
            (9, CAP),
            (10, CAP),
            (64, CAP),
            (u32::MAX, CAP),
        ];
        for (retry, expected) in cases {
            let delay = backoff.delay(retry, Duration::ZERO, &mut rng);
            assert_eq!(delay, expected, "retry {retry}");
        }
    }

    #[test]
    fn full_jitter_stays_within_exp() {
        let backoff = Backoff::exponential(BASE, CAP);
        let mut rng = Rng::with_seed(2);
        for retry in [1, 2, 10, 64, u32::MAX] {
            for _ in 0..1000 {
                let delay = backoff.delay(retry, Duration::ZERO, &mut rng);
                let exp = exponential(BASE, 2.0, CAP, retry);
                assert!(delay <= exp, "retry {retry}: {delay:?} > {exp:?}");
            }
        }
    }

    #[test]
    fn equal_and_decorrelated_stay_within_bounds() {
        let mut rng = Rng::with_seed(3);
        let equal = Backoff::exponential(BASE, CAP).jitter(Jitter::Equal);
        let decorrelated = Backoff::exponential(BASE, CAP).jitter(Jitter::Decorrelated);
        let mut previous = Duration::ZERO;
        for retry in 1..200 {
            let exp = exponential(BASE, 2.0, CAP, retry);
            let delay = equal.delay(retry, Duration::ZERO, &mut rng);
            assert!(delay >= exp / 2, "equal, retry {retry}: {delay:?}");
            assert!(delay <= exp, "equal, retry {retry}: {delay:?}");

            previous = decorrelated.delay(retry, previous, &mut rng);
            assert!(
                previous >= BASE,
                "decorrelated, retry {retry}: {previous:?}"
            );
            assert!(previous <= CAP, "decorrelated, retry {retry}: {previous:?}");
        }
    }

    #[test]
    fn seeded_runs_repeat() {
        let backoff = Backoff::exponential(BASE, CAP);
        let run = |seed| {
            let mut rng = Rng::with_seed(seed);
            (1..20)
                .map(|retry| backoff.delay(retry, Duration::ZERO, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    #[test]
    fn huge_factor_saturates_to_cap() {
        let backoff = Backoff::exponential(BASE, CAP)
            .factor(1e300)
            .jitter(Jitter::None);
        let mut rng = Rng::with_seed(4);
        assert_eq!(backoff.delay(3, Duration::ZERO, &mut rng), CAP);
    }

    #[test]
    fn validate_rejects_bad_values() {
        let inverted = Backoff::exponential(CAP, BASE).validate().unwrap_err();
        assert!(inverted.contains("20s"), "{inverted}");
        for factor in [0.5, f64::NAN, f64::INFINITY] {
            let message = Backoff::exponential(BASE, CAP)
                .factor(factor)
                .validate()
                .unwrap_err();
            assert!(message.contains("factor"), "{message}");
        }
        assert_eq!(Backoff::constant(Duration::ZERO).validate(), Ok(()));
    }
}
