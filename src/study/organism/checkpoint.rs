//! Where a run's LoRA starts and how it survives an interruption: the AdamW
//! moments, `--init-from` an adapter, and the checkpoint `--resume` reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::recipe::Recipe;
use crate::error::{Error, Result};
use crate::io::write_atomic;

/// What a checkpoint records beside the tensors (and `training.json` reports).
#[derive(Serialize, Deserialize, Clone)]
pub(super) struct CheckpointMeta {
    pub(super) recipe: Recipe,
    pub(super) data_sha256: String,
    pub(super) step: usize,
    pub(super) losses: Vec<f64>,
    pub(super) seconds: f64,
    pub(super) tokens: usize,
}

/// AdamW state (kept here, not in candle-nn's optimizer, so a checkpoint can hold it).
pub(super) struct Adam {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Adam {
    pub(super) fn zeros(vars: &[(String, Var)]) -> Result<Adam> {
        Ok(Adam {
            m: vars
                .iter()
                .map(|(_, v)| v.zeros_like())
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|(_, v)| v.zeros_like())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// A fresh start for the optimizer (the moments back to zero).
    pub(super) fn reset(&mut self) -> Result<()> {
        for (m, v) in self.m.iter_mut().zip(&mut self.v) {
            *m = m.zeros_like()?;
            *v = v.zeros_like()?;
        }
        Ok(())
    }

    /// Step `t` (from 1) of AdamW (decoupled weight decay), bias-corrected, as
    /// candle-nn's; a variable without a gradient is left as it is.
    pub(super) fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        t: i32,
        r: &Recipe,
    ) -> Result<()> {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        for (i, (_, var)) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&self.m[i] / (1.0 - b1.powi(t)))?;
            let v_hat = (&self.v[i] / (1.0 - b2.powi(t)))?;
            let decayed = (var.as_tensor() * (1.0 - r.lr * r.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            var.set(&(decayed - (update * r.lr)?)?)?;
        }
        Ok(())
    }
}

/// `checkpoint.safetensors` (the variables and their moments) and
/// `checkpoint.json` ([`CheckpointMeta`]) in a run's output directory.
pub(super) struct Checkpoint {
    pub(super) file: PathBuf,
    meta: PathBuf,
}

impl Checkpoint {
    pub(super) fn in_dir(out: &Path) -> Checkpoint {
        Checkpoint {
            file: out.join("checkpoint.safetensors"),
            meta: out.join("checkpoint.json"),
        }
    }

    /// Sets `vars` and `adam` from the checkpoint, which must be of this
    /// recipe (only `steps` may differ, to extend a run) and data; returns
    /// its record.
    pub(super) fn resume(
        &self,
        r: &Recipe,
        data_sha: &str,
        vars: &[(String, Var)],
        adam: &mut Adam,
    ) -> Result<CheckpointMeta> {
        let (ck_file, ck_meta) = (&self.file, &self.meta);
        let text = crate::io::read_to_string(ck_meta)?;
        let old: CheckpointMeta = serde_json::from_str(&text)
            .map_err(|e| Error::model_file(ck_meta, format!("not a checkpoint: {e}")))?;
        // Only `steps` may change on a resume (to extend a run).
        let same = Recipe {
            steps: r.steps,
            ..old.recipe.clone()
        } == *r;
        if !same || old.data_sha256 != data_sha {
            return Err(Error::model_file(
                ck_meta,
                format!(
                    "the checkpoint is of recipe `{}` (data sha256 {}), not of this run's recipe `{}` \
                     (data sha256 {}) with the same settings; nothing was changed",
                    old.recipe.name, old.data_sha256, r.name, data_sha
                ),
            ));
        }
        crate::io::check_safetensors(ck_file)?;
        let t = candle_core::safetensors::load(ck_file, &Device::Cpu)
            .map_err(|e| Error::model_file(ck_file, format!("cannot read: {e}")))?;
        for (i, (name, var)) in vars.iter().enumerate() {
            let get = |k: String| {
                t.get(&k)
                    .cloned()
                    .ok_or_else(|| Error::model_file(ck_file, format!("no tensor `{k}`")))
            };
            let dev = var.device();
            var.set(&get(name.clone())?.to_device(dev)?)?;
            adam.m[i] = get(format!("adam_m.{name}"))?.to_device(dev)?;
            adam.v[i] = get(format!("adam_v.{name}"))?.to_device(dev)?;
        }
        Ok(old)
    }

    /// Writes the variables, their moments and `meta` (each file replaced whole).
    pub(super) fn save(
        &self,
        vars: &[(String, Var)],
        adam: &Adam,
        meta: &CheckpointMeta,
    ) -> Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        for (i, (name, var)) in vars.iter().enumerate() {
            t.insert(name.clone(), cpu(var.as_tensor())?);
            t.insert(format!("adam_m.{name}"), cpu(&adam.m[i])?);
            t.insert(format!("adam_v.{name}"), cpu(&adam.v[i])?);
        }
        let tmp = self.file.with_file_name("checkpoint.safetensors.tmp");
        candle_core::safetensors::save(&t, &tmp)?;
        std::fs::rename(&tmp, &self.file).map_err(|e| Error::io(&self.file, e))?;
        write_atomic(
            &self.meta,
            serde_json::to_string_pretty(meta).unwrap().as_bytes(),
        )
    }

    /// Removes both files once the adapter is written (a missing one is fine).
    pub(super) fn remove(&self) {
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(&self.meta);
    }
}

/// Sets `vars` (PEFT names) from the adapter in `dir`, which must have the
/// recipe's rank and alpha and a tensor of the right shape for every variable.
pub(super) fn init_from_adapter(dir: &Path, r: &Recipe, vars: &[(String, Var)]) -> Result<()> {
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
        var.set(
            &w.to_dtype(candle_core::DType::F32)?
                .to_device(var.device())?,
        )?;
    }
    Ok(())
}
