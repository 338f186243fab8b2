//! Median, p99 and max of a scenario's trials.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub trials: usize,
    pub median: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    /// Summarises `samples`, which must not be empty.
    pub fn of(mut samples: Vec<Duration>) -> Summary {
        assert!(!samples.is_empty(), "a scenario ran no trials");
        samples.sort_unstable();
        Summary {
            trials: samples.len(),
            median: nearest_rank(&samples, 0.50),
            p99: nearest_rank(&samples, 0.99),
            max: samples[samples.len() - 1],
        }
    }
}

/// The nearest-rank percentile of sorted `samples`: an observed value,
/// never an interpolation between two. With 30 trials p99 is the max.
fn nearest_rank(sorted: &[Duration], quantile: f64) -> Duration {
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `value` as a multiple of `baseline`.
pub fn ratio(value: Duration, baseline: Duration) -> f64 {
    value.as_secs_f64() / baseline.as_secs_f64()
}

/// Microseconds, for the table and the JSON.
pub fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
