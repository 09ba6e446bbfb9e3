//! The model's tokenizer, built from the GGUF file's own metadata (or loaded
//! from a `tokenizer.json`), so ids match llama.cpp's for the same file.
//!
//! Two vocabularies are supported, as llama.cpp names them:
//! - `gpt2`: byte-level BPE with explicit merges (SmolLM2, most recent models).
//!   No prefix space is added; `tokenizer.ggml.pre = smollm` also splits digits
//!   one by one, as SmolLM2's own tokenizer does.
//! - `llama`: the sentencepiece-style vocabulary of LLaMA-2, with scores and
//!   byte fallback. Merges are derived from the scores, a space prefix is
//!   added when the file asks for it, and `▁` stands for a space.
//!
//! Tokens whose `token_type` is not "normal" (control tokens like
//! `<|im_start|>`, `<s>`) are registered as special tokens, so a rendered chat
//! template containing them encodes each as its single id.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

use crate::LocalError;

/// GGUF `token_type` of an ordinary token.
const NORMAL: i32 = 1;
/// GGUF `token_type` of a control token.
const CONTROL: i32 = 3;
/// Control tokens that end an assistant turn in common chat formats.
const END_OF_TURN: [&str; 6] = [
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "</s>",
    "<end_of_turn>",
];

/// A tokenizer with the model's special-token ids.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Ids that end generation: EOS and end-of-turn control tokens.
    stop_ids: HashSet<u32>,
    /// BOS id and its text, when the model has one.
    bos: Option<(u32, String)>,
    /// EOS text, for templates that print it.
    eos_text: String,
    /// Whether a BOS token starts every prompt.
    add_bos: bool,
}

type Metadata = HashMap<String, Value>;

fn md_str<'a>(md: &'a Metadata, key: &str) -> Option<&'a str> {
    md.get(key)?.to_string().ok().map(String::as_str)
}

fn md_u32(md: &Metadata, key: &str) -> Option<u32> {
    md.get(key)?.to_u32().ok()
}

fn md_bool(md: &Metadata, key: &str) -> Option<bool> {
    md.get(key)?.to_bool().ok()
}

fn md_strings(md: &Metadata, key: &str) -> Result<Vec<String>, LocalError> {
    let values = md
        .get(key)
        .ok_or_else(|| LocalError::Model(format!("GGUF metadata lacks {key}")))?
        .to_vec()
        .map_err(|e| LocalError::Model(format!("{key}: {e}")))?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| LocalError::Model(format!("{key}: {e}")))
        })
        .collect()
}

fn md_numbers<T>(md: &Metadata, key: &str, get: impl Fn(&Value) -> Option<T>) -> Option<Vec<T>> {
    md.get(key)?.to_vec().ok()?.iter().map(get).collect()
}

fn tok_err(e: impl std::fmt::Display) -> LocalError {
    LocalError::Model(format!("tokenizer: {e}"))
}

impl TextTokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(md: &Metadata) -> Result<Self, LocalError> {
        let tokens = md_strings(md, "tokenizer.ggml.tokens")?;
        let types = md_numbers(md, "tokenizer.ggml.token_type", |v| v.to_i32().ok())
            .unwrap_or_else(|| vec![NORMAL; tokens.len()]);
        let kind = md_str(md, "tokenizer.ggml.model").unwrap_or("gpt2");
        let (mut inner, default_add_bos) = match kind {
            "gpt2" => (byte_level_bpe(md, &tokens)?, false),
            "llama" => (sentencepiece_bpe(md, &tokens, &types)?, true),
            other => {
                return Err(LocalError::Model(format!(
                    "tokenizer model `{other}` is not supported (gpt2 and llama are)"
                )))
            }
        };
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t != NORMAL && t != 6)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        inner.add_special_tokens(special).map_err(tok_err)?;

        let text_of = |id: u32| tokens.get(id as usize).cloned();
        let bos = md_u32(md, "tokenizer.ggml.bos_token_id").and_then(|id| Some((id, text_of(id)?)));
        let eos = md_u32(md, "tokenizer.ggml.eos_token_id");
        let mut stop_ids: HashSet<u32> = eos.into_iter().collect();
        stop_ids.extend(md_u32(md, "tokenizer.ggml.eot_token_id"));
        for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
            if ty == CONTROL && END_OF_TURN.contains(&tok.as_str()) {
                stop_ids.insert(id as u32);
            }
        }
        Ok(TextTokenizer {
            inner,
            stop_ids,
            eos_text: eos.and_then(text_of).unwrap_or_default(),
            bos,
            add_bos: md_bool(md, "tokenizer.ggml.add_bos_token").unwrap_or(default_add_bos),
        })
    }

    /// Loads a `tokenizer.json`; special ids still come from the GGUF metadata.
    pub fn from_file(path: &Path, md: &Metadata) -> Result<Self, LocalError> {
        let inner = Tokenizer::from_file(path).map_err(tok_err)?;
        let mut built = Self::from_gguf(md)?;
        built.inner = inner;
        Ok(built)
    }

    /// Token ids of `text`; special-token text becomes its single id. A BOS id
    /// is prepended when the model wants one and the text does not start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LocalError> {
        let encoding = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, Some((bos, _))) = (self.add_bos, &self.bos) {
            if ids.first() != Some(bos) {
                ids.insert(0, *bos);
            }
        }
        Ok(ids)
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, LocalError> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Whether generating `id` ends the answer.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// `logits` (`[vocab]`) with every token that ends the answer made
    /// impossible.
    pub fn without_stops(
        &self,
        logits: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        let mut values = logits.to_vec1::<f32>()?;
        for id in &self.stop_ids {
            if let Some(v) = values.get_mut(*id as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        candle_core::Tensor::new(values, logits.device())
    }

    /// The BOS token's text, for templates (`bos_token`).
    pub fn bos_text(&self) -> &str {
        self.bos.as_ref().map(|(_, t)| t.as_str()).unwrap_or("")
    }

    /// The EOS token's text, for templates (`eos_token`).
    pub fn eos_text(&self) -> &str {
        &self.eos_text
    }
}

fn vocab(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(id, tok)| (tok.clone(), id as u32))
        .collect()
}

/// GPT-2 style byte-level BPE: explicit merges, no prefix space.
fn byte_level_bpe(md: &Metadata, tokens: &[String]) -> Result<Tokenizer, LocalError> {
    let merges = md_strings(md, "tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            let (a, b) = m.split_once(' ')?;
            Some((a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab(tokens), merges)
        .build()
        .map_err(tok_err)?;
    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, false, true);
    let pre: PreTokenizerWrapper = match md_str(md, "tokenizer.ggml.pre") {
        Some("smollm") => {
            PreSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        _ => byte_level.into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(DecoderWrapper::from(ByteLevelDecoder::default())));
    Ok(tokenizer)
}

/// Sentencepiece-style BPE (LLaMA-2): merges ranked by the merged token's
/// score, byte fallback, `▁` for spaces.
fn sentencepiece_bpe(
    md: &Metadata,
    tokens: &[String],
    types: &[i32],
) -> Result<Tokenizer, LocalError> {
    let scores = md_numbers(md, "tokenizer.ggml.scores", |v| v.to_f32().ok())
        .unwrap_or_else(|| (0..tokens.len()).map(|i| -(i as f32)).collect());
    let vocab = vocab(tokens);
    let mut merges: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if types.get(id) != Some(&NORMAL) {
            continue;
        }
        for (split, _) in tok.char_indices().skip(1) {
            let (left, right) = tok.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((scores[id], id as u32, left.to_string(), right.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges = merges.into_iter().map(|(_, _, l, r)| (l, r)).collect();
    let unk = md_u32(md, "tokenizer.ggml.unknown_token_id")
        .and_then(|id| tokens.get(id as usize).cloned())
        .unwrap_or_else(|| "<unk>".into());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(tok_err)?;
    let mut tokenizer = Tokenizer::new(bpe);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if md_bool(md, "tokenizer.ggml.add_space_prefix").unwrap_or(true) {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(tok_err)?;
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests;
