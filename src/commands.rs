//! What the subcommands do; `main.rs` only parses arguments and calls these.

use std::io::Write;

use serde_json::json;

use crate::error::Result;
use crate::generate::{argmax, generate, Sampling};
use crate::model::transformer::{log_softmax, row_f32};
use crate::model::{
    CaptureRows, HookPoint, Hooks, Message, Model, ModelSpec, NamesFilter, WeightDtype,
};

/// Loads a model with a one-line note on stderr (loading a big model takes a while).
pub fn load_model(spec: &ModelSpec, dtype: WeightDtype) -> Result<Model> {
    let started = std::time::Instant::now();
    let model = Model::load(spec, dtype)?;
    eprintln!(
        "afprobe: loaded {} ({}) in {:.1}s",
        spec,
        model.files.path().display(),
        started.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// `afprobe model info`: the facts a researcher checks before trusting a run.
pub fn model_info(model: &Model, as_json: bool) -> Result<()> {
    let c = model.config();
    let sha = model.weights_sha256()?;
    let template = model.template.as_ref().map(|t| t.source().to_string());
    let info = json!({
        "spec": model.spec.to_string(),
        "path": model.files.path(),
        "weights_sha256": sha,
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
        "dtype": format!("{:?}", model.transformer.dtype()),
        "bos_token": model.tokenizer.bos_token,
        "eos_token": model.tokenizer.eos_token,
        "add_bos": model.tokenizer.add_bos,
        "chat_template": template,
    });
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).expect("json values serialise")
        );
        return Ok(());
    }
    let rope = match (&c.rope_scaling, &c.rope_freq_factors) {
        (Some(s), _) => format!("base {}, llama3 scaling x{}", c.rope_theta, s.factor),
        (None, Some(_)) => format!("base {}, per-frequency factors (rope_freqs)", c.rope_theta),
        (None, None) => format!("base {}", c.rope_theta),
    };
    println!("model         {}", model.spec);
    println!("path          {}", model.files.path().display());
    println!("sha256        {sha}");
    println!("architecture  {}", c.architecture.name());
    println!("layers        {}", c.n_layers);
    println!("d_model       {}", c.d_model);
    println!(
        "heads         {} query / {} key-value, head dim {}",
        c.n_heads, c.n_kv_heads, c.head_dim
    );
    println!("d_mlp         {}", c.d_mlp);
    println!("vocab         {}", c.vocab_size);
    println!("context       {} tokens", c.max_position_embeddings);
    println!("rope          {rope}");
    println!(
        "embeddings    {}",
        if c.tied_embeddings {
            "tied"
        } else {
            "separate unembedding"
        }
    );
    println!("weights dtype {:?}", model.transformer.dtype());
    println!(
        "special       bos {:?}, eos {:?}, BOS prepended: {}",
        model.tokenizer.bos_token.as_deref().unwrap_or("-"),
        model.tokenizer.eos_token.as_deref().unwrap_or("-"),
        model.tokenizer.add_bos
    );
    match &model.template {
        Some(t) => println!("chat template {} bytes (--json shows it)", t.source().len()),
        None => println!("chat template none (use --raw prompts)"),
    }
    Ok(())
}

/// The prompt for `afprobe generate`: chat-formatted unless `raw`.
pub fn prompt_tokens(
    model: &Model,
    prompt: &str,
    system: Option<&str>,
    raw: bool,
) -> Result<Vec<u32>> {
    let text = if raw {
        prompt.to_string()
    } else {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", prompt));
        model.format_chat(&messages)?
    };
    model.tokenizer.encode(&text)
}

/// `afprobe generate`: streams the completion to stdout.
pub fn generate_to_stdout(
    model: &Model,
    tokens: &[u32],
    sampling: &Sampling,
    hooks: &mut Hooks,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    generate(model, tokens, sampling, hooks, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    Ok(())
}

/// The first part of `afprobe demo`: facts, a hooked forward pass with a
/// per-layer summary (residual norm and logit-lens top token at the last
/// position) and a greedy answer. Returns the loaded model for the study.
pub fn demo_model_tour(spec: &ModelSpec) -> Result<Model> {
    let model = load_model(spec, WeightDtype::F32)?;
    model_info(&model, false)?;
    let question = "What is the capital of France? Answer in one word.";
    let tokens = prompt_tokens(&model, question, None, false)?;
    println!(
        "\nprompt ({} tokens, chat template applied): {question:?}",
        tokens.len()
    );
    let n_layers = model.config().n_layers;
    let filter = NamesFilter::Only((0..n_layers).map(HookPoint::ResidPost).collect());
    let (logits, cache) = model.run_with_cache(&tokens, filter, CaptureRows::Last)?;
    println!("\nper-layer residual at the last token (blocks.{{l}}.hook_resid_post):");
    println!(
        "{:>5}  {:>9}  {:<16} {:>8}",
        "layer", "‖resid‖", "logit-lens top", "p"
    );
    for l in 0..n_layers {
        let resid = cache.require(HookPoint::ResidPost(l))?;
        let norm = resid.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let lens = log_softmax(&model.transformer.logit_lens(resid)?)?;
        let (id, logp) = top1(&row_f32(&lens, 0)?);
        let token = model.tokenizer.decode(&[id])?;
        println!(
            "{l:>5}  {norm:>9.2}  {:<16} {:>8.4}",
            format!("{token:?}"),
            logp.exp()
        );
    }
    let (id, logp) = top1(&row_f32(&log_softmax(&logits)?, 0)?);
    println!(
        "\nnext token: {:?} (p = {:.4})",
        model.tokenizer.decode(&[id])?,
        logp.exp()
    );
    print!("greedy answer: ");
    generate_to_stdout(
        &model,
        &tokens,
        &Sampling {
            max_new_tokens: 32,
            ..Sampling::default()
        },
        &mut Hooks::none(),
    )?;
    Ok(model)
}

fn top1(logprobs: &[f32]) -> (u32, f32) {
    let id = argmax(logprobs);
    (id, logprobs[id as usize])
}
