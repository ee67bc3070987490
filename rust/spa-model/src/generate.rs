//! Decoding: greedy, temperature / top-k / top-p sampling with a seed, and beam search, over
//! any [`Decoder`] (the base alone, or base + side network + gate).

use crate::base::{argmax, BaseModel};
use crate::error::{Result, SpaError};
use crate::kv_cache::KvCache;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A model that consumes tokens and yields next-token logits; forkable for beam search.
pub trait Decoder: Sized {
    /// Appends `tokens` at the current position and returns the logits that predict the next one.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    /// An independent copy of the decoding state.
    fn fork(&self) -> Result<Self>;
    /// Number of positions consumed so far.
    fn position(&self) -> usize;
    /// Rolls back to `pos` positions.
    fn truncate(&mut self, pos: usize);
}

/// The base model alone with its KV cache.
#[derive(Debug)]
pub struct BaseDecoder<'a> {
    model: &'a BaseModel,
    cache: KvCache,
}

impl BaseModel {
    /// A decoder over this model with an empty cache.
    pub fn decoder(&self) -> BaseDecoder<'_> {
        BaseDecoder {
            model: self,
            cache: self.new_cache(),
        }
    }
}

impl BaseDecoder<'_> {
    /// The KV cache (for callers that run the base forward themselves).
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }
}

impl Decoder for BaseDecoder<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let out = self.model.forward(tokens, &mut self.cache)?;
        self.model.last_logits(&out.hidden)
    }
    fn fork(&self) -> Result<Self> {
        Ok(Self {
            model: self.model,
            cache: self.cache.fork()?,
        })
    }
    fn position(&self) -> usize {
        self.cache.len()
    }
    fn truncate(&mut self, pos: usize) {
        self.cache.truncate(pos)
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Argmax.
    Greedy,
    /// Sample from softmax(logits / temperature), optionally restricted to the top-k ids and the
    /// smallest top-p nucleus; reproducible for a given seed.
    Sample {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Keep only the k most likely ids (None: all).
        top_k: Option<usize>,
        /// Keep the smallest set with cumulative probability >= top_p (None: all).
        top_p: Option<f32>,
        /// RNG seed.
        seed: u64,
    },
    /// Beam search with `width` beams and length penalty `alpha` (score / len^alpha).
    Beam {
        /// Number of beams.
        width: usize,
        /// Length penalty exponent.
        length_penalty: f32,
    },
}

/// Generation parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Maximum number of new tokens.
    pub max_tokens: usize,
    /// Decoding strategy.
    pub sampling: Sampling,
    /// Ids that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
}

impl GenerateParams {
    /// Greedy decoding of at most `max_tokens` tokens, no stop tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            sampling: Sampling::Greedy,
            stop_tokens: Vec::new(),
        }
    }

    /// Checks parameter ranges.
    pub fn validate(&self) -> Result<()> {
        match &self.sampling {
            Sampling::Sample {
                temperature,
                top_p,
                top_k,
                ..
            } => {
                if !(temperature.is_finite() && *temperature > 0.0) {
                    return Err(SpaError::InvalidConfig("temperature must be > 0".into()));
                }
                if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
                    return Err(SpaError::InvalidConfig("top_p must be in (0, 1]".into()));
                }
                if *top_k == Some(0) {
                    return Err(SpaError::InvalidConfig("top_k must be >= 1".into()));
                }
            }
            Sampling::Beam { width, .. } if *width == 0 => {
                return Err(SpaError::InvalidConfig("beam width must be >= 1".into()))
            }
            _ => {}
        }
        Ok(())
    }
}

/// Picks tokens from logits according to a [`Sampling`] rule (greedy or sampling).
#[derive(Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler; the RNG is seeded from the sampling seed (0 for greedy).
    pub fn new(sampling: Sampling) -> Self {
        let seed = match &sampling {
            Sampling::Sample { seed, .. } => *seed,
            _ => 0,
        };
        Self {
            sampling,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The filtered, normalised distribution the sampler draws from (ids, probabilities),
    /// sorted by decreasing probability.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let (temperature, top_k, top_p) = match &self.sampling {
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => (*temperature, *top_k, *top_p),
            _ => (1.0, Some(1), None),
        };
        let mut idx: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / temperature))
            .collect();
        idx.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = top_k {
            idx.truncate(k.max(1));
        }
        let max = idx.first().map(|x| x.1).unwrap_or(0.0);
        let mut sum = 0.0;
        for p in idx.iter_mut() {
            p.1 = (p.1 - max).exp();
            sum += p.1;
        }
        for p in idx.iter_mut() {
            p.1 /= sum;
        }
        if let Some(top_p) = top_p {
            let mut cum = 0.0;
            let mut keep = idx.len();
            for (i, p) in idx.iter().enumerate() {
                cum += p.1;
                if cum >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            idx.truncate(keep);
            let s: f32 = idx.iter().map(|p| p.1).sum();
            idx.iter_mut().for_each(|p| p.1 /= s);
        }
        idx
    }

    /// Chooses the next token.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if let Sampling::Greedy | Sampling::Beam { .. } = self.sampling {
            return argmax(logits)
                .map(|i| i as u32)
                .ok_or_else(|| SpaError::InvalidConfig("empty logits".into()));
        }
        let dist = self.distribution(logits);
        let r: f32 = self.rng.random();
        let mut cum = 0.0;
        for &(id, p) in &dist {
            cum += p;
            if r < cum {
                return Ok(id);
            }
        }
        dist.last()
            .map(|x| x.0)
            .ok_or_else(|| SpaError::InvalidConfig("no finite logits".into()))
    }
}

/// Generates up to `params.max_tokens` tokens after `prompt`. `on_token` is called for each
/// emitted token (for beam search: once the best beam is known); returning `false` stops early.
/// Returns the generated ids (stop token excluded).
pub fn generate<D: Decoder>(
    dec: &mut D,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(SpaError::InvalidConfig("empty prompt".into()));
    }
    if let Sampling::Beam {
        width,
        length_penalty,
    } = params.sampling
    {
        let out = beam_search(dec, prompt, params, width, length_penalty)?;
        for &t in &out {
            if !on_token(t) {
                break;
            }
        }
        return Ok(out);
    }
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut logits = dec.feed(prompt)?;
    let mut out = Vec::new();
    while out.len() < params.max_tokens {
        let t = sampler.sample(&logits)?;
        if params.stop_tokens.contains(&t) {
            break;
        }
        out.push(t);
        if !on_token(t) || out.len() == params.max_tokens {
            break;
        }
        logits = dec.feed(&[t])?;
    }
    Ok(out)
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|l| l - lse).collect()
}

struct Beam<D> {
    dec: D,
    tokens: Vec<u32>,
    score: f32,
    logits: Vec<f32>,
}

fn beam_search<D: Decoder>(
    dec: &mut D,
    prompt: &[u32],
    params: &GenerateParams,
    width: usize,
    alpha: f32,
) -> Result<Vec<u32>> {
    let norm = |score: f32, len: usize| score / (len.max(1) as f32).powf(alpha);
    let logits = dec.feed(prompt)?;
    let mut beams = vec![Beam {
        dec: dec.fork()?,
        tokens: vec![],
        score: 0.0,
        logits,
    }];
    let mut finished: Vec<(Vec<u32>, f32)> = Vec::new();
    for _step in 0..params.max_tokens {
        // (beam index, token, new score)
        let mut cands: Vec<(usize, u32, f32)> = Vec::new();
        for (bi, b) in beams.iter().enumerate() {
            let lp = log_softmax(&b.logits);
            let mut ids: Vec<usize> = (0..lp.len()).collect();
            let k = (2 * width).min(ids.len());
            ids.select_nth_unstable_by(k - 1, |&a, &c| lp[c].total_cmp(&lp[a]));
            for &i in &ids[..k] {
                cands.push((bi, i as u32, b.score + lp[i]));
            }
        }
        cands.sort_by(|a, b| b.2.total_cmp(&a.2));
        let mut next: Vec<(usize, u32, f32)> = Vec::new();
        for c in cands {
            if params.stop_tokens.contains(&c.1) {
                let b = &beams[c.0];
                finished.push((b.tokens.clone(), norm(c.2, b.tokens.len() + 1)));
            } else {
                next.push(c);
            }
            if next.len() == width {
                break;
            }
        }
        let best_live = next.first().map(|c| norm(c.2, beams[c.0].tokens.len() + 1));
        let best_done = finished
            .iter()
            .map(|f| f.1)
            .fold(f32::NEG_INFINITY, f32::max);
        if next.is_empty() || best_live.is_some_and(|l| finished.len() >= width && best_done >= l) {
            break;
        }
        // Reuse a parent's state for its first child, fork for the others.
        let mut parents: Vec<Option<Beam<D>>> = beams.into_iter().map(Some).collect();
        let mut uses = vec![0usize; parents.len()];
        for c in &next {
            uses[c.0] += 1;
        }
        let mut new_beams = Vec::with_capacity(next.len());
        for (bi, tok, score) in next {
            uses[bi] -= 1;
            let (mut d, mut tokens) = if uses[bi] == 0 {
                let p = parents[bi]
                    .take()
                    .expect("parent used once more than counted");
                (p.dec, p.tokens)
            } else {
                let p = parents[bi].as_ref().expect("parent present");
                (p.dec.fork()?, p.tokens.clone())
            };
            tokens.push(tok);
            let logits = if tokens.len() < params.max_tokens {
                d.feed(&[tok])?
            } else {
                Vec::new()
            };
            new_beams.push(Beam {
                dec: d,
                tokens,
                score,
                logits,
            });
        }
        beams = new_beams;
        if beams.iter().all(|b| b.tokens.len() >= params.max_tokens) {
            break;
        }
    }
    for b in beams {
        let l = b.tokens.len();
        finished.push((b.tokens, norm(b.score, l)));
    }
    finished.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(finished.into_iter().next().map(|f| f.0).unwrap_or_default())
}
