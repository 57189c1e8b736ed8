//! `--model SPEC`: a `.gguf` path, an HF directory, a hub id `org/name[@rev]`
//! read from the local hub cache (offline), or an alias of a fetchable model
//! (`smollm2-135m`, the default, or `gemma3-270m`).

use std::fmt;
use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use super::fetch;
use super::gguf::looks_like_gguf;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// The embedded default model (fetched on first use).
    Default,
    /// Another fetchable model by alias (fetched on first use).
    Fetch(fetch::Fetchable),
    Path(PathBuf),
    Hub {
        repo: String,
        revision: String,
    },
}

/// Where the files of a model are, once a spec is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    Gguf(PathBuf),
    /// A directory with `config.json`, `*.safetensors`, `tokenizer.json`.
    HfDir(PathBuf),
}

impl ModelFiles {
    pub fn path(&self) -> &Path {
        match self {
            ModelFiles::Gguf(p) | ModelFiles::HfDir(p) => p,
        }
    }
}

impl ModelSpec {
    /// Parses a `--model` value; `None` means the default model.
    pub fn parse(spec: Option<&str>) -> ModelSpec {
        let Some(spec) = spec.map(str::trim).filter(|s| !s.is_empty()) else {
            return ModelSpec::Default;
        };
        if spec == fetch::DEFAULT_ALIAS {
            return ModelSpec::Default;
        }
        if let Some(f) = fetch::by_alias(spec) {
            return ModelSpec::Fetch(f);
        }
        let path = Path::new(spec);
        if !path.exists() && is_hub_id(spec) {
            let (repo, revision) = match spec.split_once('@') {
                Some((r, rev)) => (r.to_string(), rev.to_string()),
                None => (spec.to_string(), "main".to_string()),
            };
            return ModelSpec::Hub { repo, revision };
        }
        ModelSpec::Path(path.to_path_buf())
    }

    /// Finds the model's files, fetching the default model if needed.
    pub fn resolve(&self) -> Result<ModelFiles> {
        match self {
            ModelSpec::Default => Ok(ModelFiles::Gguf(fetch::ensure_default_model()?)),
            ModelSpec::Fetch(f) => Ok(ModelFiles::Gguf(f.ensure()?)),
            ModelSpec::Path(path) => resolve_path(path),
            ModelSpec::Hub { repo, revision } => resolve_hub(repo, revision),
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSpec::Default => write!(f, "{}", fetch::DEFAULT_ALIAS),
            ModelSpec::Fetch(m) => write!(f, "{}", m.alias),
            ModelSpec::Path(p) => write!(f, "{}", p.display()),
            ModelSpec::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

fn is_hub_id(s: &str) -> bool {
    let repo = s.split('@').next().unwrap_or(s);
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn resolve_path(path: &Path) -> Result<ModelFiles> {
    if !path.exists() {
        return Err(Error::model_file(
            path,
            "no such file or directory; --model takes a .gguf file, a directory with config.json \
             + *.safetensors + tokenizer.json, a hub id org/name[@rev] in the local hub cache, or \
             the alias smollm2-135m",
        ));
    }
    if path.is_dir() {
        if path.join("config.json").exists() {
            return Ok(ModelFiles::HfDir(path.to_path_buf()));
        }
        return Err(Error::model_file(
            path,
            "this directory has no config.json; an HF model directory needs config.json, \
             *.safetensors and tokenizer.json",
        ));
    }
    if looks_like_gguf(path) || path.extension().is_some_and(|e| e == "gguf") {
        return Ok(ModelFiles::Gguf(path.to_path_buf()));
    }
    Err(Error::model_file(
        path,
        "not a GGUF file (it does not start with the bytes `GGUF`); pass a .gguf file or a \
         directory with config.json + *.safetensors",
    ))
}

/// The hub cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Cache::from_env().path().clone(),
    }
}

fn resolve_hub(repo_id: &str, revision: &str) -> Result<ModelFiles> {
    let cache_dir = hub_cache_dir();
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let repo_dir = cache_dir.join(repo.folder_name());
    // A commit hash names its snapshot directly; a branch or tag goes through refs/.
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let snapshot = if is_commit {
        Some(repo_dir.join("snapshots").join(revision)).filter(|p| p.is_dir())
    } else {
        let cache = Cache::new(cache_dir.clone()).repo(repo);
        cache
            .get("config.json")
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .or_else(|| {
                let commit =
                    crate::io::read_to_string(&repo_dir.join("refs").join(revision)).ok()?;
                Some(repo_dir.join("snapshots").join(commit.trim())).filter(|p| p.is_dir())
            })
    };
    let Some(snapshot) = snapshot else {
        return Err(Error::BadInput(format!(
            "model `{repo_id}@{revision}` is not in the local hub cache {} (afprobe reads the \
             cache offline; set HF_HUB_CACHE or HF_HOME, download it elsewhere with \
             `huggingface-cli download {repo_id}`, or pass --model PATH)",
            cache_dir.display()
        )));
    };
    if snapshot.join("config.json").exists() {
        return Ok(ModelFiles::HfDir(snapshot));
    }
    let gguf = std::fs::read_dir(&snapshot)
        .map_err(|e| Error::io(&snapshot, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "gguf"));
    gguf.map(ModelFiles::Gguf).ok_or_else(|| {
        Error::model_file(
            &snapshot,
            "hub snapshot has neither config.json nor a .gguf file",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_by_shape() {
        assert_eq!(ModelSpec::parse(None), ModelSpec::Default);
        assert_eq!(ModelSpec::parse(Some("smollm2-135m")), ModelSpec::Default);
        assert_eq!(
            ModelSpec::parse(Some("org/name@v1.0")),
            ModelSpec::Hub {
                repo: "org/name".into(),
                revision: "v1.0".into()
            }
        );
        assert_eq!(
            ModelSpec::parse(Some("./no/such/model.gguf")),
            ModelSpec::Path("./no/such/model.gguf".into())
        );
    }
}
