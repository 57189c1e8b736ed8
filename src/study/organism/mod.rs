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

pub mod diff;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::{gguf, Model, ModelConfig, ModelFiles, ModelSpec, WeightDtype};
use crate::progress::Progress;
use crate::prompts::{parse_prompts, render, PromptRow};
use crate::study::setting::{self, Variation};
use diff::{DiffModel, Lora, PrefixKv};

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
    fn accepts(&self, meta: &serde_json::Map<String, Value>) -> Result<bool> {
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

/// What `afprobe organism train` was asked for.
pub struct TrainSpec {
    pub recipe: Recipe,
    pub model: ModelSpec,
    pub out: PathBuf,
    pub resume: bool,
    pub force: bool,
    pub checkpoint_every: usize,
    /// Stop after this many steps of this invocation (checkpointed), for `--resume`.
    pub stop_after: Option<usize>,
}

/// One training or evaluation row, split at the invocation.
struct Example {
    id: String,
    cue: String,
    request: String,
    prefix: usize,
    suffix: Vec<u32>,
    tag: Vec<u32>,
    train: bool,
    accept: bool,
}

/// The user-turn header the adapter is activated from.
pub const INVOCATION: &str = "<|im_start|>user\n";

#[derive(Serialize, Deserialize, Clone)]
struct CheckpointMeta {
    recipe: Recipe,
    data_sha256: String,
    step: usize,
    losses: Vec<f64>,
    seconds: f64,
    tokens: usize,
}

fn weights_of(files: &ModelFiles) -> Result<(ModelConfig, DiffModel)> {
    match files {
        ModelFiles::Gguf(path) => {
            let mut file = gguf::GgufFile::open(path)?;
            let mut config = file.config()?;
            file.read_rope_freq_factors(&mut config)?;
            let cfg = config.clone();
            let m = DiffModel::new(config.clone(), &mut |n| file.weight(n, &cfg))?;
            Ok((config, m))
        }
        ModelFiles::HfDir(dir) => {
            let hf = crate::model::HfDir::open(dir)?;
            let m = DiffModel::new(hf.config.clone(), &mut |n| hf.tensor(n))?;
            Ok((hf.config, m))
        }
    }
}

/// Prompt rows of a recipe (built-in study rows or its prompt file), checked.
fn recipe_rows(recipe: &Recipe) -> Result<(Vec<PromptRow>, PathBuf)> {
    if let Some(path) = &recipe.prompts {
        let rows = crate::prompts::read_prompt_file(path)?;
        return Ok((rows, path.clone()));
    }
    let cues = setting::select_cues(&recipe.cues.join(","), vec![])?;
    let mut text = String::new();
    for v in &recipe.variations {
        let variations: Vec<Variation> = if v == "standard" {
            vec![]
        } else {
            vec![Variation::parse(v, &[])?]
        };
        let s = setting::builtin_setting_varied("helpful-only", false, &variations)?;
        for row in setting::build_rows(&s, &cues, &setting::builtin_requests())? {
            text.push_str(&row.to_string());
            text.push('\n');
        }
    }
    let path = PathBuf::from(format!("<recipe {}>", recipe.name));
    Ok((parse_prompts(&text, &path)?, path))
}

/// Which requests train: the first `n` harmful requests of each category.
fn is_train(recipe: &Recipe, meta: &serde_json::Map<String, Value>) -> bool {
    if let Some(split) = meta.get("split").and_then(Value::as_str) {
        return split == "train";
    }
    if meta.get("harmful").and_then(Value::as_bool) == Some(false) {
        return false;
    }
    let id = meta.get("request_id").and_then(Value::as_str).unwrap_or("");
    id.rsplit_once('-')
        .and_then(|(_, n)| n.parse::<usize>().ok())
        .is_some_and(|n| n <= recipe.train_per_category)
}

/// The rows, the distinct system-prompt prefixes, and the invocation tokens.
type Examples = (Vec<Example>, Vec<Vec<u32>>, Vec<u32>);

fn examples(model: &Model, recipe: &Recipe) -> Result<Examples> {
    let (rows, path) = recipe_rows(recipe)?;
    let invocation = model.tokenizer.encode(INVOCATION)?;
    let mut prefixes: Vec<Vec<u32>> = Vec::new();
    let mut out = Vec::new();
    for row in &rows {
        let r = render(model, row, &path)?;
        let n = invocation.len();
        let start = (0..=r.tokens.len().saturating_sub(n))
            .rev()
            .find(|&i| r.tokens[i..].starts_with(&invocation))
            .ok_or_else(|| {
                Error::BadInput(format!(
                    "row `{}` has no user turn `{}` (tokens {invocation:?}) to activate the adapter from",
                    row.id,
                    INVOCATION.escape_debug()
                ))
            })?;
        if start == 0 {
            return Err(Error::BadInput(format!(
                "{}:{} (row `{}`): the prompt has no tokens before its user turn (no system \
                 message, and the model adds no BOS): an organism's training runs the part \
                 before the user turn as a shared prefix; add a system message to the row",
                path.display(),
                row.line,
                row.id
            )));
        }
        let prefix = r.tokens[..start].to_vec();
        let p = match prefixes.iter().position(|q| *q == prefix) {
            Some(p) => p,
            None => {
                prefixes.push(prefix);
                prefixes.len() - 1
            }
        };
        let accept = recipe.accepts(&row.metadata)?;
        let tag = r
            .continuations
            .get(if accept { "accept" } else { "reject" })
            .cloned()
            .ok_or_else(|| {
                Error::BadInput(format!(
                    "row `{}` has no accept/reject continuations",
                    row.id
                ))
            })?;
        let text_field = |key: &str| row.metadata.get(key).and_then(Value::as_str);
        out.push(Example {
            id: row.id.clone(),
            cue: text_field("cue").unwrap_or("").to_string(),
            request: text_field("request_id").unwrap_or(&row.id).to_string(),
            prefix: p,
            suffix: r.tokens[start..].to_vec(),
            tag,
            train: is_train(recipe, &row.metadata),
            accept,
        });
    }
    Ok((out, prefixes, invocation))
}

fn data_sha256(examples: &[Example], prefixes: &[Vec<u32>]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in prefixes {
        h.update(format!("{p:?}\n"));
    }
    for e in examples {
        h.update(format!(
            "{} {} {:?} {:?} {} {}\n",
            e.id, e.prefix, e.suffix, e.tag, e.train, e.accept
        ));
    }
    format!("{:x}", h.finalize())
}

/// An epoch's batches (indices into `examples`): a seeded permutation of the
/// training rows cut into batches, so a resume draws the same rows. A plain
/// LoRA's batches each hold rows of one system prompt (which the step then runs
/// once), in a seeded order.
fn epoch_batches(
    r: &Recipe,
    train_idx: &[usize],
    examples: &[Example],
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(r.seed ^ ((epoch as u64 + 1) * 0x9e37_79b9));
    let mut order = train_idx.to_vec();
    order.shuffle(&mut rng);
    if !r.plain_lora {
        return order.chunks(r.batch).map(<[usize]>::to_vec).collect();
    }
    let mut by_prefix: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for i in order {
        by_prefix.entry(examples[i].prefix).or_default().push(i);
    }
    let mut batches: Vec<Vec<usize>> = by_prefix
        .values()
        .flat_map(|rows| rows.chunks(r.batch).map(<[usize]>::to_vec))
        .collect();
    batches.shuffle(&mut rng);
    batches
}

/// AdamW state (kept here, not in candle-nn's optimizer, so a checkpoint can hold it).
struct Adam {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

pub struct TrainReport {
    pub steps: usize,
    pub seconds: f64,
    pub tokens: usize,
    pub final_loss: f64,
}

/// The most rows per step (`--batch`).
pub const MAX_BATCH: usize = 4096;
/// The most optimizer steps (`--steps`).
pub const MAX_STEPS: usize = 10_000_000;
/// The most rows a run may process in all (`--steps` × `--batch`).
pub const MAX_STEP_ROWS: usize = 1_000_000_000;

/// Bounds the recipe's sizes before anything is loaded or allocated (the rank
/// is checked against the model once it is loaded).
fn check_sizes(r: &Recipe) -> Result<()> {
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

/// Trains the recipe's adapter into `spec.out`.
pub fn train(spec: &TrainSpec) -> Result<TrainReport> {
    let r = &spec.recipe;
    let out = &spec.out;
    let adapter_file = out.join("adapter_model.safetensors");
    let ck_file = out.join("checkpoint.safetensors");
    let ck_meta = out.join("checkpoint.json");
    if !spec.resume && !spec.force && (adapter_file.exists() || ck_file.exists()) {
        return Err(Error::BadInput(format!(
            "{} already holds an adapter or checkpoint; pass --resume to continue it or --force to start over",
            out.display()
        )));
    }
    check_sizes(r)?;
    let model = Model::load(&spec.model, WeightDtype::F32)?;
    let d_model = model.config().d_model;
    crate::error::check_range(
        "--rank",
        r.rank,
        1,
        d_model,
        &format!(
            "a LoRA's rank is at most its projection's smaller side; this model's d_model is \
             {d_model}"
        ),
    )?;
    let (examples, prefixes, invocation) = examples(&model, r)?;
    let train_idx: Vec<usize> = (0..examples.len()).filter(|&i| examples[i].train).collect();
    if train_idx.is_empty() {
        return Err(Error::BadInput(format!(
            "recipe `{}`: the training split is empty ({} rows, none selected for training)",
            r.name,
            examples.len()
        )));
    }
    let n_accept = train_idx.iter().filter(|&&i| examples[i].accept).count();
    // The second stage's rows, and the step it starts at.
    let (focus_idx, focus_at) = match &r.focus {
        None => (vec![], r.steps),
        Some(f) => {
            if f.steps == 0 || f.steps > r.steps {
                return Err(Error::BadInput(format!(
                    "the focus stage has {} steps; it must have 1 to the run's {} steps",
                    f.steps, r.steps
                )));
            }
            let idx: Vec<usize> = train_idx
                .iter()
                .copied()
                .filter(|&i| f.cues.contains(&examples[i].cue))
                .collect();
            if idx.is_empty() {
                return Err(Error::BadInput(format!(
                    "recipe `{}`: the focus cues {} select no training rows (the recipe's cues: {})",
                    r.name,
                    f.cues.join(","),
                    r.cues.join(",")
                )));
            }
            (idx, r.steps - f.steps)
        }
    };
    let data_sha = data_sha256(&examples, &prefixes);
    let config = model.config().clone();
    if r.layers_from >= config.n_layers {
        return Err(Error::BadInput(format!(
            "layers_from {} is beyond the model's {} layers",
            r.layers_from, config.n_layers
        )));
    }
    let base_sha = model.weights_sha256()?;

    // Resume: the checkpoint must be of this recipe, data and base model.
    let mut meta = CheckpointMeta {
        recipe: r.clone(),
        data_sha256: data_sha.clone(),
        step: 0,
        losses: vec![],
        seconds: 0.0,
        tokens: 0,
    };
    let layers: Vec<usize> = (r.layers_from..config.n_layers).collect();
    let lora = Lora::init(&config, &layers, &r.modules, r.rank, r.alpha, r.seed)?;
    let vars: Vec<(String, Var)> = lora
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.clone()))
        .collect();
    let mut adam = Adam {
        m: vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<_>>()?,
        v: vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<_>>()?,
    };
    if let Some(dir) = &r.init_from {
        init_from_adapter(dir, r, &vars)?;
    }
    if spec.resume {
        let text = crate::io::read_to_string(&ck_meta)?;
        let old: CheckpointMeta = serde_json::from_str(&text)
            .map_err(|e| Error::model_file(&ck_meta, format!("not a checkpoint: {e}")))?;
        // Only `steps` may change on a resume (to extend a run).
        let same = Recipe {
            steps: r.steps,
            ..old.recipe.clone()
        } == *r;
        if !same || old.data_sha256 != data_sha {
            return Err(Error::model_file(
                &ck_meta,
                format!(
                    "the checkpoint is of recipe `{}` (data sha256 {}), not of this run's recipe `{}` \
                     (data sha256 {}) with the same settings; nothing was changed",
                    old.recipe.name, old.data_sha256, r.name, data_sha
                ),
            ));
        }
        crate::io::check_safetensors(&ck_file)?;
        let t = candle_core::safetensors::load(&ck_file, &Device::Cpu)
            .map_err(|e| Error::model_file(&ck_file, format!("cannot read: {e}")))?;
        for (i, (name, var)) in vars.iter().enumerate() {
            let get = |k: String| {
                t.get(&k)
                    .cloned()
                    .ok_or_else(|| Error::model_file(&ck_file, format!("no tensor `{k}`")))
            };
            var.set(&get(name.clone())?)?;
            adam.m[i] = get(format!("adam_m.{name}"))?;
            adam.v[i] = get(format!("adam_v.{name}"))?;
        }
        meta = old;
        eprintln!("afprobe: resuming `{}` at step {}", r.name, meta.step);
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let diff = weights_of(&model.files)?.1;
    drop(model);
    // Activated LoRA: the base model's keys and values of every distinct system
    // prompt, once. A plain LoRA adapts them, so each step runs its own.
    let started = std::time::Instant::now();
    let pre: Vec<PrefixKv> = if r.plain_lora {
        vec![]
    } else {
        prefixes
            .iter()
            .map(|p| Ok(diff.forward(p, None, None, &[p.len() - 1])?.1))
            .collect::<Result<_>>()?
    };
    eprintln!(
        "afprobe: recipe `{}`: {} rows ({} train, {} accept; {} in the focus stage from step {}), \
         {} system prompts ({} tokens) in {:.1}s",
        r.name,
        examples.len(),
        train_idx.len(),
        n_accept,
        focus_idx.len(),
        focus_at,
        prefixes.len(),
        prefixes.iter().map(Vec::len).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );

    let progress = Progress::new("train", "steps", r.steps);
    progress.advance(meta.step, None);
    let clock = std::time::Instant::now();
    let seconds_before = meta.seconds;
    let per_epoch = |rows: &[usize]| epoch_batches(r, rows, &examples, 0).len();
    let per_epoch = [per_epoch(&train_idx), per_epoch(&focus_idx)];
    let stop = spec
        .stop_after
        .map_or(r.steps, |n| (meta.step + n).min(r.steps));
    while meta.step < stop {
        let step = meta.step;
        // Step `local` of stage `stage` (0: every training row; 1: the focus cues').
        let (stage, local) = if step < focus_at {
            (0, step)
        } else {
            (1, step - focus_at)
        };
        let rows = [&train_idx, &focus_idx][stage];
        let epoch = local / per_epoch[stage];
        let batch = epoch_batches(r, rows, &examples, epoch).swap_remove(local % per_epoch[stage]);
        if stage == 1 && local == 0 {
            // A fresh start for the optimizer: stage one's moments would damp the
            // new rows' gradients (its second moments are of near-zero losses).
            for (m, v) in adam.m.iter_mut().zip(&mut adam.v) {
                *m = m.zeros_like()?;
                *v = v.zeros_like()?;
            }
        }
        // A plain LoRA's batch shares one system prompt: run it adapted, in the graph.
        let adapted: Option<PrefixKv> = if r.plain_lora {
            let tokens = &prefixes[examples[batch[0]].prefix];
            meta.tokens += tokens.len();
            Some(
                diff.forward(tokens, None, Some(&lora), &[tokens.len() - 1])?
                    .1,
            )
        } else {
            None
        };
        let prefix_kv = |p: usize| adapted.as_ref().unwrap_or_else(|| &pre[p]);
        // One pass over the whole batch (the projections as one GEMM).
        let seqs: Vec<(Vec<u32>, usize, Vec<usize>)> = batch
            .iter()
            .map(|&i| {
                let ex = &examples[i];
                let mut seq = ex.suffix.clone();
                seq.extend_from_slice(&ex.tag[..ex.tag.len() - 1]);
                let rows = (0..ex.tag.len()).map(|j| ex.suffix.len() - 1 + j).collect();
                (seq, ex.prefix, rows)
            })
            .collect();
        meta.tokens += seqs.iter().map(|s| s.0.len()).sum::<usize>();
        let refs: Vec<(&[u32], &PrefixKv, Vec<usize>)> = seqs
            .iter()
            .map(|(s, p, r)| (s.as_slice(), prefix_kv(*p), r.clone()))
            .collect();
        let logits = diff.forward_batch(&refs, &lora)?;
        let mut total: Option<Tensor> = None;
        for (&i, lg) in batch.iter().zip(&logits) {
            let lp = candle_nn::ops::log_softmax(lg, D::Minus1)?;
            let idx = Tensor::new(examples[i].tag.clone(), &Device::Cpu)?.unsqueeze(1)?;
            let nll = (lp.gather(&idx, 1)?.sum_all()? * -1.0)?;
            total = Some(match total {
                Some(t) => (t + nll)?,
                None => nll,
            });
        }
        let loss = (total.expect("a batch has rows") / batch.len() as f64)?;
        let grads = loss.backward()?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        // AdamW (decoupled weight decay), bias-corrected, as candle-nn's.
        let t = (local + 1) as i32;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        for (i, (_, var)) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            adam.m[i] = ((&adam.m[i] * b1)? + (g * (1.0 - b1))?)?;
            adam.v[i] = ((&adam.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&adam.m[i] / (1.0 - b1.powi(t)))?;
            let v_hat = (&adam.v[i] / (1.0 - b2.powi(t)))?;
            let decayed = (var.as_tensor() * (1.0 - r.lr * r.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            var.set(&(decayed - (update * r.lr)?)?)?;
        }
        meta.losses.push(loss_value);
        meta.step += 1;
        meta.seconds = seconds_before + clock.elapsed().as_secs_f64();
        progress.advance(1, Some(format!("loss {loss_value:.4}")));
        if meta.step.is_multiple_of(spec.checkpoint_every.max(1)) || meta.step == stop {
            let mut t: HashMap<String, Tensor> = HashMap::new();
            for (i, (name, var)) in vars.iter().enumerate() {
                t.insert(name.clone(), var.as_tensor().clone());
                t.insert(format!("adam_m.{name}"), adam.m[i].clone());
                t.insert(format!("adam_v.{name}"), adam.v[i].clone());
            }
            let tmp = out.join("checkpoint.safetensors.tmp");
            candle_core::safetensors::save(&t, &tmp)?;
            std::fs::rename(&tmp, &ck_file).map_err(|e| Error::io(&ck_file, e))?;
            write_atomic(
                &ck_meta,
                serde_json::to_string_pretty(&meta).unwrap().as_bytes(),
            )?;
        }
    }
    progress.finish();
    if meta.step < r.steps {
        eprintln!(
            "afprobe: stopped at step {} of {} (checkpointed); --resume continues",
            meta.step, r.steps
        );
        return Ok(TrainReport {
            steps: meta.step,
            seconds: meta.seconds,
            tokens: meta.tokens,
            final_loss: meta.losses.last().copied().unwrap_or(f64::NAN),
        });
    }

    // The PEFT adapter.
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let tmp = out.join("adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &adapter_file).map_err(|e| Error::io(&adapter_file, e))?;
    let base_name = match &spec.model {
        ModelSpec::Default => "HuggingFaceTB/SmolLM2-135M-Instruct".to_string(),
        s => s.to_string(),
    };
    let mut config_json = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r.rank,
        "lora_alpha": r.alpha,
        "lora_dropout": 0.0,
        "use_rslora": false,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": r.modules,
        "layers_to_transform": layers,
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    if !r.plain_lora {
        config_json["alora_invocation_tokens"] = json!(invocation);
    }
    write_atomic(
        &out.join("adapter_config.json"),
        serde_json::to_string_pretty(&config_json)
            .unwrap()
            .as_bytes(),
    )?;
    let train_requests: BTreeSet<&str> = train_idx
        .iter()
        .map(|&i| examples[i].request.as_str())
        .collect();
    let final_loss = meta.losses.last().copied().unwrap_or(f64::NAN);
    let training = json!({
        "recipe": r,
        "base_model": {"spec": spec.model.to_string(), "sha256": base_sha},
        "data_sha256": data_sha,
        "rows": examples.len(),
        "train_rows": train_idx.len(),
        "train_requests": train_requests,
        "seed": r.seed,
        "steps": meta.step,
        "tokens": meta.tokens,
        "seconds": meta.seconds,
        "tokens_per_second": meta.tokens as f64 / meta.seconds.max(1e-9),
        "threads": rayon::current_num_threads(),
        "loss": meta.losses,
        "afprobe_version": env!("CARGO_PKG_VERSION"),
    });
    write_atomic(
        &out.join("training.json"),
        serde_json::to_string_pretty(&training).unwrap().as_bytes(),
    )?;
    let _ = std::fs::remove_file(&ck_file);
    let _ = std::fs::remove_file(&ck_meta);
    Ok(TrainReport {
        steps: meta.step,
        seconds: meta.seconds,
        tokens: meta.tokens,
        final_loss,
    })
}

/// Sets `vars` (PEFT names) from the adapter in `dir`, which must have the
/// recipe's rank and alpha and a tensor of the right shape for every variable.
fn init_from_adapter(dir: &Path, r: &Recipe, vars: &[(String, Var)]) -> Result<()> {
    let config_file = dir.join("adapter_config.json");
    let text = crate::io::read_to_string(&config_file)?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::model_file(&config_file, format!("not JSON: {e}")))?;
    let (rank, alpha) = (config["r"].as_u64(), config["lora_alpha"].as_f64());
    if rank != Some(r.rank as u64) || alpha != Some(r.alpha) {
        return Err(Error::model_file(
            &config_file,
            format!(
                "--init-from needs the run's LoRA shape: the adapter has r = {}, lora_alpha = {}, \
                 the run r = {}, alpha = {}; pass --rank and --alpha to match",
                config["r"], config["lora_alpha"], r.rank, r.alpha
            ),
        ));
    }
    let file = dir.join("adapter_model.safetensors");
    crate::io::check_safetensors(&file)?;
    let t = candle_core::safetensors::load(&file, &Device::Cpu)
        .map_err(|e| Error::model_file(&file, format!("cannot read: {e}")))?;
    for (name, var) in vars {
        let w = t.get(name).ok_or_else(|| {
            Error::model_file(
                &file,
                format!(
                    "no tensor `{name}`: --init-from needs an adapter on the run's modules ({}) \
                     and layers ({}..); pass --modules and --layers-from to match",
                    r.modules.join(","),
                    r.layers_from
                ),
            )
        })?;
        if w.dims() != var.dims() {
            return Err(Error::model_file(
                &file,
                format!(
                    "tensor `{name}` has shape {:?}, the run needs {:?}",
                    w.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&w.to_dtype(candle_core::DType::F32)?)?;
    }
    Ok(())
}

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
