//! Arguments shared by every command that loads a model.

use crate::model::{self, Model, ModelSpec, Placement, WeightDtype};
use clap::Args;

/// `--model SPEC`.
#[derive(Args, Clone)]
pub struct ModelSpecArg {
    /// Model: a .gguf file, an HF directory, a hub id org/name[@rev], or a fetchable alias:
    /// smollm2-135m (the default), gemma3-270m, qwen2.5-coder-0.5b.
    #[arg(long, value_name = "SPEC")]
    pub model: Option<String>,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to
    /// apply to the model: plain LoRA merged at load, activated LoRA (alora_invocation_tokens)
    /// from the last occurrence of its invocation tokens on.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<std::path::PathBuf>,
}

impl ModelSpecArg {
    pub fn spec(&self) -> ModelSpec {
        ModelSpec::parse(self.model.as_deref())
    }
}

/// `--model SPEC --dtype f32|f16|bf16`: what every command that loads a model takes.
#[derive(Args, Clone)]
pub struct ModelArgs {
    #[command(flatten)]
    pub spec: ModelSpecArg,
    /// Weight precision after loading: GGUF weights are dequantized to f32, f16 or bf16, or with
    /// `quantized` (GGUF only) the projections stay block-quantized (Q4_0 … Q8_0, K-quants) and run
    /// on afprobe's quantized GEMM over the stored blocks, for memory near the file size. `auto`:
    /// f32, or quantized (with a notice) for a GGUF whose f32 weights would not fit comfortably.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: WeightDtype,
    #[command(flatten)]
    pub placement: Placement,
}

impl ModelArgs {
    /// Loads the model, with a one-line note on stderr.
    pub fn load(&self) -> anyhow::Result<Model> {
        load(&self.spec, self.dtype, self.placement)
    }
}

fn load(spec: &ModelSpecArg, dtype: WeightDtype, at: Placement) -> anyhow::Result<Model> {
    Ok(model::load_model_placed(
        &spec.spec(),
        dtype,
        spec.adapter.as_deref(),
        at,
    )?)
}

/// `--model` for `capture`, whose `--dtype` is the stored activations' precision,
/// so the weights' precision is `--weights-dtype`.
#[derive(Args, Clone)]
pub struct CaptureModelArgs {
    #[command(flatten)]
    pub spec: ModelSpecArg,
    /// Weight precision after loading: GGUF weights are dequantized to f32, f16 or bf16, or with
    /// `quantized` (GGUF only) the projections stay block-quantized (Q4_0 … Q8_0, K-quants) and run
    /// on afprobe's quantized GEMM over the stored blocks, for memory near the file size. `auto`:
    /// f32, or quantized (with a notice) for a GGUF whose f32 weights would not fit comfortably.
    #[arg(long, value_enum, default_value = "auto")]
    pub weights_dtype: WeightDtype,
    #[command(flatten)]
    pub placement: Placement,
}

impl CaptureModelArgs {
    /// Loads the model, with a one-line note on stderr.
    pub fn load(&self) -> anyhow::Result<Model> {
        load(&self.spec, self.weights_dtype, self.placement)
    }
}
