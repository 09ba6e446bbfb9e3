//! A fast matrix product for Q4_1 weights, the format of the default model.
//!
//! candle 0.11 has no SIMD dot product for Q4_1 and falls back to a generic
//! loop: two thirds of decode time (perf). This is the same arithmetic as
//! ggml's Q4_1 × Q8_1 product — activations quantized per block of 32 to
//! 8-bit with one scale, weights' 4-bit values times the activations' 8-bit
//! values summed in integers, then `d_w · d_x · Σ q_w q_x + m_w · d_x · Σ q_x` —
//! over weights repacked at load so that a vector register holds eight
//! weight rows at once, one per 32-bit lane ([`Tile`]): a block's products
//! for eight rows are eight `dpbusd` (AVX-512 VNNI) or `maddubs`/`madd`
//! pairs (AVX2) against the activations' bytes broadcast, and its scales
//! apply to all eight rows in one multiply and two FMAs, with no per-row
//! broadcasts and no horizontal sums. ggml's own Q4_1 product takes one row
//! at a time; this one does about a third of its instructions per block.
//! A portable loop does the same sums where the CPU has neither. The columns
//! run in parallel on candle's own worker pool (a second pool would fight it
//! for the cores).
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
/// Weight rows a [`Tile`] interleaves: one per 32-bit lane of a 256-bit
/// register.
const LANES: usize = 8;
/// Tiles' worth of output columns per parallel task (32 columns).
const GROUPS_PER_TASK: usize = 4;
/// Activation rows a task takes at a time.
const ROW_TILE: usize = 64;

/// One Q4_1 block as the file has it: value `i` is `d · q_i + m`, `q_i` the
/// low nibbles of `qs` for `i < 16` and the high ones for the rest.
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    d: f16,
    m: f16,
    qs: [u8; QK / 2],
}

/// Block `b` of eight consecutive weight rows, laid out for the vector
/// registers: row `j`'s scale and minimum at `d[j]` and `m[j]`, and its
/// block's bytes `4t..4t + 4` (values `4t..4t + 4` in the low nibbles,
/// `16 + 4t..` in the high ones) at `qs[t][4j..4j + 4]`, so that one 32-bit
/// lane of a register loaded from `qs[t]` follows one row.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Tile {
    d: [f16; LANES],
    m: [f16; LANES],
    qs: [[u8; 4 * LANES]; 4],
}

/// Activations of one block quantized to 8 bits, with the sum of the
/// quantized values (so the product is exactly that of the quantized
/// activations, as in ggml's Q8_1).
#[derive(Debug, Clone, Copy, Default)]
struct Q8 {
    d: f32,
    sum: f32,
    qs: [i8; QK],
}

impl Q8 {
    /// Values `4t..4t + 4` as one little-endian word, to broadcast.
    #[inline(always)]
    fn word(&self, t: usize) -> i32 {
        let q = &self.qs[4 * t..4 * t + 4];
        i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
    }
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
    q
}

/// Eight weight rows (a run of tiles) against activation rows `xs`:
/// `out[i][j]` is row `j` of the tiles times activation row `i`. Each
/// block's integer sums are exact; a row's floats are summed block after
/// block, `acc = fma(Σ, d_w · d_x, acc)` and `mins = fma(m_w, s_x, mins)`,
/// then `acc + mins`: the same operations, in the same order, on every path,
/// so every path gives the same result to the bit.
fn group_portable<const M: usize>(tiles: &[Tile], xs: [&[Q8]; M]) -> [[f32; LANES]; M] {
    let mut acc = [[0f32; LANES]; M];
    let mut mins = [[0f32; LANES]; M];
    for (b, tile) in tiles.iter().enumerate() {
        for i in 0..M {
            let x = &xs[i][b];
            for j in 0..LANES {
                let mut sum = 0i32;
                for t in 0..4 {
                    for v in 0..4 {
                        let byte = tile.qs[t][4 * j + v];
                        sum += i32::from(byte & 0x0F) * i32::from(x.qs[4 * t + v])
                            + i32::from(byte >> 4) * i32::from(x.qs[QK / 2 + 4 * t + v]);
                    }
                }
                let scale = tile.d[j].to_f32() * x.d;
                acc[i][j] = (sum as f32).mul_add(scale, acc[i][j]);
                mins[i][j] = tile.m[j].to_f32().mul_add(x.sum, mins[i][j]);
            }
        }
    }
    let mut out = [[0f32; LANES]; M];
    for i in 0..M {
        for j in 0..LANES {
            out[i][j] = acc[i][j] + mins[i][j];
        }
    }
    out
}

/// The x86-64 paths: the same arithmetic as [`group_portable`], eight rows
/// in the lanes of a register, with AVX2 or with AVX-512 VNNI. Every
/// intrinsic here but the loads and the store is safe to call inside the
/// functions, which enable the features they need.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, LANES, Q8};

    #[target_feature(enable = "avx2,fma")]
    fn load_bytes(bytes: &[u8; 32]) -> __m256i {
        // SAFETY: an unaligned load of the array's 32 bytes.
        #[allow(unsafe_code)]
        unsafe {
            _mm256_loadu_si256(bytes.as_ptr().cast())
        }
    }

    /// Eight f16 values as eight f32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_f16(values: &[half::f16; 8]) -> __m256 {
        // SAFETY: an unaligned load of the array's 16 bytes.
        #[allow(unsafe_code)]
        let halves = unsafe { _mm_loadu_si128(values.as_ptr().cast()) };
        _mm256_cvtph_ps(halves)
    }

    #[target_feature(enable = "avx2,fma")]
    fn lanes(v: __m256) -> [f32; LANES] {
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
    fn dot_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(w, x);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// The same in one AVX-512 VNNI instruction, on 256-bit registers.
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    fn dot_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, x)
    }

    macro_rules! group {
        ($name:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            pub(in super::super) fn $name<const M: usize>(
                tiles: &[Tile],
                xs: [&[Q8]; M],
            ) -> [[f32; LANES]; M] {
                let low = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); M];
                let mut mins = [_mm256_setzero_ps(); M];
                for (b, tile) in tiles.iter().enumerate() {
                    // Four independent sums a row (one per quarter of the
                    // block), so the integer products do not wait on each
                    // other.
                    let mut sums = [[_mm256_setzero_si256(); 4]; M];
                    for t in 0..4 {
                        let w = load_bytes(&tile.qs[t]);
                        let lo = _mm256_and_si256(w, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                        for i in 0..M {
                            let x = &xs[i][b];
                            let s = $dot(sums[i][t], lo, _mm256_set1_epi32(x.word(t)));
                            sums[i][t] = $dot(s, hi, _mm256_set1_epi32(x.word(t + 4)));
                        }
                    }
                    let d = load_f16(&tile.d);
                    let m = load_f16(&tile.m);
                    for i in 0..M {
                        let x = &xs[i][b];
                        let [s0, s1, s2, s3] = sums[i];
                        let sum =
                            _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(x.d));
                        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[i]);
                        mins[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.sum), mins[i]);
                    }
                }
                let mut out = [[0f32; LANES]; M];
                for i in 0..M {
                    out[i] = lanes(_mm256_add_ps(acc[i], mins[i]));
                }
                out
            }
        };
    }

    /// A group's product on each path an x86-64 CPU may have.
    pub(super) mod groups {
        use super::*;
        group!(avx2, "avx2,fma,f16c", dot_avx2);
        group!(vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_vnni);
    }
}

/// The instructions a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Simd {
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
    fn detect() -> Self {
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

/// Eight weight rows (a run of tiles) against activation rows, on path
/// `simd`: `out[i][j]` is row `j` of the tiles times activation row `i`.
#[inline]
fn group<const M: usize>(tiles: &[Tile], xs: [&[Q8]; M], simd: Simd) -> [[f32; LANES]; M] {
    // SAFETY (both calls): `simd` names a path only when `Simd::detect`
    // found the CPU features its function enables; the functions read
    // nothing but their slices, each as long as `tiles` (checked by the
    // caller).
    #[cfg(target_arch = "x86_64")]
    match simd {
        #[allow(unsafe_code)]
        Simd::Vnni => return unsafe { x86::groups::vnni(tiles, xs) },
        #[allow(unsafe_code)]
        Simd::Avx2 => return unsafe { x86::groups::avx2(tiles, xs) },
        Simd::Portable => {}
    }
    let _ = simd;
    group_portable(tiles, xs)
}

/// The blocks of a GGUF Q4_1 tensor's raw bytes.
fn blocks(bytes: &[u8]) -> Vec<Block> {
    bytes
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
        .collect()
}

/// Q4_1 weights whose product with f32 activations is fast.
#[derive(Debug, Clone)]
pub struct FastQ4_1 {
    /// Weight rows (output columns).
    rows: usize,
    /// Blocks a row.
    per_row: usize,
    /// For each run of eight rows (the last padded with zero blocks), its
    /// `per_row` tiles.
    tiles: Vec<Tile>,
}

impl FastQ4_1 {
    /// `rows` rows of `per_row` blocks each, row after row, repacked.
    fn from_blocks(blocks: &[Block], rows: usize, per_row: usize) -> Result<Self> {
        if blocks.len() != rows * per_row {
            return Err(candle_core::Error::Msg(format!(
                "FastQ4_1: {} blocks for {rows} rows of {per_row}",
                blocks.len()
            )));
        }
        let zero = Block::default();
        let mut tiles = Vec::with_capacity(rows.div_ceil(LANES) * per_row);
        for first in (0..rows).step_by(LANES) {
            for b in 0..per_row {
                let mut tile = Tile {
                    d: [f16::ZERO; LANES],
                    m: [f16::ZERO; LANES],
                    qs: [[0; 4 * LANES]; 4],
                };
                for j in 0..LANES {
                    let block = blocks
                        .get((first + j) * per_row + b)
                        .filter(|_| first + j < rows)
                        .unwrap_or(&zero);
                    tile.d[j] = block.d;
                    tile.m[j] = block.m;
                    for (t, qs) in tile.qs.iter_mut().enumerate() {
                        qs[4 * j..4 * j + 4].copy_from_slice(&block.qs[4 * t..4 * t + 4]);
                    }
                }
                tiles.push(tile);
            }
        }
        Ok(FastQ4_1 {
            rows,
            per_row,
            tiles,
        })
    }

    /// Takes a GGUF Q4_1 tensor's raw bytes, `rows` rows of `width` values.
    fn from_bytes(bytes: &[u8], rows: usize, width: usize) -> Result<Self> {
        Self::from_blocks(&blocks(bytes), rows, width / QK)
    }

    /// The blocks again, row after row, as the file had them.
    fn blocks(&self) -> impl Iterator<Item = Block> + '_ {
        (0..self.rows).flat_map(move |row| {
            let (group, j) = (row / LANES, row % LANES);
            self.tiles[group * self.per_row..(group + 1) * self.per_row]
                .iter()
                .map(move |tile| {
                    let mut qs = [0u8; QK / 2];
                    for (t, q) in tile.qs.iter().enumerate() {
                        qs[4 * t..4 * t + 4].copy_from_slice(&q[4 * j..4 * j + 4]);
                    }
                    Block {
                        d: tile.d[j],
                        m: tile.m[j],
                        qs,
                    }
                })
        })
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
        let mut all = Vec::new();
        for t in tensors {
            all.extend(blocks(&t.data()?));
        }
        let fast = FastQ4_1::from_blocks(&all, rows, width / QK)?;
        QTensor::new(QStorage::Cpu(Box::new(fast)), (rows, width)).map(Some)
    }

    /// A Q4_1 CPU tensor with the fast product; other tensors as they are.
    pub fn adopt(tensor: QTensor) -> Result<QTensor> {
        if tensor.dtype() != GgmlDType::Q4_1 || !matches!(tensor.device(), Device::Cpu) {
            return Ok(tensor);
        }
        let (rows, width) = tensor.shape().dims2()?;
        let fast = FastQ4_1::from_bytes(&tensor.data()?, rows, width)?;
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
        let per_row = self.per_row;
        if k != per_row * QK || n != self.rows || lhs.len() != m * k || dst.len() < m * n {
            return Err(candle_core::Error::Msg(format!(
                "FastQ4_1 matmul: bad shapes ({m},{k},{n}) for {} rows of {per_row} blocks",
                self.rows
            )));
        }
        let x: Vec<Q8> = lhs.chunks_exact(QK).map(quantize).collect();
        let groups = n.div_ceil(LANES);
        let columns_per_task = GROUPS_PER_TASK * LANES;
        // One task per run of output columns, for every activation row: a
        // run of eight weight rows is read from memory once and stays in
        // the first-level cache while each activation row is multiplied by
        // it, so rows (a prompt's tokens, or a batch's sequences) share the
        // weight reads. A task writes its columns of every row into its own
        // part of `out`, behind its own (never contended) lock, which is
        // `dst` itself for a single row, and laid out per task otherwise.
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
                let x = |row: usize| &x[row * per_row..(row + 1) * per_row];
                // Two activation rows at a time, then the row left over;
                // the rows in tiles, so that a long prompt's activations
                // stay in the second-level cache while the task's weights
                // pass over them.
                for tile in (0..m).step_by(ROW_TILE) {
                    let rows = tile..m.min(tile + ROW_TILE);
                    for g in first..groups.min(first + GROUPS_PER_TASK) {
                        let tiles = &self.tiles[g * per_row..(g + 1) * per_row];
                        let at = (g - first) * LANES;
                        let width = LANES.min(cols - at);
                        let mut row = rows.start;
                        while row + 2 <= rows.end {
                            let [a, b] = group(tiles, [x(row), x(row + 1)], simd);
                            out[row * cols + at..][..width].copy_from_slice(&a[..width]);
                            out[(row + 1) * cols + at..][..width].copy_from_slice(&b[..width]);
                            row += 2;
                        }
                        if row < rows.end {
                            let [a] = group(tiles, [x(row)], simd);
                            out[row * cols + at..][..width].copy_from_slice(&a[..width]);
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

    fn dequantized(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.per_row * QK);
        for b in self.blocks() {
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
        self.tiles.len() * std::mem::size_of::<Tile>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.tiles.as_ptr().cast()
    }

    fn block_size(&self) -> usize {
        QK
    }

    fn from_float(&mut self, xs: &[f32]) {
        let quantized: Vec<Block> = xs
            .chunks_exact(QK)
            .take(self.rows * self.per_row)
            .map(|xs| {
                let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
                let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let q = |x: f32| ((x - min) * inv).round().clamp(0.0, 15.0) as u8;
                let mut qs = [0u8; QK / 2];
                for (j, q_j) in qs.iter_mut().enumerate() {
                    *q_j = q(xs[j]) | (q(xs[j + QK / 2]) << 4);
                }
                Block {
                    d: f16::from_f32(d),
                    m: f16::from_f32(min),
                    qs,
                }
            })
            .collect();
        // A slice too short for every row leaves the tensor as it was.
        if let Ok(fast) = FastQ4_1::from_blocks(&quantized, self.rows, self.per_row) {
            *self = fast;
        }
    }

    /// Importance weights are not used: the same as [`Self::from_float`].
    fn from_float_imatrix(&mut self, xs: &[f32], _: &[f32], _: usize) {
        self.from_float(xs);
    }

    fn size(&self) -> usize {
        self.rows * self.per_row * BLOCK_BYTES
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
    fn the_product_is_that_of_the_quantized_activations_to_float_rounding() {
        // Against the same sums in f64, over the dequantized weights and
        // the 8-bit activations: only the f32 rounding may differ, so a
        // value paired with the wrong weight shows, where against f32
        // activations the quantization's own error would hide it.
        let (m, k, n) = (3, 1536, 75);
        let w = Tensor::from_vec(values(n * k, 13), (n, k), &Device::Cpu).unwrap();
        let fast = FastQ4_1::from_bytes(
            &QTensor::quantize(&w, GgmlDType::Q4_1)
                .unwrap()
                .data()
                .unwrap(),
            n,
            k,
        )
        .unwrap();
        let weights = fast.dequantized();
        let x = values(m * k, 17);
        let q: Vec<Q8> = x.chunks_exact(QK).map(quantize).collect();
        let xq: Vec<f64> = q
            .iter()
            .flat_map(|b| b.qs.iter().map(move |v| f64::from(b.d) * f64::from(*v)))
            .collect();
        let mut got = vec![0f32; m * n];
        fast.product((m, k, n), &x, &mut got, Simd::detect())
            .unwrap();
        for row in 0..m {
            for col in 0..n {
                let terms = (0..k).map(|i| f64::from(weights[col * k + i]) * xq[row * k + i]);
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

    #[test]
    fn every_path_this_cpu_has_gives_the_same_product() {
        // Shapes that take every branch: whole tiles of eight rows and a
        // padded one, tasks of four tiles and a shorter one, pairs of
        // activation rows and a row left over, more than one row tile.
        let (k, n) = (256, 70);
        let w = Tensor::from_vec(values(n * k, 5), (n, k), &Device::Cpu).unwrap();
        let fast = FastQ4_1::from_bytes(
            &QTensor::quantize(&w, GgmlDType::Q4_1)
                .unwrap()
                .data()
                .unwrap(),
            n,
            k,
        )
        .unwrap();
        let best = Simd::detect();
        for m in [1, 2, 3, 67] {
            let x = values(m * k, 9);
            let product = |simd| {
                let mut dst = vec![0f32; m * n];
                fast.product((m, k, n), &x, &mut dst, simd).unwrap();
                dst
            };
            // The integer sums are exact on every path, and the floats
            // go through the same operations in the same order: every path
            // agrees to the bit.
            let want = product(Simd::Portable);
            for simd in [Simd::Avx2, Simd::Vnni].into_iter().filter(|s| *s <= best) {
                assert_eq!(product(simd), want, "{simd:?}, {m} rows");
            }
        }
    }

    #[test]
    fn other_tensors_are_left_as_they_are_and_bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(64 * 32, 3), (64, 32), &dev).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert_eq!(FastQ4_1::adopt(q8).unwrap().dtype(), GgmlDType::Q8_0);
        let fast = FastQ4_1::from_bytes(&[0u8; BLOCK_BYTES * 2], 2, 32).unwrap();
        let mut dst = [0f32; 2];
        assert!(fast.matmul_t((1, 32, 2), &[0.0; 16], &mut dst).is_err());
        assert!(fast.matmul_t((1, 32, 2), &[1.0; 32], &mut dst).is_ok());
    }
}
