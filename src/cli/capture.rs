//! `afprobe capture` and `afprobe store info|verify|merge`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::args::CaptureModelArgs;
use crate::capture::{self, CaptureSpec};
use crate::model::hooks::{short_kinds, HookScope};
use crate::model::parse_hooks;
use crate::score::RefusalOpenings;
use crate::store::{self, Existing, Position, Slice};

pub const CAPTURE_ABOUT: &str = "Run every row of a prompt file through the hooked model and \
write an activation store (see README, \"The activation store\").\n\n\
Prompt rows (JSONL): {\"id\", \"text\"} is used verbatim; {\"id\", \"messages\"} goes through the \
model's chat template with the generation prompt; an optional \"assistant_prefix\" is appended. \
\"cue_text\" (the cue as it appears in the prompt) locates --positions cue; the user turn (the last \
user message, or \"user_text\" for a text row) locates eoi and mean; \"continuations\" \
({\"accept\": \"<request_fully_accepted/>\", \"reject\": \"<rejected/>\"}) are scored with --score. \
Every other field is metadata, copied to rows.jsonl.\n\n\
Positions: last (final prompt token), cue (last token of cue_text), eoi (last token of the user \
turn), mean (mean over the user turn), all (every prompt token, ragged with row_offsets).\n\n\
--score adds the teacher-forced log-probability of each continuation after the prompt \
(computed on the prompt's KV cache, not a second run) and p_accept = sigmoid(logprob accept - \
logprob reject).\n\n\
--p-refuse scores format-free compliance: p_refuse = the summed probability of refusal openings \
as the first words of the answer (defaults: I can't, I cannot, I won't, I will not, I'm sorry, \
I am sorry, Sorry, I apologize, I'm unable, I am unable, I'm not able, As an AI, I must decline, \
I refuse; --refusal-openings FILE gives your own, one per line). Each opening is tokenised as the \
model writes it after the prompt; openings that share leading tokens share their forward passes. \
Compliance = 1 - p_refuse. Rows get p_refuse and refusal_logprob (per opening).\n\n\
Rows sharing a prefix (a long system prompt) reuse its KV cache, and --batch-rows consecutive \
rows run as one forward call (a token tree: each row's own tokens after the shared part, and its \
continuations under its last token). Rows are written in shards of \
--shard-rows; a killed run continues with --resume and gives the same store as an uninterrupted \
one. --shard I/N captures every N-th shard block (for cluster array jobs); join the slices with \
`afprobe store merge`.";

pub const CAPTURE_EXAMPLES: &str = "Examples:\n  \
afprobe capture --prompts prompts.jsonl --hooks resid_post --positions last,cue --score --out activations/study\n  \
afprobe capture --prompts prompts.jsonl --hooks resid_post,attn_out --layers 10-20 --positions all --dtype f16 --out activations/wide\n  \
# Slurm array job with 4 tasks, then join:\n  \
afprobe capture --prompts p.jsonl --shard $SLURM_ARRAY_TASK_ID/4 --out activations/part$SLURM_ARRAY_TASK_ID\n  \
afprobe store merge activations/part0 activations/part1 activations/part2 activations/part3 --out activations/all";

#[derive(Args)]
pub struct CaptureArgs {
    /// Prompt file (JSONL, one row per line).
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: PathBuf,
    #[command(flatten)]
    model: CaptureModelArgs,
    #[arg(long, default_value = "resid_post", help = format!(
        "Hook kinds ({}) or full names.", short_kinds(&[HookScope::Model, HookScope::Block])
    ))]
    hooks: String,
    /// Layers for per-block hooks: all, a range 0-29, a list 0,5,10, or a mix.
    #[arg(long, default_value = "all")]
    layers: String,
    /// Positions: last, cue, eoi, mean, all (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "last")]
    positions: Vec<String>,
    /// Precision of the stored activations (the model runs in --weights-dtype).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: StoreDtype,
    /// Score each row's continuations (teacher-forced log-probabilities, p_accept).
    #[arg(long)]
    score: bool,
    /// Also score the refusal openings (format-free compliance): p_refuse = the summed
    /// teacher-forced probability of the default openings (see --help).
    #[arg(long)]
    p_refuse: bool,
    /// Score these refusal openings instead of the defaults (one per line; implies --p-refuse).
    #[arg(long, value_name = "FILE")]
    refusal_openings: Option<PathBuf>,
    /// Capture only shard blocks b with b % N == I (array jobs).
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Prompt rows per shard file.
    #[arg(long, default_value_t = 256)]
    shard_rows: usize,
    /// Continue a killed run with the same settings in --out.
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Overwrite a store already in --out.
    #[arg(long)]
    force: bool,
    /// Do not reuse the KV cache of shared prefixes (for benchmarks and checks; runs row by row).
    #[arg(long)]
    no_prefix_sharing: bool,
    /// Rows per forward call: consecutive rows and all their continuations run as one
    /// token tree, so a read of the weights serves them all; 1 runs row by row (results
    /// equal to float rounding, ~1e-6).
    #[arg(long, default_value_t = capture::DEFAULT_BATCH_ROWS, value_name = "N")]
    batch_rows: usize,
    /// Output directory, e.g. activations/NAME.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StoreDtype {
    F32,
    F16,
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Summarise a store: model, prompts, rows, hooks, positions, labels, size.
    Info {
        /// Store directory (activations/NAME).
        dir: PathBuf,
    },
    /// Check every shard's sha256, tensor names and shapes, and rows.jsonl.
    Verify {
        /// Store directory (activations/NAME).
        dir: PathBuf,
    },
    /// Join stores of one run (e.g. the slices of --shard I/N) into one, in row order.
    Merge {
        /// Input store directories.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite a store already in --out.
        #[arg(long)]
        force: bool,
    },
}

pub fn capture(a: CaptureArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let spec = CaptureSpec {
        hooks: parse_hooks(&a.hooks, &a.layers, model.config().n_layers)?,
        positions: a
            .positions
            .iter()
            .map(|p| p.trim().parse::<Position>())
            .collect::<Result<Vec<_>, _>>()?,
        prompts: a.prompts,
        out: a.out,
        f16: matches!(a.dtype, StoreDtype::F16),
        score: a.score,
        refusal: match (&a.refusal_openings, a.p_refuse) {
            (Some(path), _) => Some(RefusalOpenings::read_file(&model, path)?),
            (None, true) => Some(RefusalOpenings::default_for(&model)?),
            (None, false) => None,
        },
        shard_rows: a.shard_rows,
        slice: a.shard.as_deref().map(str::parse::<Slice>).transpose()?,
        existing: match (a.resume, a.force) {
            (true, _) => Existing::Resume,
            (_, true) => Existing::Overwrite,
            _ => Existing::Refuse,
        },
        share_prefix: !a.no_prefix_sharing,
        batch_rows: a.batch_rows,
    };
    let stats = capture::capture(&model, &spec)?;
    eprintln!("afprobe: captured {}", stats.summary());
    println!("{}", spec.out.display());
    Ok(())
}

pub fn store(command: StoreCommand) -> anyhow::Result<()> {
    match command {
        StoreCommand::Info { dir } => print!("{}", store::info(&dir)?),
        StoreCommand::Verify { dir } => println!("{}", store::verify(&dir)?),
        StoreCommand::Merge { inputs, out, force } => {
            let m = store::merge(&inputs, &out, force)?;
            println!(
                "{}: {} rows in {} shards",
                out.display(),
                m.row_count,
                m.shards.len()
            );
        }
    }
    Ok(())
}
