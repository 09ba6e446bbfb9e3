use candle_core::quantized::gguf_file::Value;

use super::*;

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

/// A tiny sentencepiece-style vocabulary, as a LLaMA GGUF would carry it.
fn llama_metadata() -> Metadata {
    let tokens = [
        "<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab", "<0x0A>", "<0x21>",
    ];
    let types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 6, 6];
    let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -0.5, 0.0, 0.0];
    let mut md = Metadata::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    md.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
    );
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(scores.iter().map(|s| Value::F32(*s)).collect()),
    );
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
    md.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
    md
}

#[test]
fn sentencepiece_vocabularies_merge_by_score_and_fall_back_to_bytes() {
    let tok = TextTokenizer::from_gguf(&llama_metadata()).unwrap();
    // BOS first, a space prefix, `▁ab` preferred by its score, `!` and a
    // newline through byte fallback.
    let ids = tok.encode("ab ab!\n").unwrap();
    assert_eq!(ids, vec![1, 8, 8, 10, 9]);
    assert_eq!(tok.decode(&ids).unwrap(), "ab ab!\n");
    assert!(tok.is_stop(2));
    assert_eq!((tok.bos_text(), tok.eos_text()), ("<s>", "</s>"));
    // Special-token text is its single id.
    assert_eq!(tok.encode("<s>a").unwrap(), vec![1, 6]);
}

#[test]
fn unknown_tokenizer_models_are_refused() {
    let mut md = llama_metadata();
    md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    assert!(TextTokenizer::from_gguf(&md).is_err());
}
