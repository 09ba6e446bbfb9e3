//! Fetching production models from the Hugging Face Hub (hf-hub), with a
//! progress bar, checked against the sha256 the Hub reports for the file.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::api::tokio::ApiBuilder;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::LocalError;

#[derive(Deserialize)]
struct RepoBlobs {
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
}

fn hub_err(e: impl std::fmt::Display) -> LocalError {
    LocalError::Model(format!("Hugging Face: {e}"))
}

/// Downloads `file` of the model repo `repo` into `dir` (the Hub's cache
/// layout under `dir/.hf-cache`, with `dir/file` linked to it), showing
/// progress, and verifies its sha256. `HF_TOKEN` and `HF_ENDPOINT` apply.
pub async fn fetch_from_hub(repo: &str, file: &str, dir: &Path) -> Result<PathBuf, LocalError> {
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .with_cache_dir(dir.join(".hf-cache"))
        .build()
        .map_err(hub_err)?;
    let repo = api.model(repo.to_string());
    let blobs: RepoBlobs = repo
        .info_request()
        .query(&[("blobs", "true")])
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(hub_err)?
        .json()
        .await
        .map_err(hub_err)?;
    let expected = blobs
        .siblings
        .iter()
        .find(|s| s.rfilename == file)
        .ok_or_else(|| hub_err(format!("the repository has no file {file}")))?
        .lfs
        .as_ref()
        .map(|l| l.sha256.to_ascii_lowercase())
        .ok_or_else(|| hub_err(format!("{file} has no LFS checksum to verify against")))?;
    let cached = repo.get(file).await.map_err(hub_err)?;
    let actual = sha256_file(&cached)?;
    if actual != expected {
        return Err(hub_err(format!(
            "{file}: sha256 {actual} does not match the Hub's {expected}"
        )));
    }
    let target = dir.join(file);
    let _ = std::fs::remove_file(&target);
    std::os::unix::fs::symlink(&cached, &target)
        .map_err(|e| LocalError::Model(format!("{}: {e}", target.display())))?;
    Ok(target)
}

/// The hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, LocalError> {
    let io = |e: std::io::Error| LocalError::Model(format!("{}: {e}", path.display()));
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
