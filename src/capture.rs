//! `afprobe capture`: run every prompt through the hooked model and write the
//! activation store, with teacher-forced continuation scores.
//!
//! Rows are processed in shard blocks. Each block starts from an empty KV
//! cache and every row reuses the cache of the row before it up to their
//! longest common run of token ids (the shared system prompt), so the prefix
//! is computed once per block and results do not depend on where a run was
//! interrupted or how it was sliced: `--resume` and `--shard I/N` + merge give
//! the same store as one uninterrupted run.
//!
//! Within a block, up to `batch_rows` consecutive rows run as one forward call:
//! a token tree holding each row's tokens past the part they share, and under
//! each row's last token its continuations, so one read of the weights serves
//! every row and every score. Batches are cut the same way on every run (from
//! the block's first row), so a resumed or sharded capture equals one
//! uninterrupted run to the bit; a batched store equals a row-by-row one
//! (`batch_rows = 1`) to float rounding (~1e-6), not to the bit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::sha256_file;
use crate::model::transformer::log_softmax;
use crate::model::{
    CaptureRows, HookPoint, Hooks, KvCache, LogitsAt, Model, NamesFilter, WeightDtype,
};
use crate::progress::Progress;
use crate::prompts::{read_prompt_file, render, PromptRow, RenderedPrompt};
use crate::score::{continuations, score_prompt, PromptTree, RefusalOpenings, Scores};
use crate::store::{
    Existing, Manifest, ModelRecord, NamedTensors, Position, PromptsRecord, Slice, StoreWriter,
    TensorName, FORMAT,
};

/// Rows per batched forward call unless told otherwise (`--batch-rows`).
pub const DEFAULT_BATCH_ROWS: usize = 32;

/// A batch stops growing before its token tree passes this many tokens, which
/// bounds its memory (captured rows, logits, attention scratch)...
const MAX_TREE_TOKENS: usize = 4096;
/// ... and before the tree's keys and values (f32, every layer) pass this many
/// bytes: an 8B model's are 256 KiB a token, so 4,096 tokens would add 1 GiB,
/// while a thousand already give the quantized GEMM full tiles of tokens.
const MAX_TREE_KV_BYTES: usize = 256 << 20;

/// The tree-size limit for `model`: [`MAX_TREE_TOKENS`], or fewer tokens where
/// their keys and values would pass [`MAX_TREE_KV_BYTES`].
fn max_tree_tokens(model: &Model) -> usize {
    let c = model.config();
    let kv_bytes_per_token = c.n_layers * 2 * c.n_kv_heads * c.head_dim * 4;
    MAX_TREE_TOKENS.min(MAX_TREE_KV_BYTES / kv_bytes_per_token.max(1))
}

/// What to capture.
#[derive(Debug, Clone)]
pub struct CaptureSpec {
    pub prompts: PathBuf,
    pub out: PathBuf,
    pub hooks: Vec<HookPoint>,
    pub positions: Vec<Position>,
    /// Store activations as f16 instead of f32.
    pub f16: bool,
    pub score: bool,
    /// Score these refusal openings too (`p_refuse`).
    pub refusal: Option<RefusalOpenings>,
    pub shard_rows: usize,
    pub slice: Option<Slice>,
    pub existing: Existing,
    /// Reuse the KV cache of shared prompt prefixes (off only to measure it).
    pub share_prefix: bool,
    /// Rows per forward call (a token tree); 1 runs row by row.
    pub batch_rows: usize,
}

impl CaptureSpec {
    /// A scored capture (answer tags, no refusal openings) of `hooks` at
    /// `positions`, f32, 256 rows per shard, sharing prompt prefixes: what the
    /// demo and the benchmarks run.
    pub fn scored(
        prompts: PathBuf,
        out: PathBuf,
        hooks: Vec<HookPoint>,
        positions: Vec<Position>,
        existing: Existing,
    ) -> CaptureSpec {
        CaptureSpec {
            prompts,
            out,
            hooks,
            positions,
            f16: false,
            score: true,
            refusal: None,
            shard_rows: 256,
            slice: None,
            existing,
            share_prefix: true,
            batch_rows: DEFAULT_BATCH_ROWS,
        }
    }
}

/// Counts for the summary line and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct CaptureStats {
    pub rows: usize,
    /// Prompt tokens of the captured rows.
    pub prompt_tokens: usize,
    /// Tokens actually run through the model (prompt suffixes + continuations).
    pub computed_tokens: usize,
    pub seconds: f64,
    /// Where the time went: prompts run from an empty cache (the shared prefix
    /// computed once per shard block), prompt suffixes on a reused prefix, and
    /// continuation scoring.
    pub prefix_seconds: f64,
    pub suffix_seconds: f64,
    pub score_seconds: f64,
}

impl CaptureStats {
    /// A one-line summary with the time split.
    pub fn summary(&self) -> String {
        format!(
            "{} rows ({} prompt tokens, {} computed) in {:.1}s: {:.2} rows/s, {:.0} tok/s; \
             time in full prompts {:.1}s, prompt suffixes {:.1}s, scoring {:.1}s",
            self.rows,
            self.prompt_tokens,
            self.computed_tokens,
            self.seconds,
            self.rows as f64 / self.seconds.max(1e-9),
            self.prompt_tokens as f64 / self.seconds.max(1e-9),
            self.prefix_seconds,
            self.suffix_seconds,
            self.score_seconds
        )
    }
}

/// The most rows per shard (`--shard-rows`).
pub const MAX_SHARD_ROWS: usize = 1_000_000;
/// The most rows per token tree (`--batch-rows`); the tree's size is capped anyway.
pub const MAX_BATCH_ROWS: usize = 4096;

/// Runs a capture into `spec.out`.
pub fn capture(model: &Model, spec: &CaptureSpec) -> Result<CaptureStats> {
    let rows = read_prompt_file(&spec.prompts)?;
    spec.hooks
        .iter()
        .try_for_each(|h| h.check_layer(model.config().n_layers))?;
    crate::error::check_range(
        "--shard-rows",
        spec.shard_rows,
        1,
        MAX_SHARD_ROWS,
        "a shard's rows and activations are held in memory until it is written",
    )?;
    crate::error::check_range(
        "--batch-rows",
        spec.batch_rows,
        1,
        MAX_BATCH_ROWS,
        "rows run together as one token tree; 1 runs row by row",
    )?;
    if let Some(p) = spec.hooks.iter().find(|p| p.is_attention_internal()) {
        return Err(Error::BadInput(format!(
            "`{p}` is not stored by capture (its shape is per head); read attention \
             internals through the library's run_with_cache / Hooks::capture"
        )));
    }
    // Render and check every row before any compute, so bad input fails fast.
    let rendered = rows
        .iter()
        .map(|row| render_checked(model, spec, row))
        .collect::<Result<Vec<_>>>()?;
    let fresh = manifest(model, spec, rows.len())?;
    let mut writer = StoreWriter::open(&spec.out, fresh, spec.existing)?;
    let done = writer.done_blocks();
    let todo: Vec<usize> = writer
        .manifest
        .planned_blocks()
        .into_iter()
        .filter(|b| !done.contains(b))
        .collect();
    let todo_rows: usize = todo
        .iter()
        .map(|b| spec.shard_rows.min(rows.len() - b * spec.shard_rows))
        .sum();
    let already = writer.manifest.row_count;
    if already > 0 {
        eprintln!("afprobe: resuming after {already} rows already in the store");
    }
    let progress = Progress::new("capture", "rows", todo_rows);
    let mut tokens_done = 0usize;
    let mut stats = CaptureStats::default();
    let started = Instant::now();
    for block in todo {
        let start = block * spec.shard_rows;
        let end = (start + spec.shard_rows).min(rows.len());
        let mut block_state = Block::default();
        let mut i = start;
        while i < end {
            let n = batch_len(spec, &rendered[i..end], max_tree_tokens(model));
            let batch = i..i + n;
            let computed = match capture_batch(
                model,
                spec,
                &rows[batch.clone()],
                &rendered[batch.clone()],
                i,
                &mut block_state,
                &mut stats,
            )? {
                Some(computed) => computed,
                // One by one where the model cannot run the rows as one tree.
                None => batch
                    .clone()
                    .map(|j| {
                        capture_row(
                            model,
                            spec,
                            &rows[j],
                            &rendered[j],
                            j,
                            &mut block_state,
                            &mut stats,
                        )
                    })
                    .sum::<Result<usize>>()?,
            };
            let batch_tokens: usize = rendered[batch].iter().map(|r| r.tokens.len()).sum();
            stats.rows += n;
            stats.prompt_tokens += batch_tokens;
            stats.computed_tokens += computed;
            tokens_done += batch_tokens;
            i += n;
            let secs = progress.elapsed().max(1e-9);
            progress.advance(
                n,
                Some(format!(
                    "{:.1} rows/s, {:.0} tok/s",
                    stats.rows as f64 / secs,
                    tokens_done as f64 / secs
                )),
            );
        }
        let dtype = if spec.f16 { DType::F16 } else { DType::F32 };
        let (records, tensors) = block_state.shard.finish(dtype)?;
        writer.write_shard(block, [start, end], &records, tensors)?;
    }
    stats.seconds = started.elapsed().as_secs_f64();
    progress.finish();
    writer.finish()?;
    Ok(stats)
}

/// A row rendered to tokens, with the positions, length and continuations
/// the capture needs checked; errors name the row.
fn render_checked(model: &Model, spec: &CaptureSpec, row: &PromptRow) -> Result<RenderedPrompt> {
    let r = render(model, row, &spec.prompts)?;
    let at = |msg: String| {
        Error::BadInput(format!(
            "{}:{} (id `{}`): {msg}",
            spec.prompts.display(),
            row.line,
            row.id
        ))
    };
    check_positions(&r, &spec.positions).map_err(at)?;
    model
        .transformer
        .check_length(r.tokens.len() + longest(&r, spec.refusal.as_ref()))
        .map_err(|e| at(e.to_string()))?;
    if spec.score && row.continuations.is_empty() {
        return Err(at("--score needs `continuations` in every row".into()));
    }
    Ok(r)
}

/// The manifest of a fresh run of `spec` over a prompt file of `n_rows` rows.
fn manifest(model: &Model, spec: &CaptureSpec, n_rows: usize) -> Result<Manifest> {
    Ok(Manifest {
        format: FORMAT.into(),
        afprobe_version: env!("CARGO_PKG_VERSION").into(),
        complete: false,
        model: ModelRecord {
            spec: model.spec.to_string(),
            sha256: model.weights_sha256()?,
            architecture: model.config().architecture.name().into(),
            d_model: model.config().d_model,
            n_layers: model.config().n_layers,
            adapter: model.adapter.clone(),
            weights_dtype: (model.weights != WeightDtype::F32).then(|| model.weights.name().into()),
        },
        prompts: PromptsRecord {
            file: spec.prompts.display().to_string(),
            sha256: sha256_file(&spec.prompts)?,
            rows: n_rows,
        },
        hooks: spec.hooks.iter().map(|h| h.to_string()).collect(),
        positions: spec.positions.clone(),
        dtype: if spec.f16 { "f16" } else { "f32" }.into(),
        score: spec.score,
        refusal_openings: spec.refusal.as_ref().map(|o| o.texts.clone()),
        shard_rows: spec.shard_rows,
        batch_rows: if spec.share_prefix {
            spec.batch_rows
        } else {
            1
        },
        slice: spec.slice,
        row_count: 0,
        shards: Vec::new(),
    })
}

/// Longest continuation, so scoring cannot overflow the context window.
fn longest(r: &RenderedPrompt, refusal: Option<&RefusalOpenings>) -> usize {
    let openings = refusal.iter().flat_map(|o| &o.tokens);
    r.continuations
        .values()
        .chain(openings)
        .map(Vec::len)
        .max()
        .unwrap_or(0)
}

fn check_positions(r: &RenderedPrompt, positions: &[Position]) -> std::result::Result<(), String> {
    for p in positions {
        match p {
            Position::Cue if r.cue_span.is_none() => {
                return Err("--positions cue needs a `cue_text` field (the cue as it appears in the prompt)".into())
            }
            Position::Eoi | Position::Mean if r.user_span.is_none() => {
                return Err("--positions eoi/mean need the user turn: give `messages` with a user message, or `user_text` for a `text` row".into())
            }
            _ => {}
        }
    }
    Ok(())
}

/// The absolute token positions `position` reads for one prompt.
fn token_positions(r: &RenderedPrompt, position: Position) -> Vec<usize> {
    match position {
        Position::Last => vec![r.last()],
        Position::Cue => vec![r.cue_span.expect("checked").1 - 1],
        Position::Eoi => vec![r.user_span.expect("checked").1 - 1],
        Position::Mean => {
            let (a, b) = r.user_span.expect("checked");
            (a..b).collect()
        }
        Position::All => (0..r.tokens.len()).collect(),
    }
}

/// Runs one row on top of `kv` (the previous row's cache), records its
/// activations and scores into `shard`, and returns how many tokens it computed.
fn capture_row(
    model: &Model,
    spec: &CaptureSpec,
    row: &PromptRow,
    r: &RenderedPrompt,
    index: usize,
    block: &mut Block,
    stats: &mut CaptureStats,
) -> Result<usize> {
    let Block { kv, shard } = block;
    let t = &model.transformer;
    // Reuse the shared prefix, but never past the first position we must capture.
    let shared = if spec.share_prefix {
        kv.shared_prefix_len(&r.tokens)
    } else {
        0
    };
    let reuse = shared.min(first_needed(spec, r));
    kv.truncate(reuse)?;
    // Only the rows the positions store: a long prompt's every row at every
    // layer would be its whole residual stream (692 MB for an 8B model's
    // 1,320-token system prompt).
    let keep: Vec<usize> = stored_positions(spec, r)
        .map(|pos| pos - reuse)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut hooks = Hooks::capture(
        NamesFilter::Only(spec.hooks.clone()),
        CaptureRows::Rows(keep.clone()),
    );
    let started = Instant::now();
    let logits = t.forward(&r.tokens[reuse..], kv, &mut hooks, &LogitsAt::Last)?;
    let elapsed = started.elapsed().as_secs_f64();
    if reuse == 0 {
        stats.prefix_seconds += elapsed;
    } else {
        stats.suffix_seconds += elapsed;
    }
    let mut computed = r.tokens.len() - reuse;

    push_activations(spec, r, &hooks, shard, |pos| {
        keep.binary_search(&(pos - reuse)).expect("kept")
    })?;

    let mut record = row_record(spec, row, r, index);
    if spec.score || spec.refusal.is_some() {
        let started = Instant::now();
        let named = scored_continuations(spec, r);
        let (scores, tokens) = score_prompt(
            t,
            kv,
            &mut [Hooks::none()],
            &logits,
            &named,
            spec.refusal.as_ref(),
        )?;
        scores.write_into(&mut record);
        computed += tokens;
        stats.score_seconds += started.elapsed().as_secs_f64();
    }
    shard.add_row(
        Value::Object(record),
        &r.tokens,
        spec.positions.contains(&Position::All),
    );
    Ok(computed)
}

/// The absolute positions whose activations the row's capture stores, for
/// every position spec in turn (repeats included).
fn stored_positions<'a>(
    spec: &'a CaptureSpec,
    r: &'a RenderedPrompt,
) -> impl Iterator<Item = usize> + 'a {
    spec.positions.iter().flat_map(|&p| token_positions(r, p))
}

/// The first absolute position whose activations the row's capture stores.
fn first_needed(spec: &CaptureSpec, r: &RenderedPrompt) -> usize {
    stored_positions(spec, r).min().unwrap_or(r.last())
}

/// Pushes the row's activations at each position onto `shard`: `row_of(pos)`
/// is the row of the captured tensors holding absolute position `pos`.
fn push_activations(
    spec: &CaptureSpec,
    r: &RenderedPrompt,
    hooks: &Hooks,
    shard: &mut ShardBuilder,
    row_of: impl Fn(usize) -> usize,
) -> Result<()> {
    // Rows each position reads; the same for every hook.
    let picks = spec
        .positions
        .iter()
        .map(|&p| {
            let rows: Vec<u32> = token_positions(r, p)
                .into_iter()
                .map(|pos| row_of(pos) as u32)
                .collect();
            Ok((p, Tensor::new(rows, &candle_core::Device::Cpu)?))
        })
        .collect::<Result<Vec<_>>>()?;
    for &hook in &spec.hooks {
        let acts = hooks.cache.require(hook)?;
        for (p, rows) in &picks {
            let picked = acts.index_select(rows, 0)?;
            let value = match p {
                Position::Mean => picked.mean_keepdim(0)?,
                _ => picked,
            };
            shard.push(TensorName { hook, position: *p }.to_string(), value);
        }
    }
    Ok(())
}

/// The continuations a row's capture scores (see [`crate::score::continuations`]).
fn scored_continuations(spec: &CaptureSpec, r: &RenderedPrompt) -> BTreeMap<String, Vec<u32>> {
    if spec.score {
        r.continuations.clone()
    } else {
        BTreeMap::new()
    }
}

/// Where rows `rendered[..n]` stop sharing a prefix the batch can start from:
/// their common leading tokens, cut before the first position any of them
/// stores and before the last token of each (its logits are needed).
fn batch_shared(spec: &CaptureSpec, rendered: &[RenderedPrompt]) -> usize {
    let first = &rendered[0].tokens;
    rendered
        .iter()
        .map(|r| {
            let common = first
                .iter()
                .zip(&r.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            common.min(first_needed(spec, r)).min(r.last())
        })
        .min()
        .unwrap_or(0)
}

/// How many of `rendered`'s leading rows the next batch takes: up to
/// `batch_rows`, while the tree stays under `max_tokens` (at least one).
fn batch_len(spec: &CaptureSpec, rendered: &[RenderedPrompt], max_tokens: usize) -> usize {
    if !spec.share_prefix {
        return 1;
    }
    // At most: every continuation as long as the longest.
    let scored = |r: &RenderedPrompt| {
        let n = scored_continuations(spec, r).len()
            + spec.refusal.as_ref().map_or(0, |o| o.tokens.len());
        n * longest(r, spec.refusal.as_ref())
    };
    let mut n = 1;
    while n < spec.batch_rows.min(rendered.len()) {
        let shared = batch_shared(spec, &rendered[..=n]);
        let size: usize = rendered[..=n]
            .iter()
            .map(|r| r.tokens.len() - shared + scored(r))
            .sum();
        if size > max_tokens {
            break;
        }
        n += 1;
    }
    n
}

/// Runs consecutive rows as one token tree on the block's cache (brought to
/// the part they share), storing what [`capture_row`] stores for each; returns
/// the tokens computed, or `None` where the model cannot run the tree (an
/// activated adapter whose invocation is not in the shared part): the caller
/// then runs the rows one by one.
fn capture_batch(
    model: &Model,
    spec: &CaptureSpec,
    rows: &[PromptRow],
    rendered: &[RenderedPrompt],
    first_index: usize,
    block: &mut Block,
    stats: &mut CaptureStats,
) -> Result<Option<usize>> {
    if rows.len() < 2 {
        return Ok(None);
    }
    let Block { kv, shard } = block;
    let t = &model.transformer;
    let shared = batch_shared(spec, rendered);
    let head = &rendered[0].tokens[..shared];
    let reuse = kv.shared_prefix_len(head);
    kv.truncate(reuse)?;
    let mut computed = 0;
    if reuse < shared {
        let started = Instant::now();
        t.forward(&head[reuse..], kv, &mut Hooks::none(), &LogitsAt::None)?;
        stats.prefix_seconds += started.elapsed().as_secs_f64();
        computed += shared - reuse;
    }
    let named: Vec<BTreeMap<String, Vec<u32>>> = rendered
        .iter()
        .map(|r| scored_continuations(spec, r))
        .collect();
    let prompts = PromptTree::new(
        rendered
            .iter()
            .zip(&named)
            .map(|(r, n)| (&r.tokens[shared..], continuations(n, spec.refusal.as_ref())))
            .collect(),
    );
    // Captured rows: every position any row stores.
    let mut keep = std::collections::BTreeSet::new();
    for (k, r) in rendered.iter().enumerate() {
        keep.extend(stored_positions(spec, r).map(|pos| prompts.node(k, pos - shared)));
    }
    let keep: Vec<usize> = keep.into_iter().collect();
    let nodes = prompts.logit_nodes();
    let logits_at = if nodes.is_empty() {
        LogitsAt::None
    } else {
        LogitsAt::Rows(nodes.clone())
    };
    let mut hooks = Hooks::capture(
        NamesFilter::Only(spec.hooks.clone()),
        CaptureRows::Rows(keep.clone()),
    );
    let started = Instant::now();
    let Some(logits) = t.forward_tree(&prompts.tree, kv, &mut hooks, &logits_at)? else {
        return Ok(None);
    };
    stats.suffix_seconds += started.elapsed().as_secs_f64();
    computed += prompts.tree.len();
    let logprobs = log_softmax(&logits)?.to_vec2::<f32>()?;
    for (k, (row, r)) in rows.iter().zip(rendered).enumerate() {
        push_activations(spec, r, &hooks, shard, |pos| {
            let node = prompts.node(k, pos - shared);
            keep.binary_search(&node).expect("kept")
        })?;
        let mut record = row_record(spec, row, r, first_index + k);
        if spec.score || spec.refusal.is_some() {
            let logprobs = prompts.logprobs(k, &nodes, &logprobs);
            Scores::from_logprobs(&named[k], spec.refusal.as_ref(), &logprobs)
                .write_into(&mut record);
        }
        shard.add_row(
            Value::Object(record),
            &r.tokens,
            spec.positions.contains(&Position::All),
        );
    }
    Ok(Some(computed))
}

/// The row's line of `rows.jsonl` before its scores: id, index, metadata,
/// token count, the token index of each single-token position, and the spans.
fn row_record(
    spec: &CaptureSpec,
    row: &PromptRow,
    r: &RenderedPrompt,
    index: usize,
) -> serde_json::Map<String, Value> {
    let mut record = serde_json::Map::new();
    record.insert("id".into(), json!(row.id));
    record.insert("row".into(), json!(index));
    for (k, v) in &row.metadata {
        record.insert(k.clone(), v.clone());
    }
    record.insert("n_tokens".into(), json!(r.tokens.len()));
    let mut positions = serde_json::Map::new();
    for &p in &spec.positions {
        if p != Position::All && p != Position::Mean {
            positions.insert(p.to_string(), json!(token_positions(r, p)[0]));
        }
    }
    record.insert("positions".into(), Value::Object(positions));
    if let Some((a, b)) = r.cue_span {
        record.insert("cue_span".into(), json!([a, b]));
    }
    if let Some((a, b)) = r.user_span {
        record.insert("user_span".into(), json!([a, b]));
    }
    record
}

/// The state of one shard block: the KV cache rows share, and the shard being built.
#[derive(Default)]
struct Block {
    kv: KvCache,
    shard: ShardBuilder,
}

/// Accumulates one shard's rows and tensors.
#[derive(Default)]
struct ShardBuilder {
    records: Vec<Value>,
    tensors: BTreeMap<String, Vec<Tensor>>,
    tokens: Vec<i64>,
    token_offsets: Vec<i64>,
    row_offsets: Vec<i64>,
    has_all: bool,
}

impl ShardBuilder {
    fn push(&mut self, name: String, value: Tensor) {
        self.tensors.entry(name).or_default().push(value);
    }

    fn add_row(&mut self, record: Value, tokens: &[u32], all_positions: bool) {
        if self.token_offsets.is_empty() {
            self.token_offsets.push(0);
            self.row_offsets.push(0);
        }
        self.records.push(record);
        self.tokens.extend(tokens.iter().map(|&t| t as i64));
        self.token_offsets.push(self.tokens.len() as i64);
        // `@all` rows are the prompt tokens, so their offsets equal the token offsets.
        self.row_offsets.push(self.tokens.len() as i64);
        self.has_all |= all_positions;
    }

    fn finish(self, dtype: DType) -> Result<(Vec<Value>, NamedTensors)> {
        let mut out = Vec::new();
        for (name, parts) in self.tensors {
            out.push((name, Tensor::cat(&parts, 0)?.to_dtype(dtype)?));
        }
        let dev = candle_core::Device::Cpu;
        let n = self.tokens.len();
        out.push(("tokens".into(), Tensor::from_vec(self.tokens, n, &dev)?));
        let k = self.token_offsets.len();
        out.push((
            "token_offsets".into(),
            Tensor::from_vec(self.token_offsets, k, &dev)?,
        ));
        if self.has_all {
            out.push((
                "row_offsets".into(),
                Tensor::from_vec(self.row_offsets, k, &dev)?,
            ));
        }
        Ok((self.records, out))
    }
}
