//! A fast matrix product for Q6_K weights: LLaMA-2-7B Q4_K_M's output
//! projection and half its layers' value and down projections, a quarter
//! of the file's bytes.
//!
//! candle 0.11 multiplies Q6_K one weight row at a time, so every row of a
//! step (each sequence of a batch) reads the weights again: two 7B
//! sequences read these 0.9 GB twice a step. Here they are repacked eight
//! rows to a register ([`Tile`], and [`crate::tiled`] for why), read once a
//! step for every row.
//!
//! A Q6_K value is `d · sc · (q − 32)`, `q` six bits (a nibble and two high
//! bits, stored apart) and `sc` a signed byte per 16 values. An activation
//! block of 32 spans two such sub-blocks, so a sub-block's sum is
//! `d · sc · d_x · Σ q q_x − 32 · d · sc · s_x`, `s_x` being `d_x` times the
//! sum of the sub-block's half of the quantized activations
//! ([`Q8::halves`]): the arithmetic of the Q4_K product, with `32 · d · sc`
//! for its minimum (taken off in the product's own accumulator) and `q`
//! itself the unsigned side of the byte products.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;
use half::f16;

#[cfg(target_arch = "x86_64")]
use crate::tiled::FeatureGroup;
use crate::tiled::{Kernel, Tiled, LANES, Q8, QK};

/// Values per block.
const QK_K: usize = 256;
/// Bytes of one GGUF Q6_K block: 128 bytes of low nibbles, 64 of high bit
/// pairs, 16 signed scales and an f16 scale.
const BLOCK_BYTES: usize = 210;
/// Activation blocks of 32 a block.
const SPAN: usize = QK_K / QK;
/// Sub-blocks of 16 values (one scale each) a block.
const SUBS: usize = QK_K / 16;

/// Block `b` of eight consecutive weight rows, laid out for the vector
/// registers with one 32-bit lane per row, in the order the kernel reads
/// them: row `j`'s scales at `d[j]` and `scales[s][j]` (sub-block `s` being
/// values `16s..16s + 16`), and the four values `128h + 32c + l` (`c` in
/// 0..4, `l = 4t + v`) in the three bytes `qs[h][t][p][4j + v]`: bits 0..6
/// of parts 0, 1 and 2 hold `c` = 0, 1 and 3, and their top two bits hold
/// `c = 2`'s bits 0..2, 2..4 and 4..6. Four registers of values unpack
/// from three loads in eleven AVX2 operations (three masks, three shifts,
/// a mask, and two masked merges of two each), where the file's nibbles
/// and bit pairs take seventeen (counted in the code, not timed apart).
/// 1,680 bytes, as the file's 8 · 210.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct Tile {
    d: [f16; LANES],
    scales: [[i8; LANES]; SUBS],
    qs: [[[[u8; 4 * LANES]; 3]; 8]; 2],
}

impl Tile {
    /// The six bits of value `128h + 32c + 4t + v` of the row in lane `j`.
    fn q(&self, h: usize, c: usize, t: usize, j: usize, v: usize) -> u8 {
        let [a, b, d] = self.qs[h][t].map(|part| part[4 * j + v]);
        match c {
            0 => a & 0x3F,
            1 => b & 0x3F,
            2 => (a >> 6) | ((b >> 6) << 2) | ((d >> 6) << 4),
            _ => d & 0x3F,
        }
    }

    /// `d · sc` of sub-block `s` of the row in lane `j`.
    fn scale(&self, s: usize, j: usize) -> f32 {
        self.d[j].to_f32() * f32::from(self.scales[s][j])
    }
}

/// The portable path: the arithmetic of the x86 ones, operation for
/// operation (sub-blocks in the same order), so that every path gives the
/// same result to the bit.
fn group_portable<const M: usize>(tiles: &[Tile], xs: [&[Q8]; M]) -> [[f32; LANES]; M] {
    let mut acc = [[0f32; LANES]; M];
    for (b, tile) in tiles.iter().enumerate() {
        for h in 0..2 {
            for k in 0..2 {
                for c in 0..4 {
                    let s = 4 * h + c;
                    for (acc, xs) in acc.iter_mut().zip(xs) {
                        let x = &xs[SPAN * b + s];
                        for (j, acc) in acc.iter_mut().enumerate() {
                            let mut sum = 0i32;
                            for t in 4 * k..4 * k + 4 {
                                for v in 0..4 {
                                    let q = i32::from(tile.q(h, c, t, j, v));
                                    sum += q * i32::from(x.qs[4 * t + v]);
                                }
                            }
                            let scale = tile.scale(2 * s + k, j);
                            *acc = (sum as f32).mul_add(scale * x.d, *acc);
                            *acc = (-(scale * 32.0)).mul_add(x.halves[k], *acc);
                        }
                    }
                }
            }
        }
    }
    acc
}

/// The x86-64 paths: eight rows in the lanes of a register, with AVX2 or
/// with AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, SPAN};
    use crate::tiled::x86::{dot_avx2, dot_vnni, lanes, load_bytes, load_f16, load_i8, prefetch};
    use crate::tiled::{LANES, Q8};

    /// `acc` with the bits of `v` under `mask` set (`acc` has none there).
    #[target_feature(enable = "avx2,fma")]
    fn or_masked(acc: __m256i, v: __m256i, mask: __m256i) -> __m256i {
        _mm256_or_si256(acc, _mm256_and_si256(v, mask))
    }

    macro_rules! group {
        ($name:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            pub(in super::super) fn $name<const M: usize>(
                tiles: &[Tile],
                xs: [&[Q8]; M],
            ) -> [[f32; LANES]; M] {
                let six = _mm256_set1_epi8(0x3F);
                let low2 = _mm256_set1_epi8(0x03);
                let mid2 = _mm256_set1_epi8(0x0C);
                let high2 = _mm256_set1_epi8(0x30);
                let mut acc = [_mm256_setzero_ps(); M];
                for (b, tile) in tiles.iter().enumerate() {
                    prefetch(tile);
                    let d = load_f16(&tile.d);
                    for h in 0..2 {
                        // The first 16 values of the half's four activation
                        // blocks (sub-blocks 8h + 2c), then the last 16.
                        for k in 0..2 {
                            let mut sums = [[_mm256_setzero_si256(); 4]; M];
                            for t in 4 * k..4 * k + 4 {
                                let [p0, p1, p2] = &tile.qs[h][t];
                                let (p0, p1, p2) = (load_bytes(p0), load_bytes(p1), load_bytes(p2));
                                // Sixteen-bit shifts: the masks drop what
                                // crosses from the next byte.
                                let two = _mm256_and_si256(_mm256_srli_epi16(p0, 6), low2);
                                let two = or_masked(two, _mm256_srli_epi16(p1, 4), mid2);
                                let two = or_masked(two, _mm256_srli_epi16(p2, 2), high2);
                                let q = [
                                    _mm256_and_si256(p0, six),
                                    _mm256_and_si256(p1, six),
                                    two,
                                    _mm256_and_si256(p2, six),
                                ];
                                for i in 0..M {
                                    for c in 0..4 {
                                        let x = &xs[i][SPAN * b + 4 * h + c];
                                        let word = _mm256_set1_epi32(x.word(t));
                                        sums[i][c] = $dot(sums[i][c], q[c], word);
                                    }
                                }
                            }
                            for c in 0..4 {
                                let s = 4 * h + c;
                                let scale = _mm256_mul_ps(d, load_i8(&tile.scales[2 * s + k]));
                                let offset = _mm256_mul_ps(scale, _mm256_set1_ps(32.0));
                                for i in 0..M {
                                    let x = &xs[i][SPAN * b + s];
                                    let sum = _mm256_cvtepi32_ps(sums[i][c]);
                                    let times_x = _mm256_mul_ps(scale, _mm256_set1_ps(x.d));
                                    acc[i] = _mm256_fmadd_ps(sum, times_x, acc[i]);
                                    let half = _mm256_set1_ps(x.halves[k]);
                                    acc[i] = _mm256_fnmadd_ps(offset, half, acc[i]);
                                }
                            }
                        }
                    }
                }
                let mut out = [[0f32; LANES]; M];
                for i in 0..M {
                    out[i] = lanes(acc[i]);
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

/// Q6_K weights whose product with f32 activations is fast.
pub type FastQ6K = Tiled<Tile>;

impl Tiled<Tile> {
    /// `rows` rows of `width` values from a GGUF Q6_K tensor's raw bytes,
    /// repacked.
    fn from_bytes(bytes: &[u8], rows: usize, width: usize) -> Result<Self> {
        let per_row =
            Self::blocks_per_row(bytes, (rows, width), GgmlDType::Q6K, (QK_K, BLOCK_BYTES))?;
        Ok(Tiled::build(rows, per_row, |first, b| {
            // Padding rows are zero: scale 0.
            let mut tile = Tile {
                d: [f16::ZERO; LANES],
                scales: [[0; LANES]; SUBS],
                qs: [[[[0; 4 * LANES]; 3]; 8]; 2],
            };
            for j in (0..LANES).filter(|j| first + j < rows) {
                let at = ((first + j) * per_row + b) * BLOCK_BYTES;
                let block = &bytes[at..at + BLOCK_BYTES];
                let (ql, rest) = block.split_at(QK_K / 2);
                let (qh, rest) = rest.split_at(QK_K / 4);
                let (scales, d) = rest.split_at(SUBS);
                tile.d[j] = f16::from_le_bytes([d[0], d[1]]);
                for (s, scale) in scales.iter().enumerate() {
                    tile.scales[s][j] = *scale as i8;
                }
                // Value `128h + 32c + l`, as the file keeps it: the low
                // nibbles of `ql[64h + l]` (c = 0, 2) and `ql[64h + 32 + l]`
                // (c = 1, 3), and bits `2c..2c + 2` of `qh[32h + l]`.
                let q = |h: usize, c: usize, l: usize| {
                    let low = ql[64 * h + 32 * (c % 2) + l] >> (4 * (c / 2));
                    (low & 0x0F) | (((qh[32 * h + l] >> (2 * c)) & 3) << 4)
                };
                for (h, half) in tile.qs.iter_mut().enumerate() {
                    for (t, [a, b, d3]) in half.iter_mut().enumerate() {
                        for v in 0..4 {
                            let l = 4 * t + v;
                            let two = q(h, 2, l);
                            a[4 * j + v] = q(h, 0, l) | (two << 6);
                            b[4 * j + v] = q(h, 1, l) | ((two >> 2) << 6);
                            d3[4 * j + v] = q(h, 3, l) | ((two >> 4) << 6);
                        }
                    }
                }
            }
            tile
        }))
    }

    /// A Q6_K CPU matrix, repacked; `None` for any other.
    pub fn new(tensor: &QTensor) -> Result<Option<Self>> {
        Self::of(tensor, GgmlDType::Q6K, Self::from_bytes)
    }
}

impl Kernel for Tile {
    const SPAN: usize = SPAN;

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
            for h in 0..2 {
                for c in 0..4 {
                    for l in 0..QK {
                        let q = f32::from(tile.q(h, c, l / 4, j, l % 4)) - 32.0;
                        out.push(tile.scale(8 * h + 2 * c + l / 16, j) * q);
                    }
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
        GgmlDType::Q6K,
        FastQ6K,
        crate::linear::Linear::Q6K,
        QK_K,
        1.0
    );
}
