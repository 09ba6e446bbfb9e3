//! A fast matrix product for Q4_K weights, the bulk of a LLaMA-2-7B
//! Q4_K_M file.
//!
//! candle 0.11 multiplies Q4_K one weight row at a time, against
//! activations quantized per 256 values (Q8_K): for one activation row that
//! runs at the memory's bandwidth, but a second row reads every weight
//! again, and from three rows on candle repacks the weights into tiles a
//! third bigger than the file's blocks, kept beside them (on the 7B file,
//! 10.6 GiB resident against the file's 3.8). This product keeps one copy,
//! repacked eight rows to a register ([`Tile`], and [`crate::tiled`] for
//! why): each block is unpacked once for all the activation rows of a
//! step, against activations quantized per 32 values (a finer scale than
//! Q8_K's). A Q4_K value is `d · sc · q − dmin · m`, with `sc` and `m` the
//! 6-bit scale and minimum of its sub-block of 32, so a sub-block's sum is
//! `d · sc · d_x · Σ q q_x − dmin · m · s_x`: the arithmetic of the Q4_1
//! product, with the sub-block's scales unpacked to bytes once at load.
//!
//! [`crate::linear::Linear`] calls it directly: as a candle `QuantizedType`
//! of dtype Q4_K, candle takes its bytes for its own blocks and repacks them
//! (`repack_x86`), which would read garbage.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;
use half::f16;

#[cfg(target_arch = "x86_64")]
use crate::tiled::FeatureGroup;
use crate::tiled::{Kernel, Tiled, LANES, Q8, QK};

/// Values per block (a super-block of eight sub-blocks of 32).
const QK_K: usize = 256;
/// Bytes of one GGUF Q4_K block: f16 scale and minimum, 12 bytes of packed
/// 6-bit sub-block scales and minimums, 128 bytes of nibbles.
const BLOCK_BYTES: usize = 144;
/// Sub-blocks a block.
const SUBS: usize = QK_K / QK;

/// One Q4_K block, its sub-blocks' scales and minimums unpacked: value
/// `32s + i` is `d · scales[s] · q − dmin · mins[s]`, `q` the low nibble of
/// `qs[32c + i]` for sub-block `s = 2c` and the high one for `s = 2c + 1`.
#[derive(Debug, Clone, Copy)]
struct Block {
    d: f16,
    dmin: f16,
    scales: [u8; SUBS],
    mins: [u8; SUBS],
    qs: [u8; QK_K / 2],
}

impl Block {
    const ZERO: Block = Block {
        d: f16::ZERO,
        dmin: f16::ZERO,
        scales: [0; SUBS],
        mins: [0; SUBS],
        qs: [0; QK_K / 2],
    };

    /// A block from the file's 144 bytes.
    fn parse(b: &[u8]) -> Self {
        let packed = &b[4..16];
        let mut block = Block {
            d: f16::from_le_bytes([b[0], b[1]]),
            dmin: f16::from_le_bytes([b[2], b[3]]),
            ..Block::ZERO
        };
        for j in 0..SUBS {
            (block.scales[j], block.mins[j]) = if j < 4 {
                (packed[j] & 63, packed[j + 4] & 63)
            } else {
                (
                    (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
                    (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
                )
            };
        }
        block.qs.copy_from_slice(&b[16..BLOCK_BYTES]);
        block
    }
}

/// Block `b` of eight consecutive weight rows, laid out for the vector
/// registers: row `j`'s scales at `d[j]`, `dmin[j]`, `scales[s][j]` and
/// `mins[s][j]`, and its bytes `32c + 4t..32c + 4t + 4` (values
/// `64c + 4t..` of sub-block `2c` in the low nibbles, of sub-block `2c + 1`
/// in the high ones) at `qs[c][t][4j..4j + 4]`, so that one 32-bit lane of
/// a register loaded from `qs[c][t]` follows one row. 1,184 bytes for the
/// file's 8 · 144.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct Tile {
    d: [f16; LANES],
    dmin: [f16; LANES],
    scales: [[u8; LANES]; SUBS],
    mins: [[u8; LANES]; SUBS],
    qs: [[[u8; 4 * LANES]; 8]; 4],
}

/// The portable path: the arithmetic of the x86 ones, operation for
/// operation, so that every path gives the same result to the bit.
fn group_portable<const M: usize>(tiles: &[Tile], xs: [&[Q8]; M]) -> [[f32; LANES]; M] {
    let mut acc = [[0f32; LANES]; M];
    let mut mins = [[0f32; LANES]; M];
    for (b, tile) in tiles.iter().enumerate() {
        for s in 0..SUBS {
            let (c, shift) = (s / 2, 4 * (s % 2));
            for i in 0..M {
                let x = &xs[i][SUBS * b + s];
                for j in 0..LANES {
                    let mut sum = 0i32;
                    for t in 0..8 {
                        for v in 0..4 {
                            let q = (tile.qs[c][t][4 * j + v] >> shift) & 0x0F;
                            sum += i32::from(q) * i32::from(x.qs[4 * t + v]);
                        }
                    }
                    let scale = tile.d[j].to_f32() * f32::from(tile.scales[s][j]);
                    let min = tile.dmin[j].to_f32() * f32::from(tile.mins[s][j]);
                    acc[i][j] = (sum as f32).mul_add(scale * x.d, acc[i][j]);
                    mins[i][j] = min.mul_add(x.sum, mins[i][j]);
                }
            }
        }
    }
    let mut out = [[0f32; LANES]; M];
    for i in 0..M {
        for j in 0..LANES {
            out[i][j] = acc[i][j] - mins[i][j];
        }
    }
    out
}

/// The x86-64 paths: eight rows in the lanes of a register, with AVX2 or
/// with AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, SUBS};
    use crate::tiled::x86::{dot_avx2, dot_vnni, lanes, load_bytes, load_f16, load_u8, prefetch};
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
                    let d = load_f16(&tile.d);
                    let dmin = load_f16(&tile.dmin);
                    for c in 0..4 {
                        // Sub-blocks 2c (low nibbles) and 2c + 1 (high), two
                        // independent sums each a row for one or two rows,
                        // so that the byte products do not wait on each
                        // other; four rows are eight chains already.
                        let split = if M >= 4 { 1 } else { 2 };
                        let mut sums = [[[_mm256_setzero_si256(); 2]; 2]; M];
                        for t in 0..8 {
                            let w = load_bytes(&tile.qs[c][t]);
                            let lo = _mm256_and_si256(w, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                            for i in 0..M {
                                let (xl, xh) =
                                    (&xs[i][SUBS * b + 2 * c], &xs[i][SUBS * b + 2 * c + 1]);
                                let [l, h] = &mut sums[i];
                                let k = t % split;
                                l[k] = $dot(l[k], lo, _mm256_set1_epi32(xl.word(t)));
                                h[k] = $dot(h[k], hi, _mm256_set1_epi32(xh.word(t)));
                            }
                        }
                        for half in 0..2 {
                            let s = 2 * c + half;
                            let scale = _mm256_mul_ps(d, load_u8(&tile.scales[s]));
                            let min = _mm256_mul_ps(dmin, load_u8(&tile.mins[s]));
                            for i in 0..M {
                                let x = &xs[i][SUBS * b + s];
                                let [s0, s1] = sums[i][half];
                                let sum = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                                let scale = _mm256_mul_ps(scale, _mm256_set1_ps(x.d));
                                acc[i] = _mm256_fmadd_ps(sum, scale, acc[i]);
                                mins[i] = _mm256_fmadd_ps(min, _mm256_set1_ps(x.sum), mins[i]);
                            }
                        }
                    }
                }
                let mut out = [[0f32; LANES]; M];
                for i in 0..M {
                    out[i] = lanes(_mm256_sub_ps(acc[i], mins[i]));
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

/// Q4_K weights whose product with f32 activations is fast.
pub type FastQ4K = Tiled<Tile>;

impl Tiled<Tile> {
    /// `rows` rows of `width` values from a GGUF Q4_K tensor's raw bytes,
    /// repacked.
    fn from_bytes(bytes: &[u8], rows: usize, width: usize) -> Result<Self> {
        let per_row =
            Self::blocks_per_row(bytes, (rows, width), GgmlDType::Q4K, (QK_K, BLOCK_BYTES))?;
        let block = |row: usize, b: usize| {
            let at = (row * per_row + b) * BLOCK_BYTES;
            Block::parse(&bytes[at..at + BLOCK_BYTES])
        };
        Ok(Tiled::build(rows, per_row, |first, b| {
            let mut tile = Tile {
                d: [f16::ZERO; LANES],
                dmin: [f16::ZERO; LANES],
                scales: [[0; LANES]; SUBS],
                mins: [[0; LANES]; SUBS],
                qs: [[[0; 4 * LANES]; 8]; 4],
            };
            for j in 0..LANES {
                let block = if first + j < rows {
                    block(first + j, b)
                } else {
                    Block::ZERO
                };
                tile.d[j] = block.d;
                tile.dmin[j] = block.dmin;
                for s in 0..SUBS {
                    tile.scales[s][j] = block.scales[s];
                    tile.mins[s][j] = block.mins[s];
                }
                for (c, chunk) in tile.qs.iter_mut().enumerate() {
                    for (t, qs) in chunk.iter_mut().enumerate() {
                        let at = 32 * c + 4 * t;
                        qs[4 * j..4 * j + 4].copy_from_slice(&block.qs[at..at + 4]);
                    }
                }
            }
            tile
        }))
    }

    /// A Q4_K CPU matrix, repacked; `None` for any other.
    pub fn new(tensor: &QTensor) -> Result<Option<Self>> {
        Self::of(tensor, GgmlDType::Q4K, Self::from_bytes)
    }
}

impl Kernel for Tile {
    const SPAN: usize = SUBS;

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
            for s in 0..SUBS {
                let scale = tile.d[j].to_f32() * f32::from(tile.scales[s][j]);
                let min = tile.dmin[j].to_f32() * f32::from(tile.mins[s][j]);
                let (c, shift) = (s / 2, 4 * (s % 2));
                for i in 0..QK {
                    let q = (tile.qs[c][i / 4][4 * j + i % 4] >> shift) & 0x0F;
                    out.push(scale * f32::from(q) - min);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Activations quantized per 32 values, not per 256 as candle's: closer
    // on average.
    crate::tiled::testing::format_tests!(
        GgmlDType::Q4K,
        FastQ4K,
        crate::linear::Linear::Q4K,
        QK_K,
        1.0
    );
}
