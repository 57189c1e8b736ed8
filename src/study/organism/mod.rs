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
pub mod diff;
mod examples;
mod output;
mod recipe;
mod train;

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::error::Result;
use crate::model::{Model, ModelSpec, WeightDtype};
use diff::Lora;
pub use examples::INVOCATION;
pub use recipe::{Focus, Recipe, Rule, MAX_BATCH, MAX_STEPS, MAX_STEP_ROWS};
use train::weights_of;
pub use train::{train, TrainReport, TrainSpec};

/// Checks the differentiable forward against the fast one: max |logit diff| on `tokens`.
pub fn check_forward(model_spec: &ModelSpec, tokens: &[u32]) -> Result<f64> {
    let model = Model::load(model_spec, WeightDtype::F32)?;
    let fast = model.run_with_hooks(
        tokens,
        &mut crate::model::Hooks::none(),
        &crate::model::LogitsAt::All,
    )?;
    let diff = weights_of(&model.files)?.1;
    let config = model.config().clone();
    let lora = Lora::init(
        &config,
        &(0..config.n_layers).collect::<Vec<_>>(),
        &["q_proj".into(), "down_proj".into()],
        2,
        4.0,
        0,
    )?;
    // Split: a base prefix and an adapted suffix (the adapter is at zero: B = 0).
    let split = tokens.len() / 2;
    let (a, kv) = diff.forward(
        &tokens[..split],
        None,
        None,
        &(0..split).collect::<Vec<_>>(),
    )?;
    let (b, _) = diff.forward(
        &tokens[split..],
        Some(&kv),
        Some(&lora),
        &(0..tokens.len() - split).collect::<Vec<_>>(),
    )?;
    let slow = Tensor::cat(&[a, b], 0)?;
    Ok((fast - slow)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()? as f64)
}

/// The adapter path a recipe's shipped organism lives at.
pub fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("organisms")
        .join(name)
}
