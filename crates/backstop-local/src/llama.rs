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
//! - Q4_1 weights use [`crate::q4_1::FastQ4_1`];
//! - the output projection reuses the token embeddings when the file has no
//!   `output.weight` (tied embeddings).

use std::io::{Read, Seek};

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use crate::q4_1::FastQ4_1;

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
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// The weights, shared by every sequence.
pub struct Llama {
    /// The model's shape.
    pub shape: Shape,
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
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
) -> Result<QMatMul> {
    let tensor: QTensor = ct.tensor(reader, name, device)?;
    match precision {
        Precision::Quantized => QMatMul::from_qtensor(FastQ4_1::adopt(tensor)?),
        Precision::F32 => Ok(QMatMul::Tensor(tensor.dequantize(device)?)),
    }
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
        if shape.heads % shape.kv_heads != 0 || shape.head_dim * shape.heads != hidden {
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
        let norm = |reader: &mut _, name: &str| {
            RmsNorm::from_qtensor(ct.tensor(reader, name, device)?, eps)
        };
        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: norm(reader, &format!("{p}.attn_norm.weight"))?,
                wq: matmul(reader, &format!("{p}.attn_q.weight"))?,
                wk: matmul(reader, &format!("{p}.attn_k.weight"))?,
                wv: matmul(reader, &format!("{p}.attn_v.weight"))?,
                wo: matmul(reader, &format!("{p}.attn_output.weight"))?,
                ffn_norm: norm(reader, &format!("{p}.ffn_norm.weight"))?,
                gate: matmul(reader, &format!("{p}.ffn_gate.weight"))?,
                up: matmul(reader, &format!("{p}.ffn_up.weight"))?,
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
        })
    }

    /// An empty cache for one sequence of up to `len` positions.
    pub fn cache(&self, len: usize) -> Result<Cache> {
        let len = len.min(self.shape.context);
        let dims = (1, self.shape.kv_heads, len, self.shape.head_dim);
        let zeros = || Tensor::zeros(dims, DType::F32, &self.device);
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
        let Shape {
            heads,
            kv_heads,
            head_dim,
            hidden,
            ..
        } = self.shape;
        let (seq, at) = (tokens.len(), cache.filled);
        let room = cache.capacity();
        if seq == 0 || at + seq > room {
            return Err(candle_core::Error::Msg(format!(
                "{seq} tokens at position {at} do not fit a cache of {room}"
            )));
        }
        let len = at + seq;
        let group = heads / kv_heads;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embeddings.index_select(&ids, 0)?.unsqueeze(0)?;
        let (cos, sin) = (self.cos.narrow(0, at, seq)?, self.sin.narrow(0, at, seq)?);
        let mask = (seq > 1)
            .then(|| causal_mask(seq, at, &self.device))
            .transpose()?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        for (layer, (keys, values)) in self.layers.iter().zip(cache.keys.iter().zip(&cache.values))
        {
            let h = layer.attn_norm.forward(&x)?;
            let heads_of = |t: Tensor, n: usize| -> Result<Tensor> {
                t.reshape((1, seq, n, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = heads_of(layer.wq.forward(&h)?, heads)?;
            let k = heads_of(layer.wk.forward(&h)?, kv_heads)?;
            let v = heads_of(layer.wv.forward(&h)?, kv_heads)?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
            keys.slice_set(&k, 2, at)?;
            values.slice_set(&v, 2, at)?;
            let (k, v) = (keys.narrow(2, 0, len)?, values.narrow(2, 0, len)?);
            // Each KV head serves `group` query heads: stack their rows.
            let q = q.reshape((1, kv_heads, group * seq, head_dim))?;
            let mut att = (q.matmul(&k.t()?)? * scale)?;
            if let Some(mask) = &mask {
                att = att
                    .reshape((1, kv_heads, group, seq, len))?
                    .broadcast_add(mask)?
                    .reshape((1, kv_heads, group * seq, len))?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att
                .matmul(&v)?
                .reshape((1, heads, seq, head_dim))?
                .transpose(1, 2)?
                .reshape((1, seq, hidden))?;
            x = (x + layer.wo.forward(&y)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gated =
                (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        cache.filled = len;
        let last = x.narrow(1, seq - 1, 1)?;
        let logits = self.output.forward(&self.norm.forward(&last)?)?;
        logits.flatten_all()
    }
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
