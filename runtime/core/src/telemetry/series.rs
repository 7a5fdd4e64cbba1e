//! The last hour of each function, minute by minute, for the console's metrics page
//! (`GET /v1/metrics`): invocations by outcome and a duration histogram per minute, in a ring of
//! [`MINUTES`] slots. Kiln keeps it itself so that a console needs no Prometheus.
//!
//! Hot-path cost: the minute number (one clock read), then the same relaxed increments as the
//! Prometheus counters, in the slot of that minute. The first invocation of a new minute claims
//! its slot by swapping the minute number in and zeroes it; an increment racing that zeroing may
//! be lost, an error of a few counts once a minute that a console can live with (an exact count
//! is what `/metrics` is for).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::metrics::{bucket_of, Counter, Outcome, BUCKETS};

/// Slots in the ring: one hour.
pub const MINUTES: usize = 60;

#[derive(Default)]
struct Minute {
    /// Which minute (since the Unix epoch) the counters are of; a slot holding an older minute
    /// counts as empty.
    minute: AtomicU64,
    outcomes: [Counter; 4],
    buckets: [Counter; BUCKETS.len() + 1],
}

/// One function's ring of minutes.
pub struct Series {
    minutes: [Minute; MINUTES],
}

impl Default for Series {
    fn default() -> Self {
        Series {
            minutes: std::array::from_fn(|_| Minute::default()),
        }
    }
}

/// One minute as read: counts by outcome and the duration histogram of those that ran.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MinuteStats {
    /// Minutes since the Unix epoch.
    pub minute: u64,
    pub success: u64,
    pub failed: u64,
    pub timeout: u64,
    pub rejected: u64,
    /// Per bucket of [`BUCKETS`] (not cumulative); the last is `+Inf`.
    pub buckets: [u64; BUCKETS.len() + 1],
}

impl MinuteStats {
    /// Invocations that ran: the rejected ones never did.
    pub fn ran(&self) -> u64 {
        self.success + self.failed + self.timeout
    }

    /// Adds another minute's counts (to sum a window).
    pub fn add(&mut self, other: &MinuteStats) {
        self.success += other.success;
        self.failed += other.failed;
        self.timeout += other.timeout;
        self.rejected += other.rejected;
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine += theirs;
        }
    }

    /// The `q` quantile (0..=1) of the durations, in seconds, interpolated linearly inside the
    /// bucket it falls in (so no finer than the buckets); `None` when nothing ran. Past the last
    /// finite bound it answers that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).max(1.0);
        let mut below = 0u64;
        for (i, count) in self.buckets.iter().enumerate() {
            if *count > 0 && (below + count) as f64 >= rank {
                let Some(upper) = BUCKETS.get(i) else {
                    return Some(BUCKETS[BUCKETS.len() - 1]);
                };
                let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                let within = (rank - below as f64) / *count as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += count;
        }
        Some(BUCKETS[BUCKETS.len() - 1])
    }
}

impl Series {
    pub fn observe(&self, minute: u64, outcome: Outcome, duration: Duration) {
        let slot = &self.minutes[(minute % MINUTES as u64) as usize];
        let held = slot.minute.load(Ordering::Acquire);
        if held < minute
            && slot
                .minute
                .compare_exchange(held, minute, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for counter in slot.outcomes.iter().chain(&slot.buckets) {
                counter.reset();
            }
        }
        slot.outcomes[outcome as usize].inc();
        if outcome != Outcome::Rejected {
            slot.buckets[bucket_of(duration)].inc();
        }
    }

    /// The [`MINUTES`] minutes up to and including `now` (minutes since the epoch), oldest first;
    /// a minute without invocations is all zeros.
    pub fn last_hour(&self, now: u64) -> Vec<MinuteStats> {
        let first = now.saturating_sub(MINUTES as u64 - 1);
        (first..=now)
            .map(|minute| {
                let slot = &self.minutes[(minute % MINUTES as u64) as usize];
                let mut stats = MinuteStats {
                    minute,
                    ..Default::default()
                };
                if slot.minute.load(Ordering::Acquire) == minute {
                    let [success, failed, timeout, rejected] = std::array::from_fn(|i| slot.outcomes[i].get());
                    (stats.success, stats.failed, stats.timeout, stats.rejected) = (success, failed, timeout, rejected);
                    stats.buckets = std::array::from_fn(|i| slot.buckets[i].get());
                }
                stats
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_are_counted_apart_and_an_old_slot_is_reused() {
        let series = Series::default();
        let now = 29_000_000;
        series.observe(now - 1, Outcome::Success, Duration::from_millis(2));
        series.observe(now, Outcome::Success, Duration::from_millis(2));
        series.observe(now, Outcome::Failed, Duration::from_millis(20));
        series.observe(now, Outcome::Rejected, Duration::ZERO);
        let hour = series.last_hour(now);
        assert_eq!(hour.len(), MINUTES);
        assert_eq!(hour[0].minute, now - 59);
        let last = &hour[MINUTES - 1];
        assert_eq!((last.success, last.failed, last.rejected, last.ran()), (1, 1, 1, 2));
        assert_eq!(hour[MINUTES - 2].success, 1);
        assert_eq!(hour[..MINUTES - 2].iter().map(MinuteStats::ran).sum::<u64>(), 0);

        // An hour later the same slot holds the new minute only.
        series.observe(now + 60, Outcome::Timeout, Duration::from_secs(1));
        let later = series.last_hour(now + 60);
        assert_eq!((later[MINUTES - 1].timeout, later[MINUTES - 1].success), (1, 0));
        assert_eq!(
            later[..MINUTES - 1].iter().map(MinuteStats::ran).sum::<u64>(),
            0,
            "{later:?}"
        );
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let series = Series::default();
        // 98 in the bucket (0.5, 1] ms, 2 in (25, 50] ms.
        for _ in 0..98 {
            series.observe(1_000, Outcome::Success, Duration::from_micros(700));
        }
        for _ in 0..2 {
            series.observe(1_000, Outcome::Success, Duration::from_millis(40));
        }
        let minute = &series.last_hour(1_000)[MINUTES - 1];
        let p50 = minute.quantile(0.5).unwrap();
        assert!((0.0005..=0.001).contains(&p50), "{p50}");
        let p99 = minute.quantile(0.99).unwrap();
        assert!((0.025..=0.05).contains(&p99), "{p99}");
        assert_eq!(MinuteStats::default().quantile(0.5), None);
    }
}
