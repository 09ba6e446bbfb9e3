//! Matrix products over quantized weights repacked eight rows to a vector
//! register: the part every such format shares.
//!
//! A format (Q4_1 in [`crate::q4_1`], Q4_K in [`crate::q4k`], Q6_K in
//! [`crate::q6k`], Q8_0 in [`crate::q8_0`]) keeps its
//! weights in runs of tiles, each run eight consecutive weight rows, laid out
//! so that one 32-bit lane of a 256-bit register follows one row. A block's
//! products for eight rows are then eight `dpbusd` (AVX-512 VNNI) or
//! `maddubs`/`madd` pairs (AVX2) against the activations' bytes broadcast,
//! and its scales apply to all eight rows in one multiply and two FMAs, with
//! no per-row broadcasts and no horizontal sums. ggml's and candle's
//! products take one weight row at a time.
//!
//! Here: the activations quantized per block of 32 to 8 bits ([`Q8`], as
//! ggml's Q8_1), the instruction set a product runs on ([`Simd`]), the
//! shared x86 pieces, and [`Tiled::product`], which runs a format's eight-row
//! kernel over the output columns in parallel on candle's own worker pool
//! (a second pool would fight it for the cores).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result};
use std::sync::{Mutex, PoisonError};

/// Values per activation block.
pub(crate) const QK: usize = 32;
/// Weight rows a run of tiles interleaves: one per 32-bit lane.
pub(crate) const LANES: usize = 8;
/// Runs of eight rows per parallel task (32 output columns).
const GROUPS_PER_TASK: usize = 4;
/// Activation rows a task takes at a time.
const ROW_TILE: usize = 64;

/// Activations of one block quantized to 8 bits, with the sum of the
/// quantized values, as it is and times the scale (so the product is
/// exactly that of the quantized activations, as in ggml's Q8_1), and the
/// same times the scale for each half (for formats scaled per 16 values).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Q8 {
    pub(crate) d: f32,
    pub(crate) sum: f32,
    pub(crate) isum: i32,
    pub(crate) halves: [f32; 2],
    pub(crate) qs: [i8; QK],
}

impl Q8 {
    /// Values `4t..4t + 4` as one little-endian word, to broadcast.
    #[inline(always)]
    pub(crate) fn word(&self, t: usize) -> i32 {
        let q = &self.qs[4 * t..4 * t + 4];
        i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
    }
}

pub(crate) fn quantize(xs: &[f32]) -> Q8 {
    let amax = xs.iter().fold(0f32, |a, x| a.max(x.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = Q8 { d, ..Q8::default() };
    for (o, x) in q.qs.iter_mut().zip(xs) {
        *o = (x * inv).round() as i8;
    }
    let [first, second] =
        [&q.qs[..QK / 2], &q.qs[QK / 2..]].map(|h| h.iter().map(|v| i32::from(*v)).sum::<i32>());
    q.isum = first + second;
    q.halves = [d * first as f32, d * second as f32];
    q.sum = d * q.isum as f32;
    q
}

/// The instructions a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Simd {
    /// Plain Rust.
    Portable,
    /// AVX2, FMA and F16C (x86-64-v3).
    Avx2,
    /// AVX2 with AVX-512 VNNI's byte dot products (Zen 4, Ice Lake and
    /// later): one instruction where AVX2 takes two.
    Vnni,
}

impl Simd {
    /// The best path this CPU runs.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
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

/// What the formats' x86 kernels share. Every intrinsic here but the loads
/// and the store is safe to call inside the functions, which enable the
/// features they need.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// How far ahead of the tile being multiplied [`prefetch`] reaches.
    /// The hardware prefetcher alone leaves the kernel waiting on memory
    /// while it streams the weights (perf: the samples pile up on the
    /// instructions after the weights' loads). Asking for the lines 14 KB
    /// ahead, into the second-level cache, measured best on a Zen 4 among
    /// 4.6 to 28 KB ahead into either cache: a 16,384 × 4,096 product (38
    /// MB in Q4_K, 55 in Q6_K, past the last-level cache) with one, two and
    /// four activation rows took 0.53-0.70, 0.69-0.86 and 1.10-1.27 ms in
    /// Q4_K and 1.01-1.44, 1.20-1.39 and 2.20-2.55 in Q6_K, against 0.65-
    /// 0.83, 0.74-1.04 and 1.20-1.59, and 1.47-1.85, 1.86-2.15 and 2.65-2.94,
    /// 4.6 KB ahead into the first-level cache; and without prefetching,
    /// Q4_K took 0.79-1.07 ms for one row and 1.95-2.36 for four.
    const PREFETCH: usize = 12 * 1184;

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn load_bytes(bytes: &[u8; 32]) -> __m256i {
        // SAFETY: an unaligned load of the array's 32 bytes.
        #[allow(unsafe_code)]
        unsafe {
            _mm256_loadu_si256(bytes.as_ptr().cast())
        }
    }

    /// Eight f16 values as eight f32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn load_f16(values: &[half::f16; LANES]) -> __m256 {
        // SAFETY: an unaligned load of the array's 16 bytes.
        #[allow(unsafe_code)]
        let halves = unsafe { _mm_loadu_si128(values.as_ptr().cast()) };
        _mm256_cvtph_ps(halves)
    }

    /// Eight bytes as eight f32 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn load_u8(values: &[u8; LANES]) -> __m256 {
        let word = _mm_set_epi64x(0, i64::from_le_bytes(*values));
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(word))
    }

    /// Eight signed bytes as eight f32 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn load_i8(values: &[i8; LANES]) -> __m256 {
        // SAFETY: an unaligned load of the array's 8 bytes.
        #[allow(unsafe_code)]
        let word = unsafe { _mm_loadl_epi64(values.as_ptr().cast()) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(word))
    }

    /// Asks for the cache lines of the weights [`PREFETCH`] bytes past the
    /// start of `tile`, so that they are in the second-level cache when the
    /// kernel gets there. Past the last tile it asks for lines that may
    /// not be mapped, which a prefetch ignores (it never faults).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn prefetch<T>(tile: &T) {
        let ahead = (tile as *const T).cast::<i8>().wrapping_add(PREFETCH);
        for line in (0..size_of::<T>()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(line));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn lanes(v: __m256) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        // SAFETY: an unaligned store into the array's 32 bytes.
        #[allow(unsafe_code)]
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), v)
        };
        out
    }

    /// `acc` plus, in each 32-bit lane, the sum of the four products of
    /// the lane's unsigned bytes `w` and signed bytes `x`. AVX2 multiplies
    /// pairs to i16 (at most 2 · 15 · 127) and adds pairs of those to i32.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn dot_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(w, x);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// The same in one AVX-512 VNNI instruction, on 256-bit registers.
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(crate) fn dot_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, x)
    }
}

/// A run of eight rows' product with `M` activation rows, on a path that
/// needs CPU features.
pub(crate) type FeatureGroup<T, const M: usize> = unsafe fn(&[T], [&[Q8]; M]) -> [[f32; LANES]; M];

/// A format's tile (block `b` of eight consecutive weight rows) and the
/// kernels that multiply a run of them.
pub(crate) trait Kernel: Sync + Sized {
    /// Activation blocks of 32 values a tile spans.
    const SPAN: usize;

    /// The plain-Rust kernel: the arithmetic of the x86 ones, operation
    /// for operation.
    fn portable<const M: usize>(tiles: &[Self], xs: [&[Q8]; M]) -> [[f32; LANES]; M];

    /// The x86 kernels, AVX2 and AVX-512 VNNI (`#[target_feature]`
    /// functions).
    #[cfg(target_arch = "x86_64")]
    fn x86<const M: usize>() -> [FeatureGroup<Self, M>; 2];

    /// The values of the row in lane `lane` of a run of tiles, as candle
    /// dequantizes the file's.
    #[cfg(test)]
    fn values(tiles: &[Self], lane: usize, out: &mut Vec<f32>);

    /// Eight weight rows (a run of tiles) against activation rows `xs`, on
    /// path `simd`: `out[i][j]` is row `j` of the run times activation row
    /// `i`. Every path gives the same result to the bit.
    #[inline]
    fn group<const M: usize>(tiles: &[Self], xs: [&[Q8]; M], simd: Simd) -> [[f32; LANES]; M] {
        // SAFETY (both calls): `simd` names a path only when
        // `Simd::detect` found the CPU features its kernel enables; the
        // kernels read nothing but their slices, each `SPAN` activation
        // blocks a tile (checked by `product`).
        #[cfg(target_arch = "x86_64")]
        {
            let [avx2, vnni] = Self::x86::<M>();
            match simd {
                #[allow(unsafe_code)]
                Simd::Vnni => return unsafe { vnni(tiles, xs) },
                #[allow(unsafe_code)]
                Simd::Avx2 => return unsafe { avx2(tiles, xs) },
                Simd::Portable => {}
            }
        }
        let _ = simd;
        Self::portable(tiles, xs)
    }
}

/// Weights repacked for [`Tiled::product`]: for each run of eight rows (the
/// last padded with zero rows), its tiles.
#[derive(Debug, Clone)]
pub struct Tiled<T> {
    /// Weight rows (output columns).
    rows: usize,
    /// Tiles a run of eight rows.
    per_run: usize,
    tiles: Vec<T>,
}

impl<T: Kernel> Tiled<T> {
    /// `rows` rows of `per_run` tiles, `tile(first, b)` being tile `b` of
    /// rows `first..first + 8` (rows past `rows` are padding).
    pub(crate) fn build(
        rows: usize,
        per_run: usize,
        mut tile: impl FnMut(usize, usize) -> T,
    ) -> Self {
        let mut tiles = Vec::with_capacity(rows.div_ceil(LANES) * per_run);
        for first in (0..rows).step_by(LANES) {
            for b in 0..per_run {
                tiles.push(tile(first, b));
            }
        }
        Tiled {
            rows,
            per_run,
            tiles,
        }
    }

    /// `tensor` repacked by `from_bytes` (its bytes, rows and width) if it
    /// is a CPU matrix of GGUF type `dtype`; `None` for any other.
    pub(crate) fn of(
        tensor: &QTensor,
        dtype: GgmlDType,
        from_bytes: impl FnOnce(&[u8], usize, usize) -> Result<Self>,
    ) -> Result<Option<Self>> {
        if tensor.dtype() != dtype || !matches!(tensor.device(), Device::Cpu) {
            return Ok(None);
        }
        let (rows, width) = tensor.shape().dims2()?;
        from_bytes(&tensor.data()?, rows, width).map(Some)
    }

    /// Blocks a row, when `bytes` are `rows` rows of `width` values in
    /// `dtype`'s blocks of `values` values in `block_bytes` bytes; an error
    /// otherwise.
    pub(crate) fn blocks_per_row(
        bytes: &[u8],
        (rows, width): (usize, usize),
        dtype: GgmlDType,
        (values, block_bytes): (usize, usize),
    ) -> Result<usize> {
        let per_row = width / values;
        if !width.is_multiple_of(values) || bytes.len() != rows * per_row * block_bytes {
            return Err(candle_core::Error::Msg(format!(
                "{dtype:?}: {} bytes for {rows} rows of {width}",
                bytes.len()
            )));
        }
        Ok(per_row)
    }

    /// Weight rows (output columns).
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Values a row (the input's width).
    pub(crate) fn width(&self) -> usize {
        self.per_run * T::SPAN * QK
    }

    /// The tiles that hold row `row`, and its lane in them.
    #[cfg(test)]
    pub(crate) fn row(&self, row: usize) -> (&[T], usize) {
        let run = row / LANES;
        (
            &self.tiles[run * self.per_run..(run + 1) * self.per_run],
            row % LANES,
        )
    }

    /// Every row's values, row after row.
    #[cfg(test)]
    pub(crate) fn dequantized(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.width());
        for row in 0..self.rows {
            let (tiles, lane) = self.row(row);
            T::values(tiles, lane, &mut out);
        }
        out
    }

    /// `lhs · wᵀ` into `dst` on path `simd`, `lhs` being `m` rows of `k`.
    pub(crate) fn product(
        &self,
        (m, k, n): (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
        simd: Simd,
    ) -> Result<()> {
        let blocks = k / QK;
        let per_group = blocks / T::SPAN;
        let groups = n.div_ceil(LANES);
        if k != self.width()
            || !k.is_multiple_of(QK * T::SPAN)
            || n != self.rows
            || self.tiles.len() != groups * per_group
            || lhs.len() != m * k
            || dst.len() < m * n
        {
            return Err(candle_core::Error::Msg(format!(
                "quantized matmul: bad shapes ({m},{k},{n}) for {} rows of {} in {} tiles",
                self.rows,
                self.width(),
                self.tiles.len()
            )));
        }
        let x: Vec<Q8> = lhs.chunks_exact(QK).map(quantize).collect();
        let columns_per_task = GROUPS_PER_TASK * LANES;
        // One task per run of output columns, for every activation row: a run
        // of eight weight rows is read from memory once and stays in the cache
        // while each activation row is multiplied by it, so rows (a prompt's
        // tokens, or a batch's sequences) share the weight reads. A task writes
        // its columns of every row into its own part of `out`, behind its own
        // (never contended) lock, which is `dst` itself for a single row, and
        // laid out per task otherwise.
        let mut scratch = Vec::new();
        let out: &mut [f32] = if m == 1 {
            &mut dst[..n]
        } else {
            scratch.resize(m * n, 0.0);
            &mut scratch
        };
        let tasks: Vec<Mutex<&mut [f32]>> = out
            .chunks_mut(m * columns_per_task)
            .map(Mutex::new)
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
            for task in range {
                let first = task * GROUPS_PER_TASK;
                let cols = columns_per_task.min(n - first * LANES);
                let mut out = tasks[task].lock().unwrap_or_else(PoisonError::into_inner);
                let x = |row: usize| &x[row * blocks..(row + 1) * blocks];
                // Four activation rows at a time (each tile unpacked once for
                // the four), then two, then the row left over; the
                // rows in tiles, so that a long prompt's activations stay in the
                // second-level cache while the task's weights pass over them.
                for tile in (0..m).step_by(ROW_TILE) {
                    let rows = tile..m.min(tile + ROW_TILE);
                    for g in first..groups.min(first + GROUPS_PER_TASK) {
                        let tiles = &self.tiles[g * per_group..(g + 1) * per_group];
                        let at = (g - first) * LANES;
                        let width = LANES.min(cols - at);
                        let mut put = |row: usize, values: &[f32; LANES]| {
                            out[row * cols + at..][..width].copy_from_slice(&values[..width]);
                        };
                        let mut row = rows.start;
                        while row + 4 <= rows.end {
                            let xs = [x(row), x(row + 1), x(row + 2), x(row + 3)];
                            for (i, values) in T::group(tiles, xs, simd).iter().enumerate() {
                                put(row + i, values);
                            }
                            row += 4;
                        }
                        if row + 2 <= rows.end {
                            let [a, b] = T::group(tiles, [x(row), x(row + 1)], simd);
                            put(row, &a);
                            put(row + 1, &b);
                            row += 2;
                        }
                        if row < rows.end {
                            let [a] = T::group(tiles, [x(row)], simd);
                            put(row, &a);
                        }
                    }
                }
            }
        });
        drop(tasks);
        if m > 1 {
            // From per-task runs of `[row][column]` to `[row][n]`.
            for (task, run) in scratch.chunks(m * columns_per_task).enumerate() {
                let first = task * columns_per_task;
                let cols = run.len() / m;
                for (row, values) in run.chunks_exact(cols).enumerate() {
                    dst[row * n + first..row * n + first + cols].copy_from_slice(values);
                }
            }
        }
        Ok(())
    }
}

/// Checks every format's product passes.
#[cfg(test)]
pub(crate) mod testing {
    use super::{quantize, Kernel, Simd, Tiled, QK};
    use crate::linear::Linear;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// An `n × k` matrix of [`values`], quantized to `dtype`.
    pub(crate) fn quantized(n: usize, k: usize, seed: u64, dtype: GgmlDType) -> QTensor {
        let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    /// The mean distance of `ours` (made from `q`) and of candle's own
    /// product over `q` from the exact product of `m` rows of f32
    /// activations with `q`'s values.
    pub(crate) fn mean_errors(q: QTensor, ours: Linear, m: usize) -> (f32, f32) {
        let (_, k) = q.shape().dims2().unwrap();
        let x = Tensor::from_vec(values(m * k, 23), (m, k), &Device::Cpu).unwrap();
        let exact = x
            .matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap())
            .unwrap();
        let off = |t: Tensor| {
            (t - &exact)
                .unwrap()
                .abs()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let theirs = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
        (off(ours.forward(&x).unwrap()), off(theirs))
    }

    /// `w` holds `q`'s values, bit for bit.
    pub(crate) fn weights_are_the_files<T: Kernel>(q: &QTensor, w: &Tiled<T>) {
        let theirs = q.dequantize(&Device::Cpu).unwrap();
        let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(w.dequantized(), theirs);
    }

    /// Deterministic values in -1..1.
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).max(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 20_001) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// `w`'s product with `m` rows against the same sums in f64, over its
    /// weights (`dequantized`, row after row) and the 8-bit activations:
    /// only f32's rounding may differ, so a value paired with the wrong
    /// weight or scale shows, where the quantization's own error would hide
    /// it.
    pub(crate) fn product_is_exact<T: Kernel>(w: &Tiled<T>, m: usize) {
        let (k, n) = (w.width(), w.rows());
        let dequantized = w.dequantized();
        let x = values(m * k, 17);
        let xq: Vec<f64> = x
            .chunks_exact(QK)
            .map(quantize)
            .flat_map(|b| b.qs.map(|v| f64::from(b.d) * f64::from(v)))
            .collect();
        let mut got = vec![0f32; m * n];
        w.product((m, k, n), &x, &mut got, Simd::detect()).unwrap();
        for row in 0..m {
            for col in 0..n {
                let terms = (0..k).map(|i| f64::from(dequantized[col * k + i]) * xq[row * k + i]);
                let exact: f64 = terms.clone().sum();
                // f32's rounding, a few steps deep, of terms this large.
                let bound = 1e-6 * terms.map(f64::abs).sum::<f64>();
                let g = f64::from(got[row * n + col]);
                assert!(
                    (g - exact).abs() <= bound,
                    "row {row} column {col}: {g} against {exact} (within {bound})"
                );
            }
        }
    }

    /// Every path this CPU has gives the portable path's product to the
    /// bit: the integer sums are exact on every path, and the floats go
    /// through the same operations in the same order. With 70 weight rows
    /// (whole runs of eight and a padded one, tasks of four runs and a
    /// shorter one) and activation rows by fours, pairs and one, in more
    /// than one row tile.
    pub(crate) fn every_path_agrees<T: Kernel>(w: &Tiled<T>) {
        let (k, n) = (w.width(), w.rows());
        assert_eq!(n, 70);
        let best = Simd::detect();
        for m in [1, 2, 3, 4, 7, 67] {
            let x = values(m * k, 9);
            let product = |simd| {
                let mut dst = vec![0f32; m * n];
                w.product((m, k, n), &x, &mut dst, simd).unwrap();
                dst
            };
            let want = product(Simd::Portable);
            for simd in [Simd::Avx2, Simd::Vnni].into_iter().filter(|s| *s <= best) {
                assert_eq!(product(simd), want, "{simd:?}, {m} rows");
            }
        }
    }

    /// A repacked format's tests: its weights are the file's values bit
    /// for bit, its product is that of the quantized activations, every
    /// path gives the same product, and its mean error is at most `$within`
    /// times candle's own product's, with bad shapes refused. `$fast` is
    /// the format's `Tiled` with `new` and `from_bytes`, `$linear` its
    /// `Linear` variant, `$block` its block's width.
    macro_rules! format_tests {
        ($dtype:expr, $fast:ty, $linear:path, $block:expr, $within:expr) => {
            fn weights(n: usize, k: usize, seed: u64) -> (QTensor, $fast) {
                let q = $crate::tiled::testing::quantized(n, k, seed, $dtype);
                let fast = <$fast>::new(&q).unwrap().unwrap();
                (q, fast)
            }

            #[test]
            fn the_weights_are_the_files_bit_for_bit() {
                // 24 rows: a multiple of eight, which candle's own product
                // repacks.
                let (q, fast) = weights(24, 512, 3);
                $crate::tiled::testing::weights_are_the_files(&q, &fast);
            }

            #[test]
            fn the_product_is_that_of_the_quantized_activations_to_float_rounding() {
                $crate::tiled::testing::product_is_exact(&weights(75, 768, 13).1, 3);
            }

            #[test]
            fn every_path_this_cpu_has_gives_the_same_product() {
                $crate::tiled::testing::every_path_agrees(&weights(70, 512, 5).1);
            }

            #[test]
            fn it_is_as_close_to_the_exact_product_as_candles_and_bad_shapes_are_errors() {
                let (q, fast) = weights(48, 1024, 21);
                let (ours, theirs) = $crate::tiled::testing::mean_errors(q, $linear(fast), 2);
                assert!(ours <= theirs * $within, "{ours} against {theirs}");

                assert!(<$fast>::from_bytes(&[0u8; 7], 1, $block).is_err());
                let (_, fast) = weights(8, $block, 1);
                let mut dst = [0f32; 8];
                let simd = $crate::tiled::Simd::detect();
                let product =
                    |lhs: &[f32], dst: &mut [f32]| fast.product((1, $block, 8), lhs, dst, simd);
                assert!(product(&[0.0; $block - 1], &mut dst).is_err());
                assert!(product(&[1.0; $block], &mut dst).is_ok());
            }
        };
    }
    pub(crate) use format_tests;
}
