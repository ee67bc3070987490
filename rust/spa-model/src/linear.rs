//! Linear layers in f32 or candle-quantized form, with one forward for all of them.

use crate::error::{Result, SpaError};
use crate::kernels::Q41Matrix;
use crate::qkern_int8 as qk;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

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
    I8(Arc<I8Weights>),
}

#[derive(Debug, Clone)]
enum I8Weights {
    Q41(Vec<qk::BlockQ4_1>),
    Q80(Vec<qk::BlockQ8_0>),
}

/// Which kernels run the base's GGUF matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseKernel {
    /// f32 activations x on-the-fly dequantized weights ([`crate::kernels`]); matches the float
    /// reference (default).
    #[default]
    F32Activations,
    /// llama.cpp numerics: activations quantized to 8 bits per block of 32 (faster; greedy
    /// output can differ from the float reference on near-ties).
    Int8Activations,
    /// candle's own `QMatMul` (kept for comparison).
    Candle,
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
    /// f32 copy of the weights for [`Linear::forward_dense`], made on first use (shared by
    /// clones).
    dense: Arc<OnceLock<Tensor>>,
}

impl Linear {
    /// Wraps a quantized tensor loaded from GGUF (shape `[out, in]`) with the default kernels.
    pub fn from_qtensor(q: QTensor) -> Result<Self> {
        Self::from_qtensor_with(q, BaseKernel::default())
    }

    /// Wraps a quantized tensor loaded from GGUF (shape `[out, in]`) with `kernel`
    /// (Q4_1 and Q8_0 only; other formats always use candle).
    pub fn from_qtensor_with(q: QTensor, kernel: BaseKernel) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let bytes = q.storage_size_in_bytes();
        let own = matches!(q.dtype(), GgmlDType::Q4_1 | GgmlDType::Q8_0)
            && std::env::var_os("SPA_CANDLE_Q4_1").is_none();
        if own && kernel == BaseKernel::Int8Activations {
            let data = q.data()?;
            let bad = || SpaError::WrongShape {
                name: "quantized matrix".into(),
                expected: vec![out_dim, in_dim],
                got: vec![data.len()],
            };
            let w = if q.dtype() == GgmlDType::Q4_1 {
                I8Weights::Q41(qk::q4_1_from_bytes(&data).ok_or_else(bad)?)
            } else {
                I8Weights::Q80(qk::q8_0_from_bytes(&data).ok_or_else(bad)?)
            };
            return Ok(Self {
                inner: Inner::I8(Arc::new(w)),
                out_dim,
                in_dim,
                bytes,
                dense: Default::default(),
            });
        }
        if own && kernel == BaseKernel::F32Activations {
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
                dense: Default::default(),
            });
        }
        Ok(Self {
            inner: Inner::Candle(QMatMul::from_arc(Arc::new(q))?),
            out_dim,
            in_dim,
            bytes,
            dense: Default::default(),
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
                dense: Default::default(),
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
        let all_i8 = parts.iter().all(|p| matches!(p.inner, Inner::I8(_)));
        if all_i8 && !parts.is_empty() {
            let mut q41 = Vec::new();
            let mut q80 = Vec::new();
            for p in parts {
                match &p.inner {
                    Inner::I8(w) => match w.as_ref() {
                        I8Weights::Q41(b) => q41.extend_from_slice(b),
                        I8Weights::Q80(b) => q80.extend_from_slice(b),
                    },
                    _ => return Ok(None),
                }
            }
            if !q41.is_empty() && !q80.is_empty()
                || parts.iter().any(|p| p.in_dim != parts[0].in_dim)
            {
                return Ok(None);
            }
            let w = if q80.is_empty() {
                I8Weights::Q41(q41)
            } else {
                I8Weights::Q80(q80)
            };
            return Ok(Some(Self {
                out_dim: parts.iter().map(|p| p.out_dim).sum(),
                in_dim: parts[0].in_dim,
                bytes: parts.iter().map(|p| p.bytes).sum(),
                dense: Default::default(),
                inner: Inner::I8(Arc::new(w)),
            }));
        }
        let mats: Option<Vec<&Q41Matrix>> = parts
            .iter()
            .map(|p| match &p.inner {
                Inner::Q41(m) => Some(m.as_ref()),
                _ => None,
            })
            .collect();
        let Some(mats) = mats else { return Ok(None) };
        let m = Q41Matrix::concat_rows(&mats)?;
        Ok(Some(Self {
            out_dim: m.rows(),
            in_dim: m.cols(),
            bytes: parts.iter().map(|p| p.bytes).sum(),
            dense: Default::default(),
            inner: Inner::Q41(Arc::new(m)),
        }))
    }

    /// Applies the layer to `x` (`[..., in]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.inner {
            Inner::Candle(m) => Ok(m.forward(x)?),
            Inner::Q41(_) | Inner::I8(_) => {
                let dims = x.dims().to_vec();
                let n = x.elem_count() / self.in_dim.max(1);
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let mut y = vec![0f32; n * self.out_dim];
                match &self.inner {
                    Inner::Q41(m) => m.matmul(&xs, n, &mut y)?,
                    Inner::I8(w) => match w.as_ref() {
                        I8Weights::Q41(b) => {
                            qk::matmul_q4_1(b, self.out_dim, self.in_dim, &xs, n, &mut y)
                        }
                        I8Weights::Q80(b) => {
                            qk::matmul_q8_0(b, self.out_dim, self.in_dim, &xs, n, &mut y)
                        }
                    },
                    Inner::Candle(_) => unreachable!("matched above"),
                }
                let mut out_dims = dims;
                if let Some(last) = out_dims.last_mut() {
                    *last = self.out_dim;
                }
                Ok(Tensor::from_vec(y, out_dims, x.device())?)
            }
        }
    }

    /// `x W^T` with `W` dequantized to f32 once (on the first call, ~4 bytes per weight, kept)
    /// and a dense matrix product (candle's gemm): several times faster than the block kernels
    /// on many rows, equal to [`Linear::forward`] up to float rounding. For offline passes only:
    /// the server's forward stays on [`Linear::forward`] (one kernel for every row count keeps
    /// it batch-invariant).
    pub fn forward_dense(&self, x: &Tensor) -> Result<Tensor> {
        let w = match self.dense.get() {
            Some(w) => w,
            None => {
                let w = self.weight_f32()?.contiguous()?;
                self.dense.get_or_init(|| w)
            }
        };
        Ok(x.broadcast_matmul(&w.t()?)?)
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
            Inner::I8(w) => {
                let mut out = vec![0f32; self.out_dim * self.in_dim];
                match w.as_ref() {
                    I8Weights::Q41(b) => qk::dequantize_row_q4_1(b, &mut out),
                    I8Weights::Q80(b) => qk::dequantize_row_q8_0(b, &mut out),
                }
                Tensor::from_vec(out, (self.out_dim, self.in_dim), &Device::Cpu)?
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
