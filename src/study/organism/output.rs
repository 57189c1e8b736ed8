//! What a finished run leaves: the PEFT adapter (`adapter_model.safetensors`,
//! `adapter_config.json`) and `training.json`, the record of how it was made.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use serde_json::json;

use super::checkpoint::CheckpointMeta;
use super::examples::TrainingData;
use super::recipe::Recipe;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::ModelSpec;

/// The adapter's weights file in the output directory.
pub(super) const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The trained variables (PEFT names) and their config, on `layers` × `modules`.
pub(super) fn write_adapter(
    out: &Path,
    r: &Recipe,
    model: &ModelSpec,
    (layers, modules): (&[usize], &[String]),
    vars: &[(String, Var)],
    invocation: &[u32],
) -> Result<()> {
    let adapter_file = out.join(WEIGHTS_FILE);
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let tmp = out.join("adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &adapter_file).map_err(|e| Error::io(&adapter_file, e))?;
    let base_name = match model {
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
        "target_modules": modules,
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
    )
}

/// `training.json`: the recipe, the base model and data fingerprints, and the
/// run's losses and throughput.
pub(super) fn write_training_record(
    out: &Path,
    r: &Recipe,
    model: &ModelSpec,
    base_sha: &str,
    data: &TrainingData,
    meta: &CheckpointMeta,
) -> Result<()> {
    let train_requests: BTreeSet<&str> = data
        .train_idx
        .iter()
        .map(|&i| data.examples[i].request.as_str())
        .collect();
    let training = json!({
        "recipe": r,
        "base_model": {"spec": model.to_string(), "sha256": base_sha},
        "data_sha256": data.sha256,
        "rows": data.examples.len(),
        "train_rows": data.train_idx.len(),
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
    )
}
