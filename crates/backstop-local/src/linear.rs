//! The model's weight matrices: candle's quantized products, with faster
//! ones where candle's are slow.
//!
//! On the CPU, Q4_1 weights (the default SmolLM2 file) multiply through
//! [`FastQ4_1`], Q4_K weights (LLaMA-2-7B's Q4_K_M file) through
//! [`FastQ4K`], Q6_K (the rest of that file) through [`FastQ6K`] and Q8_0
//! (SmolLM2's output projection) through [`FastQ8_0`]: weights repacked eight rows to a register, one copy, read
//! once per step for every row of it (see [`crate::tiled`]). candle's own
//! products read every weight again for a second row, and for Q4_K from
//! three rows on repack the weights into tiles a third bigger, kept beside
//! the file's blocks.
//!
//! On a GPU, candle multiplies quantized weights with integer kernels that
//! suit a decode step's few rows; from [`GPU_DENSE_ROWS`] rows on (a prompt)
//! [`Linear`] dequantizes the weights to f16 instead and multiplies on the
//! tensor cores through cuBLAS, as llama.cpp can.
//!
//! [`Parallel`] stacks matrices that multiply the same input (q/k/v,
//! gate/up) into one product when they are Q4_1.
//!
//! The fast weights are not candle `QuantizedType`s: candle's CPU product
//! picks its path from the dtype a weight reports, and for Q4_K (Q6_K, Q8_0)
//! reads the weight's bytes as its own blocks.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor, D};

use crate::llama::Precision;
use crate::q4_1::FastQ4_1;
use crate::q4k::FastQ4K;
use crate::q6k::FastQ6K;
use crate::q8_0::FastQ8_0;
use crate::tiled::{Kernel, Simd, Tiled};

/// Rows from which a product on the GPU runs in f16 on the tensor cores.
const GPU_DENSE_ROWS: usize = 32;

/// One weight matrix, `[out, in]`.
pub enum Linear {
    /// Through candle: other formats, the GPU, the f32 reference.
    Candle(QMatMul),
    /// Q4_1 on the CPU.
    Q4_1(FastQ4_1),
    /// Q4_K on the CPU.
    Q4K(FastQ4K),
    /// Q6_K on the CPU.
    Q6K(FastQ6K),
    /// Q8_0 on the CPU.
    Q8_0(FastQ8_0),
}

impl Linear {
    /// The matrix from a file's tensor: quantized as it is (Q4_1, Q4_K, Q6_K
    /// and Q8_0 on the CPU repacked), or dequantized to f32 for the
    /// reference.
    pub fn new(tensor: QTensor, device: &Device, precision: Precision) -> Result<Self> {
        if precision == Precision::F32 {
            return Ok(Linear::Candle(QMatMul::Tensor(tensor.dequantize(device)?)));
        }
        if let Some(fast) = FastQ4_1::new(std::slice::from_ref(&tensor))? {
            return Ok(Linear::Q4_1(fast));
        }
        if let Some(fast) = FastQ4K::new(&tensor)? {
            return Ok(Linear::Q4K(fast));
        }
        if let Some(fast) = FastQ6K::new(&tensor)? {
            return Ok(Linear::Q6K(fast));
        }
        if let Some(fast) = FastQ8_0::new(&tensor)? {
            return Ok(Linear::Q8_0(fast));
        }
        QMatMul::from_qtensor(tensor).map(Linear::Candle)
    }

    /// `x · Wᵀ` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(q) => match self.gpu_dense(x)? {
                Some(y) => Ok(y),
                None => q.forward(x),
            },
            Linear::Q4_1(w) => tiled_forward(w, x),
            Linear::Q4K(w) => tiled_forward(w, x),
            Linear::Q6K(w) => tiled_forward(w, x),
            Linear::Q8_0(w) => tiled_forward(w, x),
        }
    }

    /// Many rows against quantized weights on a GPU: the weights
    /// dequantized to f16 for this product and multiplied by cuBLAS; `None`
    /// for anything else.
    fn gpu_dense(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Linear::Candle(QMatMul::QTensor(w)) = self else {
            return Ok(None);
        };
        let (_, k) = w.shape().dims2()?;
        if !x.device().is_cuda() || x.elem_count() / k < GPU_DENSE_ROWS {
            return Ok(None);
        }
        let w = w.dequantize_f16(x.device())?;
        x.to_dtype(DType::F16)?
            .broadcast_matmul(&w.t()?)?
            .to_dtype(DType::F32)
            .map(Some)
    }
}

/// `x · Wᵀ` for weights repacked eight rows to a register, `x` f32 on the
/// CPU.
fn tiled_forward<T: Kernel>(w: &Tiled<T>, x: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = dims.last().copied().unwrap_or(0);
    let (m, n) = (x.elem_count() / k.max(1), w.rows());
    let x = x.contiguous()?;
    let mut out = vec![0f32; m * n];
    {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(candle_core::Error::Msg(
                "a repacked weight multiplies on the CPU only".into(),
            ));
        };
        let lhs = cpu
            .as_slice::<f32>()?
            .get(layout.start_offset()..layout.start_offset() + m * k)
            .ok_or_else(|| {
                candle_core::Error::Msg("activations shorter than their shape".into())
            })?;
        w.product((m, k, n), lhs, &mut out, Simd::detect())?;
    }
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, x.device())
}

/// Matrices that multiply the same input (a layer's query, key and value
/// projections; its gate and up projections): stacked into one matrix when
/// their format allows, so the input is quantized once and the product is
/// one hand-off to the worker pool instead of several.
pub enum Parallel {
    /// One matrix, and the width of each part's output in it.
    Stacked(Linear, Vec<usize>),
    /// Each apart.
    Apart(Vec<Linear>),
}

impl Parallel {
    /// The matrices from a file's tensors, as [`Linear::new`] takes them.
    pub fn new(tensors: Vec<QTensor>, device: &Device, precision: Precision) -> Result<Self> {
        if precision == Precision::Quantized {
            if let Some(stacked) = FastQ4_1::new(&tensors)? {
                let widths = tensors
                    .iter()
                    .map(|t| t.shape().dims2().map(|(n, _)| n))
                    .collect::<Result<_>>()?;
                return Ok(Parallel::Stacked(Linear::Q4_1(stacked), widths));
            }
        }
        tensors
            .into_iter()
            .map(|t| Linear::new(t, device, precision))
            .collect::<Result<_>>()
            .map(Parallel::Apart)
    }

    /// Each matrix's `x · Wᵀ`, in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Parallel::Stacked(linear, widths) => {
                let y = linear.forward(x)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&width| {
                        let part = y.narrow(D::Minus1, at, width);
                        at += width;
                        part
                    })
                    .collect()
            }
            Parallel::Apart(linears) => linears.iter().map(|l| l.forward(x)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn stacked_q4_1_matrices_give_what_each_gives_apart() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 3, 64), &dev).unwrap();
        let sizes = [64, 32, 32];
        let weights: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::randn(0f32, 0.1, (n, 64), &dev).unwrap())
            .collect();
        let matrices = |dtype| -> Vec<QTensor> {
            weights
                .iter()
                .map(|w| QTensor::quantize(w, dtype).unwrap())
                .collect()
        };
        let parts = matrices(GgmlDType::Q4_1);
        let apart: Vec<Tensor> = matrices(GgmlDType::Q4_1)
            .into_iter()
            .map(|w| {
                Linear::new(w, &dev, Precision::Quantized)
                    .unwrap()
                    .forward(&x)
                    .unwrap()
            })
            .collect();
        let stacked = Parallel::new(parts, &dev, Precision::Quantized).unwrap();
        assert!(matches!(stacked, Parallel::Stacked(..)));
        for ((got, want), n) in stacked.forward(&x).unwrap().iter().zip(&apart).zip(sizes) {
            assert_eq!(got.dims(), &[1, 3, n]);
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(got), flat(want));
        }
        // Other formats multiply apart.
        let q8 = Parallel::new(matrices(GgmlDType::Q8_0), &dev, Precision::Quantized);
        assert!(matches!(q8.unwrap(), Parallel::Apart(..)));
    }
}
