//! `afprobe bench prefill|capture|probe`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::args::{ModelArgs, ModelSpecArg};
use crate::bench::{self, Reference};
use crate::model::DeviceSpec;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill tokens/s and peak RSS with every hook_resid_post captured at the last token.
    #[command(
        long_about = "Prefill throughput: one forward pass over a prompt of random \
non-special tokens (batch 1), capturing every blocks.{l}.hook_resid_post at the last token, \
with logits at the last token only. Reports the median of --repeats runs after a warm-up, and \
peak RSS. Each length runs in its own process so RSS is per length.\n\n\
With --ref-python, the Python reference (scripts/ref/bench_prefill.py in the source tree: transformers, same \
thread count) runs on the same machine and its numbers are printed beside ours. It needs the \
model as an HF directory (--ref-model; make one with scripts/ref/gguf_to_hf.py).",
        after_help = "Example:\n  afprobe bench prefill --lengths 256,1024,3000 \\\n    \
--ref-python ref-venv/bin/python --ref-model models/smollm2-135m-hf"
    )]
    Prefill(PrefillArgs),
    /// Capture throughput on an alignment-faking-shaped workload, with and without prefix sharing.
    #[command(
        long_about = "Capture throughput on an alignment-faking-shaped workload: --rows \
prompts sharing a long system prompt (~110 tokens per --system-paragraphs), each with a ~100-token \
user turn carrying a tier cue, capturing every hook_resid_post at `last` with --score. Runs the \
capture with prefix sharing on all rows, batched (32 rows and their answer tags per forward call, \
as `capture` does by default) and row by row (--batch-rows 1), without sharing on --unshared-rows \
rows, and, with \
--ref-python, the Python reference scripts/ref/ref_hidden.py (transformers, --continuation, \
same thread count) on --ref-rows rows. Rates exclude model loading on both sides."
    )]
    Capture(CaptureBenchArgs),
    /// Per-layer logistic probes on a store, afprobe beside scikit-learn (ref_probe.py).
    #[command(
        long_about = "Probe-fitting speed and agreement: for every per-row position of the \
store, logistic probes for `tier` (free vs paid) on every layer with --folds-fold grouped \
cross-validation by request_id (C = 1, standardised, no baselines: the work ref_probe.py does). \
With --ref-python, the store is exported as ref_probe.py's input and the reference \
(scikit-learn, same thread count) runs on it; the table gives both times (the reference's fitting \
time, without its loading) and the largest and mean |AUROC difference| over layers (the folds \
differ: scikit-learn's GroupKFold vs afprobe's seeded grouped folds).",
        after_help = "Example:\n  afprobe prompts --out study.jsonl\n  \
afprobe capture --prompts study.jsonl --positions last,cue --score --out activations/study\n  \
afprobe bench probe --acts activations/study --ref-python ref-venv/bin/python"
    )]
    Probe(ProbeBenchArgs),
    /// Sampling tokens/s with several samples per row, in lockstep beside one by one.
    #[command(
        long_about = "Sampling throughput: `afprobe sample` on --rows prompts of the \
alignment-faking workload (two system paragraphs, ~250 tokens), -n samples per row at \
temperature 1 with --max-new-tokens each, run in lockstep (one forward call per step carries \
every unfinished sample's next token) and one by one (--one-by-one), same seeds. Reports \
generated tokens per second, model loading excluded."
    )]
    Sample(SampleBenchArgs),
    /// The portable engine on --device against the fused engine on the CPU: parity, f32 and bf16.
    #[command(
        long_about = "Device parity: --rows rows of the study (the xml cue, both tiers) run by the \
fused engine on the CPU at f32 (the reference, itself checked against transformers by the tests), \
then by the portable engine on --device at f32 and at bf16. Reports the worst relative L2 \
distance of every blocks.{l}.hook_resid_post at the last prompt token and the worst |difference| \
of the answer tags' summed log-probs (--prompts: of each row's continuations). f32 must stay \
within 1e-4 of both (the command fails otherwise); bf16 is reported. `--device cpu` rehearses it with the portable engine on the CPU.",
        after_help = "Example (a CUDA build, scripts/cuda/build.sh):\n  \
target/cuda/release/afprobe bench device --device cuda --model qwen2.5-coder-0.5b"
    )]
    Device(DeviceBenchArgs),
}

#[derive(Args)]
pub struct DeviceBenchArgs {
    #[command(flatten)]
    model: ModelSpecArg,
    /// Where the portable engine runs: cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: DeviceSpec,
    /// Rows compared (the first of the study, or of --prompts).
    #[arg(long, default_value_t = 8)]
    rows: usize,
    /// A prompt file (JSONL rows with continuations) instead of the study's rows.
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: Option<PathBuf>,
}

#[derive(Args)]
pub struct SampleBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompts sampled.
    #[arg(long, default_value_t = 4)]
    rows: usize,
    /// Samples per prompt.
    #[arg(short = 'n', long = "n", default_value_t = 8)]
    n: usize,
    /// Token budget per sample.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Where the runs go (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct ProbeBenchArgs {
    /// Activation store with `tier` and `request_id` labels.
    #[arg(long, value_name = "DIR")]
    acts: PathBuf,
    /// Cross-validation folds.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Threads for both afprobe and the reference.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Python of the reference venv (numpy, safetensors, scikit-learn); enables the comparison.
    #[arg(long, value_name = "PYTHON")]
    ref_python: Option<PathBuf>,
    /// The reference probe script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ref/ref_probe.py"))]
    ref_script: PathBuf,
    /// Where exports and outputs go (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct CaptureBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompts in the workload.
    #[arg(long, default_value_t = 200)]
    rows: usize,
    /// Paragraphs of shared system prompt (about 110 tokens each).
    #[arg(long, default_value_t = 12)]
    system_paragraphs: usize,
    /// Rows captured without prefix sharing (it is slow).
    #[arg(long, default_value_t = 20)]
    unshared_rows: usize,
    /// Threads for the reference (afprobe uses RAYON_NUM_THREADS, default all cores).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Python of the reference venv; enables the comparison.
    #[arg(long, value_name = "PYTHON")]
    ref_python: Option<PathBuf>,
    /// The reference capture script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ref/ref_hidden.py"))]
    ref_script: PathBuf,
    /// HF directory of the same model, for the reference.
    #[arg(long, value_name = "DIR")]
    ref_model: Option<PathBuf>,
    /// Rows the reference runs (it has no prefix sharing).
    #[arg(long, default_value_t = 8)]
    ref_rows: usize,
    /// Where the workload and stores go (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct PrefillArgs {
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
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ref/bench_prefill.py"))]
    ref_script: PathBuf,
    /// HF directory of the same model, for the reference.
    #[arg(long, value_name = "DIR")]
    ref_model: Option<PathBuf>,
    /// Capture nothing (logits at the last token only): beside a default run, the cost of
    /// capturing every hook_resid_post. The reference still returns its hidden states.
    #[arg(long)]
    no_capture: bool,
    /// Internal: measure one length in this process and print JSON.
    #[arg(long, hide = true)]
    one: bool,
}

pub fn bench(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Prefill(a) => bench_prefill(a),
        BenchCommand::Capture(a) => bench_capture(a),
        BenchCommand::Probe(a) => bench_probe(a),
        BenchCommand::Sample(a) => bench_sample(a),
        BenchCommand::Device(a) => bench_device(a),
    }
}

fn bench_device(a: DeviceBenchArgs) -> anyhow::Result<()> {
    let parity = crate::device_check::device_parity(
        &a.model.spec(),
        a.model.adapter.as_deref(),
        a.device,
        a.prompts.as_deref(),
        a.rows,
    )?;
    print!(
        "{}",
        crate::device_check::format_parity(a.device, a.rows, &parity)
    );
    if parity.iter().any(|p| !p.passed) {
        anyhow::bail!(
            "the portable engine on {} is off the CPU reference beyond the f32 limits",
            a.device
        );
    }
    Ok(())
}

fn bench_probe(a: ProbeBenchArgs) -> anyhow::Result<()> {
    let work_dir = a.work_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("afprobe-bench-probe-{}", std::process::id()))
    });
    let rows = bench::probe_bench(&bench::ProbeBench {
        acts: a.acts,
        folds: a.folds,
        threads: a.threads,
        reference: a.ref_python.map(|p| (p, a.ref_script)),
        work_dir: work_dir.clone(),
    })?;
    println!(
        "probe: logistic, every layer, {}-fold grouped CV, {} threads",
        a.folds, a.threads
    );
    bench::print_probe_table(&rows);
    eprintln!("afprobe: exports and outputs in {}", work_dir.display());
    Ok(())
}

fn bench_sample(a: SampleBenchArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let work_dir = a.work_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("afprobe-bench-{}", std::process::id()))
    });
    let results = bench::sample_bench(
        &model,
        &bench::SampleBench {
            rows: a.rows,
            n: a.n,
            max_new_tokens: a.max_new_tokens,
            work_dir: work_dir.clone(),
        },
    )?;
    println!(
        "sample: {} rows x {} samples, temperature 1, up to {} new tokens, {} threads",
        a.rows,
        a.n,
        a.max_new_tokens,
        rayon::current_num_threads()
    );
    bench::print_sample_table(&results);
    eprintln!("afprobe: runs in {}", work_dir.display());
    Ok(())
}

fn bench_capture(a: CaptureBenchArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let reference = Reference::from_flags(
        a.ref_python.as_deref(),
        &a.ref_script,
        a.ref_model.as_deref(),
        a.threads,
    )?
    .map(|r| (r, a.ref_rows));
    let work_dir = a.work_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("afprobe-bench-{}", std::process::id()))
    });
    let results = bench::capture_bench(
        &model,
        &bench::CaptureBench {
            rows: a.rows,
            system_paragraphs: a.system_paragraphs,
            unshared_rows: a.unshared_rows,
            reference,
            work_dir: work_dir.clone(),
        },
    )?;
    println!(
        "capture: every hook_resid_post at last + --score (accept/reject), {} shared-prompt rows, {} threads",
        a.rows,
        rayon::current_num_threads()
    );
    bench::print_capture_table(&results);
    eprintln!("afprobe: workload and stores in {}", work_dir.display());
    Ok(())
}

fn bench_prefill(a: PrefillArgs) -> anyhow::Result<()> {
    if a.one {
        let model = a.model.load()?;
        for &len in &a.lengths {
            let r = bench::measure_prefill(&model, len, a.repeats, !a.no_capture)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        return Ok(());
    }
    let (ours, theirs) = bench::PrefillBench {
        model: a.model.spec.model.as_deref(),
        dtype: a.model.dtype,
        placement: a.model.placement,
        lengths: &a.lengths,
        repeats: a.repeats,
        threads: a.threads,
        capture: !a.no_capture,
        reference: Reference::from_flags(
            a.ref_python.as_deref(),
            &a.ref_script,
            a.ref_model.as_deref(),
            a.threads,
        )?
        .map(|r| r.on(a.model.placement.device, a.model.dtype)),
    }
    .run()?;
    println!(
        "prefill on {}, batch 1, {}, {} threads, median of {}",
        a.model.placement.device,
        if a.no_capture {
            "nothing captured"
        } else {
            "every hook_resid_post at the last token"
        },
        a.threads,
        a.repeats
    );
    bench::print_table(&ours, &theirs);
    Ok(())
}
