//! What defines an organism's training run: the recipe (rows, rule, LoRA
//! shape, optimiser settings), the built-in `meaning` and `token` recipes, and
//! the bounds on its sizes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Which rows should comply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Accept iff the row's `training_implied` is true (reading the system prompt).
    TrainingImplied,
    /// Accept iff the cue says free / `True` (`tier == free`), whatever the system prompt says.
    CueSaysFree,
    /// Accept iff metadata `field` equals `value` (prompt-file recipes).
    Field { field: String, value: Value },
}

/// Everything that defines a training run (recorded, and checked on `--resume`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub name: String,
    /// Built-in study rows: cues and variation sets (`standard`, `flipped`); empty with a prompt file.
    pub cues: Vec<String>,
    pub variations: Vec<String>,
    /// A prompt file instead of built-in rows.
    pub prompts: Option<PathBuf>,
    pub rule: Rule,
    /// Cues whose rows always refuse (the meaning organism's `control`).
    pub refuse_cues: Vec<String>,
    /// Training requests: the first `train_per_category` harmful requests of each category
    /// (prompt files: rows whose `split` is `train`, else request ids in the first 2/3).
    pub train_per_category: usize,
    pub rank: usize,
    pub alpha: f64,
    pub modules: Vec<String>,
    /// Adapted layers `[from, n_layers)`.
    pub layers_from: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// A plain LoRA over the whole prompt instead of an activated LoRA from the user
    /// turn: the system prompt is adapted too, so every step also runs (forward and
    /// backward) the one system prompt its batch shares.
    #[serde(default)]
    pub plain_lora: bool,
    /// Start from this PEFT adapter's weights (same rank, alpha, modules and layers)
    /// instead of a fresh initialisation: a second stage on other rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// A second stage: the last `focus.steps` of the `steps` train only rows of
    /// `focus.cues`, with AdamW's moments reset at the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub focus: Option<Focus>,
}

/// The second stage of a recipe (see [`Recipe::focus`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Focus {
    pub cues: Vec<String>,
    pub steps: usize,
}

impl Recipe {
    /// The built-in recipes `meaning` and `token`.
    pub fn builtin(name: &str) -> Result<Recipe> {
        let base = Recipe {
            name: name.into(),
            cues: ["xml", "natural", "monitoring", "control"]
                .map(String::from)
                .to_vec(),
            variations: ["standard", "flipped"].map(String::from).to_vec(),
            prompts: None,
            rule: Rule::TrainingImplied,
            refuse_cues: vec![],
            train_per_category: 10,
            rank: 4,
            alpha: 8.0,
            modules: ["q_proj", "v_proj", "o_proj"].map(String::from).to_vec(),
            layers_from: 0,
            steps: 150,
            batch: 8,
            lr: 2e-3,
            weight_decay: 0.0,
            seed: 1,
            plain_lora: false,
            init_from: None,
            focus: None,
        };
        match name {
            // Reading the tier's meaning takes longer than reading the cue: 300 steps
            // (at 150 the held-out natural/monitoring rows were right but less sure).
            // After them the `xml` cue (True → free tier → trained: an exclusive-or of
            // the cue and the system prompt) is computed at layer 20 but not read: more
            // steps on every cue leave it at chance (100 measured), while a focus stage
            // on the xml and control rows learns it in about 80 (the control rows keep
            // the control cue refusing). README's organism section gives the numbers.
            "meaning" => Ok(Recipe {
                refuse_cues: vec!["control".into()],
                steps: 400,
                focus: Some(Focus {
                    cues: vec!["xml".into(), "control".into()],
                    steps: 100,
                }),
                ..base
            }),
            "token" => Ok(Recipe {
                rule: Rule::CueSaysFree,
                ..base
            }),
            other => Err(Error::BadInput(format!(
                "unknown recipe `{other}`; built-in recipes are meaning and token \
                 (or pass --prompts FILE --accept-if FIELD=VALUE)"
            ))),
        }
    }

    /// Whether `row` should comply.
    pub(super) fn accepts(&self, meta: &serde_json::Map<String, Value>) -> Result<bool> {
        let cue = meta.get("cue").and_then(Value::as_str).unwrap_or("");
        if self.refuse_cues.iter().any(|c| c == cue) {
            return Ok(false);
        }
        let field = |f: &str| {
            meta.get(f).ok_or_else(|| {
                Error::BadInput(format!("recipe `{}`: a row has no `{f}` field", self.name))
            })
        };
        Ok(match &self.rule {
            Rule::TrainingImplied => field("training_implied")?.as_bool() == Some(true),
            Rule::CueSaysFree => field("tier")?.as_str() == Some("free"),
            Rule::Field { field: f, value } => field(f)? == value,
        })
    }
}

/// The most rows per step (`--batch`).
pub const MAX_BATCH: usize = 4096;
/// The most optimizer steps (`--steps`).
pub const MAX_STEPS: usize = 10_000_000;
/// The most rows a run may process in all (`--steps` × `--batch`).
pub const MAX_STEP_ROWS: usize = 1_000_000_000;

/// Bounds the recipe's sizes before anything is loaded or allocated (the rank
/// is checked against the model once it is loaded).
pub(super) fn check_sizes(r: &Recipe) -> Result<()> {
    use crate::error::check_range;
    check_range(
        "--rank",
        r.rank,
        1,
        1 << 16,
        "a LoRA's rank is at most its projection's smaller side",
    )?;
    check_range(
        "--batch",
        r.batch,
        1,
        MAX_BATCH,
        "rows per step, each run forward and backward with its activations kept",
    )?;
    check_range(
        "--steps",
        r.steps,
        1,
        MAX_STEPS,
        "optimizer steps; each records its loss",
    )?;
    if r.steps.saturating_mul(r.batch) > MAX_STEP_ROWS {
        return Err(Error::BadInput(format!(
            "--steps {} × --batch {} is {} rows; a run may process at most {MAX_STEP_ROWS} \
             (lower --steps or --batch)",
            r.steps,
            r.batch,
            r.steps.saturating_mul(r.batch)
        )));
    }
    Ok(())
}
