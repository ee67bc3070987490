//! Speculative sampling shared by server and device (Leviathan et al. 2023), so both compute
//! the draft distribution `q` identically from the wire data.
//!
//! The server samples each draft from `q` = softmax(top-k logits / T) (nucleus `top_p` inside
//! the top-k), using logits rounded to f16 exactly as sent. The device, whose own distribution
//! at that position is `p`, accepts the draft with probability min(1, p/q), otherwise samples
//! from norm(max(0, p - q)); the emitted tokens then follow `p` exactly. Every draw at position
//! `pos` comes from [`rng_for`]`(seed, pos, stream)`, so a retried or re-prefilled round draws
//! the same numbers.

use half::f16;

/// A small deterministic generator (splitmix64) for draws keyed by (seed, position, stream).
#[derive(Debug, Clone)]
pub struct DrawRng(u64);

impl DrawRng {
    /// Next uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The generator for draws at `pos` (`stream` 0: server draft, 1: device accept/resample).
pub fn rng_for(seed: u64, pos: u64, stream: u64) -> DrawRng {
    DrawRng(
        seed ^ pos.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ stream.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7),
    )
}

/// Rounds logits to f16 and back (what the wire carries).
pub fn wire_round(logits: &[f32]) -> Vec<f32> {
    logits.iter().map(|&l| f16::from_f32(l).to_f32()).collect()
}

/// The sampling distribution over `ids` from their `logits`: softmax(logits / temperature),
/// restricted to the smallest prefix (by probability) with mass >= `top_p` (0 or >= 1: all).
/// Returns probabilities aligned with `ids` (zeros outside the nucleus).
pub fn distribution(logits: &[f32], temperature: f32, top_p: f32) -> Vec<f32> {
    if logits.is_empty() {
        return Vec::new();
    }
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|l| ((l - max) / t).exp()).collect();
    let sum: f32 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    if top_p > 0.0 && top_p < 1.0 {
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let mut cum = 0.0;
        let mut keep = vec![false; p.len()];
        for &i in &order {
            keep[i] = true;
            cum += p[i];
            if cum >= top_p {
                break;
            }
        }
        p.iter_mut().zip(&keep).for_each(|(x, k)| {
            if !k {
                *x = 0.0
            }
        });
        let s: f32 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= s);
    }
    p
}

/// Draws an index from probabilities `p` with uniform `u`.
pub fn draw(p: &[f32], u: f32) -> usize {
    let total: f32 = p.iter().sum();
    let mut cum = 0.0;
    for (i, &x) in p.iter().enumerate() {
        cum += x / total;
        if u < cum {
            return i;
        }
    }
    p.iter().rposition(|&x| x > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_and_draws() {
        let p = distribution(&[2.0, 1.0, 0.0], 1.0, 0.0);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[0] > p[1] && p[1] > p[2]);
        let n = distribution(&[2.0, 1.0, 0.0], 1.0, 0.5);
        assert_eq!(n[1], 0.0);
        assert_eq!(n[2], 0.0);
        assert_eq!(draw(&[0.0, 1.0, 0.0], 0.3), 1);
        // same key, same numbers; different position, different numbers
        assert_eq!(rng_for(1, 5, 0).uniform(), rng_for(1, 5, 0).uniform());
        assert_ne!(rng_for(1, 5, 0).uniform(), rng_for(1, 6, 0).uniform());
        // empirical frequencies follow the distribution
        let q = [0.5f32, 0.3, 0.2];
        let mut c = [0usize; 3];
        let mut r = rng_for(9, 0, 0);
        for _ in 0..20000 {
            c[draw(&q, r.uniform())] += 1;
        }
        for i in 0..3 {
            assert!((c[i] as f32 / 20000.0 - q[i]).abs() < 0.02);
        }
    }
}
