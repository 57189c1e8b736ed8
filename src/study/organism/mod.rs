//! `afprobe organism train`: activated-LoRA model organisms whose compliance
//! depends on the prompt in a known way (the study's positive control).
//!
//! A recipe names prompt rows (built-in study rows: cues × variations ×
//! requests, or a prompt file) and a rule saying which rows should answer
//! `<request_fully_accepted/>` and which `<rejected/>`. Training is activated
//! LoRA from the start of the user turn (`<|im_start|>user\n`): every distinct
//! system prompt is run once by the base model and its keys and values are
//! reused; each step runs only the user turns and answer tags of a batch. The
//! loss is the cross-entropy of the answer tag tokens only. Output: a PEFT
//! adapter directory (`adapter_config.json`, `adapter_model.safetensors`) and
//! `training.json`; `checkpoint.safetensors` + `checkpoint.json` for `--resume`.
//!
//! `recipe.rs` defines a run, `examples.rs` prepares its rows, `train.rs` runs
//! it (`checkpoint.rs`: its starting state and `--resume`), and `output.rs`
//! writes the adapter.

mod checkpoint;
mod examples;
mod output;
mod recipe;
mod train;

use std::path::{Path, PathBuf};

pub use examples::INVOCATION;
pub use recipe::{Focus, Recipe, Rule, MAX_BATCH, MAX_STEPS, MAX_STEP_ROWS};
pub use train::{train, TrainReport, TrainSpec};

/// The adapter path a recipe's shipped organism lives at.
pub fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("organisms")
        .join(name)
}
