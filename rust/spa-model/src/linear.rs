//! Linear layers in f32 or candle-quantized form, with one forward for all of them.

use crate::error::{Result, SpaError};
use crate::kernels::Q41Matrix;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Weight format of the on-device components (side blocks, gate, head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    /// f32 reference path.
    F32,
    /// candle q8_0 (8-bit blocks of 32).
    #[default]
    Q8,
    /// candle q4_0 (4-bit blocks of 32).
    Q4,
}

impl QuantMode {
    /// The GGML block type, `None` for f32.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            QuantMode::F32 => None,
            QuantMode::Q8 => Some(GgmlDType::Q8_0),
            QuantMode::Q4 => Some(GgmlDType::Q4_0),
        }
    }

    /// Parses "f32" / "q8" / "q4".
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(QuantMode::F32),
            "q8" | "q8_0" => Ok(QuantMode::Q8),
            "q4" | "q4_0" => Ok(QuantMode::Q4),
            _ => Err(SpaError::InvalidConfig(format!(
                "unknown quantization `{s}` (f32|q8|q4)"
            ))),
        }
    }

    /// Bytes used by a `rows x cols` matrix in this format.
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        match self.ggml() {
            None => rows * cols * 4,
            Some(t) => rows * cols / t.block_size() * t.type_size(),
        }
    }
}

#[derive(Debug, Clone)]
enum Inner {
    Candle(QMatMul),
    Q41(Arc<Q41Matrix>),
}

/// `y = x W^T` with `W` of shape `[out, in]`, stored as f32 or as a candle quantized tensor.
///
/// Q4_1 and Q8_0 weights of a GGUF base (SmolLM2) run on [`crate::kernels`] (f32 activations, SIMD) unless
/// `SPA_CANDLE_Q4_1=1` selects candle's own `QMatMul` (8-bit activations; kept for comparison).
#[derive(Debug, Clone)]
pub struct Linear {
    inner: Inner,
    out_dim: usize,
    in_dim: usize,
    bytes: usize,
}

impl Linear {
    /// Wraps a quantized tensor loaded from GGUF (shape `[out, in]`).
    pub fn from_qtensor(q: QTensor) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let bytes = q.storage_size_in_bytes();
        let own = match q.dtype() {
            GgmlDType::Q4_1 | GgmlDType::Q8_0 => std::env::var_os("SPA_CANDLE_Q4_1").is_none(),
            _ => false,
        };
        if own {
            let m = if q.dtype() == GgmlDType::Q4_1 {
                Q41Matrix::from_ggml_bytes(&q.data()?, out_dim, in_dim)?
            } else {
                Q41Matrix::from_ggml_q8_0(&q.data()?, out_dim, in_dim)?
            };
            return Ok(Self {
                inner: Inner::Q41(Arc::new(m)),
                out_dim,
                in_dim,
                bytes,
            });
        }
        Ok(Self {
            inner: Inner::Candle(QMatMul::from_arc(Arc::new(q))?),
            out_dim,
            in_dim,
            bytes,
        })
    }

    /// Builds from an f32 weight `[out, in]`, quantizing it with `mode`.
    pub fn from_f32(w: &Tensor, mode: QuantMode) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        let w = w.to_dtype(candle_core::DType::F32)?.contiguous()?;
        match mode.ggml() {
            None => Ok(Self {
                inner: Inner::Candle(QMatMul::Tensor(w)),
                out_dim,
                in_dim,
                bytes: out_dim * in_dim * 4,
            }),
            Some(t) => {
                if in_dim % t.block_size() != 0 {
                    return Err(SpaError::InvalidConfig(format!(
                        "input size {in_dim} is not a multiple of the {t:?} block ({})",
                        t.block_size()
                    )));
                }
                Self::from_qtensor(QTensor::quantize(&w, t)?)
            }
        }
    }

    /// Stacks layers with the same input size into one (`out` = sum of outs), so one kernel
    /// call computes e.g. q, k and v. Only for layers on the crate's own kernels; returns `None`
    /// for others (the caller then keeps them separate).
    pub fn fuse(parts: &[&Linear]) -> Result<Option<Linear>> {
        let mats: Option<Vec<&Q41Matrix>> = parts
            .iter()
            .map(|p| match &p.inner {
                Inner::Q41(m) => Some(m.as_ref()),
                Inner::Candle(_) => None,
            })
            .collect();
        let Some(mats) = mats else { return Ok(None) };
        let m = Q41Matrix::concat_rows(&mats)?;
        Ok(Some(Self {
            out_dim: m.rows(),
            in_dim: m.cols(),
            bytes: parts.iter().map(|p| p.bytes).sum(),
            inner: Inner::Q41(Arc::new(m)),
        }))
    }

    /// Applies the layer to `x` (`[..., in]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.inner {
            Inner::Candle(m) => Ok(m.forward(x)?),
            Inner::Q41(m) => {
                let dims = x.dims().to_vec();
                let n = x.elem_count() / self.in_dim.max(1);
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let mut y = vec![0f32; n * self.out_dim];
                m.matmul(&xs, n, &mut y)?;
                let mut out_dims = dims;
                if let Some(last) = out_dims.last_mut() {
                    *last = self.out_dim;
                }
                Ok(Tensor::from_vec(y, out_dims, x.device())?)
            }
        }
    }

    /// The weights as f32 `[out, in]` (dequantized if needed).
    pub fn weight_f32(&self) -> Result<Tensor> {
        Ok(match &self.inner {
            Inner::Candle(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu)?,
            Inner::Candle(QMatMul::Tensor(t)) => t.clone(),
            Inner::Candle(QMatMul::TensorF16(t)) => t.to_dtype(candle_core::DType::F32)?,
            Inner::Q41(m) => {
                Tensor::from_vec(m.to_f32(), (self.out_dim, self.in_dim), &Device::Cpu)?
            }
        })
    }

    /// Output size.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Input size.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes of weight storage.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
