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

    #[cfg(test)]
    fn values(tiles: &[Tile], j: usize, out: &mut Vec<f32>) {
        for tile in tiles {
            let (d, m) = (tile.d[j].to_f32(), tile.m[j].to_f32());
            let bytes = || tile.qs.iter().flat_map(|q| &q[4 * j..4 * j + 4]);
            out.extend(bytes().map(|q| d * f32::from(q & 0x0F) + m));
            out.extend(bytes().map(|q| d * f32::from(q >> 4) + m));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiled::testing::{self, values};
    use crate::tiled::Simd;
    use candle_core::quantized::QMatMul;
    use candle_core::{Module, Tensor};

    fn fast(w: &Tensor) -> FastQ4_1 {
        FastQ4_1::new(&[QTensor::quantize(w, GgmlDType::Q4_1).unwrap()])
            .unwrap()
            .unwrap()
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
        let w = Tensor::from_vec(values(75 * 1536, 13), (75, 1536), &Device::Cpu).unwrap();
        let fast = fast(&w);
        testing::product_is_exact(&fast, 3);
    }

    #[test]
    fn every_path_this_cpu_has_gives_the_same_product() {
        let w = Tensor::from_vec(values(70 * 256, 5), (70, 256), &Device::Cpu).unwrap();
        testing::every_path_agrees(&fast(&w));
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
