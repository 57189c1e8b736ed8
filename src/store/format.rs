//! The activation store's format: `manifest.json`, `rows.jsonl` and
//! `shard-NNNNN.safetensors` (README, "The activation store"), readable from
//! Python without afprobe.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::HookPoint;

/// Tensors of one shard, by name.
pub type NamedTensors = Vec<(String, Tensor)>;

pub const FORMAT: &str = "afprobe-activations/1";
pub const MANIFEST: &str = crate::run_dir::RunKind::Activations.marker();
pub const ROWS: &str = "rows.jsonl";

/// Where in a prompt an activation is read (`--positions`; README, "Commands").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    /// The final prompt token.
    Last,
    /// The last token of the row's `cue_text`.
    Cue,
    /// The last token of the user turn.
    Eoi,
    /// The mean over the user turn.
    Mean,
    /// Every prompt token (ragged; see `row_offsets`).
    All,
}

pub const POSITIONS: [Position; 5] = [
    Position::Last,
    Position::Cue,
    Position::Eoi,
    Position::Mean,
    Position::All,
];

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Position::Last => "last",
            Position::Cue => "cue",
            Position::Eoi => "eoi",
            Position::Mean => "mean",
            Position::All => "all",
        })
    }
}

impl FromStr for Position {
    type Err = Error;
    fn from_str(s: &str) -> Result<Position> {
        POSITIONS
            .into_iter()
            .find(|p| p.to_string() == s)
            .ok_or_else(|| {
                Error::BadInput(format!(
                    "unknown position `{s}`; valid: last, cue, eoi, mean, all"
                ))
            })
    }
}

/// The name of a stored tensor: a hook point at a position, written
/// `{hook}@{position}` (e.g. `blocks.12.hook_resid_post@last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorName {
    pub hook: HookPoint,
    pub position: Position,
}

impl TensorName {
    /// The tensor of the hook named `hook` (a TransformerLens name) at `position`.
    pub fn of(hook: &str, position: Position) -> Result<TensorName> {
        Ok(TensorName {
            hook: hook.parse()?,
            position,
        })
    }
}

impl fmt::Display for TensorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.hook, self.position)
    }
}

impl FromStr for TensorName {
    type Err = Error;
    fn from_str(s: &str) -> Result<TensorName> {
        let (hook, position) = s.rsplit_once('@').ok_or_else(|| {
            Error::BadInput(format!(
                "tensor name `{s}` is not {{hook}}@{{position}} (e.g. blocks.12.hook_resid_post@last)"
            ))
        })?;
        TensorName::of(hook, position.parse()?)
    }
}

/// Which model produced a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub spec: String,
    pub sha256: String,
    pub architecture: String,
    pub d_model: usize,
    pub n_layers: usize,
    /// The LoRA adapter applied to the model (`--adapter`), with its sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<crate::model::AdapterRecord>,
    /// The weight precision the activations were computed at, when not f32
    /// (`f16`, `bf16`, `quantized`: GGUF blocks kept as stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_dtype: Option<String>,
}

/// Which prompt file a store was captured from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptsRecord {
    pub file: String,
    pub sha256: String,
    /// Rows in the prompt file (a sliced store holds only some of them).
    pub rows: usize,
}

/// One slice of an array job: this store holds shard blocks `b` with `b % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Slice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Slice> {
        let bad = || Error::BadInput(format!("--shard takes I/N with 0 <= I < N, got `{s}`"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Slice { index, count })
    }
}

/// One shard file and the prompt-file rows `[start, end)` it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub file: String,
    pub rows: [usize; 2],
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub afprobe_version: String,
    pub complete: bool,
    pub model: ModelRecord,
    pub prompts: PromptsRecord,
    /// Hook names, e.g. `blocks.12.hook_resid_post`.
    pub hooks: Vec<String>,
    pub positions: Vec<Position>,
    /// `f32` or `f16`.
    pub dtype: String,
    pub score: bool,
    /// The refusal openings scored for `p_refuse` (`capture --p-refuse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_openings: Option<Vec<String>>,
    /// Prompt rows per shard block.
    pub shard_rows: usize,
    /// Rows per batched forward call (`capture --batch-rows`); batching changes
    /// results by float rounding, so a resume or merge must not mix it.
    /// Absent (1: row by row) in stores written before batching.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub batch_rows: usize,
    pub slice: Option<Slice>,
    /// Rows in the complete shards.
    pub row_count: usize,
    pub shards: Vec<ShardRecord>,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Manifest {
    /// The fields that define a run; two manifests with equal settings can resume each other.
    pub fn settings_differ(&self, other: &Manifest) -> Vec<&'static str> {
        let mut diff = Vec::new();
        let mut check = |name, same: bool| {
            if !same {
                diff.push(name)
            }
        };
        check("model", self.model == other.model);
        // The prompt file by content: a resume may name it by another path.
        check(
            "prompt file",
            (self.prompts.sha256 == other.prompts.sha256)
                && (self.prompts.rows == other.prompts.rows),
        );
        check("hooks", self.hooks == other.hooks);
        check("positions", self.positions == other.positions);
        check("dtype", self.dtype == other.dtype);
        check("score", self.score == other.score);
        check(
            "refusal openings",
            self.refusal_openings == other.refusal_openings,
        );
        check("shard rows", self.shard_rows == other.shard_rows);
        check("batch rows", self.batch_rows == other.batch_rows);
        check("slice", self.slice == other.slice);
        diff
    }

    /// Checks every field a reader or writer will index with, against each
    /// other: format, model sizes, hooks (TransformerLens names inside the
    /// model), positions, dtype, slice, and that the shards are the store's
    /// planned blocks, in order, each a file inside the store directory
    /// holding exactly its block's rows. `path` names the manifest in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |what: String| {
            Error::model_file(path, format!("{what}; the store is damaged or not from this afprobe (rerun `afprobe capture`)"))
        };
        if self.format != FORMAT {
            return Err(bad(format!(
                "format is `{}`, expected `{FORMAT}`",
                self.format
            )));
        }
        let m = &self.model;
        if m.d_model == 0 || m.d_model > 1 << 20 || m.n_layers == 0 || m.n_layers > 1 << 12 {
            return Err(bad(format!(
                "model.d_model {} and model.n_layers {} must be positive and plausible",
                m.d_model, m.n_layers
            )));
        }
        if self.hooks.is_empty() || self.positions.is_empty() {
            return Err(bad("`hooks` and `positions` must not be empty".into()));
        }
        for (i, hook) in self.hooks.iter().enumerate() {
            let point: HookPoint = hook.parse().map_err(|e| bad(format!("hooks[{i}]: {e}")))?;
            if point.layer().is_some_and(|l| l >= m.n_layers) {
                return Err(bad(format!(
                    "hooks[{i}] `{hook}` is outside the model's {} layers",
                    m.n_layers
                )));
            }
            if self.hooks[..i].contains(hook) {
                return Err(bad(format!("hooks[{i}] `{hook}` is listed twice")));
            }
        }
        for (i, p) in self.positions.iter().enumerate() {
            if self.positions[..i].contains(p) {
                return Err(bad(format!("positions[{i}] `{p}` is listed twice")));
            }
        }
        if self.dtype != "f32" && self.dtype != "f16" {
            return Err(bad(format!(
                "dtype is `{}`, expected f32 or f16",
                self.dtype
            )));
        }
        if self.shard_rows == 0 {
            return Err(bad("shard_rows must be at least 1".into()));
        }
        if let Some(s) = self.slice {
            if s.count == 0 || s.index >= s.count {
                return Err(bad(format!(
                    "slice {}/{} is not I/N with 0 <= I < N",
                    s.index, s.count
                )));
            }
        }
        // Bounds what planning the blocks allocates (16M blocks).
        if self.prompts.rows.div_ceil(self.shard_rows) > 1 << 24 {
            return Err(bad(format!(
                "prompts.rows {} in blocks of {} is not a plausible store",
                self.prompts.rows, self.shard_rows
            )));
        }
        self.validate_shards().map_err(bad)
    }

    /// The shards are the first planned blocks, in order (a run writes them so),
    /// each with its block's rows.
    fn validate_shards(&self) -> std::result::Result<(), String> {
        let planned = self.planned_blocks();
        if self.shards.len() > planned.len() {
            return Err(format!(
                "{} shards listed, but the run has {} shard blocks",
                self.shards.len(),
                planned.len()
            ));
        }
        let mut rows = 0usize;
        for (i, (shard, &block)) in self.shards.iter().zip(&planned).enumerate() {
            let mut parts = Path::new(&shard.file).components();
            let plain = matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            );
            if !plain || shard.file.contains(['/', '\\']) {
                return Err(format!(
                    "shards[{i}].file `{}` is not a file name inside the store directory",
                    shard.file
                ));
            }
            let start = block * self.shard_rows;
            let end = start.saturating_add(self.shard_rows).min(self.prompts.rows);
            if shard.rows != [start, end] {
                return Err(format!(
                    "shards[{i}] rows [{}, {}) are not its block's rows [{start}, {end})",
                    shard.rows[0], shard.rows[1]
                ));
            }
            rows += end - start;
        }
        if rows != self.row_count {
            return Err(format!(
                "row_count is {} but the shards hold {rows} rows",
                self.row_count
            ));
        }
        if self.complete && self.shards.len() != planned.len() {
            return Err(format!(
                "the store is marked complete but holds {} of its {} shard blocks",
                self.shards.len(),
                planned.len()
            ));
        }
        Ok(())
    }

    /// Shard blocks this store is meant to hold, in order.
    pub fn planned_blocks(&self) -> Vec<usize> {
        let n_blocks = self.prompts.rows.div_ceil(self.shard_rows);
        (0..n_blocks)
            .filter(|b| self.slice.is_none_or(|s| b % s.count == s.index))
            .collect()
    }

    /// Tensor names every shard holds, besides `tokens` and `token_offsets`.
    pub fn tensor_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for hook in &self.hooks {
            for &position in &self.positions {
                names.push(TensorName::of(hook, position)?.to_string());
            }
        }
        Ok(names)
    }
}

pub fn shard_file(block: usize) -> String {
    format!("shard-{block:05}.safetensors")
}

/// Reads and validates `dir/manifest.json` (see [`Manifest::validate`]).
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = crate::io::read_to_string(&path).map_err(|e| {
        Error::BadInput(format!(
            "cannot read ({e}); is {} an activation store from `afprobe capture`?",
            dir.display()
        ))
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::model_file(&path, format!("not a valid afprobe manifest: {e}")))?;
    manifest.validate(&path)?;
    Ok(manifest)
}
