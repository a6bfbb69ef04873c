//! Property tests of the backoff schedules over random policies and retry numbers.

use std::time::Duration;

use proptest::prelude::*;
use tower_safe_retry::backoff::{Backoff, Jitter};

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
    ]
}

/// A valid exponential backoff: base at most cap, factor at least 1.
fn exponential() -> impl Strategy<Value = (Backoff, Duration, Duration)> {
    (
        0u64..=60_000_000_000,
        0u64..=600_000_000_000,
        1.0f64..1e6,
        jitter(),
    )
        .prop_map(|(base, extra, factor, jitter)| {
            let base = Duration::from_nanos(base);
            let cap = base + Duration::from_nanos(extra);
            let backoff = Backoff::exponential(base, cap)
                .factor(factor)
                .jitter(jitter);
            (backoff, base, cap)
        })
}

proptest! {
    #[test]
    fn delay_within_zero_and_cap(
        (backoff, _base, cap) in exponential(),
        retry in any::<u32>(),
        previous in 0u64..=u64::MAX / 4,
        seed in any::<u64>(),
    ) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let delay = backoff.delay(retry, Duration::from_nanos(previous), &mut rng);
        prop_assert!(delay <= cap, "{delay:?} > cap {cap:?}");
    }

    #[test]
    fn decorrelated_stays_at_or_above_base(
        (backoff, base, cap) in exponential(),
        retries in 1u32..50,
        seed in any::<u64>(),
    ) {
        let backoff = backoff.jitter(Jitter::Decorrelated);
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut previous = Duration::ZERO;
        for retry in 1..=retries {
            previous = backoff.delay(retry, previous, &mut rng);
            prop_assert!(previous >= base.min(cap), "{previous:?} < base {base:?}");
            prop_assert!(previous <= cap, "{previous:?} > cap {cap:?}");
        }
    }

    #[test]
    fn seeded_runs_reproduce(
        (backoff, _base, _cap) in exponential(),
        seed in any::<u64>(),
    ) {
        let run = || {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut previous = Duration::ZERO;
            (1..30u32)
                .map(|retry| {
                    previous = backoff.delay(retry, previous, &mut rng);
                    previous
                })
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(run(), run());
    }

    #[test]
    fn constant_is_constant(nanos in any::<u64>(), retry in any::<u32>(), seed in any::<u64>()) {
        let delay = Duration::from_nanos(nanos);
        let mut rng = fastrand::Rng::with_seed(seed);
        prop_assert_eq!(Backoff::constant(delay).delay(retry, Duration::ZERO, &mut rng), delay);
    }
}
