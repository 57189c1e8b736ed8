//! Loading a model for a command, and `afprobe model info`.

use std::fmt::Write as _;

use serde_json::json;

use super::config::FamilyConfig;
use super::{Model, ModelSpec, Placement, WeightDtype};
use crate::error::Result;

/// Loads a model with a one-line note on stderr (loading a big model takes a while).
pub fn load_model(spec: &ModelSpec, dtype: WeightDtype) -> Result<Model> {
    load_model_with_adapter(spec, dtype, None)
}

/// [`load_model`] with a PEFT LoRA adapter (`--adapter DIR`).
pub fn load_model_with_adapter(
    spec: &ModelSpec,
    dtype: WeightDtype,
    adapter: Option<&std::path::Path>,
) -> Result<Model> {
    let started = std::time::Instant::now();
    let model = Model::load_with_adapter(spec, dtype, adapter)?;
    let with = match &model.adapter {
        Some(a) => format!(" with {} adapter {} (r {})", a.kind, a.path, a.r),
        None => String::new(),
    };
    eprintln!(
        "afprobe: loaded {} ({}){with} in {:.1}s",
        spec,
        model.files.path().display(),
        started.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// [`load_model_with_adapter`] on `--device` with `--engine` (see
/// [`Placement`]). The engine and the device are checked before the (slow)
/// load: the fused engine off the CPU, a backend this build lacks, a GPU the
/// machine does not have.
pub fn load_model_placed(
    spec: &ModelSpec,
    dtype: WeightDtype,
    adapter: Option<&std::path::Path>,
    at: Placement,
) -> Result<Model> {
    let engine = at.resolved_engine()?;
    let device = at.device.device()?;
    let mut model = load_model_with_adapter(spec, dtype, adapter)?;
    model.transformer.move_to(&device)?;
    model.transformer.set_engine(engine);
    Ok(model)
}

/// `afprobe model info`: the facts a researcher checks before trusting a run,
/// as aligned text or (with `as_json`) pretty JSON that includes the chat template.
pub fn model_info(model: &Model, as_json: bool) -> Result<String> {
    let sha = model.weights_sha256()?;
    if as_json {
        let info = info_json(model, &sha);
        let mut out = serde_json::to_string_pretty(&info).expect("json values serialise");
        out.push('\n');
        return Ok(out);
    }
    Ok(info_text(model, &sha))
}

/// `model info --json`: the facts as one object.
fn info_json(model: &Model, sha: &str) -> serde_json::Value {
    let c = model.config();
    let template = model.template.as_ref().map(|t| t.source().to_string());
    json!({
        "spec": model.spec.to_string(),
        "path": model.files.path(),
        "weights_sha256": sha,
        "adapter": model.adapter,
        "architecture": c.architecture.name(),
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "d_mlp": c.d_mlp,
        "vocab_size": c.vocab_size,
        "context_length": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "rope_freq_factors": c.rope_freq_factors.is_some(),
        "rms_norm_eps": c.rms_norm_eps,
        "tied_embeddings": c.tied_embeddings,
        "family": c.family,
        "attention_scale": 1.0 / c.family.query_pre_attn_scalar.unwrap_or(c.head_dim as f64).sqrt(),
        "stop_token_ids": model.tokenizer.stop_ids,
        "dtype": format!("{:?}", model.transformer.dtype()),
        "bos_token": model.tokenizer.bos_token,
        "eos_token": model.tokenizer.eos_token,
        "add_bos": model.tokenizer.add_bos,
        "chat_template": template,
        "chat_template_error": model.template.as_ref().and_then(|t| t.parse_error()),
    })
}

/// `model info`: one aligned line per fact.
fn info_text(model: &Model, sha: &str) -> String {
    // Writing to a String cannot fail, so the results of writeln! are ignored.
    let mut out = String::new();
    let c = model.config();
    let rope = match (&c.rope_scaling, &c.rope_freq_factors) {
        (Some(s), _) => format!("base {}, scaling {}", c.rope_theta, serde_json::json!(s)),
        (None, Some(_)) => format!("base {}, per-frequency factors (rope_freqs)", c.rope_theta),
        (None, None) => format!("base {}", c.rope_theta),
    };
    let _ = writeln!(out, "model         {}", model.spec);
    let _ = writeln!(out, "path          {}", model.files.path().display());
    let _ = writeln!(out, "sha256        {sha}");
    let _ = writeln!(out, "architecture  {}", c.architecture.name());
    let _ = writeln!(out, "layers        {}", c.n_layers);
    let _ = writeln!(out, "d_model       {}", c.d_model);
    let _ = writeln!(
        out,
        "heads         {} query / {} key-value, head dim {}",
        c.n_heads, c.n_kv_heads, c.head_dim
    );
    let _ = writeln!(out, "d_mlp         {}", c.d_mlp);
    let _ = writeln!(out, "vocab         {}", c.vocab_size);
    let _ = writeln!(out, "context       {} tokens", c.max_position_embeddings);
    let _ = writeln!(out, "rope          {rope}");
    let f = &c.family;
    let _ = writeln!(out, "window        {}", window_line(f));
    let _ = writeln!(
        out,
        "attention     scores x 1/sqrt({}); soft-caps: attention {}, final {}",
        f.query_pre_attn_scalar.unwrap_or(c.head_dim as f64),
        f.attn_softcap.map_or("none".into(), |x| x.to_string()),
        f.final_softcap.map_or("none".into(), |x| x.to_string()),
    );
    if let Some(a) = &model.adapter {
        let _ = writeln!(
            out,
            "adapter       {} ({}, r {}, alpha {}, {}; sha256 {})",
            a.path,
            a.kind,
            a.r,
            a.lora_alpha,
            a.target_modules.join(","),
            a.sha256
        );
    }
    let _ = writeln!(
        out,
        "embeddings    {}",
        if c.tied_embeddings {
            "tied"
        } else {
            "separate unembedding"
        }
    );
    let _ = writeln!(out, "weights dtype {:?}", model.transformer.dtype());
    let _ = writeln!(
        out,
        "special       bos {:?}, eos {:?}, BOS prepended: {}",
        model.tokenizer.bos_token.as_deref().unwrap_or("-"),
        model.tokenizer.eos_token.as_deref().unwrap_or("-"),
        model.tokenizer.add_bos
    );
    let _ = writeln!(out, "stop tokens   {}", stop_tokens_line(model));
    let _ = writeln!(out, "chat template {}", template_line(model));
    out
}

/// The sliding window and the layers it applies to.
fn window_line(f: &FamilyConfig) -> String {
    match (f.sliding_window, &f.sliding_layers) {
        (None, _) => "none".to_string(),
        (Some(w), None) => format!("{w} tokens on every layer"),
        (Some(w), Some(layers)) => {
            let sliding: Vec<String> = (0..layers.len())
                .filter(|&l| layers[l])
                .map(|l| l.to_string())
                .collect();
            format!("{w} tokens on layers [{}]", sliding.join(", "))
        }
    }
}

/// The stop token ids, each with its token where the vocabulary has it.
fn stop_tokens_line(model: &Model) -> String {
    let stops: Vec<String> = model
        .tokenizer
        .stop_ids
        .iter()
        .map(|&id| match model.tokenizer.id_to_token(id) {
            Some(t) => format!("{id} {t:?}"),
            None => id.to_string(),
        })
        .collect();
    stops.join(", ")
}

/// The chat template's size, or why chat prompts will fail.
fn template_line(model: &Model) -> String {
    match &model.template {
        Some(t) => match t.parse_error() {
            None => format!("{} bytes (--json shows it)", t.source().len()),
            Some(e) => format!(
                "{} bytes from {}, does NOT parse ({e}): chat prompts will fail, --raw and \
                 text rows work",
                t.source().len(),
                t.origin()
            ),
        },
        None => "none (use --raw prompts)".to_string(),
    }
}
