//! The step's row-wise passes on the CPU, RMS norm and the rotary
//! embedding, run on the engine's thread or on candle's barrier pool.
//!
//! candle-nn's own hand every call with more than one row to rayon's global
//! pool, and a thread outside that pool waits for it on a lock: a decode step
//! of four sequences made about 120 such calls (two norms and two rotations
//! a layer), each a sleep and a wake-up of the engine's thread, with
//! rayon's two threads spinning for work against the barrier pool's between
//! them (`strace -f -c` on `bench-local MODEL 16 64 8 4`: 25,245 futex calls
//! and 6,492 `sched_yield`s for about 100 steps, against 8,765 and 1,100
//! with these). Off the CPU, candle's run.

use std::sync::{Mutex, PoisonError};

use candle_core::quantized::QTensor;
use candle_core::{Layout, Result, Storage, Tensor};

/// Values at or above which a pass goes to the pool: below it, handing the
/// work over costs more than it saves.
const POOL_MIN: usize = 1 << 15;

/// Runs `f(row, out)` for each `width`-long row of `out`, on the pool when
/// there is enough work.
fn each_row(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() < POOL_MIN {
        for (i, row) in out.chunks_mut(width).enumerate() {
            f(i, row);
        }
        return;
    }
    let rows: Vec<Mutex<&mut [f32]>> = out.chunks_mut(width).map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(rows.len(), |range| {
        for i in range {
            let mut row = rows[i].lock().unwrap_or_else(PoisonError::into_inner);
            f(i, &mut row);
        }
    });
}

/// A contiguous f32 CPU tensor's values; `None` for any other.
pub(crate) fn values<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) if layout.is_contiguous() => cpu
            .as_slice::<f32>()
            .ok()
            .map(|all| &all[layout.start_offset()..][..layout.shape().elem_count()]),
        _ => None,
    }
}

/// RMS normalization over the last dimension, times a weight.
pub(crate) struct RmsNorm {
    /// `[dim]`, f32, on the model's device.
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// The norm with the file's weight (`[dim]`).
    pub(crate) fn new(weight: QTensor, eps: f64) -> Result<Self> {
        let device = weight.device();
        Ok(RmsNorm {
            weight: weight.dequantize(&device)?,
            eps: eps as f32,
        })
    }

    /// `x / rms(x) · weight`, row by row.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let width = self.weight.elem_count();
        let out = {
            let (storage, layout) = x.storage_and_layout();
            let (w_storage, w_layout) = self.weight.storage_and_layout();
            match (values(&storage, layout), values(&w_storage, w_layout)) {
                (Some(xs), Some(weight)) if x.dims().last() == Some(&width) => {
                    let mut out = vec![0f32; xs.len()];
                    each_row(&mut out, width, |i, row| {
                        let xs = &xs[i * width..][..width];
                        let sum: f32 = xs.iter().map(|v| v * v).sum();
                        let scale = 1.0 / (sum / width as f32 + self.eps).sqrt();
                        for ((o, v), w) in row.iter_mut().zip(xs).zip(weight) {
                            *o = v * scale * w;
                        }
                    });
                    Some(out)
                }
                _ => None,
            }
        };
        match out {
            Some(out) => Tensor::from_vec(out, x.shape(), x.device()),
            None => candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps),
        }
    }
}

/// The interleaved rotary embedding (`rope_i`): `x` is `[batch, heads,
/// tokens, dim]`, `cos` and `sin` are `[tokens, dim / 2]`, and each pair of
/// neighbouring values of a token's head turns by its position's angle.
pub(crate) fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, tokens, dim) = x.dims4()?;
    let out = {
        let (xs, xl) = x.storage_and_layout();
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        match (values(&xs, xl), values(&cs, cl), values(&ss, sl)) {
            (Some(xs), Some(cos), Some(sin))
                if cos.len() == tokens * dim / 2 && sin.len() == cos.len() =>
            {
                let mut out = vec![0f32; xs.len()];
                // One row a head: its tokens, one after another.
                each_row(&mut out, tokens * dim, |i, row| {
                    let xs = &xs[i * tokens * dim..][..tokens * dim];
                    for ((o, x), (c, s)) in row
                        .chunks_exact_mut(2)
                        .zip(xs.chunks_exact(2))
                        .zip(cos.iter().zip(sin))
                    {
                        o[0] = x[0] * c - x[1] * s;
                        o[1] = x[0] * s + x[1] * c;
                    }
                });
                Some(out)
            }
            _ => None,
        }
    };
    match out {
        Some(out) => Tensor::from_vec(out, x.shape(), x.device()),
        None => candle_nn::rotary_emb::rope_i(x, cos, sin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn rms_norm_matches_candles_on_one_row_and_on_the_pool() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(1f32, 0.2, 576, &dev).unwrap();
        let norm = RmsNorm::new(QTensor::quantize(&weight, GgmlDType::F32).unwrap(), 1e-5).unwrap();
        // One row (inline) and 100 rows (past POOL_MIN: on the pool).
        for rows in [1, 4, 100] {
            let x = Tensor::randn(0f32, 3.0, (1, rows, 576), &dev).unwrap();
            let want = candle_nn::ops::rms_norm(&x, &weight, 1e-5).unwrap();
            let got = norm.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-5, "{rows} rows");
        }
    }

    #[test]
    fn rope_i_matches_candles_for_one_token_and_many() {
        let dev = Device::Cpu;
        for (heads, tokens) in [(9, 1), (9, 4), (32, 300)] {
            let x = Tensor::randn(0f32, 1.0, (1, heads, tokens, 64), &dev).unwrap();
            let angles = Tensor::randn(0f32, 3.0, (tokens, 32), &dev).unwrap();
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            let want = candle_nn::rotary_emb::rope_i(&x, &cos, &sin).unwrap();
            let got = rope_i(&x, &cos, &sin).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(
                max_diff(&got, &want) < 1e-6,
                "{heads} heads, {tokens} tokens"
            );
        }
    }
}
