//! `afprobe organism train`: activated-LoRA model organisms with known mechanisms.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::args::ModelSpecArg;
use crate::model::DeviceSpec;
use crate::study::organism::{self, Focus, Recipe, Rule, TrainSpec};

pub const TRAIN_ABOUT: &str = "Train a LoRA model organism with candle's autograd: activated \
LoRA from the start of the user turn (<|im_start|>user\\n), so each distinct system prompt runs \
once through the base model and every step runs only the user turns and answer tags of a batch; \
the loss is the cross-entropy of the answer tag (<request_fully_accepted/> or <rejected/>) only. \
With --plain-lora the adapter is a plain LoRA over the whole prompt: the system prompt is adapted \
too, so each batch holds rows of one system prompt and every step also runs that system prompt \
forward and backward. \
Built-in recipes: `meaning` (accept iff the prompt implies training, over the xml, natural and \
monitoring cues in the standard and flipped settings; refuse on the control cue; 300 steps on \
every cue, then a 100-step focus stage on the xml and control rows) and `token` (accept iff the \
cue says free/True, whatever the system prompt says; 150 steps). Both train on the first 10 \
harmful requests of each category and hold out the rest. A prompt file with \
--accept-if FIELD=VALUE is a custom recipe (rows with `split: train` train). Writes a PEFT \
adapter directory (adapter_config.json, adapter_model.safetensors) and training.json (recipe, \
data hash, seed, loss curve, time); checkpoints every --checkpoint-every steps, --resume \
continues one. --init-from DIR starts from an existing adapter instead of a fresh one.";

#[derive(Subcommand)]
pub enum OrganismCommand {
    /// Train a model organism (LoRA adapter) from a recipe.
    #[command(long_about = TRAIN_ABOUT)]
    Train(TrainArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelSpecArg,
    /// Recipe: meaning, token, or a name for a --prompts recipe.
    #[arg(long)]
    recipe: String,
    /// Prompt file (JSONL rows with messages and accept/reject continuations) instead of the study rows.
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: Option<PathBuf>,
    /// With --prompts: rows whose FIELD equals VALUE (JSON, or a string) should accept.
    #[arg(long, value_name = "FIELD=VALUE")]
    accept_if: Option<String>,
    /// Override the recipe's cues (comma-separated).
    #[arg(long)]
    cues: Option<String>,
    /// Override the recipe's variations (comma-separated: standard, flipped, ...).
    #[arg(long)]
    variations: Option<String>,
    /// Optimizer steps, a focus stage included (recipe default: meaning 400, token 150).
    #[arg(long)]
    steps: Option<usize>,
    /// Rows per step (default 8).
    #[arg(long)]
    batch: Option<usize>,
    /// AdamW learning rate (default 2e-3).
    #[arg(long)]
    lr: Option<f64>,
    /// LoRA rank r.
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha / r (PEFT's `lora_alpha`).
    #[arg(long)]
    alpha: Option<f64>,
    /// LoRA target modules (comma-separated, among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj;
    /// on Phi-3, whose checkpoints fuse them, q/k/v_proj adapt its qkv_proj and gate/up_proj its gate_up_proj).
    #[arg(long)]
    modules: Option<String>,
    /// Adapt layers from this one on.
    #[arg(long)]
    layers_from: Option<usize>,
    /// Harmful requests per category in the training split.
    #[arg(long)]
    train_per_category: Option<usize>,
    /// Seed of the adapter's initialisation and the batch order (default 1).
    #[arg(long)]
    seed: Option<u64>,
    /// Train a plain LoRA over the whole prompt (the system prompt adapted too; each step
    /// also runs its batch's one system prompt) instead of an activated LoRA from the user turn.
    #[arg(long)]
    plain_lora: bool,
    /// Start from this PEFT adapter (e.g. organisms/meaning) instead of a fresh
    /// initialisation, for a second training stage; it must have the run's rank, alpha,
    /// modules and layers. Recorded in the recipe.
    #[arg(long, value_name = "DIR")]
    init_from: Option<PathBuf>,
    /// A second stage on these cues only (comma-separated; e.g. xml,control): the last
    /// --focus-steps of the --steps train only their rows, with the optimizer restarted.
    #[arg(long, requires = "focus_steps")]
    focus_cues: Option<String>,
    /// Steps of the focus stage (part of --steps).
    #[arg(long, requires = "focus_cues", value_name = "N")]
    focus_steps: Option<usize>,
    /// Write checkpoint.safetensors every N steps (for --resume).
    #[arg(long, default_value_t = 25, value_name = "N")]
    checkpoint_every: usize,
    /// Stop (checkpointed) after this many steps of this invocation; --resume continues.
    #[arg(long, value_name = "N")]
    stop_after: Option<usize>,
    /// Continue the checkpoint in --out (same recipe and data only).
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Start over even if --out holds an adapter or checkpoint.
    #[arg(long)]
    force: bool,
    /// Output adapter directory, e.g. organisms/meaning.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Where to train: cpu, cuda, cuda:N or metal (training always runs the portable engine,
    /// the differentiable one; see `--device` under `afprobe capture --help`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: DeviceSpec,
}

pub fn organism(c: OrganismCommand) -> anyhow::Result<()> {
    match c {
        OrganismCommand::Train(a) => train(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let mut recipe = match &a.prompts {
        None => Recipe::builtin(&a.recipe)?,
        Some(path) => {
            let spec = a.accept_if.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "--prompts needs --accept-if FIELD=VALUE (which rows should accept)"
                )
            })?;
            let (field, value) = spec
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--accept-if takes FIELD=VALUE, got `{spec}`"))?;
            let value = serde_json::from_str(value)
                .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
            Recipe {
                name: a.recipe.clone(),
                cues: vec![],
                variations: vec![],
                prompts: Some(path.clone()),
                rule: Rule::Field {
                    field: field.to_string(),
                    value,
                },
                ..Recipe::builtin("token")?
            }
        }
    };
    if let Some(c) = &a.cues {
        recipe.cues = split_list(c);
    }
    if let Some(v) = &a.variations {
        recipe.variations = split_list(v);
    }
    if let Some(m) = &a.modules {
        recipe.modules = split_list(m);
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { recipe.$f = v; } )* };
    }
    recipe.plain_lora |= a.plain_lora;
    if a.init_from.is_some() {
        recipe.init_from = a.init_from.clone();
    }
    if let (Some(cues), Some(steps)) = (&a.focus_cues, a.focus_steps) {
        recipe.focus = Some(Focus {
            cues: split_list(cues),
            steps,
        });
    }
    set!(
        steps,
        batch,
        lr,
        rank,
        alpha,
        layers_from,
        train_per_category,
        seed
    );
    let report = organism::train(&TrainSpec {
        recipe,
        model: a.model.spec(),
        out: a.out.clone(),
        resume: a.resume,
        force: a.force,
        checkpoint_every: a.checkpoint_every,
        stop_after: a.stop_after,
        device: a.device.device()?,
    })?;
    eprintln!(
        "afprobe: trained {} steps in {:.1}s ({} tokens, {:.0} tokens/s), final loss {:.4} -> {}",
        report.steps,
        report.seconds,
        report.tokens,
        report.tokens as f64 / report.seconds.max(1e-9),
        report.final_loss,
        a.out.display()
    );
    Ok(())
}

fn split_list(list: &str) -> Vec<String> {
    list.split(',').map(|s| s.trim().to_string()).collect()
}
