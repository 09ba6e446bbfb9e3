//! Loading a GGUF llama-family model: weights, tokenizer and prompt format.

use std::fs::File;
use std::path::Path;

use crate::llama::{Llama, Precision};
use candle_core::quantized::gguf_file;
use candle_core::Device;

use crate::template::Template;
use crate::tokenizer::TextTokenizer;
use crate::{LocalConfig, LocalError};

/// A loaded model: weights shared by every sequence, and what prompts need.
pub struct LoadedModel {
    /// The weights, shared by every sequence (each has its own KV cache).
    pub llama: Llama,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// The prompt format.
    pub template: Template,
    /// Tokens of prompt plus answer the model can attend to.
    pub context: usize,
}

/// The device a model runs on: CUDA when compiled in and present, else CPU.
fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(device) = Device::new_cuda(0) {
        return device;
    }
    Device::Cpu
}

impl LoadedModel {
    /// Reads a GGUF file.
    pub fn load(config: &LocalConfig) -> Result<Self, LocalError> {
        let path: &Path = &config.model;
        let model_err =
            |e: candle_core::Error| LocalError::Model(format!("{}: {e}", path.display()));
        let mut file =
            File::open(path).map_err(|e| LocalError::Model(format!("{}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file).map_err(model_err)?;
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(LocalError::Model(format!(
                "{}: architecture `{arch}` is not llama",
                path.display()
            )));
        }
        let tokenizer = match &config.tokenizer {
            Some(json) => TextTokenizer::from_file(json, md)?,
            None => TextTokenizer::from_gguf(md)?,
        };
        let kind = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("gpt2");
        let chat_template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        let template = Template::for_model(chat_template, kind);
        let trained = md
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .map(|n| n as usize)
            .unwrap_or(2048);
        let mut context = trained;
        if let Some(cap) = config.context {
            context = context.min(cap);
        }
        let device = device();
        let mut llama = Llama::from_gguf(&content, &mut file, &device, Precision::Quantized)
            .map_err(model_err)?;
        llama.keep_kv(config.kv_cache);
        Ok(LoadedModel {
            llama,
            tokenizer,
            template,
            context,
        })
    }
}
