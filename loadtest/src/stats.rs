//! Measurement plumbing: a monotonic microsecond clock, sharded HDR
//! histograms, error tallies and the JSON shapes they turn into.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Microseconds since the start of a run, never 0, so 0 can mean "unset" in
/// atomics that hold timestamps.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Self {
        Clock(Instant::now())
    }
    pub fn now_us(&self) -> u64 {
        self.0.elapsed().as_micros() as u64 + 1
    }
}

/// Microseconds of CLOCK_MONOTONIC: unlike `Instant`, comparable between
/// processes on one machine, so worker processes can timestamp arrivals
/// against a moment the parent took.
pub fn mono_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Highest latency a histogram tracks: one hour. Anything slower is clamped
/// (saturating_record) rather than dropped, so the count stays exact.
const MAX_US: u64 = 3_600_000_000;

fn new_hist() -> Histogram<u64> {
    // 3 significant digits: 0.1 % resolution, a few tens of KiB per histogram.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds are valid")
}

/// A histogram that many tasks record into. A handful of mutex-guarded shards
/// keeps contention negligible without a histogram per connection (which
/// would cost tens of KiB each).
pub struct Hist {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Hist {
    pub fn new() -> Self {
        Hist {
            shards: (0..16).map(|_| Mutex::new(new_hist())).collect(),
        }
    }

    pub fn record(&self, shard_hint: usize, us: u64) {
        let shard = &self.shards[shard_hint % self.shards.len()];
        if let Ok(mut h) = shard.lock() {
            h.saturating_record(us.max(1));
        }
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut out = new_hist();
        for s in &self.shards {
            if let Ok(h) = s.lock() {
                // Same bounds everywhere, so add cannot fail.
                let _ = out.add(&*h);
            }
        }
        out
    }
}

/// Flattens a histogram to (value, count) pairs: compact, lossless at the
/// histogram's resolution, and plain JSON, which is how worker processes hand
/// their histograms to the parent.
pub fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn from_pairs(pairs: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = new_hist();
    for &(v, n) in pairs {
        // Values arrive from another process: out-of-range ones are clamped
        // like saturating_record does, so counts stay exact.
        if h.record_n(v.max(1), n).is_err() {
            let _ = h.record_n(MAX_US, n);
        }
    }
    h
}

pub fn merge_pairs(into: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    let _ = into.add(from_pairs(pairs));
}

/// Latency percentiles in milliseconds, plus enough points of the cumulative
/// distribution for the report to draw it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// (latency ms, fraction of samples at or below it), ascending.
    pub cdf: Vec<(f64, f64)>,
}

impl LatencySummary {
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let total = h.len() as f64;
        // Quantile points thin out where the curve is flat: at most ~200
        // points however many distinct values were recorded.
        let mut cdf = Vec::new();
        let mut seen = 0u64;
        let mut last_frac = -1.0;
        for v in h.iter_recorded() {
            seen += v.count_at_value();
            let frac = seen as f64 / total;
            if frac - last_frac >= 0.005 || frac >= 0.999 || seen == h.len() {
                cdf.push((ms(h.highest_equivalent(v.value_iterated_to())), frac));
                last_frac = frac;
            }
        }
        LatencySummary {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            cdf,
        }
    }

    pub fn short(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

/// Failure tallies keyed by a short reason ("hello: timeout", "status 503").
#[derive(Default)]
pub struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    pub fn add(&self, key: impl Into<String>) {
        self.add_n(key, 1);
    }
    pub fn add_n(&self, key: impl Into<String>, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut m) = self.0.lock() {
            *m.entry(key.into()).or_insert(0) += n;
        }
    }
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
    pub fn total(&self) -> u64 {
        self.0.lock().map(|m| m.values().sum()).unwrap_or(0)
    }
}

pub fn merge_tally(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

/// One point of a rate-over-time series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RatePoint {
    /// Seconds since the phase being measured started (end of the interval).
    pub t_s: f64,
    /// Named rates per second over the interval ending at `t_s`.
    pub rates: BTreeMap<String, f64>,
}

/// Samples named monotonically increasing counters at a fixed interval and
/// turns them into per-second rates.
pub struct RateSampler {
    names: Vec<&'static str>,
    last: Vec<u64>,
    last_t: Instant,
    start: Instant,
    pub points: Vec<RatePoint>,
}

impl RateSampler {
    pub fn new(names: &[&'static str], initial: &[u64]) -> Self {
        let now = Instant::now();
        RateSampler {
            names: names.to_vec(),
            last: initial.to_vec(),
            last_t: now,
            start: now,
            points: Vec::new(),
        }
    }

    pub fn sample(&mut self, values: &[u64]) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_t).as_secs_f64();
        if dt <= 0.0 {
            return;
        }
        let mut rates = BTreeMap::new();
        for (i, name) in self.names.iter().enumerate() {
            let d = values[i].saturating_sub(self.last[i]);
            rates.insert(name.to_string(), d as f64 / dt);
        }
        self.points.push(RatePoint {
            t_s: now.duration_since(self.start).as_secs_f64(),
            rates,
        });
        self.last = values.to_vec();
        self.last_t = now;
    }
}

/// A duration from a user-supplied number of seconds: NaN and negatives
/// are zero, and anything past ten days is ten days, so deadlines built from
/// flags can neither panic nor overflow.
pub fn secs(x: f64) -> Duration {
    if x.is_nan() || x <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(x.min(864_000.0))
    }
}

/// The per-step timeout from `--timeout`: 10 ms to an hour, 10 s if NaN.
pub fn step_limit(x: f64) -> Duration {
    if x.is_nan() {
        Duration::from_secs(10)
    } else {
        secs(x.clamp(0.01, 3600.0))
    }
}

/// Sampling interval that yields a readable plot for a phase of this length.
pub fn sample_interval(expected: Duration) -> Duration {
    let target = expected.as_secs_f64() / 60.0;
    secs(target.clamp(0.1, 1.0))
}

/// Adds a value to an atomic maximum.
/// The median of the finite values, the mean of the middle two when their
/// number is even; `None` when there are none.
pub fn median(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub fn fetch_max(a: &AtomicU64, v: u64) {
    a.fetch_max(v, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_percentiles_and_cdf() {
        let hist = Hist::new();
        for i in 1..=1000u64 {
            hist.record(i as usize, i * 1000); // 1..1000 ms
        }
        let s = LatencySummary::from_hist(&hist.merged());
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "{}", s.p50_ms);
        assert!((s.p99_ms - 990.0).abs() < 1.5, "{}", s.p99_ms);
        assert!((s.max_ms - 1000.0).abs() < 1.5, "{}", s.max_ms);
        assert!(s.cdf.len() > 50 && s.cdf.len() < 400, "{}", s.cdf.len());
        assert!(s
            .cdf
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(s.cdf.last().unwrap().1, 1.0);
    }

    #[test]
    fn pairs_round_trip() {
        let hist = Hist::new();
        for v in [5u64, 5, 70, 12_000, 4_000_000_000] {
            hist.record(0, v);
        }
        let h = hist.merged();
        let back = from_pairs(&to_pairs(&h));
        assert_eq!(back.len(), 5);
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        let mut sum = from_pairs(&[]);
        merge_pairs(&mut sum, &to_pairs(&h));
        merge_pairs(&mut sum, &to_pairs(&h));
        assert_eq!(sum.len(), 10);
    }

    #[test]
    fn empty_summary_is_zero() {
        let s = LatencySummary::from_hist(&Hist::new().merged());
        assert_eq!(s.count, 0);
        assert!(s.cdf.is_empty());
        assert_eq!(s.short(), "no samples");
    }

    #[test]
    fn secs_never_panics() {
        assert_eq!(secs(f64::NAN), Duration::ZERO);
        assert_eq!(secs(-1.0), Duration::ZERO);
        assert_eq!(secs(f64::INFINITY), Duration::from_secs(864_000));
        assert_eq!(secs(1.5), Duration::from_millis(1500));
        assert_eq!(sample_interval(Duration::ZERO), Duration::from_millis(100));
    }

    #[test]
    fn monotonic_microseconds_advance() {
        let a = mono_us();
        std::thread::sleep(Duration::from_millis(3));
        let b = mono_us();
        assert!(b >= a + 2_000 && b < a + 1_000_000, "{a} {b}");
    }

    #[test]
    fn sampler_rates() {
        let mut s = RateSampler::new(&["a"], &[0]);
        std::thread::sleep(Duration::from_millis(20));
        s.sample(&[100]);
        let r = s.points[0].rates["a"];
        assert!(r > 100.0 && r < 100.0 / 0.019, "{r}");
    }
}
