//! The model's weight matrices: candle's quantized products, with a faster
//! path where candle's choice is slow.
//!
//! On AVX2 CPUs, candle 0.11 multiplies Q4_K weights (LLaMA-2-7B's Q4_K_M
//! file) through tiles it repacks them into on first use: good for many rows
//! at once (a prompt, a batch of four), but a third bigger than the file's
//! blocks, and a decode step of one or two sequences reads all of that. For
//! up to [`COMPACT_ROWS`] rows, [`Linear`] runs candle's kernel over the
//! compact blocks instead, with the same result. On a 4096 x 11008 matrix
//! here: one row 0.70 ms against 1.18 (at the memory bandwidth), two rows
//! 1.39 against 1.47; from three rows on the tiles win (4 rows: 2.06 against
//! 3.31).
//!
//! On a GPU, candle multiplies quantized weights with integer kernels that
//! suit a decode step's few rows; from [`GPU_DENSE_ROWS`] rows on (a prompt)
//! [`Linear`] dequantizes the weights to f16 instead and multiplies on the
//! tensor cores through cuBLAS, as llama.cpp can.
//!
//! [`Parallel`] stacks matrices that multiply the same input (q/k/v,
//! gate/up) into one product when they are Q4_1.

use candle_core::quantized::k_quants::{self, BlockQ4K};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};

use crate::llama::Precision;
use crate::q4_1::FastQ4_1;

/// Rows up to which Q4_K products use the compact blocks.
const COMPACT_ROWS: usize = 2;

/// Rows from which a product on the GPU runs in f16 on the tensor cores.
const GPU_DENSE_ROWS: usize = 32;

/// One weight matrix, `[out, in]`.
pub struct Linear(QMatMul);

impl Linear {
    /// The matrix from a file's tensor: quantized as it is (Q4_1 through
    /// [`FastQ4_1`]), or dequantized to f32 for the reference.
    pub fn new(tensor: QTensor, device: &Device, precision: Precision) -> Result<Self> {
        Ok(Linear(match precision {
            Precision::Quantized => QMatMul::from_qtensor(FastQ4_1::adopt(tensor)?)?,
            Precision::F32 => QMatMul::Tensor(tensor.dequantize(device)?),
        }))
    }

    /// `x · Wᵀ` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.q4k_rows(x)? {
            return Ok(y);
        }
        if let Some(y) = self.gpu_dense(x)? {
            return Ok(y);
        }
        self.0.forward(x)
    }

    /// Many rows against quantized weights on a GPU: the weights
    /// dequantized to f16 for this product and multiplied by cuBLAS; `None`
    /// for anything else.
    fn gpu_dense(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let QMatMul::QTensor(w) = &self.0 else {
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

    /// A few rows against Q4_K weights on the CPU, through the compact
    /// blocks; `None` for anything else.
    fn q4k_rows(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let QMatMul::QTensor(w) = &self.0 else {
            return Ok(None);
        };
        let (n, k) = w.shape().dims2()?;
        let m = x.elem_count() / k;
        if w.dtype() != GgmlDType::Q4K
            || !x.device().is_cpu()
            || x.dims().last() != Some(&k)
            || m > COMPACT_ROWS
        {
            return Ok(None);
        }
        let bytes = w.data()?;
        let blocks = q4k_blocks(&bytes)?;
        let rows = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; m * n];
        k_quants::matmul::<BlockQ4K>((m, k, n), &rows, blocks, &mut out)?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Tensor::from_vec(out, dims, x.device()).map(Some)
    }
}

/// candle's Q4_K blocks, seen in the bytes of a CPU `QTensor` that holds
/// them (`QTensor::data` borrows candle's own `Vec<BlockQ4K>`).
fn q4k_blocks(bytes: &[u8]) -> Result<&[BlockQ4K]> {
    let size = std::mem::size_of::<BlockQ4K>();
    if !bytes.len().is_multiple_of(size)
        || bytes
            .as_ptr()
            .align_offset(std::mem::align_of::<BlockQ4K>())
            != 0
    {
        return Err(candle_core::Error::Msg(
            "Q4_K weights are not whole, aligned blocks".into(),
        ));
    }
    // SAFETY: `BlockQ4K` is candle's `#[repr(C)]` block of plain numbers
    // (two f16 and two byte arrays), so any bytes are a valid value; the
    // length and alignment are checked above, and the slice borrows `bytes`,
    // which candle's `Vec<BlockQ4K>` backs for as long as the tensor lives.
    #[allow(unsafe_code)]
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size) };
    Ok(blocks)
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
            if let Some(stacked) = FastQ4_1::stack(&tensors)? {
                let widths = tensors
                    .iter()
                    .map(|t| t.shape().dims2().map(|(n, _)| n))
                    .collect::<Result<_>>()?;
                return Ok(Parallel::Stacked(
                    Linear(QMatMul::from_qtensor(stacked)?),
                    widths,
                ));
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

    #[test]
    fn a_few_q4k_rows_get_candles_product_and_more_go_through_candle() {
        let dev = Device::Cpu;
        let (k, n) = (512, 64);
        let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
        let linear = Linear::new(
            QTensor::quantize(&w, GgmlDType::Q4K).unwrap(),
            &dev,
            Precision::Quantized,
        )
        .unwrap();
        let candle = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K).unwrap()).unwrap();
        for rows in [1, 2, 3] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
            let compact = linear.q4k_rows(&x).unwrap().is_some();
            assert_eq!(compact, rows <= COMPACT_ROWS);
            let got = linear.forward(&x).unwrap();
            let want = candle.forward(&x).unwrap();
            assert_eq!(got.dims(), &[1, rows, n]);
            let worst = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(worst < 1e-4, "{rows} rows: off by {worst}");
        }
        assert!(q4k_blocks(&[0u8; 7]).is_err());
    }

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
