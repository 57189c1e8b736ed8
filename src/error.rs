//! The library's error type: each variant says what is wrong, where, and what to do.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `valid` lists the hook names (`hooks::unknown_hook` fills it from the table of kinds).
    #[error("unknown hook point `{name}`; {valid}")]
    UnknownHook { name: String, valid: String },

    #[error("{path}: {message}")]
    ModelFile { path: PathBuf, message: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    BadInput(String),

    #[error(
        "could not fetch the default model: {0}\n\
         To use a model you already have, pass --model PATH (a .gguf file or a directory with \
         config.json, *.safetensors and tokenizer.json), or put SmolLM2-135M-Instruct.Q4_1.gguf \
         in $AFPROBE_HOME/models/ (default ~/.cache/afprobe/models/)."
    )]
    Fetch(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("linfa: {0}")]
    Linfa(#[from] linfa::Error),
}

impl Error {
    /// An error about a model file, naming the file.
    pub fn model_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Error {
        Error::ModelFile {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Errors unless `value` (a size or count given as option `flag`) lies in
/// `min..=max`; `why` says where the bound comes from. Checked before
/// anything is allocated, so a huge value is an error, not an abort.
pub fn check_range(flag: &str, value: usize, min: usize, max: usize, why: &str) -> Result<()> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(Error::BadInput(format!(
        "{flag} is {value}; it must be {min} to {max} ({why})"
    )))
}
