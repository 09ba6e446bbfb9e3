//! A fast matrix product for Q4_1 weights, the format of the default model.
//!
//! candle 0.11 has no SIMD dot product for Q4_1 and falls back to a generic
//! loop: two thirds of decode time (perf). This is the same arithmetic as
//! ggml's Q4_1 × Q8_1 product — activations quantized per block of 32 to
//! 8-bit with one scale, weights' 4-bit values times the activations' 8-bit
//! values summed in integers, then `d_w · d_x · Σ q_w q_x + m_w · d_x · Σ q_x` —
//! over weights repacked eight rows to a register ([`Tile`], and
//! [`crate::tiled`] for why), with AVX-512 VNNI or AVX2 when the CPU has
//! them and a portable loop otherwise.
//!
//! [`crate::linear::Linear`] calls it directly: as a candle `QuantizedType`
//! of dtype Q4_1, candle could take its repacked bytes for its own blocks.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result};

use half::f16;

#[cfg(target_arch = "x86_64")]
use crate::tiled::FeatureGroup;
use crate::tiled::{Kernel, Tiled, LANES, Q8, QK};

/// Bytes of one GGUF Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;

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
pub(crate) struct Tile {
    d: [f16; LANES],
    m: [f16; LANES],
    qs: [[u8; 4 * LANES]; 4],
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
/// in the lanes of a register, with AVX2 or with AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Tile;
    use crate::tiled::x86::{dot_avx2, dot_vnni, lanes, load_bytes, load_f16, prefetch};
    use crate::tiled::{LANES, Q8};

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
                    prefetch(tile);
                    // Four independent sums a row (one per quarter of the
                    // block) for one or two rows, so the integer products
                    // do not wait on each other; two for four rows (eight
                    // chains), which then fit the registers.
                    let split = if M >= 4 { 2 } else { 4 };
                    let mut sums = [[_mm256_setzero_si256(); 4]; M];
                    for t in 0..4 {
                        let w = load_bytes(&tile.qs[t]);
                        let lo = _mm256_and_si256(w, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                        for i in 0..M {
                            let x = &xs[i][b];
                            let k = t % split;
                            let s = $dot(sums[i][k], lo, _mm256_set1_epi32(x.word(t)));
                            sums[i][k] = $dot(s, hi, _mm256_set1_epi32(x.word(t + 4)));
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
pub type FastQ4_1 = Tiled<Tile>;

impl Tiled<Tile> {
    /// `rows` rows of `per_row` blocks each, row after row, repacked.
    fn from_blocks(blocks: &[Block], rows: usize, per_row: usize) -> Result<Self> {
        if blocks.len() != rows * per_row {
            return Err(candle_core::Error::Msg(format!(
                "FastQ4_1: {} blocks for {rows} rows of {per_row}",
                blocks.len()
            )));
        }
        let zero = Block::default();
        Ok(Tiled::build(rows, per_row, |first, b| {
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
            tile
        }))
    }

    /// Takes a GGUF Q4_1 tensor's raw bytes, `rows` rows of `width` values.
    #[cfg(test)]
    fn from_bytes(bytes: &[u8], rows: usize, width: usize) -> Result<Self> {
        Self::from_blocks(&blocks(bytes), rows, width / QK)
    }

    /// The blocks again, row after row, as the file had them.
    #[cfg(test)]
    fn blocks(&self) -> impl Iterator<Item = Block> + '_ {
        (0..self.rows()).flat_map(move |row| {
            let (tiles, j) = self.row(row);
            tiles.iter().map(move |tile| {
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

    /// Q4_1 CPU matrices with the same input width (one, or a layer's
    /// q/k/v), stacked into one, their rows one after the other; `None`
    /// when they are not all such.
    pub fn new(tensors: &[QTensor]) -> Result<Option<Self>> {
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
        FastQ4_1::from_blocks(&all, rows, width / QK).map(Some)
    }

    #[cfg(test)]
    fn dequantized(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows() * self.width());
        for b in self.blocks() {
            let (d, m) = (b.d.to_f32(), b.m.to_f32());
            out.extend(b.qs.iter().map(|q| d * f32::from(q & 0x0F) + m));
            out.extend(b.qs.iter().map(|q| d * f32::from(q >> 4) + m));
        }
        out
    }
}

impl Kernel for Tile {
    const SPAN: usize = 1;

    fn portable<const M: usize>(tiles: &[Tile], xs: [&[Q8]; M]) -> [[f32; LANES]; M] {
        group_portable(tiles, xs)
    }

    #[cfg(target_arch = "x86_64")]
    fn x86<const M: usize>() -> [FeatureGroup<Tile, M>; 2] {
        [x86::groups::avx2::<M>, x86::groups::vnni::<M>]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiled::Simd;
    use candle_core::quantized::QMatMul;
    use candle_core::{Module, Tensor};

    fn fast(w: &Tensor) -> FastQ4_1 {
        FastQ4_1::new(&[QTensor::quantize(w, GgmlDType::Q4_1).unwrap()])
            .unwrap()
            .unwrap()
    }

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
        let fast = fast(&w);
        let want = QMatMul::from_qtensor(reference)
            .unwrap()
            .forward(&x)
            .unwrap();
        let dq = Tensor::from_vec(fast.dequantized(), (n, k), &dev).unwrap();
        let mut got = vec![0f32; m * n];
        let lhs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        fast.product((m, k, n), &lhs, &mut got, Simd::detect())
            .unwrap();
        let got = Tensor::from_vec(got, (m, n), &dev).unwrap();
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
        let fast = fast(&w);
        let weights = fast.dequantized();
        let x = values(m * k, 17);
        let q: Vec<Q8> = x.chunks_exact(QK).map(crate::tiled::quantize).collect();
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
        let fast = fast(&w);
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
        assert!(FastQ4_1::new(&[q8]).unwrap().is_none());
        let fast = FastQ4_1::from_bytes(&[0u8; BLOCK_BYTES * 2], 2, 32).unwrap();
        let mut dst = [0f32; 2];
        let product =
            |lhs: &[f32], dst: &mut [f32]| fast.product((1, 32, 2), lhs, dst, Simd::detect());
        assert!(product(&[0.0; 16], &mut dst).is_err());
        assert!(product(&[1.0; 32], &mut dst).is_ok());
    }
}
