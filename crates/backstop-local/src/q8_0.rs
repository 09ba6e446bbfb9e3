//! A fast matrix product for Q8_0 weights: the default SmolLM2 file's
//! token embeddings, which it also uses as its output projection (49,152
//! rows, a third of the file).
//!
//! candle 0.11 multiplies Q8_0 one weight row at a time, so every row of a
//! step (each sequence of a batch) reads the 30 MB again: perf put a
//! quarter of a four-sequence SmolLM2 decode step there. Here the weights
//! are repacked eight rows to a register ([`Tile`], and [`crate::tiled`]
//! for why), read once a step for every row.
//!
//! A Q8_0 value is `d · q`, `q` a signed byte, and a block's product with
//! 8-bit activations is `d · d_x · Σ q q_x`. The byte products of AVX-512
//! VNNI take one unsigned side, so the tiles keep `q + 128` (`q ^ 0x80`)
//! and the kernel takes `128 · Σ q_x` back off: the exact `Σ q q_x`. AVX2's
//! pairwise byte products would saturate on `q + 128`, so that path takes
//! `|q|` against `q_x` with `q`'s sign, as ggml's does: the same integer.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;
use half::f16;

#[cfg(target_arch = "x86_64")]
use crate::tiled::FeatureGroup;
use crate::tiled::{Kernel, Tiled, LANES, Q8, QK};

/// Bytes of one GGUF Q8_0 block: an f16 scale and 32 signed bytes.
const BLOCK_BYTES: usize = 2 + QK;

/// Block `b` of eight consecutive weight rows, laid out for the vector
/// registers: row `j`'s scale at `d[j]` and its values `4t..4t + 4`, each
/// plus 128, at `qs[t][4j..4j + 4]`, so that one 32-bit lane of a register
/// loaded from `qs[t]` follows one row. 272 bytes, as the file's 8 · 34.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct Tile {
    d: [f16; LANES],
    qs: [[u8; 4 * LANES]; 8],
}

/// The portable path: the arithmetic of the x86 ones (an exact integer sum
/// a block, then `acc = fma(Σ, d · d_x, acc)`), so that every path gives
/// the same result to the bit.
fn group_portable<const M: usize>(tiles: &[Tile], xs: [&[Q8]; M]) -> [[f32; LANES]; M] {
    let mut acc = [[0f32; LANES]; M];
    for (b, tile) in tiles.iter().enumerate() {
        for (acc, xs) in acc.iter_mut().zip(xs) {
            let x = &xs[b];
            for (j, acc) in acc.iter_mut().enumerate() {
                let mut sum = 0i32;
                for t in 0..8 {
                    for v in 0..4 {
                        let q = i32::from(tile.qs[t][4 * j + v]) - 128;
                        sum += q * i32::from(x.qs[4 * t + v]);
                    }
                }
                let scale = tile.d[j].to_f32() * x.d;
                *acc = (sum as f32).mul_add(scale, *acc);
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

    use super::Tile;
    use crate::tiled::x86::{dot_vnni, lanes, load_bytes, load_f16, prefetch};
    use crate::tiled::{LANES, Q8};

    /// AVX2: `|q|` (an unsigned byte, at most 128) against `q_x` with the
    /// sign of `q`, pairs summed to i16 (at most 2 · 128 · 127) and to i32:
    /// `Σ q q_x` itself.
    #[target_feature(enable = "avx2,fma")]
    fn dot_signed(acc: __m256i, plus128: __m256i, x: __m256i) -> __m256i {
        let q = _mm256_xor_si256(plus128, _mm256_set1_epi8(-128));
        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    macro_rules! group {
        ($name:ident, $features:literal, $dot:ident, $offset:literal) => {
            #[target_feature(enable = $features)]
            pub(in super::super) fn $name<const M: usize>(
                tiles: &[Tile],
                xs: [&[Q8]; M],
            ) -> [[f32; LANES]; M] {
                let mut acc = [_mm256_setzero_ps(); M];
                // Independent sums a row (four for one or two rows, two for
                // four), so that the byte products do not wait on each
                // other.
                let split = if M >= 4 { 2 } else { 4 };
                for (b, tile) in tiles.iter().enumerate() {
                    prefetch(tile);
                    let mut sums = [[_mm256_setzero_si256(); 4]; M];
                    for t in 0..8 {
                        let w = load_bytes(&tile.qs[t]);
                        for i in 0..M {
                            let k = t % split;
                            let x = _mm256_set1_epi32(xs[i][b].word(t));
                            sums[i][k] = $dot(sums[i][k], w, x);
                        }
                    }
                    let d = load_f16(&tile.d);
                    for i in 0..M {
                        let x = &xs[i][b];
                        let [s0, s1, s2, s3] = sums[i];
                        let sum =
                            _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
                        // What the weights' 128 added: 128 · Σ q_x.
                        let sum = _mm256_sub_epi32(sum, _mm256_set1_epi32($offset * x.isum));
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(x.d));
                        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[i]);
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
        group!(avx2, "avx2,fma,f16c", dot_signed, 0);
        group!(vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_vnni, 128);
    }
}

/// Q8_0 weights whose product with f32 activations is fast.
pub type FastQ8_0 = Tiled<Tile>;

impl Tiled<Tile> {
    /// `rows` rows of `width` values from a GGUF Q8_0 tensor's raw bytes,
    /// repacked.
    fn from_bytes(bytes: &[u8], rows: usize, width: usize) -> Result<Self> {
        let per_row =
            Self::blocks_per_row(bytes, (rows, width), GgmlDType::Q8_0, (QK, BLOCK_BYTES))?;
        Ok(Tiled::build(rows, per_row, |first, b| {
            let mut tile = Tile {
                d: [f16::ZERO; LANES],
                // A padding row's values are 0: 128 once stored.
                qs: [[0x80; 4 * LANES]; 8],
            };
            for j in (0..LANES).filter(|j| first + j < rows) {
                let at = ((first + j) * per_row + b) * BLOCK_BYTES;
                let block = &bytes[at..at + BLOCK_BYTES];
                tile.d[j] = f16::from_le_bytes([block[0], block[1]]);
                for (t, qs) in tile.qs.iter_mut().enumerate() {
                    for v in 0..4 {
                        qs[4 * j + v] = block[2 + 4 * t + v] ^ 0x80;
                    }
                }
            }
            tile
        }))
    }

    /// A Q8_0 CPU matrix, repacked; `None` for any other.
    pub fn new(tensor: &QTensor) -> Result<Option<Self>> {
        Self::of(tensor, GgmlDType::Q8_0, Self::from_bytes)
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
            let d = tile.d[j].to_f32();
            for i in 0..QK {
                let q = (tile.qs[i / 4][4 * j + i % 4] ^ 0x80) as i8;
                out.push(d * f32::from(q));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Both quantize the activations per 32 values to 8 bits: the same error
    // but for the order of the sums.
    crate::tiled::testing::format_tests!(
        GgmlDType::Q8_0,
        FastQ8_0,
        crate::linear::Linear::Q8_0,
        QK,
        1.1
    );
}
