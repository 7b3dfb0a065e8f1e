//! One backoff policy for every retry loop of syncfleet: exponential with jitter (backon).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays that start near `min`, double each time (plus up to 100 % jitter, so a fleet that
/// failed together does not retry together) and stop growing at `max`. Endless: the caller
/// bounds the attempts.
pub fn delays(min: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let d: Vec<Duration> = delays(Duration::from_millis(100), Duration::from_secs(1)).take(10).collect();
        assert_eq!(d.len(), 10);
        assert!(d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(200), "{d:?}");
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)), "{d:?}");
        assert!(d[9] >= Duration::from_secs(1), "{d:?}");
    }
}
