#!/usr/bin/env python3
"""Writes a GGUF file shaped like LLaMA-2-7B Q4_K_M, with random weights.

    benches/make-llama7b.py VOCAB_GGUF OUT_GGUF

The real file cannot be downloaded here, and a speed benchmark needs only its
shape: the same hyperparameters (32 layers, 4096 wide, 11008 feed-forward, 32
heads, 4096 positions), the same tensor types as llama.cpp's Q4_K_M mix
(Q4_K everywhere, Q6_K for the output and for attn_v and ffn_down in the
layers llama.cpp gives more bits), F32 norms, and the real LLaMA tokenizer,
copied from VOCAB_GGUF: llama.cpp's `models/ggml-vocab-llama-spm.gguf`, which
the llama.cpp source tree ships (see `benches/local.sh`).

Blocks are random bytes with their scales set to small normal f16 values, so
every weight is finite, of a plausible size (|w| < 0.2) and averages zero;
the answers are nonsense, the work per token is the real model's. Needs the `gguf` and
`numpy` Python packages. The file is about 3.9 GB.
"""

import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

HIDDEN, FFN, LAYERS, HEADS, CONTEXT, VOCAB = 4096, 11008, 32, 32, 4096, 32000
Q4_K, Q6_K = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K
# Bytes per block of 256 values.
BLOCK = {Q4_K: 144, Q6_K: 210}
FILE_TYPE_Q4_K_M = 15

rng = np.random.default_rng(7)


def blocks(kind, count):
    """`count` random blocks of `kind` with sane scales, as raw bytes."""
    raw = rng.integers(0, 256, size=(count, BLOCK[kind]), dtype=np.uint8)
    if kind == Q4_K:
        # d and dmin (f16) lead the block, then 12 bytes of 6-bit scales and
        # mins, then 128 bytes of nibbles: w = d·sc·q − dmin·m. With
        # dmin = 7.5·d the weights average zero (q averages 7.5, and sc and m
        # alike): weights all of one sign would add up layer after layer into
        # activations past f16's range, which a GPU's q8_1 block sums hold.
        scales = np.array([2e-4, 1.5e-3], dtype=np.float16).view(np.uint8)
        raw[:, 0:4] = scales
    else:
        # 128 bytes of low bits, 64 of high bits, 16 signed 8-bit scales, d
        # (f16) last: w = d·sc·(q − 32). Scales kept within ±16.
        raw[:, 192:208] = rng.integers(-16, 17, size=(count, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = np.array([1e-3], dtype=np.float16).view(np.uint8)
    return raw


def more_bits(layer):
    """The layers whose attn_v and ffn_down llama.cpp's Q4_K_M keeps at Q6_K."""
    eighth = LAYERS // 8
    return layer < eighth or layer >= 7 * eighth or (layer - eighth) % 3 == 2


def tensors():
    """(name, rows, columns, kind) of every tensor, in the file's order."""
    yield "token_embd.weight", VOCAB, HIDDEN, Q4_K
    for i in range(LAYERS):
        wide = Q6_K if more_bits(i) else Q4_K
        yield f"blk.{i}.attn_norm.weight", 1, HIDDEN, None
        yield f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN, Q4_K
        yield f"blk.{i}.attn_k.weight", HIDDEN, HIDDEN, Q4_K
        yield f"blk.{i}.attn_v.weight", HIDDEN, HIDDEN, wide
        yield f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN, Q4_K
        yield f"blk.{i}.ffn_norm.weight", 1, HIDDEN, None
        yield f"blk.{i}.ffn_gate.weight", FFN, HIDDEN, Q4_K
        yield f"blk.{i}.ffn_up.weight", FFN, HIDDEN, Q4_K
        yield f"blk.{i}.ffn_down.weight", HIDDEN, FFN, wide
    yield "output_norm.weight", 1, HIDDEN, None
    yield "output.weight", VOCAB, HIDDEN, Q6_K


def main(vocab_path, out_path):
    writer = GGUFWriter(out_path, "llama")
    writer.add_name("llama-2-7b-shaped random Q4_K_M")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(FILE_TYPE_Q4_K_M)
    vocab = GGUFReader(vocab_path)
    for key, field in vocab.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    plan = list(tensors())
    for name, rows, cols, kind in plan:
        if kind is None:
            writer.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        else:
            # Quantized shapes are given in bytes per row.
            row_bytes = cols // 256 * BLOCK[kind]
            writer.add_tensor_info(
                name, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, kind
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, rows, cols, kind in plan:
        if kind is None:
            writer.write_tensor_data(np.ones(cols, dtype=np.float32))
        else:
            writer.write_tensor_data(blocks(kind, rows * cols // 256))
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
