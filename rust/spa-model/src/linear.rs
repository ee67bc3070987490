//! Linear layers in f32 or candle-quantized form, with one forward for all of them.

use crate::error::{Result, SpaError};
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

/// `y = x W^T` with `W` of shape `[out, in]`, stored as f32 or as a candle quantized tensor.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: QMatMul,
    out_dim: usize,
    in_dim: usize,
    bytes: usize,
}

impl Linear {
    /// Wraps a quantized tensor loaded from GGUF (shape `[out, in]`).
    pub fn from_qtensor(q: QTensor) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let bytes = q.storage_size_in_bytes();
        Ok(Self {
            inner: QMatMul::from_arc(Arc::new(q))?,
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
                inner: QMatMul::Tensor(w),
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

    /// Applies the layer to `x` (`[..., in]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.inner.forward(x)?)
    }

    /// The weights as f32 `[out, in]` (dequantized if needed).
    pub fn weight_f32(&self) -> Result<Tensor> {
        Ok(match &self.inner {
            QMatMul::QTensor(q) => q.dequantize(&Device::Cpu)?,
            QMatMul::Tensor(t) => t.clone(),
            QMatMul::TensorF16(t) => t.to_dtype(candle_core::DType::F32)?,
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
