//! Bootstrap confidence intervals for the evaluation's per-example scores.
//!
//! - [`bootstrap_mean_ci`]: the percentile interval of a mean (resample the test examples with
//!   replacement, take the mean of each resample, read the `(1 - level) / 2` and
//!   `(1 + level) / 2` quantiles of those means).
//! - [`paired_bootstrap`]: the same for the mean of `a - b` over paired scores (two methods on
//!   the same test examples): one set of resampled example indices is applied to both methods,
//!   so the per-example correlation between them cancels and the interval is as narrow as the
//!   data allow.
//!
//! The generator is SplitMix64 written out here, so an interval depends on the data and the
//! seed only, never on a dependency's version. Quantiles interpolate linearly between order
//! statistics (numpy's default).

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};

/// Resamples of the evaluation's intervals.
pub const RESAMPLES: usize = 1000;
/// Seed of the evaluation's intervals.
pub const SEED: u64 = 0x5ba_b007;
/// Coverage of the evaluation's intervals.
pub const LEVEL: f64 = 0.95;

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and fixed forever.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform index in `0..n` (multiply-shift; the bias is below 2^-50 for our n).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// Mean difference of paired scores and its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedDiff {
    /// Mean of `a - b`.
    pub mean_diff: f64,
    /// Percentile bootstrap interval of the mean difference.
    pub ci: (f64, f64),
    /// Pairs.
    pub n: usize,
}

/// The `q` quantile (0..=1) of ascending `sorted`, interpolated linearly between order
/// statistics; NaN when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn check(n: usize, resamples: usize, level: f64) -> Result<()> {
    if n == 0 {
        return Err(TrainError::Data("bootstrap of no scores".into()));
    }
    if resamples == 0 || !(level > 0.0 && level < 1.0) {
        return Err(TrainError::Config(format!(
            "bootstrap needs resamples > 0 and 0 < level < 1 (got {resamples}, {level})"
        )));
    }
    Ok(())
}

/// Means of `f` over `resamples` resamples of the indices `0..n`, sorted; then the interval.
fn percentile_interval(
    n: usize,
    resamples: usize,
    seed: u64,
    level: f64,
    f: impl Fn(usize) -> f64,
) -> (f64, f64) {
    let mut rng = SplitMix64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| f(rng.below(n))).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    (quantile(&means, tail), quantile(&means, 1.0 - tail))
}

/// Percentile bootstrap interval of the mean of `xs` (`level` coverage, e.g. 0.95).
pub fn bootstrap_mean_ci(
    xs: &[f64],
    resamples: usize,
    seed: u64,
    level: f64,
) -> Result<(f64, f64)> {
    check(xs.len(), resamples, level)?;
    Ok(percentile_interval(xs.len(), resamples, seed, level, |i| {
        xs[i]
    }))
}

/// Paired bootstrap of `mean(a - b)`: `a[i]` and `b[i]` are two methods' scores on the same
/// example `i`, and every resample draws example indices once for both.
pub fn paired_bootstrap(
    a: &[f64],
    b: &[f64],
    resamples: usize,
    seed: u64,
    level: f64,
) -> Result<PairedDiff> {
    if a.len() != b.len() {
        return Err(TrainError::Data(format!(
            "paired bootstrap needs the same examples for both methods ({} vs {} scores)",
            a.len(),
            b.len()
        )));
    }
    check(a.len(), resamples, level)?;
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    Ok(PairedDiff {
        mean_diff: mean(&d),
        ci: percentile_interval(d.len(), resamples, seed, level, |i| d[i]),
        n: d.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-normal noise (sum of 12 uniforms - 6).
    fn noise(rng: &mut SplitMix64) -> f64 {
        (0..12)
            .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
            .sum::<f64>()
            - 6.0
    }

    #[test]
    fn quantile_interpolates_between_order_statistics() {
        let s = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&s, 0.5), 3.0);
        assert_eq!(quantile(&s, 0.25), 2.0);
        assert!((quantile(&s, 0.1) - 1.4).abs() < 1e-12);
        assert_eq!(quantile(&s, 0.0), 1.0);
        assert_eq!(quantile(&s, 1.0), 5.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn interval_of_a_known_mean() {
        // 0..49: mean 24.5, standard error of the mean sqrt(208.25 / 50) = 2.04, so the 95%
        // interval is about 24.5 +- 4.0.
        let xs: Vec<f64> = (0..50).map(|i| i as f64).collect();
        let (lo, hi) = bootstrap_mean_ci(&xs, RESAMPLES, SEED, LEVEL).unwrap();
        assert!(lo < 24.5 && 24.5 < hi, "[{lo}, {hi}]");
        assert!((19.5..22.0).contains(&lo), "lo {lo}");
        assert!((27.0..29.5).contains(&hi), "hi {hi}");
        // A wider level gives a wider interval.
        let (lo99, hi99) = bootstrap_mean_ci(&xs, RESAMPLES, SEED, 0.99).unwrap();
        assert!(lo99 < lo && hi99 > hi);
        // Constant data: no spread at all.
        assert_eq!(
            bootstrap_mean_ci(&[7.0; 20], RESAMPLES, SEED, LEVEL).unwrap(),
            (7.0, 7.0)
        );
    }

    #[test]
    fn interval_excludes_zero_for_a_clear_effect_and_not_for_noise() {
        let mut rng = SplitMix64(3);
        let clear: Vec<f64> = (0..40).map(|_| 2.0 + noise(&mut rng)).collect();
        let (lo, hi) = bootstrap_mean_ci(&clear, RESAMPLES, SEED, LEVEL).unwrap();
        assert!(lo > 0.0 && lo < 2.0 && hi > 2.0, "[{lo}, {hi}]");
        let centred: Vec<f64> = clear.iter().map(|x| x - mean(&clear)).collect();
        let (lo, hi) = bootstrap_mean_ci(&centred, RESAMPLES, SEED, LEVEL).unwrap();
        assert!(lo < 0.0 && hi > 0.0, "[{lo}, {hi}]");
    }

    #[test]
    fn pairing_removes_the_shared_variation() {
        // Scores that vary a lot between examples (sd 20) and a method that adds 1 point to
        // every example, plus a little noise of its own.
        let mut rng = SplitMix64(11);
        let b: Vec<f64> = (0..100).map(|_| 40.0 + 20.0 * noise(&mut rng)).collect();
        let a: Vec<f64> = b.iter().map(|x| x + 1.0 + 0.3 * noise(&mut rng)).collect();
        let p = paired_bootstrap(&a, &b, RESAMPLES, SEED, LEVEL).unwrap();
        assert_eq!(p.n, 100);
        assert!((p.mean_diff - (mean(&a) - mean(&b))).abs() < 1e-9);
        assert!(
            p.ci.0 > 0.0 && p.ci.0 < 1.0 && p.ci.1 > 1.0,
            "paired {:?}",
            p.ci
        );
        // Unpaired: the two means' intervals, resampled independently, overlap widely.
        let (alo, ahi) = bootstrap_mean_ci(&a, RESAMPLES, SEED, LEVEL).unwrap();
        let (blo, bhi) = bootstrap_mean_ci(&b, RESAMPLES, SEED + 1, LEVEL).unwrap();
        assert!(alo < bhi && blo < ahi, "the unpaired intervals overlap");
        let unpaired_width = ((ahi - alo).powi(2) + (bhi - blo).powi(2)).sqrt();
        let paired_width = p.ci.1 - p.ci.0;
        assert!(
            paired_width * 10.0 < unpaired_width,
            "paired {paired_width} vs unpaired {unpaired_width}"
        );
        // The sign flips with the order.
        let q = paired_bootstrap(&b, &a, RESAMPLES, SEED, LEVEL).unwrap();
        assert!((q.mean_diff + p.mean_diff).abs() < 1e-12);
        assert!((q.ci.0 + p.ci.1).abs() < 1e-9 && (q.ci.1 + p.ci.0).abs() < 1e-9);
    }

    #[test]
    fn same_seed_same_interval() {
        let xs: Vec<f64> = (0..30).map(|i| ((i * 7919) % 100) as f64).collect();
        let a = bootstrap_mean_ci(&xs, RESAMPLES, 42, LEVEL).unwrap();
        assert_eq!(a, bootstrap_mean_ci(&xs, RESAMPLES, 42, LEVEL).unwrap());
        assert_ne!(a, bootstrap_mean_ci(&xs, RESAMPLES, 43, LEVEL).unwrap());
        // Pinned: the generator and the quantile rule are part of the results' definition.
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(bootstrap_mean_ci(&[], RESAMPLES, SEED, LEVEL).is_err());
        assert!(bootstrap_mean_ci(&[1.0], 0, SEED, LEVEL).is_err());
        assert!(bootstrap_mean_ci(&[1.0], RESAMPLES, SEED, 1.0).is_err());
        assert!(paired_bootstrap(&[1.0, 2.0], &[1.0], RESAMPLES, SEED, LEVEL).is_err());
        assert!(paired_bootstrap(&[], &[], RESAMPLES, SEED, LEVEL).is_err());
    }
}
