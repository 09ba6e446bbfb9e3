//! The llama forward pass, owned here and built on candle's tensors and
//! quantized matrix products.
//!
//! What it does differently from candle-transformers' `quantized_llama`:
//! - the KV cache is allocated once per sequence for the whole context and
//!   written in place; attention reads a view of it, so a step costs the same
//!   whatever came before (candle's grows by concatenation, copying the whole
//!   cache every step);
//! - rotary tables cover the model's full trained context (candle's stop at
//!   4,096 positions);
//! - grouped-query attention groups the query heads of each KV head instead of
//!   copying the keys and values once per query head;
//! - one step runs several sequences at once ([`Llama::forward_batch`]): the
//!   projections and feed-forward over all their tokens together, attention
//!   per sequence over its own cache;
//! - a single token's attention (a decode step) is one fused pass over its
//!   cache instead of about ten candle operations;
//! - RMS norms and rotary embeddings run on this thread or candle's barrier
//!   pool ([`crate::rows`]), never waiting on rayon's;
//! - weights multiply through [`crate::linear::Linear`] (Q4_1, Q4_K and
//!   Q8_0 repacked for the CPU);
//! - keys and values are kept in f16 on the CPU by default
//!   ([`crate::KvCache`]): half the memory a sequence holds and a decode
//!   step reads;
//! - the output projection reuses the token embeddings when the file has no
//!   `output.weight` (tied embeddings).

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;
use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device, Layout, Result, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;

use crate::linear::{Linear, Parallel};
use crate::rows::{self, RmsNorm};
use crate::KvCache;

/// The model's shape, from the GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer with grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Positions the model was trained for.
    pub context: usize,
}

struct Layer {
    attn_norm: RmsNorm,
    /// Query, key and value projections.
    qkv: Parallel,
    wo: Linear,
    ffn_norm: RmsNorm,
    /// Gate and up projections.
    gate_up: Parallel,
    down: Linear,
}

/// The weights, shared by every sequence.
pub struct Llama {
    /// The model's shape.
    pub shape: Shape,
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// The cache's element type.
    kv: DType,
}

/// One sequence's keys and values for every layer, preallocated for `len`
/// positions, and how many are filled.
pub struct Cache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    filled: usize,
}

impl Cache {
    /// Positions it can hold.
    pub fn capacity(&self) -> usize {
        self.keys.first().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Forgets every position, keeping the memory.
    pub fn clear(&mut self) {
        self.filled = 0;
    }
}

/// How weights are multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Quantized, as in the file (Q4_1 through [`FastQ4_1`]).
    Quantized,
    /// Dequantized to f32, activations never quantized: the reference that
    /// the quantized path is checked against.
    F32,
}

fn matmul(
    ct: &gguf_file::Content,
    reader: &mut (impl Read + Seek),
    name: &str,
    device: &Device,
    precision: Precision,
) -> Result<Linear> {
    Linear::new(ct.tensor(reader, name, device)?, device, precision)
}

/// The outputs of a [`Parallel`], as an array.
fn parts<const N: usize>(outputs: Vec<Tensor>) -> Result<[Tensor; N]> {
    outputs
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("expected {N} projections")))
}

fn metadata(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl Llama {
    /// Reads the weights of a llama-architecture GGUF file.
    pub fn from_gguf(
        ct: &gguf_file::Content,
        reader: &mut (impl Read + Seek),
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let matmul = |reader: &mut _, name: &str| matmul(ct, reader, name, device, precision);
        let parallel = |reader: &mut _, names: &[&str]| -> Result<Parallel> {
            let tensors = names
                .iter()
                .map(|name| ct.tensor(reader, name, device))
                .collect::<Result<_>>()?;
            Parallel::new(tensors, device, precision)
        };
        let need = |key: &str| {
            metadata(ct, key)
                .map(|v| v as usize)
                .ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata `{key}` is missing")))
        };
        let heads = need("llama.attention.head_count")?;
        let hidden = need("llama.embedding_length")?;
        let shape = Shape {
            layers: need("llama.block_count")?,
            heads,
            kv_heads: metadata(ct, "llama.attention.head_count_kv").map_or(heads, |v| v as usize),
            head_dim: metadata(ct, "llama.rope.dimension_count")
                .map_or(hidden / heads, |v| v as usize),
            hidden,
            context: metadata(ct, "llama.context_length").map_or(2048, |v| v as usize),
        };
        if !shape.heads.is_multiple_of(shape.kv_heads) || shape.head_dim * shape.heads != hidden {
            return Err(candle_core::Error::Msg(format!(
                "unsupported llama shape {shape:?}"
            )));
        }
        let eps = ct
            .metadata
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(1e-5) as f64;
        let base = ct
            .metadata
            .get("llama.rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        let embeddings = ct
            .tensor(reader, "token_embd.weight", device)?
            .dequantize(device)?;
        let output = if ct.tensor_infos.contains_key("output.weight") {
            matmul(reader, "output.weight")?
        } else {
            matmul(reader, "token_embd.weight")?
        };
        let norm = |reader: &mut _, name: &str| RmsNorm::new(ct.tensor(reader, name, device)?, eps);
        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: norm(reader, &format!("{p}.attn_norm.weight"))?,
                qkv: parallel(
                    reader,
                    &[
                        &format!("{p}.attn_q.weight"),
                        &format!("{p}.attn_k.weight"),
                        &format!("{p}.attn_v.weight"),
                    ],
                )?,
                wo: matmul(reader, &format!("{p}.attn_output.weight"))?,
                ffn_norm: norm(reader, &format!("{p}.ffn_norm.weight"))?,
                gate_up: parallel(
                    reader,
                    &[
                        &format!("{p}.ffn_gate.weight"),
                        &format!("{p}.ffn_up.weight"),
                    ],
                )?,
                down: matmul(reader, &format!("{p}.ffn_down.weight"))?,
            });
        }
        let (cos, sin) = rotary(shape.head_dim, shape.context, base, device)?;
        Ok(Llama {
            shape,
            embeddings,
            layers,
            norm: norm(reader, "output_norm.weight")?,
            output,
            cos,
            sin,
            device: device.clone(),
            kv: DType::F32,
        })
    }

    /// Keeps the caches made from now on as `kv` says, on the CPU (f32 on
    /// any other device).
    pub fn keep_kv(&mut self, kv: KvCache) {
        self.kv = match kv {
            KvCache::F16 if self.device.is_cpu() => DType::F16,
            _ => DType::F32,
        };
    }

    /// Prompt tokens a sequence runs in one step while other sequences
    /// run too, so that a long prompt holds their next tokens back for one
    /// chunk's time at most (a sequence alone runs its whole prompt at
    /// once). 64 on the CPU. 512 on a GPU: there a step of 512 rows took
    /// about 55 ms on the 7B file (`benches/README.md`, "On a GPU"), no
    /// longer than a CPU's chunk of 64 on the small model, while chunks of
    /// 64 cost several sequences' prompts eight steps each, reading every
    /// weight each time (0.40-0.66x llama.cpp's prompt rate at 2 and 4).
    pub fn prefill_chunk(&self) -> usize {
        if self.device.is_cpu() {
            64
        } else {
            512
        }
    }

    /// An empty cache for one sequence of up to `len` positions.
    pub fn cache(&self, len: usize) -> Result<Cache> {
        let len = len.min(self.shape.context);
        let dims = (1, self.shape.kv_heads, len, self.shape.head_dim);
        let zeros = || match self.kv {
            // Zeroed by the allocator, as candle's f32 zeros are, not
            // written here: candle fills an f16 tensor's zeros value by
            // value, and a 7B sequence's f16 cache is half a megabyte a
            // position. (f16 is kept on the CPU only.)
            DType::F16 => {
                let zeros: Vec<f16> =
                    vec![0u16; dims.0 * dims.1 * dims.2 * dims.3].reinterpret_into();
                Tensor::from_vec(zeros, dims, &self.device)
            }
            kv => Tensor::zeros(dims, kv, &self.device),
        };
        Ok(Cache {
            keys: (0..self.shape.layers)
                .map(|_| zeros())
                .collect::<Result<_>>()?,
            values: (0..self.shape.layers)
                .map(|_| zeros())
                .collect::<Result<_>>()?,
            filled: 0,
        })
    }

    /// Runs `tokens` at the cache's next positions and returns the logits
    /// after the last one (`[vocab]`).
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache) -> Result<Tensor> {
        self.forward_batch(&mut [Segment { tokens, cache }])?
            .squeeze(0)
    }

    /// Runs one step for several sequences at once and returns the logits
    /// after each one's last token (`[segments, vocab]`). Each segment's
    /// tokens go at its own cache's next positions: a prompt (or a piece of
    /// one) or a single decode token, in any mix. The projections and the
    /// feed-forward run once over every token of the step, so the sequences
    /// share each weight read; attention runs per sequence, over its own
    /// cache.
    pub fn forward_batch(&self, batch: &mut [Segment<'_>]) -> Result<Tensor> {
        let Shape {
            heads,
            kv_heads,
            head_dim,
            ..
        } = self.shape;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut last = Vec::with_capacity(batch.len());
        for Segment { tokens: seg, cache } in batch.iter() {
            let (seq, at, room) = (seg.len(), cache.filled, cache.capacity());
            if seq == 0 || at + seq > room {
                return Err(candle_core::Error::Msg(format!(
                    "{seq} tokens at position {at} do not fit a cache of {room}"
                )));
            }
            tokens.extend_from_slice(seg);
            positions.extend(at as u32..(at + seq) as u32);
            last.push(tokens.len() as u32 - 1);
        }
        let total = tokens.len();
        let ids = Tensor::new(tokens.as_slice(), &self.device)?;
        let mut x = self.embeddings.index_select(&ids, 0)?.unsqueeze(0)?;
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let (cos, sin) = (
            self.cos.index_select(&positions, 0)?,
            self.sin.index_select(&positions, 0)?,
        );
        let masks = batch
            .iter()
            .map(|s| {
                (s.tokens.len() > 1)
                    .then(|| causal_mask(s.tokens.len(), s.cache.filled, &self.device))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let heads_of = |t: Tensor, n: usize| -> Result<Tensor> {
                t.reshape((1, total, n, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let [q, k, v] = parts(layer.qkv.forward(&h)?)?;
            let q = heads_of(q, heads)?;
            let k = heads_of(k, kv_heads)?;
            let v = heads_of(v, kv_heads)?;
            let q = rows::rope_i(&q, &cos, &sin)?;
            let k = rows::rope_i(&k, &cos, &sin)?;
            let mut from = 0;
            for Segment { tokens, cache } in batch.iter() {
                let (seq, at) = (tokens.len(), cache.filled);
                // This sequence's rows of the step (a view when it is the
                // only one).
                let rows = |t: &Tensor| t.narrow(2, from, seq)?.to_dtype(self.kv)?.contiguous();
                cache.keys[l].slice_set(&rows(&k)?, 2, at)?;
                cache.values[l].slice_set(&rows(&v)?, 2, at)?;
                from += seq;
            }
            // Single tokens (decode steps) attend in one fused pass; pieces
            // of prompts through candle's products.
            let fused = self.attend_tokens(&q, batch, l, total)?;
            let y = match fused {
                // A decode step: every sequence's attention came from the
                // fused pass, in the step's order.
                Some(y) if y.dim(1)? == total => y,
                fused => {
                    let mut ys = Vec::with_capacity(batch.len());
                    let (mut from, mut single) = (0, 0);
                    for (segment, mask) in batch.iter().zip(&masks) {
                        let seq = segment.tokens.len();
                        match &fused {
                            Some(y) if seq == 1 => {
                                ys.push(y.narrow(1, single, 1)?);
                                single += 1;
                            }
                            _ => ys.push(self.attend(&q, from, segment, l, mask.as_ref())?),
                        }
                        from += seq;
                    }
                    Tensor::cat(&ys, 1)?
                }
            };
            x = (x + layer.wo.forward(&y)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let [gate, up] = parts(layer.gate_up.forward(&h)?)?;
            let gated = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        for Segment { tokens, cache } in batch.iter_mut() {
            cache.filled += tokens.len();
        }
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = x.squeeze(0)?.index_select(&last, 0)?;
        self.output.forward(&self.norm.forward(&x)?)
    }
}

impl Llama {
    /// Attention for the segments that run a single token (decode steps),
    /// fused into one pass over each one's cache in place of candle's two
    /// products, scaling, softmax and copies: `[1, singles, hidden]`, the
    /// single-token segments in the step's order; `None` when there are none
    /// or off the CPU.
    /// `q` is the step's queries, `[1, heads, total, head_dim]`, and each
    /// cache already holds the token's keys and values at `filled`. Every
    /// (segment, head) is a task on candle's pool.
    fn attend_tokens(
        &self,
        q: &Tensor,
        batch: &[Segment<'_>],
        layer: usize,
        total: usize,
    ) -> Result<Option<Tensor>> {
        let shape = self.shape;
        let (heads, head_dim) = (shape.heads, shape.head_dim);
        // (segment, its row in the step, positions it attends to)
        let mut singles = Vec::new();
        let mut row = 0;
        for (i, s) in batch.iter().enumerate() {
            if s.tokens.len() == 1 {
                singles.push((i, row, s.cache.filled + 1));
            }
            row += s.tokens.len();
        }
        if singles.is_empty() || !self.device.is_cpu() {
            return Ok(None);
        }
        let group = heads / shape.kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (q_storage, q_layout) = q.storage_and_layout();
        let q = cpu_f32(&q_storage, q_layout)?;
        let guards: Vec<_> = singles
            .iter()
            .map(|&(i, ..)| {
                let cache = &batch[i].cache;
                (
                    cache.keys[layer].storage_and_layout(),
                    cache.values[layer].storage_and_layout(),
                    cache.capacity(),
                )
            })
            .collect();
        let caches = guards
            .iter()
            .map(|((ks, kl), (vs, vl), capacity)| {
                Ok((Rows::of(ks, kl)?, Rows::of(vs, vl)?, *capacity))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut y = vec![0f32; singles.len() * shape.hidden];
        // Task `s · heads + h` writes head `h` of single `s`.
        let tasks: Vec<Mutex<&mut [f32]>> = y.chunks_mut(head_dim).map(Mutex::new).collect();
        candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
            let (mut scores, mut buf) = (Vec::new(), vec![0f32; KEYS * head_dim]);
            for task in range {
                let (s, h) = (task / heads, task % heads);
                let (_, row, len) = singles[s];
                let (keys, values, capacity) = &caches[s];
                // This head's keys and values start at row `first`.
                let first = (h / group) * capacity;
                let q = &q[(h * total + row) * head_dim..][..head_dim];
                scores.clear();
                for i in (0..len).step_by(KEYS) {
                    let n = KEYS.min(len - i);
                    score(
                        q,
                        keys.rows(first + i, n, head_dim, &mut buf),
                        scale,
                        &mut scores,
                    );
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for p in scores.iter_mut() {
                    *p = (*p - max).exp();
                    sum += *p;
                }
                let mut out = tasks[task].lock().unwrap_or_else(PoisonError::into_inner);
                out.fill(0.0);
                for (i, ps) in scores.chunks(KEYS).enumerate() {
                    let vs = values.rows(first + KEYS * i, ps.len(), head_dim, &mut buf);
                    for (p, v) in ps.iter().zip(vs.chunks_exact(head_dim)) {
                        let p = p / sum;
                        for (o, v) in out.iter_mut().zip(v) {
                            *o = v.mul_add(p, *o);
                        }
                    }
                }
            }
        });
        drop(tasks);
        Tensor::from_vec(y, (1, singles.len(), shape.hidden), &self.device).map(Some)
    }

    /// Attention of one segment's tokens (rows `from..` of the step's
    /// queries `q`) over its cache, through candle's products, with its
    /// causal mask when it has more than one token: `[1, tokens, hidden]`.
    fn attend(
        &self,
        q: &Tensor,
        from: usize,
        segment: &Segment<'_>,
        layer: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Shape {
            heads,
            kv_heads,
            head_dim,
            hidden,
            ..
        } = self.shape;
        let (seq, cache) = (segment.tokens.len(), &segment.cache);
        let len = cache.filled + seq;
        let (keys, values) = (&cache.keys[layer], &cache.values[layer]);
        let f32 = |t: &Tensor| t.narrow(2, 0, len)?.to_dtype(DType::F32);
        let (k, v) = (f32(keys)?, f32(values)?);
        // Each KV head serves `group` query heads: stack their rows.
        let group = heads / kv_heads;
        let q =
            q.narrow(2, from, seq)?
                .contiguous()?
                .reshape((1, kv_heads, group * seq, head_dim))?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            att = att
                .reshape((1, kv_heads, group, seq, len))?
                .broadcast_add(mask)?
                .reshape((1, kv_heads, group * seq, len))?;
        }
        candle_nn::ops::softmax_last_dim(&att)?
            .matmul(&v)?
            .reshape((1, heads, seq, head_dim))?
            .transpose(1, 2)?
            .reshape((1, seq, hidden))
    }
}

/// A cache's values on the CPU, from its first, in its element type.
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Rows<'a> {
    fn of(storage: &'a Storage, layout: &Layout) -> Result<Self> {
        match storage {
            Storage::Cpu(candle_core::CpuStorage::F16(v)) if layout.is_contiguous() => {
                Ok(Rows::F16(&v[layout.start_offset()..]))
            }
            _ => cpu_f32(storage, layout).map(Rows::F32),
        }
    }

    /// Rows `i..i + n` of rows of `width` values, as f32: converted into
    /// `buf` (wide enough) when the cache is f16.
    fn rows<'b>(&'b self, i: usize, n: usize, width: usize, buf: &'b mut [f32]) -> &'b [f32] {
        let range = i * width..(i + n) * width;
        match self {
            Rows::F32(v) => &v[range],
            Rows::F16(v) => {
                let buf = &mut buf[..n * width];
                v[range].convert_to_f32_slice(buf);
                buf
            }
        }
    }
}

/// The f32 values of a contiguous CPU tensor, from its first.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    rows::values(storage, layout).ok_or_else(|| {
        candle_core::Error::Msg("fused attention needs contiguous f32 CPU tensors".into())
    })
}

/// Keys a decode step's attention scores at a time.
const KEYS: usize = 8;

/// `q · k · scale` for each key `k` of `keys` (rows as long as `q`), onto
/// `out`: [`KEYS`] keys at a time, whose sums do not wait on each other,
/// where one key's sum alone waits on each multiply-add before it (perf: a
/// quarter of a four-sequence SmolLM2 decode step, at 200 positions, was
/// attention, most of it waiting in [`dot`]). The same sums, in the same
/// order, as [`dot`].
fn score(q: &[f32], keys: &[f32], scale: f32, out: &mut Vec<f32>) {
    let d = q.len();
    if d.is_multiple_of(8) && keys.len() == KEYS * d {
        let mut lanes = [[0f32; 8]; KEYS];
        for (c, q) in q.chunks_exact(8).enumerate() {
            for (k, lanes) in lanes.iter_mut().enumerate() {
                let key = &keys[k * d + 8 * c..][..8];
                for i in 0..8 {
                    lanes[i] = key[i].mul_add(q[i], lanes[i]);
                }
            }
        }
        out.extend(lanes.iter().map(|l| l.iter().sum::<f32>() * scale));
    } else {
        out.extend(keys.chunks_exact(d).map(|k| dot(q, k) * scale));
    }
}

/// `Σ a_i b_i`, in eight independent lanes (which the compiler keeps in one
/// vector register).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (a, b) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] = a[i].mul_add(b[i], lanes[i]);
        }
    }
    let rest = a.chunks_exact(8).remainder().iter();
    let tail: f32 = rest
        .zip(b.chunks_exact(8).remainder())
        .map(|(a, b)| a * b)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// One sequence's part of a step of [`Llama::forward_batch`].
pub struct Segment<'a> {
    /// Tokens to run, at the cache's next positions.
    pub tokens: &'a [u32],
    /// The sequence's keys and values so far.
    pub cache: &'a mut Cache,
}

/// `[seq, len]`: 0 where query `i` (at position `at + i`) may see key `j`,
/// minus infinity after it.
fn causal_mask(seq: usize, at: usize, device: &Device) -> Result<Tensor> {
    let len = at + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..len).map(move |j| if j > at + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, len), device)
}

/// Rotary tables for every position of the context: `[context, head_dim / 2]`.
fn rotary(head_dim: usize, context: usize, base: f32, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let positions = Tensor::arange(0, context as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((context, 1))?;
    let angles = positions.broadcast_mul(&theta.reshape((1, ()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_keys_eight_at_a_time_gives_what_one_at_a_time_gives() {
        // A head of 64 over a full run of keys and a short one, and a width
        // that is no multiple of eight (one key at a time throughout).
        for (d, n) in [(64, KEYS), (64, 3), (12, KEYS)] {
            let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
            let q: Vec<f32> = (0..d).map(value).collect();
            let keys: Vec<f32> = (0..n * d).map(|i| value(i + 7)).collect();
            let mut got = Vec::new();
            score(&q, &keys, 0.125, &mut got);
            let want: Vec<f32> = keys.chunks_exact(d).map(|k| dot(&q, k) * 0.125).collect();
            assert_eq!(got, want, "width {d}, {n} keys");
        }
    }
}
