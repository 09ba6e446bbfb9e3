//! A fast matrix product for Q4_1 weights, the format of the default model.
//!
//! candle 0.11 has no SIMD dot product for Q4_1 and falls back to a generic
//! loop: two thirds of decode time (perf). This is the same arithmetic as
//! ggml's Q4_1 × Q8_1 product — activations quantized per block of 32 to
//! 8-bit with one scale, weights' 4-bit values times the activations' 8-bit
//! values summed in integers, then `d_w · d_x · Σ q_w q_x + m_w · d_x · Σ q_x` —
//! with AVX-512 VNNI (`dpbusd` on 32 values a block, scales applied with FMA)
//! or AVX2 (`maddubs`/`madd`) when the CPU has them, and a portable loop
//! otherwise, over the columns in
//! parallel on candle's own worker pool (a second pool would fight it for the
//! cores).
//!
//! It plugs into candle as a [`QuantizedType`]: a `QTensor` holding it is a
//! drop-in weight for candle's `QMatMul`.

use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Device, Result};
use std::sync::{Mutex, PoisonError};

use half::f16;

/// Values per block.
const QK: usize = 32;
/// Bytes of one GGUF Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;
/// Output columns per parallel task.
const COLUMNS_PER_TASK: usize = 32;
/// Activation rows a task takes at a time.
const ROW_TILE: usize = 64;

/// One Q4_1 block: value `i` is `d · q_i + m`, `q_i` the low nibbles of
/// `qs` for `i < 16` and the high ones for the rest.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Block {
    d: f16,
    m: f16,
    qs: [u8; QK / 2],
}

/// Activations of one block quantized to 8 bits, with the sum of the
/// quantized values (so the product is exactly that of the quantized
/// activations, as in ggml's Q8_1).
#[derive(Debug, Clone, Copy, Default)]
struct Q8 {
    d: f32,
    sum: f32,
    qs: [i8; QK],
    /// `qs` as four little-endian words, ready for a vector register.
    packed: [i64; 4],
}

fn quantize(xs: &[f32]) -> Q8 {
    let amax = xs.iter().fold(0f32, |a, x| a.max(x.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = Q8 { d, ..Q8::default() };
    for (o, x) in q.qs.iter_mut().zip(xs) {
        *o = (x * inv).round() as i8;
    }
    q.sum = d * q.qs.iter().map(|v| i32::from(*v)).sum::<i32>() as f32;
    for (word, bytes) in q.packed.iter_mut().zip(q.qs.chunks_exact(8)) {
        let mut b = [0u8; 8];
        for (o, v) in b.iter_mut().zip(bytes) {
            *o = *v as u8;
        }
        *word = i64::from_le_bytes(b);
    }
    q
}

/// `Σ q_w · q_x` of one block, in integers (the portable path).
#[inline(always)]
fn dot_block(w: &Block, x: &Q8) -> i32 {
    // Products fit in i16 (15 · 127), pairs of them in i32: the shape of
    // AVX2's multiply-add of 16-bit lanes.
    let mut acc = 0i32;
    for j in 0..QK / 2 {
        let b = w.qs[j];
        let lo = i16::from(b & 0x0F) * i16::from(x.qs[j]);
        let hi = i16::from(b >> 4) * i16::from(x.qs[j + QK / 2]);
        acc += i32::from(lo) + i32::from(hi);
    }
    acc
}

/// One weight row against one quantized activation row (the portable path).
#[inline]
fn dot_row(w: &[Block], x: &[Q8]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| w.d.to_f32() * x.d * dot_block(w, x) as f32 + w.m.to_f32() * x.sum)
        .sum()
}

/// The x86-64 paths: the same arithmetic, 32 values a block in a few
/// instructions, with AVX2 or with AVX-512 VNNI. Every intrinsic here is
/// safe to call inside the functions, which enable the features they need;
/// loads are built from plain arrays.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Block, Q8};

    fn u64_at(b: &[u8], at: usize) -> i64 {
        i64::from_le_bytes([
            b[at],
            b[at + 1],
            b[at + 2],
            b[at + 3],
            b[at + 4],
            b[at + 5],
            b[at + 6],
            b[at + 7],
        ])
    }

    /// A weight block's 32 values, 0..16 the low nibbles and 16..32 the
    /// high ones, one per byte.
    #[target_feature(enable = "avx2,fma")]
    fn nibbles(w: &Block) -> __m256i {
        let packed = _mm_set_epi64x(u64_at(&w.qs, 8), u64_at(&w.qs, 0));
        let low = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16(packed, 4), low),
            _mm_and_si128(packed, low),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    fn total(acc: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let half = _mm_hadd_ps(half, half);
        let half = _mm_hadd_ps(half, half);
        _mm_cvtss_f32(half)
    }

    /// `Σ w·x` of a block's 32 unsigned and 32 signed bytes, as eight i32
    /// lanes to add up: AVX2 multiplies pairs to i16 (at most 2 · 15 · 127)
    /// and adds pairs of those to i32.
    #[target_feature(enable = "avx2,fma")]
    fn block_avx2(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    /// The same sums in one AVX-512 VNNI instruction (four products to
    /// i32 at once), on 256-bit registers.
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    fn block_vnni(w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    }

    /// Weight rows `rows` against activation rows `xs`, `R × M` independent
    /// accumulator chains: each weight block is unpacked once for all the
    /// activation rows, and each activation block loaded once for all the
    /// weight rows. `$block` sums a block's products.
    macro_rules! dot_tile {
        ($name:ident, $features:literal, $block:ident) => {
            #[target_feature(enable = $features)]
            pub(in super::super) fn $name<const R: usize, const M: usize>(
                rows: [&[Block]; R],
                xs: [&[Q8]; M],
            ) -> [[f32; R]; M] {
                let mut acc = [[_mm256_setzero_ps(); R]; M];
                let mut mins = [[0f32; R]; M];
                let mut xv = [_mm256_setzero_si256(); M];
                for b in 0..xs[0].len() {
                    for i in 0..M {
                        let p = &xs[i][b].packed;
                        xv[i] = _mm256_set_epi64x(p[3], p[2], p[1], p[0]);
                    }
                    for r in 0..R {
                        let w = &rows[r][b];
                        let wv = nibbles(w);
                        let (d, m) = (w.d.to_f32(), w.m.to_f32());
                        for i in 0..M {
                            let x = &xs[i][b];
                            let sums = $block(wv, xv[i]);
                            let scale = _mm256_set1_ps(d * x.d);
                            acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[i][r]);
                            mins[i][r] += m * x.sum;
                        }
                    }
                }
                let mut out = [[0f32; R]; M];
                for i in 0..M {
                    for r in 0..R {
                        out[i][r] = total(acc[i][r]) + mins[i][r];
                    }
                }
                out
            }
        };
    }

    /// A tile's product on each path an x86-64 CPU may have.
    pub(super) mod tiles {
        use super::*;
        dot_tile!(avx2, "avx2,fma", block_avx2);
        dot_tile!(vnni, "avx2,fma,avx512vnni,avx512vl", block_vnni);
    }
}

/// The instructions a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Simd {
    /// Plain Rust.
    Portable,
    /// AVX2 and FMA (x86-64-v3).
    Avx2,
    /// AVX2 with AVX-512 VNNI's byte dot products (Zen 4, Ice Lake and
    /// later): one instruction a block where AVX2 takes two.
    Vnni,
}

impl Simd {
    /// The best path this CPU runs.
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
            {
                Simd::Vnni
            } else {
                Simd::Avx2
            };
        }
        Simd::Portable
    }
}

/// Weight rows against activation rows, on path `simd`:
/// `out[i][r]` is row `r` of the weights times activation row `i`.
#[inline]
fn dot<const R: usize, const M: usize>(
    rows: [&[Block]; R],
    xs: [&[Q8]; M],
    simd: Simd,
) -> [[f32; R]; M] {
    // SAFETY (both calls): `simd` names a path only when `Simd::detect`
    // found the CPU features its function enables; the functions read
    // nothing but their slices, each as long as the first of `xs` (checked
    // by the caller).
    #[cfg(target_arch = "x86_64")]
    match simd {
        #[allow(unsafe_code)]
        Simd::Vnni => return unsafe { x86::tiles::vnni(rows, xs) },
        #[allow(unsafe_code)]
        Simd::Avx2 => return unsafe { x86::tiles::avx2(rows, xs) },
        Simd::Portable => {}
    }
    let _ = simd;
    xs.map(|x| rows.map(|w| dot_row(w, x)))
}

/// Q4_1 weights whose product with f32 activations is fast.
#[derive(Debug, Clone)]
pub struct FastQ4_1 {
    blocks: Vec<Block>,
}

impl FastQ4_1 {
    /// Takes a GGUF Q4_1 tensor's raw blocks.
    fn from_bytes(bytes: &[u8]) -> Self {
        let blocks = bytes
            .chunks_exact(BLOCK_BYTES)
            .map(|b| {
                let mut qs = [0u8; QK / 2];
                qs.copy_from_slice(&b[4..]);
                Block {
                    d: f16::from_le_bytes([b[0], b[1]]),
                    m: f16::from_le_bytes([b[2], b[3]]),
                    qs,
                }
            })
            .collect();
        FastQ4_1 { blocks }
    }

    /// Q4_1 CPU matrices with the same input width, stacked into one (their
    /// rows one after the other) with the fast product; `None` when they
    /// are not all such.
    pub fn stack(tensors: &[QTensor]) -> Result<Option<QTensor>> {
        let mut rows = 0;
        let mut width = None;
        for t in tensors {
            let (n, k) = t.shape().dims2()?;
            if t.dtype() != GgmlDType::Q4_1
                || !matches!(t.device(), Device::Cpu)
                || width.is_some_and(|w| w != k)
            {
                return Ok(None);
            }
            width = Some(k);
            rows += n;
        }
        let Some(width) = width else {
            return Ok(None);
        };
        let mut blocks = Vec::new();
        for t in tensors {
            blocks.extend(FastQ4_1::from_bytes(&t.data()?).blocks);
        }
        let fast = FastQ4_1 { blocks };
        QTensor::new(QStorage::Cpu(Box::new(fast)), (rows, width)).map(Some)
    }

    /// A Q4_1 CPU tensor with the fast product; other tensors as they are.
    pub fn adopt(tensor: QTensor) -> Result<QTensor> {
        if tensor.dtype() != GgmlDType::Q4_1 || !matches!(tensor.device(), Device::Cpu) {
            return Ok(tensor);
        }
        let fast = FastQ4_1::from_bytes(&tensor.data()?);
        QTensor::new(QStorage::Cpu(Box::new(fast)), tensor.shape().clone())
    }

    /// `lhs · selfᵀ` into `dst` on path `simd`.
    fn product(
        &self,
        (m, k, n): (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
        simd: Simd,
    ) -> Result<()> {
        if k % QK != 0 || lhs.len() != m * k || dst.len() < m * n || self.blocks.len() != n * k / QK
        {
            return Err(candle_core::Error::Msg(format!(
                "FastQ4_1 matmul: bad shapes ({m},{k},{n}) for {} blocks",
                self.blocks.len()
            )));
        }
        let per_row = k / QK;
        let x: Vec<Q8> = lhs.chunks_exact(QK).map(quantize).collect();
        // One task per run of output columns, for every activation row: the
        // weights of four columns are read from memory once and stay in the
        // first-level cache while each row is multiplied by them, so rows
        // (a prompt's tokens, or a batch's sequences) share the weight reads.
        // A task writes its columns of every row into its own part of
        // `out`, behind its own (never contended) lock, which is `dst`
        // itself for a single row, and laid out per task otherwise.
        let mut scratch = Vec::new();
        let out: &mut [f32] = if m == 1 {
            &mut dst[..n]
        } else {
            scratch.resize(m * n, 0.0);
            &mut scratch
        };
        let tasks: Vec<Mutex<&mut [f32]>> = out
            .chunks_mut(m * COLUMNS_PER_TASK)
            .map(Mutex::new)
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
            for task in range {
                let first = task * COLUMNS_PER_TASK;
                let cols = COLUMNS_PER_TASK.min(n - first);
                let mut out = tasks[task].lock().unwrap_or_else(PoisonError::into_inner);
                let column = |col: usize| &self.blocks[col * per_row..(col + 1) * per_row];
                let x = |row: usize| &x[row * per_row..(row + 1) * per_row];
                // Four weight columns at a time against two activation rows
                // at a time, then the rows and columns left over; the rows
                // in tiles, so that a long prompt's activations stay in the
                // second-level cache while the task's columns pass over them.
                for tile in (0..m).step_by(ROW_TILE) {
                    let rows = tile..m.min(tile + ROW_TILE);
                    let mut quad = 0;
                    while quad < cols {
                        let c = first + quad;
                        if quad + 4 <= cols {
                            let weights = [column(c), column(c + 1), column(c + 2), column(c + 3)];
                            let mut row = rows.start;
                            while row + 2 <= rows.end {
                                let [a, b] = dot(weights, [x(row), x(row + 1)], simd);
                                out[row * cols + quad..][..4].copy_from_slice(&a);
                                out[(row + 1) * cols + quad..][..4].copy_from_slice(&b);
                                row += 2;
                            }
                            if row < rows.end {
                                let [a] = dot(weights, [x(row)], simd);
                                out[row * cols + quad..][..4].copy_from_slice(&a);
                            }
                            quad += 4;
                        } else {
                            for row in rows.clone() {
                                [[out[row * cols + quad]]] = dot([column(c)], [x(row)], simd);
                            }
                            quad += 1;
                        }
                    }
                }
            }
        });
        drop(tasks);
        if m > 1 {
            // From per-task runs of `[row][column]` to `[row][n]`.
            for (task, run) in scratch.chunks(m * COLUMNS_PER_TASK).enumerate() {
                let first = task * COLUMNS_PER_TASK;
                let cols = run.len() / m;
                for (row, values) in run.chunks_exact(cols).enumerate() {
                    dst[row * n + first..row * n + first + cols].copy_from_slice(values);
                }
            }
        }
        Ok(())
    }

    fn dequantized(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.blocks.len() * QK);
        for b in &self.blocks {
            let (d, m) = (b.d.to_f32(), b.m.to_f32());
            out.extend(b.qs.iter().map(|q| d * f32::from(q & 0x0F) + m));
            out.extend(b.qs.iter().map(|q| d * f32::from(q >> 4) + m));
        }
        out
    }
}

fn unsupported(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("FastQ4_1 does not support {what}"))
}

impl QuantizedType for FastQ4_1 {
    fn dtype(&self) -> GgmlDType {
        GgmlDType::Q4_1
    }

    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        self.product(mkn, lhs, dst, Simd::detect())
    }

    fn matmul_t_f16(
        &self,
        _: (usize, usize, usize),
        _: &[half::f16],
        _: &mut [half::f16],
    ) -> Result<()> {
        Err(unsupported("f16 activations"))
    }

    fn embedding(&self, ids: &[u32], rows: usize, hidden: usize) -> Result<CpuStorage> {
        let all = self.dequantized();
        let mut out = Vec::with_capacity(ids.len() * hidden);
        for &id in ids {
            let id = id as usize;
            if id >= rows {
                return Err(candle_core::Error::Msg(format!(
                    "token id {id} out of {rows}"
                )));
            }
            out.extend_from_slice(&all[id * hidden..(id + 1) * hidden]);
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        let mut all = self.dequantized();
        all.truncate(elem_count);
        Ok(CpuStorage::F32(all))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<Block>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.blocks.as_ptr().cast()
    }

    fn block_size(&self) -> usize {
        QK
    }

    fn from_float(&mut self, xs: &[f32]) {
        for (block, xs) in self.blocks.iter_mut().zip(xs.chunks_exact(QK)) {
            let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = |x: f32| ((x - min) * inv).round().clamp(0.0, 15.0) as u8;
            for j in 0..QK / 2 {
                block.qs[j] = q(xs[j]) | (q(xs[j + QK / 2]) << 4);
            }
            block.d = f16::from_f32(d);
            block.m = f16::from_f32(min);
        }
    }

    /// Importance weights are not used: the same as [`Self::from_float`].
    fn from_float_imatrix(&mut self, xs: &[f32], _: &[f32], _: usize) {
        self.from_float(xs);
    }

    fn size(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Module, Tensor};

    /// Deterministic values in -1..1.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 20_001) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn the_fast_product_matches_candles_q4_1_product() {
        let (m, k, n) = (3, 576, 202);
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(n * k, 7), (n, k), &dev).unwrap();
        let x = Tensor::from_vec(values(m * k, 11), (m, k), &dev).unwrap();
        let reference = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let fast = FastQ4_1::adopt(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let want = QMatMul::from_qtensor(reference)
            .unwrap()
            .forward(&x)
            .unwrap();
        let dq = fast.dequantize(&dev).unwrap();
        let got = QMatMul::from_qtensor(fast).unwrap().forward(&x).unwrap();
        // The exact product of the same quantized weights, in f32.
        let exact = x.matmul(&dq.t().unwrap()).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (want, got, exact) = (flat(want), flat(got), flat(exact));
        let worst = |a: &[f32]| {
            a.iter()
                .zip(&exact)
                .fold(0f32, |m, (v, e)| m.max((v - e).abs()))
        };
        let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
        // Both compute the exact product with 8-bit quantized activations;
        // they differ in summation order only.
        let (ours, candles) = (worst(&got), worst(&want));
        assert!(
            ours <= candles * 1.1 && ours <= 1e-2 * scale,
            "ours {ours}, candle's {candles}, scale {scale}"
        );
        // The weights themselves are the file's, bit for bit.
        let rq = QTensor::quantize(&w, GgmlDType::Q4_1)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        assert_eq!(
            dq.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            rq.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn every_path_this_cpu_has_gives_the_same_product() {
        // Shapes that take every branch: 4-column quads and single columns,
        // pairs of rows and a row left over, more than one row tile.
        let (k, n) = (256, 70);
        let w = Tensor::from_vec(values(n * k, 5), (n, k), &Device::Cpu).unwrap();
        let fast = FastQ4_1::from_bytes(
            &QTensor::quantize(&w, GgmlDType::Q4_1)
                .unwrap()
                .data()
                .unwrap(),
        );
        let best = Simd::detect();
        for m in [1, 2, 3, 67] {
            let x = values(m * k, 9);
            let product = |simd| {
                let mut dst = vec![0f32; m * n];
                fast.product((m, k, n), &x, &mut dst, simd).unwrap();
                dst
            };
            let portable = product(Simd::Portable);
            let mut simd_paths = [Simd::Avx2, Simd::Vnni].into_iter().filter(|s| *s <= best);
            let Some(first) = simd_paths.next() else {
                continue;
            };
            let want = product(first);
            // The integer sums are exact on every path, so the x86 ones
            // agree to the bit; the portable one sums in another order.
            for simd in simd_paths {
                assert_eq!(product(simd), want, "{simd:?}, {m} rows");
            }
            for (a, b) in portable.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                    "{m} rows: {a} against {b}"
                );
            }
        }
    }

    #[test]
    fn other_tensors_are_left_as_they_are_and_bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(64 * 32, 3), (64, 32), &dev).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert_eq!(FastQ4_1::adopt(q8).unwrap().dtype(), GgmlDType::Q8_0);
        let fast = FastQ4_1::from_bytes(&[0u8; BLOCK_BYTES * 2]);
        let mut dst = [0f32; 2];
        assert!(fast.matmul_t((1, 32, 2), &[0.0; 16], &mut dst).is_err());
        assert!(fast.matmul_t((1, 32, 2), &[1.0; 32], &mut dst).is_ok());
    }
}
