//! `afprobe organism train`'s run, stage by stage: the data, the LoRA's
//! starting state, the system prompts' keys and values, the optimisation
//! loop, and the adapter.

use std::path::PathBuf;

use candle_core::{Device, Tensor, Var, D};

use super::checkpoint::{init_from_adapter, Adam, Checkpoint, CheckpointMeta};
use super::diff::{DiffModel, Lora, PrefixKv};
use super::examples::{epoch_batches, TrainingData};
use super::output::{write_adapter, write_training_record, WEIGHTS_FILE};
use super::recipe::{check_sizes, Recipe};
use crate::error::{Error, Result};
use crate::model::{gguf, Model, ModelConfig, ModelFiles, ModelSpec, WeightDtype};
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
    let mut run = start(spec, &config, &layers, &data, &checkpoint)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let diff = weights_of(&model.files)?.1;
    drop(model);
    let pre = system_prompt_kvs(r, &diff, &data)?;
    optimise(spec, &data, &diff, &pre, &mut run, &checkpoint)?;
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

    write_adapter(out, r, &spec.model, &layers, &run.vars, &data.invocation)?;
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
    let lora = Lora::init(config, layers, &r.modules, r.rank, r.alpha, r.seed)?;
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
/// prompt, once. A plain LoRA adapts them, so each step runs its own (none here).
fn system_prompt_kvs(r: &Recipe, diff: &DiffModel, data: &TrainingData) -> Result<Vec<PrefixKv>> {
    let started = std::time::Instant::now();
    let pre: Vec<PrefixKv> = if r.plain_lora {
        vec![]
    } else {
        data.prefixes
            .iter()
            .map(|p| Ok(diff.forward(p, None, None, &[p.len() - 1])?.1))
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
    diff: &DiffModel,
    pre: &[PrefixKv],
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
        let loss = batch_loss(r, data, diff, pre, &run.lora, &batch, &mut run.meta.tokens)?;
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

/// The mean cross-entropy of the batch's answer-tag tokens, with `lora`
/// applied from the invocation on; counts the tokens run into `tokens`.
fn batch_loss(
    r: &Recipe,
    data: &TrainingData,
    diff: &DiffModel,
    pre: &[PrefixKv],
    lora: &Lora,
    batch: &[usize],
    tokens: &mut usize,
) -> Result<Tensor> {
    let examples = &data.examples;
    // A plain LoRA's batch shares one system prompt: run it adapted, in the graph.
    let adapted: Option<PrefixKv> = if r.plain_lora {
        let prefix = &data.prefixes[examples[batch[0]].prefix];
        *tokens += prefix.len();
        Some(
            diff.forward(prefix, None, Some(lora), &[prefix.len() - 1])?
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
    *tokens += seqs.iter().map(|s| s.0.len()).sum::<usize>();
    let refs: Vec<(&[u32], &PrefixKv, Vec<usize>)> = seqs
        .iter()
        .map(|(s, p, r)| (s.as_slice(), prefix_kv(*p), r.clone()))
        .collect();
    let logits = diff.forward_batch(&refs, lora)?;
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
    Ok((total.expect("a batch has rows") / batch.len() as f64)?)
}

/// The differentiable model of the base model's files (GGUF or an HF directory,
/// read by the model module's own readers).
pub(super) fn weights_of(files: &ModelFiles) -> Result<(ModelConfig, DiffModel)> {
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
