//! `afprobe organism train`'s run, stage by stage: the data, the LoRA's
//! starting state, the system prompts' keys and values, the optimisation
//! loop, and the adapter.

use std::path::PathBuf;

use std::collections::BTreeMap;

use candle_core::{Tensor, Var, D};

use super::checkpoint::{init_from_adapter, Adam, Checkpoint, CheckpointMeta};
use super::examples::{epoch_batches, TrainingData};
use super::output::{write_adapter, write_training_record, WEIGHTS_FILE};
use super::recipe::{check_sizes, Recipe};
use crate::error::{Error, Result};
use crate::model::lora::{modules_for, Lora};
use crate::model::{
    Engine, Hooks, KvCache, LogitsAt, Model, ModelConfig, ModelSpec, TokenTree, Transformer,
    WeightDtype,
};
use crate::progress::Progress;

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
    /// Where the model and the LoRA live (`--device`).
    pub device: candle_core::Device,
}

pub struct TrainReport {
    pub steps: usize,
    pub seconds: f64,
    pub tokens: usize,
    pub final_loss: f64,
}

/// The LoRA being trained, its optimiser state and the run's record.
struct Run {
    lora: Lora,
    vars: Vec<(String, Var)>,
    adam: Adam,
    meta: CheckpointMeta,
}

/// Trains the recipe's adapter into `spec.out`.
pub fn train(spec: &TrainSpec) -> Result<TrainReport> {
    let r = &spec.recipe;
    let out = &spec.out;
    let checkpoint = Checkpoint::in_dir(out);
    if !spec.resume && !spec.force && (out.join(WEIGHTS_FILE).exists() || checkpoint.file.exists())
    {
        return Err(Error::BadInput(format!(
            "{} already holds an adapter or checkpoint; pass --resume to continue it or --force to start over",
            out.display()
        )));
    }
    check_sizes(r)?;
    let mut model = Model::load(&spec.model, WeightDtype::F32)?;
    // The portable engine: candle ops, which candle differentiates.
    model.transformer.set_engine(Engine::Portable);
    model.transformer.move_to(&spec.device)?;
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
    let data = TrainingData::prepare(&model, r)?;
    let config = model.config().clone();
    if r.layers_from >= config.n_layers {
        return Err(Error::BadInput(format!(
            "layers_from {} is beyond the model's {} layers",
            r.layers_from, config.n_layers
        )));
    }
    let base_sha = model.weights_sha256()?;
    let layers: Vec<usize> = (r.layers_from..config.n_layers).collect();
    let modules = modules_for(&config, &r.modules)?;
    if config.architecture.fused_projections() && modules != r.modules {
        eprintln!(
            "afprobe: this {} checkpoint stores its projections fused: adapting {}",
            config.architecture.name(),
            modules.join(", ")
        );
    }
    let mut run = start(spec, &config, &layers, &modules, &data, &checkpoint)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let pre = system_prompt_kvs(r, &model.transformer, &data)?;
    model.transformer.set_lora(Some(&run.lora))?;
    optimise(spec, &data, &model.transformer, &pre, &mut run, &checkpoint)?;
    let meta = &run.meta;
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

    write_adapter(
        out,
        r,
        &spec.model,
        (&layers, &modules),
        &run.vars,
        &data.invocation,
    )?;
    let final_loss = meta.losses.last().copied().unwrap_or(f64::NAN);
    write_training_record(out, r, &spec.model, &base_sha, &data, meta)?;
    checkpoint.remove();
    Ok(TrainReport {
        steps: meta.step,
        seconds: meta.seconds,
        tokens: meta.tokens,
        final_loss,
    })
}

/// The LoRA on `layers` and its optimiser state: fresh, from `--init-from`'s
/// adapter, then (with `--resume`) from the checkpoint, which must be of this
/// recipe and data.
fn start(
    spec: &TrainSpec,
    config: &ModelConfig,
    layers: &[usize],
    modules: &[String],
    data: &TrainingData,
    checkpoint: &Checkpoint,
) -> Result<Run> {
    let r = &spec.recipe;
    let mut meta = CheckpointMeta {
        recipe: r.clone(),
        data_sha256: data.sha256.clone(),
        step: 0,
        losses: vec![],
        seconds: 0.0,
        tokens: 0,
    };
    let lora = Lora::init(
        config,
        layers,
        modules,
        r.rank,
        r.alpha,
        r.seed,
        &spec.device,
    )?;
    let vars: Vec<(String, Var)> = lora
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.clone()))
        .collect();
    let mut adam = Adam::zeros(&vars)?;
    if let Some(dir) = &r.init_from {
        init_from_adapter(dir, r, &vars)?;
    }
    if spec.resume {
        meta = checkpoint.resume(r, &data.sha256, &vars, &mut adam)?;
        eprintln!("afprobe: resuming `{}` at step {}", r.name, meta.step);
    }
    Ok(Run {
        lora,
        vars,
        adam,
        meta,
    })
}

/// Activated LoRA: the base model's keys and values of every distinct system
/// prompt, once (run before the factors are attached). A plain LoRA adapts
/// them, so each step runs its own (none here).
fn system_prompt_kvs(r: &Recipe, model: &Transformer, data: &TrainingData) -> Result<Vec<KvCache>> {
    let started = std::time::Instant::now();
    let pre: Vec<KvCache> = if r.plain_lora {
        vec![]
    } else {
        data.prefixes
            .iter()
            .map(|p| prefix_kv(model, p))
            .collect::<Result<_>>()?
    };
    let n_accept = data
        .train_idx
        .iter()
        .filter(|&&i| data.examples[i].accept)
        .count();
    eprintln!(
        "afprobe: recipe `{}`: {} rows ({} train, {} accept; {} in the focus stage from step {}), \
         {} system prompts ({} tokens) in {:.1}s",
        r.name,
        data.examples.len(),
        data.train_idx.len(),
        n_accept,
        data.focus_idx.len(),
        data.focus_at,
        data.prefixes.len(),
        data.prefixes.iter().map(Vec::len).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    Ok(pre)
}

/// The optimisation loop, from the run's step to the recipe's last (or
/// `--stop-after` steps of this invocation), checkpointing as it goes.
fn optimise(
    spec: &TrainSpec,
    data: &TrainingData,
    model: &Transformer,
    pre: &[KvCache],
    run: &mut Run,
    checkpoint: &Checkpoint,
) -> Result<()> {
    let r = &spec.recipe;
    let examples = &data.examples;
    let progress = Progress::new("train", "steps", r.steps);
    progress.advance(run.meta.step, None);
    let clock = std::time::Instant::now();
    let seconds_before = run.meta.seconds;
    let per_epoch = |rows: &[usize]| epoch_batches(r, rows, examples, 0).len();
    let per_epoch = [per_epoch(&data.train_idx), per_epoch(&data.focus_idx)];
    let stop = spec
        .stop_after
        .map_or(r.steps, |n| (run.meta.step + n).min(r.steps));
    while run.meta.step < stop {
        let step = run.meta.step;
        // Step `local` of stage `stage` (0: every training row; 1: the focus cues').
        let (stage, local) = if step < data.focus_at {
            (0, step)
        } else {
            (1, step - data.focus_at)
        };
        let rows = [&data.train_idx, &data.focus_idx][stage];
        let epoch = local / per_epoch[stage];
        let batch = epoch_batches(r, rows, examples, epoch).swap_remove(local % per_epoch[stage]);
        if stage == 1 && local == 0 {
            // A fresh start for the optimizer: stage one's moments would damp the
            // new rows' gradients (its second moments are of near-zero losses).
            run.adam.reset()?;
        }
        let loss = batch_loss(r, data, model, pre, &batch, &mut run.meta.tokens)?;
        let grads = loss.backward()?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        run.adam.step(&run.vars, &grads, (local + 1) as i32, r)?;
        let meta = &mut run.meta;
        meta.losses.push(loss_value);
        meta.step += 1;
        meta.seconds = seconds_before + clock.elapsed().as_secs_f64();
        progress.advance(1, Some(format!("loss {loss_value:.4}")));
        if meta.step.is_multiple_of(spec.checkpoint_every.max(1)) || meta.step == stop {
            checkpoint.save(&run.vars, &run.adam, &run.meta)?;
        }
    }
    progress.finish();
    Ok(())
}

/// The keys and values of `tokens` run from an empty cache.
fn prefix_kv(model: &Transformer, tokens: &[u32]) -> Result<KvCache> {
    let mut kv = KvCache::new();
    model.forward(tokens, &mut kv, &mut Hooks::none(), &LogitsAt::None)?;
    Ok(kv)
}

/// The mean cross-entropy of the batch's answer-tag tokens, with the
/// attached LoRA applied from the invocation on (or, plain, everywhere);
/// counts the tokens run into `tokens`. The rows on one system prompt run as
/// one token tree on its cache: one GEMM per projection for all of them.
fn batch_loss(
    r: &Recipe,
    data: &TrainingData,
    model: &Transformer,
    pre: &[KvCache],
    batch: &[usize],
    tokens: &mut usize,
) -> Result<Tensor> {
    let examples = &data.examples;
    let mut by_prefix: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in batch {
        by_prefix.entry(examples[i].prefix).or_default().push(i);
    }
    let mut total: Option<Tensor> = None;
    for (p, rows) in by_prefix {
        // A plain LoRA's batch shares one system prompt: run it adapted, in the graph.
        let mut kv = if r.plain_lora {
            let prefix = &data.prefixes[p];
            *tokens += prefix.len();
            prefix_kv(model, prefix)?
        } else {
            pre[p].clone()
        };
        // Each row's user turn and answer tag but its last token, as a branch.
        let seqs: Vec<Vec<u32>> = rows
            .iter()
            .map(|&i| {
                let ex = &examples[i];
                [&ex.suffix[..], &ex.tag[..ex.tag.len() - 1]].concat()
            })
            .collect();
        *tokens += seqs.iter().map(Vec::len).sum::<usize>();
        let branches: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let (tree, paths) = TokenTree::trie(&branches);
        // The tree rows predicting each tag token, and the tokens.
        let mut at = Vec::new();
        let mut targets = Vec::new();
        for (&i, path) in rows.iter().zip(&paths) {
            let ex = &examples[i];
            at.extend((0..ex.tag.len()).map(|j| path[ex.suffix.len() - 1 + j]));
            targets.extend_from_slice(&ex.tag);
        }
        let logits = model
            .forward_tree(&tree, &mut kv, &mut Hooks::none(), &LogitsAt::Rows(at))?
            .ok_or_else(|| Error::BadInput("training runs without an activated adapter".into()))?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let idx = Tensor::new(targets, lp.device())?.unsqueeze(1)?;
        let nll = (lp.gather(&idx, 1)?.sum_all()? * -1.0)?;
        total = Some(match total {
            Some(t) => (t + nll)?,
            None => nll,
        });
    }
    Ok((total.expect("a batch has rows") / batch.len() as f64)?)
}
