//! The shared, frozen down-projection `D_i` from base taps to the side width.
//!
//! It is not personal: it is computed once per base (PCA of base activations on a general
//! corpus, whitened) and published with the base, so the server applies it and sends `width`
//! int8 values per tapped layer instead of `hidden` f16 values (DESIGN.md section 2).
//!
//! `D_i(h) = P_i * (h / rms(h)) + b_i`, `P_i: [width, hidden]`.

use crate::base::{sha256_hex, BaseModel};
use crate::error::{Result, SpaError};
use crate::io;
use crate::side::F32Tensor;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Version of the projection scheme (bump when the formula changes).
pub const PROJECTION_VERSION: u32 = 1;

/// Identity fields of a projection (stored in its file and in side weights made for it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionMeta {
    /// Identity (sha256) of the base it was computed for.
    pub base: String,
    /// Scheme version.
    pub version: u32,
    /// Output width.
    pub width: usize,
    /// Base layers projected.
    pub taps: Vec<usize>,
    /// Base hidden size.
    pub hidden: usize,
    /// How it was made ("pca:<n positions>" or "random:<seed>").
    pub method: String,
}

/// The down-projection for every tapped layer.
#[derive(Debug, Clone, PartialEq)]
pub struct DownProjection {
    meta: ProjectionMeta,
    mats: Vec<Vec<f32>>,
    bias: Vec<Vec<f32>>,
    fingerprint: String,
}

fn normalize(h: &[f32]) -> Vec<f32> {
    let ms = h.iter().map(|v| v * v).sum::<f32>() / h.len().max(1) as f32;
    let r = 1.0 / (ms + 1e-6).sqrt();
    h.iter().map(|v| v * r).collect()
}

impl DownProjection {
    fn finish(meta: ProjectionMeta, mats: Vec<Vec<f32>>, bias: Vec<Vec<f32>>) -> Self {
        let mut bytes = serde_json::to_vec(&meta).unwrap_or_default();
        for v in mats.iter().chain(bias.iter()) {
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
        let fingerprint = sha256_hex(&bytes)[..16].to_string();
        Self {
            meta,
            mats,
            bias,
            fingerprint,
        }
    }

    /// A random orthogonal-ish projection (tests, or before PCA is available).
    pub fn random(base: &BaseModel, width: usize, taps: &[usize], seed: u64) -> Result<Self> {
        let d = base.config().hidden;
        let mut rng = StdRng::seed_from_u64(seed);
        let scale = (3.0f32 / d as f32).sqrt() * (d as f32 / width as f32).sqrt();
        let mats = taps
            .iter()
            .map(|_| {
                (0..width * d)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
                    .collect()
            })
            .collect();
        let bias = taps.iter().map(|_| vec![0.0; width]).collect();
        let meta = ProjectionMeta {
            base: base.identity().to_string(),
            version: PROJECTION_VERSION,
            width,
            taps: taps.to_vec(),
            hidden: d,
            method: format!("random:{seed}"),
        };
        Ok(Self::finish(meta, mats, bias))
    }

    /// PCA initialisation from base activations: for each tapped layer, the top-`width`
    /// principal directions of the normalised hidden states over `texts` (token sequences),
    /// whitened so every output has unit variance on that corpus.
    pub fn pca(base: &BaseModel, texts: &[Vec<u32>], width: usize, taps: &[usize]) -> Result<Self> {
        let d = base.config().hidden;
        if width > d {
            return Err(SpaError::InvalidConfig(format!(
                "width {width} > hidden {d}"
            )));
        }
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); taps.len()];
        let mut n = 0usize;
        for t in texts {
            let mut cache = base.new_cache();
            let out = base.forward(t, &mut cache)?;
            for (j, &layer) in taps.iter().enumerate() {
                let x: Vec<Vec<f32>> = out.taps[layer].to_vec2()?;
                for r in x {
                    rows[j].extend(normalize(&r));
                }
            }
            n += t.len();
        }
        if n < width {
            return Err(SpaError::InvalidConfig(format!(
                "PCA needs at least {width} positions, got {n}"
            )));
        }
        let mut mats = Vec::new();
        let mut bias = Vec::new();
        for r in rows {
            let x = Tensor::from_vec(r, (n, d), &Device::Cpu)?;
            let mean = x.mean_keepdim(0)?;
            let xc = x.broadcast_sub(&mean)?;
            let cov = (xc.t()?.matmul(&xc)? / n as f64)?; // [d, d]
            let (vecs, vals) = top_eigen(&cov, width, 60)?;
            let mean: Vec<f32> = mean.flatten_all()?.to_vec1()?;
            let mut p = vec![0f32; width * d];
            let mut b = vec![0f32; width];
            for k in 0..width {
                let s = 1.0 / (vals[k].max(0.0) + 1e-6).sqrt();
                for c in 0..d {
                    p[k * d + c] = vecs[k][c] * s;
                }
                b[k] = -(0..d).map(|c| p[k * d + c] * mean[c]).sum::<f32>();
            }
            mats.push(p);
            bias.push(b);
        }
        let meta = ProjectionMeta {
            base: base.identity().to_string(),
            version: PROJECTION_VERSION,
            width,
            taps: taps.to_vec(),
            hidden: d,
            method: format!("pca:{n}"),
        };
        Ok(Self::finish(meta, mats, bias))
    }

    /// The published projection for `base`: PCA over [`crate::corpus::GENERAL_TEXT`], cached
    /// in `cache_dir` (computed once, then loaded; a corrupt cache file is recomputed).
    pub fn published(
        base: &BaseModel,
        width: usize,
        taps: &[usize],
        cache_dir: &Path,
    ) -> Result<Self> {
        let taps_id = sha256_hex(format!("{taps:?}").as_bytes());
        let file = cache_dir.join(format!(
            "{}-w{width}-t{}-v{PROJECTION_VERSION}.safetensors",
            &base.identity()[..16],
            &taps_id[..8]
        ));
        if file.exists() {
            match Self::load(&file) {
                Ok(p)
                    if p.meta.base == base.identity()
                        && p.meta.width == width
                        && p.meta.taps == taps =>
                {
                    return Ok(p)
                }
                Ok(_) => log::warn!(
                    "projection cache {} does not match; recomputing",
                    file.display()
                ),
                Err(e) => log::warn!(
                    "projection cache {} unreadable ({e}); recomputing",
                    file.display()
                ),
            }
        }
        let texts = crate::corpus::GENERAL_TEXT
            .iter()
            .map(|t| base.tokenizer().encode(t))
            .collect::<Result<Vec<_>>>()?;
        log::info!(
            "computing PCA projection (width {width}, {} taps)",
            taps.len()
        );
        let p = Self::pca(base, &texts, width, taps)?;
        if let Err(e) = p.save(&file) {
            log::warn!("could not cache projection at {}: {e}", file.display());
        }
        Ok(p)
    }

    /// Metadata.
    pub fn meta(&self) -> &ProjectionMeta {
        &self.meta
    }

    /// Short content hash (16 hex chars) of the weights and metadata.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Projects one base hidden vector of tap index `i` (index into `taps`, not layer number).
    pub fn apply(&self, i: usize, h: &[f32]) -> Result<Vec<f32>> {
        let d = self.meta.hidden;
        if h.len() != d || i >= self.mats.len() {
            return Err(SpaError::WrongShape {
                name: "projection input".into(),
                expected: vec![self.mats.len(), d],
                got: vec![i, h.len()],
            });
        }
        let x = normalize(h);
        let p = &self.mats[i];
        Ok((0..self.meta.width)
            .map(|k| {
                self.bias[i][k]
                    + p[k * d..(k + 1) * d]
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
            })
            .collect())
    }

    /// Projects the taps of a base forward pass: result `[position][tap][width]`.
    pub fn apply_taps(&self, taps: &[Tensor]) -> Result<Vec<Vec<Vec<f32>>>> {
        let rows: Vec<Vec<Vec<f32>>> = self
            .meta
            .taps
            .iter()
            .map(|&l| {
                taps.get(l)
                    .ok_or_else(|| {
                        SpaError::InvalidConfig(format!("tap {l} not in forward output"))
                    })
                    .and_then(|t| Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?))
            })
            .collect::<Result<_>>()?;
        let seq = rows.first().map(|r| r.len()).unwrap_or(0);
        (0..seq)
            .map(|p| {
                (0..rows.len())
                    .map(|i| self.apply(i, &rows[i][p]))
                    .collect()
            })
            .collect()
    }

    /// Saves to safetensors (atomic).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t = BTreeMap::new();
        for (i, (m, b)) in self.mats.iter().zip(&self.bias).enumerate() {
            t.insert(
                format!("proj.{i}.weight"),
                F32Tensor {
                    shape: vec![self.meta.width, self.meta.hidden],
                    data: m.clone(),
                },
            );
            t.insert(
                format!("proj.{i}.bias"),
                F32Tensor {
                    shape: vec![self.meta.width],
                    data: b.clone(),
                },
            );
        }
        let meta = serde_json::to_string(&self.meta)
            .map_err(|e| SpaError::InvalidConfig(e.to_string()))?;
        io::save_f32(path, &t, &meta)
    }

    /// Loads from safetensors, checking shapes.
    pub fn load(path: &Path) -> Result<Self> {
        let (mut t, meta) = io::load_f32(path)?;
        let meta: ProjectionMeta = serde_json::from_str(&meta)
            .map_err(|e| SpaError::safetensors(path, format!("bad metadata: {e}")))?;
        let mut mats = Vec::new();
        let mut bias = Vec::new();
        for i in 0..meta.taps.len() {
            let mut take = |name: String, shape: Vec<usize>| -> Result<Vec<f32>> {
                let x = t
                    .remove(&name)
                    .ok_or_else(|| SpaError::safetensors(path, format!("missing {name}")))?;
                if x.shape != shape {
                    return Err(SpaError::WrongShape {
                        name,
                        expected: shape,
                        got: x.shape,
                    });
                }
                Ok(x.data)
            };
            mats.push(take(
                format!("proj.{i}.weight"),
                vec![meta.width, meta.hidden],
            )?);
            bias.push(take(format!("proj.{i}.bias"), vec![meta.width])?);
        }
        Ok(Self::finish(meta, mats, bias))
    }
}

/// Top-`k` eigenvectors/values of a symmetric PSD matrix by orthogonal (subspace) iteration.
fn top_eigen(c: &Tensor, k: usize, iters: usize) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
    let d = c.dim(0)?;
    let mut rng = StdRng::seed_from_u64(7);
    let mut v: Vec<f32> = (0..d * k).map(|_| rng.random::<f32>() - 0.5).collect(); // [d, k]
    for _ in 0..iters {
        let vt = Tensor::from_vec(v.clone(), (d, k), &Device::Cpu)?;
        v = c.matmul(&vt)?.flatten_all()?.to_vec1()?;
        gram_schmidt(&mut v, d, k);
    }
    let vt = Tensor::from_vec(v.clone(), (d, k), &Device::Cpu)?;
    let cv: Vec<f32> = c.matmul(&vt)?.flatten_all()?.to_vec1()?;
    let mut pairs: Vec<(Vec<f32>, f32)> = (0..k)
        .map(|j| {
            let col: Vec<f32> = (0..d).map(|r| v[r * k + j]).collect();
            let lam = (0..d).map(|r| col[r] * cv[r * k + j]).sum::<f32>();
            (col, lam)
        })
        .collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(pairs.into_iter().unzip())
}

/// Orthonormalises the columns of a row-major `[d, k]` matrix in place (modified Gram-Schmidt, f64).
fn gram_schmidt(v: &mut [f32], d: usize, k: usize) {
    let mut cols: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..d).map(|r| v[r * k + j] as f64).collect())
        .collect();
    for j in 0..k {
        let (done, rest) = cols.split_at_mut(j);
        let cj = &mut rest[0];
        for ci in done.iter() {
            let dot: f64 = cj.iter().zip(ci).map(|(a, b)| a * b).sum();
            cj.iter_mut().zip(ci).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = cols[j].iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        cols[j].iter_mut().for_each(|x| *x /= norm);
    }
    for (j, c) in cols.iter().enumerate() {
        for r in 0..d {
            v[r * k + j] = c[r] as f32;
        }
    }
}
