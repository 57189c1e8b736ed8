//! `afprobe steer`, `patch` and `ablate` (the command line of [`crate::intervene`]).

use std::path::PathBuf;

use clap::Args;

use super::args::ModelArgs;
use crate::intervene::ablate::{self, AblateSpec};
use crate::intervene::direction::DirectionSource;
use crate::intervene::patch::{self, PatchPosition, PatchSpec};
use crate::intervene::steer::{self, SteerSpec};
use crate::model::hooks::{short_kinds, HookScope};
use crate::model::{parse_hooks, parse_layer_list, HookPoint};

/// What every intervention reads: prompts, model, row filter, output.
#[derive(Args)]
pub struct Common {
    /// Prompt file (JSONL) whose rows have accept/reject continuations (as `afprobe prompts` writes).
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Use only rows that pass this filter (FIELD=V|W,FIELD!=X), e.g. cue=xml,harmful=true.
    #[arg(long, default_value = "all")]
    filter: String,
    /// Bootstrap resamples for the intervals.
    #[arg(long, default_value_t = 2000)]
    resamples: usize,
    /// Seed for random directions and resampling (recorded in the output).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Overwrite a finished run in --out.
    #[arg(long)]
    force: bool,
    /// Run directory, e.g. activations/NAME.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Where a direction comes from.
#[derive(Args)]
pub struct DirectionArgs {
    /// probes/NAME (a probe's unit direction), activations/NAME (the mean difference of
    /// --label between its classes), or a vector file (.safetensors with one vector, or .json).
    #[arg(long, value_name = "PATH")]
    direction: PathBuf,
    /// Read this tensor's direction ({hook}@{position}, e.g. blocks.12.hook_resid_post@last).
    #[arg(long, value_name = "TENSOR")]
    direction_tensor: Option<String>,
    /// Probe method whose direction to read.
    #[arg(long, default_value = DirectionSource::DEFAULT_METHOD)]
    method: String,
    /// For a store: the label whose class means are subtracted (positive − negative).
    #[arg(long, default_value = DirectionSource::DEFAULT_LABEL)]
    label: String,
    /// For a store: the positive class (default as in `afprobe probe`: true, free, ...).
    #[arg(long)]
    positive: Option<String>,
    /// For a store: take the mean difference over the rows that pass this filter only
    /// (FIELD=V|W,FIELD!=X), e.g. variation=standard,cue=natural.
    #[arg(long, default_value = "all", value_name = "FILTER")]
    direction_filter: String,
}

impl DirectionArgs {
    fn source(&self) -> anyhow::Result<DirectionSource> {
        Ok(DirectionSource::parse(
            &self.direction,
            &self.method,
            &self.label,
            self.positive.as_deref(),
            &self.direction_filter.parse()?,
        )?)
    }
}

pub const STEER_ABOUT: &str = "Add a direction to the residual stream and measure how p_accept \
moves.\n\n\
For each --layers L, alpha of --alphas and row, the row runs with alpha * u_L * v added at \
--hook of layer L at --positions (all; last = the last prompt token; from-cue = from the cue's \
first token on, answer tokens included), where v is the unit direction and u_L the unit of \
--scale, measured on the unsteered residuals at the last prompt token of --norm-rows rows spread \
over the rows: natural (the default) is the separation of --label's class means along v \
(mean v.x of the positive rows minus the negative rows), so alpha = 1 moves the negative class's \
mean onto the positive's and alpha = -1 the other way; norm is the mean |x|, so alpha = 1 adds a \
vector as long as a typical residual. v comes from --direction: a probe directory (the hook's own \
@last probe direction, or --direction-tensor), a store (mean of --label's positive rows minus the \
negative rows, over the rows that pass --direction-filter), or a vector file.\n\n\
The baseline: --random N seeded random unit directions per layer (default 16), each swept at the \
same length alpha * u_L. steer.json's `summary` gives, per hook and alpha, the direction's mean \
effect on p_accept (steered minus unsteered, with its bootstrap interval), its effect on the \
free - paid gap, the 95% interval of the random directions' effects and the direction's \
percentile among them: a direction that matters lies outside that interval. Each edited run reuses \
the row's unedited KV cache up to the first steered position.\n\n\
Writes OUT/rows.jsonl (p_accept unsteered and per cell) and OUT/steer.json (settings, units, mean \
p_accept per cell and per tier with bootstrap intervals, summary); `afprobe plot OUT` draws the \
sweep.";

#[derive(Args)]
pub struct SteerArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    direction: DirectionArgs,
    #[arg(long, default_value = "resid_post", help = format!(
        "Hook kind to steer ({}).", short_kinds(&[HookScope::Block])
    ))]
    hook: String,
    /// Layers to steer, one at a time: a list 10,15, a range 8-12, or all.
    #[arg(long)]
    layers: String,
    /// Where to add the vector: all, last, from-cue.
    #[arg(long, default_value = "all")]
    positions: String,
    /// Steering strengths, in units of --scale.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-1,-0.5,0,0.5,1"
    )]
    alphas: Vec<f64>,
    /// The unit of alpha: natural (the class-mean separation of --label along the direction)
    /// or norm (the mean residual norm at the hook).
    #[arg(long, default_value = "natural")]
    scale: String,
    /// Random directions swept at the same length, the baseline (at most 1024).
    #[arg(long, default_value_t = 16, value_name = "N")]
    random: usize,
    /// Skip the random-direction baseline (same as --random 0).
    #[arg(long)]
    no_random: bool,
    /// Rows whose unsteered last-token residuals set the alpha unit (spread over the rows).
    #[arg(long, default_value_t = 32)]
    norm_rows: usize,
}

pub fn steer(a: SteerArgs) -> anyhow::Result<()> {
    let model = a.common.model.load()?;
    let spec = SteerSpec {
        prompts: a.common.prompts.clone(),
        out: a.common.out.clone(),
        direction: a.direction.source()?,
        direction_tensor: a.direction.direction_tensor.clone(),
        points: parse_hooks(&a.hook, &a.layers, model.config().n_layers)?,
        positions: a.positions.parse()?,
        alphas: a.alphas,
        scale: a.scale.parse()?,
        scale_label: a.direction.label.clone(),
        scale_positive: a.direction.positive.clone(),
        random: if a.no_random { 0 } else { a.random },
        norm_rows: a.norm_rows,
        filter: a.common.filter.parse()?,
        resamples: a.common.resamples,
        seed: a.common.seed,
        force: a.common.force,
    };
    let report = steer::steer(&model, &spec)?;
    print!("{}", steer::format_table(&report));
    println!("{}", spec.out.display());
    Ok(())
}

pub const PATCH_ABOUT: &str = "Activation patching between paired rows: how much of the \
difference between a source row (default: paid tier) and its destination row (default: free \
tier) does one activation carry?\n\n\
Rows pair when --pair-by fields match (default request_id, cue, variation) and --label is \
--source in one and --dest in the other; an unpaired row is an error. For every hook point \
(--hook at --layers) and position set (--positions: last, last-K, cue = the cue's last token, \
user = the user turn, system = the system message, all = every token), the destination runs with its activation there replaced \
by the source's, and p_accept is scored. With --hook z each head (--heads) of each layer is \
patched alone at one token (last, last-K or cue), TransformerLens' per-head hook_z patching: \
afprobe adds (z_source - z_dest) of that head times its rows of o_proj to hook_attn_out, exact \
where the attention output is a sum over heads (not Gemma 2/3 or OLMo 2, which are refused). Reported per cell: the mean effect p_patched − p_dest and \
the share of the difference restored, sum(p_patched − p_dest) / sum(p_source − p_dest), each with \
a bootstrap 95% interval over pairs. Positions are aligned from the end (last-K, user), from the \
start (system), at the cue, or by the common prefix and suffix (all); where the two rows' token counts differ, positions \
without a counterpart stay unpatched and patch.json counts those pairs.\n\n\
Each patched run reuses the destination's unedited KV cache up to the first patched position and \
recomputes only the rest; the summary prints the token-forwards used against one full forward per \
cell. Writes OUT/rows.jsonl (per pair) and OUT/patch.json; `afprobe plot OUT` draws the heatmap.";

#[derive(Args)]
pub struct PatchArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value = "resid_post", help = format!(
        "Hook kind to patch ({}), or `z` (blocks.L.attn.hook_z): each head of each layer \
         patched alone at one token.",
        short_kinds(&[HookScope::Model, HookScope::Block])
    ))]
    hook: String,
    /// With --hook z: the heads to patch one at a time (comma-separated; default every head).
    #[arg(long, value_delimiter = ',')]
    heads: Option<Vec<usize>>,
    /// Layers: all, a range 0-29, a list 0,5,10.
    #[arg(long, default_value = "all")]
    layers: String,
    /// Position sets, comma-separated: last, last-K, cue, user, system, all.
    #[arg(long, value_delimiter = ',', default_value = "last,last-1,cue,user")]
    positions: Vec<String>,
    /// The field whose values tell source and destination rows apart.
    #[arg(long, default_value = "tier")]
    label: String,
    /// The source rows' value of --label (activations are copied from them).
    #[arg(long, default_value = "paid")]
    source: String,
    /// The destination rows' value of --label (they run patched).
    #[arg(long, default_value = "free")]
    dest: String,
    /// Fields that must be equal for two rows to pair.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "request_id,cue,variation"
    )]
    pair_by: Vec<String>,
    /// Use only the first N pairs.
    #[arg(long, value_name = "N")]
    max_pairs: Option<usize>,
}

pub fn patch(a: PatchArgs) -> anyhow::Result<()> {
    let model = a.common.model.load()?;
    let n_layers = model.config().n_layers;
    let spec = PatchSpec {
        prompts: a.common.prompts.clone(),
        out: a.common.out.clone(),
        points: match a.hook.as_str() {
            "z" | "attn.hook_z" => parse_layer_list("--layers", &a.layers, n_layers)?
                .into_iter()
                .map(HookPoint::AttnZ)
                .collect(),
            hook => parse_hooks(hook, &a.layers, n_layers)?,
        },
        positions: a
            .positions
            .iter()
            .map(|p| p.parse::<PatchPosition>())
            .collect::<Result<_, _>>()?,
        label: a.label,
        source: a.source,
        dest: a.dest,
        pair_by: a.pair_by,
        filter: a.common.filter.parse()?,
        max_pairs: a.max_pairs,
        heads: a.heads,
        resamples: a.common.resamples,
        seed: a.common.seed,
        force: a.common.force,
    };
    let report = patch::patch(&model, &spec)?;
    print!("{}", patch::format_table(&report));
    println!("{}", spec.out.display());
    Ok(())
}

pub const ABLATE_ABOUT: &str = "Directional ablation: project one direction out of the residual \
stream (x <- x - (x.d)d) at every --hook of --layers and every position, and report the \
compliance gap before and after, its change with a paired bootstrap interval over requests, and \
mean p_accept on harmful and benign rows (does removing the direction change refusal overall?).\n\n\
The direction is that of --direction-tensor in --direction (a probe directory, a store's mean \
difference of --label, or a vector file), the same at every hook. Plain and ablated rows each \
reuse the shared system prompt of the row before them. Writes OUT/rows.jsonl (p_accept and \
p_ablated per row) and OUT/ablate.json; `afprobe plot OUT` draws the bars.";

#[derive(Args)]
pub struct AblateArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    direction: DirectionArgs,
    /// Hook kind to ablate at.
    #[arg(long, default_value = "resid_pre")]
    hook: String,
    /// Layers: all, a range, a list.
    #[arg(long, default_value = "all")]
    layers: String,
}

pub fn ablate(a: AblateArgs) -> anyhow::Result<()> {
    let model = a.common.model.load()?;
    let Some(tensor) = a.direction.direction_tensor.clone() else {
        anyhow::bail!(
            "ablate needs --direction-tensor: the one direction removed at every hook \
             (e.g. blocks.9.hook_resid_post@last)"
        );
    };
    let spec = AblateSpec {
        prompts: a.common.prompts.clone(),
        out: a.common.out.clone(),
        direction: a.direction.source()?,
        direction_tensor: tensor,
        points: parse_hooks(&a.hook, &a.layers, model.config().n_layers)?,
        filter: a.common.filter.parse()?,
        resamples: a.common.resamples,
        seed: a.common.seed,
        force: a.common.force,
    };
    let report = ablate::ablate(&model, &spec)?;
    print!("{}", ablate::format_table(&report));
    println!("{}", spec.out.display());
    Ok(())
}

pub const ATTRIBUTE_ABOUT: &str = "Direct logit attribution (DLA) of the decision: where the \
two answer tags first differ (after the prompt and the tokens they share), each component's \
direct contribution to logit(accept-tag token) - logit(reject-tag token) there, through the \
final norm, whose scale is frozen at the row's value \
(as TransformerLens does), so the embedding and every layer's hook_attn_out and hook_mlp_out sum \
to the difference exactly. Reports the mean per class of --label (default free vs paid) and the \
paired difference per component (rows pair by --pair-by) with bootstrap 95% intervals, and the \
logit lens of the same difference at every layer's hook_resid_post. Rows reuse the KV cache of \
the prompt prefix they share. Each attention head's term (its hook_z through its rows of \
o_proj; TransformerLens' stack_head_results) is reported too where nothing follows the \
attention output (no post-attention norm or output bias: Llama, Mistral, Qwen, Phi-3); a \
layer's heads sum to its attn_out term. Writes OUT/rows.jsonl (per row) and OUT/attribute.json; `afprobe plot OUT` draws \
the heatmap.";

#[derive(Args)]
pub struct AttributeArgs {
    #[command(flatten)]
    common: Common,
    /// The field whose two values are compared.
    #[arg(long, default_value = "tier")]
    label: String,
    /// The first value (the difference is positive - negative).
    #[arg(long, default_value = "free")]
    positive: String,
    /// The second value.
    #[arg(long, default_value = "paid")]
    negative: String,
    /// Fields that must be equal for two rows to pair.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "request_id,cue,variation"
    )]
    pair_by: Vec<String>,
}

pub fn attribute(a: AttributeArgs) -> anyhow::Result<()> {
    let model = a.common.model.load()?;
    let spec = crate::attribute::AttributeSpec {
        prompts: a.common.prompts.clone(),
        out: a.common.out.clone(),
        filter: a.common.filter.parse()?,
        label: a.label,
        positive: a.positive,
        negative: a.negative,
        pair_by: a.pair_by,
        resamples: a.common.resamples,
        seed: a.common.seed,
        force: a.common.force,
    };
    let report = crate::attribute::attribute(&model, &spec)?;
    print!("{}", crate::attribute::format_table(&report));
    println!("{}", spec.out.display());
    Ok(())
}
