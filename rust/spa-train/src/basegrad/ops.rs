//! Autograd-capable building blocks for the differentiable base.
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim` and `rope_i` have no backward pass, so
//! the norm and softmax are written from basic tensor ops here. Frozen weight matrices go
//! through [`frozen_linear`], a custom op whose backward returns only the input gradient:
//! candle's built-in matmul backward would also compute the (useless) gradient of every
//! frozen weight, a third of the whole step's work.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, D};

/// `x @ w^T` with a frozen `w` (`[out, in]`): gradient flows to `x` only.
struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = layout.shape().dims2()?;
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: input not contiguous".into()))?;
        let x = Tensor::from_slice(&storage.as_slice::<f32>()?[a..b], (n, k), &Device::Cpu)?;
        let y = x.matmul(&self.w.t()?)?;
        let out = y.dim(1)?;
        let data = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(data), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// `x @ w^T` for `x: [n, in]` (f32) and a frozen `w: [out, in]`.
///
/// When `x` carries no gradient (inference), this is a plain matmul; otherwise the backward
/// pass computes `grad @ w` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return x.matmul(&w.t()?);
    }
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
}

/// RMS norm over the last dimension: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?
        .broadcast_mul(w)
}

/// `x / sqrt(mean(x^2) + eps)` over the last dimension (no weight).
pub fn rms_normalize(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)
}

/// Softmax over the last dimension (the max is subtracted as a constant).
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// `log sum exp` over the last dimension, keeping it (`[.., 1]`).
pub fn logsumexp_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&m)
}

/// Rotary embedding in the split-half layout: `x: [b, t, heads, hd]`, `cos`/`sin: [t, hd/2]`.
/// Pairs `(i, i + hd/2)` rotate by frequency `i`.
pub fn rope_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let hd = x.dim(3)?;
    let half = hd / 2;
    let t = x.dim(1)?;
    let cos = cos.reshape((1, t, 1, half))?;
    let sin = sin.reshape((1, t, 1, half))?;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let b = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
    Tensor::cat(&[a, b], 3)
}

/// Additive causal mask `[rep * t, pos + t]` for `t` queries at absolute positions
/// `pos..pos + t` (row `r * t + i` is query `i`, repeated for `rep` grouped heads).
pub fn causal_mask(t: usize, pos: usize, rep: usize) -> candle_core::Result<Tensor> {
    let s = pos + t;
    let mut m = Vec::with_capacity(rep * t * s);
    for _ in 0..rep {
        for i in 0..t {
            m.extend((0..s).map(|j| {
                if j <= pos + i {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Tensor::from_vec(m, (rep * t, s), &Device::Cpu)
}

/// RoPE tables `[len, hd/2]` (cos, sin) with base `theta`.
pub fn rope_tables(theta: f32, hd: usize, len: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let half = hd / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), &Device::Cpu)?;
    let pos = Tensor::arange(0u32, len as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((len, 1))?;
    let f = pos.broadcast_mul(&inv)?;
    Ok((f.cos()?, f.sin()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn frozen_linear_matches_matmul_and_its_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev)?)?;
        let y1 = frozen_linear(x.as_tensor(), &w)?;
        let y2 = x.as_tensor().matmul(&w.t()?)?;
        let d = (&y1 - &y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "forward differs by {d}");
        let g1 = y1.sqr()?.sum_all()?.backward()?;
        let g2 = y2.sqr()?.sum_all()?.backward()?;
        let (g1, g2) = (g1.get(&x).cloned(), g2.get(&x).cloned());
        let (Some(g1), Some(g2)) = (g1, g2) else {
            panic!("missing gradient");
        };
        let d = (g1 - g2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "gradient differs by {d}");
        Ok(())
    }

    #[test]
    fn softmax_and_norm_match_candle_nn() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 7, 11), &dev)?;
        let a = softmax_last(&x)?;
        let b = candle_nn::ops::softmax_last_dim(&x)?;
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        let w = Tensor::randn(0f32, 1.0, 11, &dev)?;
        let a = rms_norm(&x, &w, 1e-5)?;
        let b = candle_nn::ops::rms_norm(&x, &w, 1e-5)?;
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let l = logsumexp_last(&x)?;
        let r = x.exp()?.sum_keepdim(D::Minus1)?.log()?;
        assert!((l - r)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
        Ok(())
    }
}
