//! The activation store (DESIGN §4): `manifest.json`, `rows.jsonl` and
//! `shard-NNNNN.safetensors`, readable from Python without afprobe.
//!
//! Writes are crash-safe: a shard is written under a temporary name and
//! renamed, then its rows are appended to `rows.jsonl`, then the manifest is
//! replaced atomically. The manifest is the source of truth: on resume, shards
//! and rows it does not list are discarded, and `complete: true` is written
//! only after the last shard.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::fetch::sha256_file;

/// Tensors of one shard, by name.
pub type NamedTensors = Vec<(String, Tensor)>;

pub const FORMAT: &str = "afprobe-activations/1";
pub const MANIFEST: &str = "manifest.json";
pub const ROWS: &str = "rows.jsonl";

/// Where in a prompt an activation is read (DESIGN §2).
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

/// The tensor name of a hook at a position: `blocks.12.hook_resid_post@last`.
pub fn tensor_name(hook: &str, position: Position) -> String {
    format!("{hook}@{position}")
}

/// Which model produced a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub spec: String,
    pub sha256: String,
    pub architecture: String,
    pub d_model: usize,
    pub n_layers: usize,
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
    pub slice: Option<Slice>,
    /// Rows in the complete shards.
    pub row_count: usize,
    pub shards: Vec<ShardRecord>,
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
        check("slice", self.slice == other.slice);
        diff
    }

    /// Shard blocks this store is meant to hold, in order.
    pub fn planned_blocks(&self) -> Vec<usize> {
        let n_blocks = self.prompts.rows.div_ceil(self.shard_rows);
        (0..n_blocks)
            .filter(|b| self.slice.is_none_or(|s| b % s.count == s.index))
            .collect()
    }

    /// Tensor names every shard holds, besides `tokens` and `token_offsets`.
    pub fn tensor_names(&self) -> Vec<String> {
        self.hooks
            .iter()
            .flat_map(|h| self.positions.iter().map(move |&p| tensor_name(h, p)))
            .collect()
    }

    pub fn store_dtype(&self) -> DType {
        if self.dtype == "f16" {
            DType::F16
        } else {
            DType::F32
        }
    }
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp"))
}

pub fn shard_file(block: usize) -> String {
    format!("shard-{block:05}.safetensors")
}

/// Appends shards to a store directory, keeping it consistent after every step.
pub struct StoreWriter {
    dir: PathBuf,
    pub manifest: Manifest,
}

/// What to do when the output directory already holds a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse (the default).
    Refuse,
    /// Continue a run with the same settings.
    Resume,
    /// Delete the old store and start over.
    Overwrite,
    /// Continue the run if its settings match, else start over (the demo).
    ResumeOrOverwrite,
}

impl StoreWriter {
    /// Opens `dir` for the run described by `fresh` (its shard list empty).
    pub fn open(dir: &Path, fresh: Manifest, existing: Existing) -> Result<StoreWriter> {
        let manifest_path = dir.join(MANIFEST);
        let existing = match existing {
            Existing::ResumeOrOverwrite => match read_manifest(dir) {
                Ok(old) if old.settings_differ(&fresh).is_empty() => Existing::Resume,
                _ => Existing::Overwrite,
            },
            other => other,
        };
        if manifest_path.exists() && existing != Existing::Overwrite {
            let old = read_manifest(dir)?;
            let diff = old.settings_differ(&fresh);
            if existing == Existing::Refuse || !diff.is_empty() {
                let why = if diff.is_empty() {
                    format!(
                        "already holds this run ({}); pass --resume to continue it",
                        if old.complete {
                            "complete"
                        } else {
                            "incomplete"
                        }
                    )
                } else {
                    format!("holds a different run (differs in {})", diff.join(", "))
                };
                return Err(Error::BadInput(format!(
                    "{}: {why}, or --force to overwrite it, or choose another --out",
                    dir.display()
                )));
            }
            let writer = StoreWriter {
                dir: dir.to_path_buf(),
                manifest: old,
            };
            writer.discard_unlisted()?;
            return Ok(writer);
        }
        if dir.exists() {
            if existing == Existing::Overwrite {
                remove_store_files(dir)?;
            } else if std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .next()
                .is_some()
            {
                return Err(Error::BadInput(format!(
                    "{}: the output directory exists, is not empty and holds no afprobe store; \
                     choose another --out (or --force to write into it)",
                    dir.display()
                )));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let writer = StoreWriter {
            dir: dir.to_path_buf(),
            manifest: fresh,
        };
        write_atomic(&dir.join(ROWS), b"")?;
        writer.save_manifest()?;
        Ok(writer)
    }

    /// Blocks already written (to skip on resume).
    pub fn done_blocks(&self) -> Vec<usize> {
        self.manifest
            .shards
            .iter()
            .map(|s| s.rows[0] / self.manifest.shard_rows)
            .collect()
    }

    /// Drops rows and shard files that a killed run left beyond the manifest.
    fn discard_unlisted(&self) -> Result<()> {
        let rows_path = self.dir.join(ROWS);
        let text = std::fs::read_to_string(&rows_path).unwrap_or_default();
        let kept: Vec<&str> = text.lines().take(self.manifest.row_count).collect();
        if kept.len() < self.manifest.row_count {
            return Err(Error::BadInput(format!(
                "{}: has {} rows but the manifest lists {}; the store is damaged, use --force",
                rows_path.display(),
                kept.len(),
                self.manifest.row_count
            )));
        }
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        write_atomic(&rows_path, body.as_bytes())
    }

    /// Writes one shard (rows `[start, end)` of the prompt file) and its rows.
    pub fn write_shard(
        &mut self,
        block: usize,
        rows: [usize; 2],
        records: &[Value],
        tensors: NamedTensors,
    ) -> Result<()> {
        let file = shard_file(block);
        let path = self.dir.join(&file);
        let tmp = tmp_path(&path);
        // One metadata key: a HashMap with several would serialise in random
        // order, and identical runs must give byte-identical shards.
        let metadata: std::collections::HashMap<String, String> = [(
            "afprobe".to_string(),
            json!({"format": FORMAT, "rows": rows}).to_string(),
        )]
        .into();
        safetensors::serialize_to_file(tensors, Some(metadata), &tmp)
            .map_err(|e| Error::model_file(&tmp, format!("cannot write shard: {e}")))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        let rows_path = self.dir.join(ROWS);
        let mut lines = String::new();
        for r in records {
            lines.push_str(&serde_json::to_string(r).expect("JSON values serialise"));
            lines.push('\n');
        }
        let append = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().append(true).open(&rows_path)?;
            f.write_all(lines.as_bytes())?;
            f.sync_all()
        };
        append().map_err(|e| Error::io(&rows_path, e))?;
        self.manifest.shards.push(ShardRecord {
            file,
            rows,
            sha256: sha256_file(&path)?,
        });
        self.manifest.row_count += records.len();
        self.save_manifest()
    }

    /// Marks the store complete once every planned block is written.
    pub fn finish(mut self) -> Result<Manifest> {
        let done = self.done_blocks();
        if done != self.manifest.planned_blocks() {
            return Err(Error::BadInput(format!(
                "{}: not every shard was written; run again with --resume",
                self.dir.display()
            )));
        }
        self.manifest.complete = true;
        self.save_manifest()?;
        Ok(self.manifest)
    }

    fn save_manifest(&self) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.manifest).expect("manifest serialises");
        write_atomic(&self.dir.join(MANIFEST), json.as_bytes())
    }
}

fn remove_store_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let ours = name == MANIFEST
            || name == ROWS
            || (name.starts_with("shard-") && name.ends_with(".safetensors"))
            || (name.starts_with('.') && name.ends_with(".tmp"));
        if ours {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::BadInput(format!(
            "{}: cannot read ({e}); is {} an activation store from `afprobe capture`?",
            path.display(),
            dir.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::model_file(&path, format!("not a valid afprobe manifest: {e}")))
}

/// A store opened for reading.
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
    pub manifest: Manifest,
    rows: Vec<Value>,
}

impl Store {
    /// Opens a finished store; an incomplete capture is refused (see [`Store::open_any`]).
    pub fn open(dir: &Path) -> Result<Store> {
        let store = Store::open_any(dir)?;
        if !store.manifest.complete {
            return Err(Error::BadInput(format!(
                "{}: the capture is incomplete ({} rows so far); finish it with \
                 `afprobe capture ... --resume`",
                dir.display(),
                store.manifest.row_count
            )));
        }
        Ok(store)
    }

    /// Opens a store whether or not the capture finished (for `store info`).
    pub fn open_any(dir: &Path) -> Result<Store> {
        let manifest = read_manifest(dir)?;
        let rows_path = dir.join(ROWS);
        let text = std::fs::read_to_string(&rows_path).map_err(|e| Error::io(&rows_path, e))?;
        let rows = text
            .lines()
            .take(manifest.row_count)
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| {
                    Error::BadInput(format!(
                        "{}:{}: not valid JSON: {e}",
                        rows_path.display(),
                        i + 1
                    ))
                })
            })
            .collect::<Result<Vec<Value>>>()?;
        if rows.len() != manifest.row_count {
            return Err(Error::BadInput(format!(
                "{}: {} rows, but the manifest lists {}",
                rows_path.display(),
                rows.len(),
                manifest.row_count
            )));
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            manifest,
            rows,
        })
    }

    /// Row records (`rows.jsonl`), in store order.
    pub fn rows(&self) -> &[Value] {
        &self.rows
    }

    /// A metadata field of every row as strings (e.g. labels), `None` where absent.
    pub fn column(&self, field: &str) -> Vec<Option<String>> {
        self.rows
            .iter()
            .map(|r| match r.get(field) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => Some(v.to_string()),
            })
            .collect()
    }

    /// The shards, in order, for streaming over a large store.
    pub fn shards(&self) -> impl Iterator<Item = Shard> + '_ {
        self.manifest.shards.iter().map(|s| Shard {
            path: self.dir.join(&s.file),
            rows: s.rows,
        })
    }

    /// `{hook}@{position}` for every row, as `[rows, d_model]` f32 (not for `@all`).
    pub fn load(&self, name: &str) -> Result<Array2<f32>> {
        self.check_name(name)?;
        let mut parts = Vec::new();
        for shard in self.shards() {
            parts.push(shard.load(name)?);
        }
        let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
        ndarray::concatenate(ndarray::Axis(0), &views)
            .map_err(|e| Error::BadInput(format!("shards of `{name}` do not stack: {e}")))
    }

    /// `{hook}@{position}` for the given store rows only, in the order given.
    pub fn load_rows(&self, name: &str, rows: &[usize]) -> Result<Array2<f32>> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows.len()) {
            return Err(Error::BadInput(format!(
                "row {bad} is out of range; the store has {} rows",
                self.rows.len()
            )));
        }
        let all = self.load(name)?;
        Ok(all.select(ndarray::Axis(0), rows))
    }

    fn check_name(&self, name: &str) -> Result<()> {
        let names = self.manifest.tensor_names();
        if name.ends_with("@all") || !names.iter().any(|n| n == name) {
            let valid: Vec<&String> = names.iter().filter(|n| !n.ends_with("@all")).collect();
            return Err(Error::BadInput(format!(
                "{}: no per-row tensor `{name}`; this store has {} (ragged `@all` tensors are read per shard)",
                self.dir.display(),
                preview(&valid)
            )));
        }
        Ok(())
    }
}

fn preview(names: &[&String]) -> String {
    let shown: Vec<&str> = names.iter().take(6).map(|s| s.as_str()).collect();
    match names.len() {
        0 => "none".into(),
        n if n > 6 => format!("{} and {} more", shown.join(", "), n - 6),
        _ => shown.join(", "),
    }
}

/// One shard file of a store.
#[derive(Debug, Clone)]
pub struct Shard {
    pub path: PathBuf,
    /// Prompt-file rows `[start, end)`.
    pub rows: [usize; 2],
}

impl Shard {
    /// Every tensor of the shard.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let map = candle_core::safetensors::load(&self.path, &Device::Cpu)
            .map_err(|e| Error::model_file(&self.path, format!("cannot read shard: {e}")))?;
        Ok(map.into_iter().collect())
    }

    /// One 2-D tensor of the shard as f32.
    pub fn load(&self, name: &str) -> Result<Array2<f32>> {
        // Safety: the shard is mapped read-only; afprobe never rewrites a finished shard in place.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::new(&self.path) }
            .map_err(|e| Error::model_file(&self.path, format!("cannot read shard: {e}")))?;
        let t = tensors
            .load(name, &Device::Cpu)
            .map_err(|e| Error::model_file(&self.path, format!("tensor `{name}`: {e}")))?;
        let (r, c) = t.dims2()?;
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Array2::from_shape_vec((r, c), data).expect("shape matches data"))
    }
}

/// Checks a store: every listed shard exists with its sha256, holds every
/// tensor with the right shapes, and rows.jsonl matches. Returns a summary.
pub fn verify(dir: &Path) -> Result<String> {
    let store = Store::open_any(dir)?;
    let m = &store.manifest;
    let mut row = 0usize;
    for (s, shard) in m.shards.iter().zip(store.shards()) {
        let sha = sha256_file(&shard.path)?;
        if sha != s.sha256 {
            return Err(Error::model_file(
                &shard.path,
                format!("sha256 {sha} does not match the manifest's {}", s.sha256),
            ));
        }
        let tensors = shard.tensors()?;
        let n = s.rows[1] - s.rows[0];
        let offsets = |key: &str| -> Result<Vec<i64>> {
            let t = tensors
                .get(key)
                .ok_or_else(|| Error::model_file(&shard.path, format!("missing tensor `{key}`")))?;
            let v = t.to_vec1::<i64>()?;
            if v.len() != n + 1 || v[0] != 0 || v.windows(2).any(|w| w[1] < w[0]) {
                return Err(Error::model_file(
                    &shard.path,
                    format!("`{key}` is not {} increasing offsets", n + 1),
                ));
            }
            Ok(v)
        };
        let token_offsets = offsets("token_offsets")?;
        for name in m.tensor_names() {
            let t = tensors.get(&name).ok_or_else(|| {
                Error::model_file(&shard.path, format!("missing tensor `{name}`"))
            })?;
            let want_rows = if name.ends_with("@all") {
                *offsets("row_offsets")?.last().unwrap_or(&0) as usize
            } else {
                n
            };
            if t.dims() != [want_rows, m.model.d_model] {
                return Err(Error::model_file(
                    &shard.path,
                    format!(
                        "`{name}` has shape {:?}, expected [{want_rows}, {}]",
                        t.dims(),
                        m.model.d_model
                    ),
                ));
            }
        }
        for (i, r) in store.rows()[row..row + n].iter().enumerate() {
            let want = (token_offsets[i + 1] - token_offsets[i]) as u64;
            if r.get("n_tokens").and_then(Value::as_u64) != Some(want) {
                return Err(Error::BadInput(format!(
                    "{}:{}: n_tokens does not match the shard's tokens ({want})",
                    dir.join(ROWS).display(),
                    row + i + 1
                )));
            }
        }
        row += n;
    }
    Ok(format!(
        "{}: ok — {} shards, {} rows, {} tensors per shard, {}",
        dir.display(),
        m.shards.len(),
        m.row_count,
        m.tensor_names().len() + 2,
        if m.complete {
            "complete"
        } else {
            "incomplete (resume with --resume)"
        }
    ))
}

/// Joins stores captured with `--shard I/N` (or any stores of one run) into one.
pub fn merge(inputs: &[PathBuf], out: &Path, force: bool) -> Result<Manifest> {
    let stores = inputs
        .iter()
        .map(|d| Store::open(d))
        .collect::<Result<Vec<_>>>()?;
    let first = stores
        .first()
        .ok_or_else(|| Error::BadInput("store merge needs at least one input".into()))?;
    let mut merged = Manifest {
        slice: None,
        complete: false,
        row_count: 0,
        shards: Vec::new(),
        ..first.manifest.clone()
    };
    let mut pieces: Vec<(ShardRecord, &Store, usize)> = Vec::new();
    for store in &stores {
        let mut probe = store.manifest.clone();
        probe.slice = None;
        let diff = merged.settings_differ(&probe);
        if !diff.is_empty() {
            return Err(Error::BadInput(format!(
                "{} cannot be merged with {}: they differ in {}",
                store.dir.display(),
                first.dir.display(),
                diff.join(", ")
            )));
        }
        let mut row = 0;
        for s in &store.manifest.shards {
            pieces.push((s.clone(), store, row));
            row += s.rows[1] - s.rows[0];
        }
    }
    pieces.sort_by_key(|p| p.0.rows[0]);
    if let Some(w) = pieces.windows(2).find(|w| w[0].0.rows[0] == w[1].0.rows[0]) {
        return Err(Error::BadInput(format!(
            "rows {:?} appear in more than one input store",
            w[0].0.rows
        )));
    }
    let mut writer = StoreWriter::open(
        out,
        merged.clone(),
        if force {
            Existing::Overwrite
        } else {
            Existing::Refuse
        },
    )?;
    for (shard, store, first_row) in pieces {
        let n = shard.rows[1] - shard.rows[0];
        let records = &store.rows()[first_row..first_row + n];
        let tensors = Shard {
            path: store.dir.join(&shard.file),
            rows: shard.rows,
        }
        .tensors()?;
        let block = shard.rows[0] / merged.shard_rows;
        writer.write_shard(block, shard.rows, records, tensors.into_iter().collect())?;
    }
    merged = writer.finish().map_err(|_| {
        Error::BadInput(format!(
            "the inputs do not cover every row of {}; merge all slices of the run",
            first.manifest.prompts.file
        ))
    })?;
    Ok(merged)
}

/// `afprobe store info`: a readable summary.
pub fn info(dir: &Path) -> Result<String> {
    let store = Store::open_any(dir)?;
    let m = &store.manifest;
    let mut labels: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for row in store.rows() {
        if let Value::Object(o) = row {
            for (k, v) in o {
                if let Value::String(s) = v {
                    if ["tier", "cue", "setting", "variation", "label"].contains(&k.as_str()) {
                        *labels
                            .entry(k.clone())
                            .or_default()
                            .entry(s.clone())
                            .or_default() += 1;
                    }
                }
            }
        }
    }
    let bytes: u64 = store
        .shards()
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|md| md.len())
        .sum();
    let mut out = format!(
        "store      {}\nstatus     {}\nmodel      {} ({}, {} layers, d_model {}, sha256 {})\n\
         prompts    {} ({} rows, sha256 {})\nrows       {}{}\nhooks      {}\npositions  {}\n\
         dtype      {}\nscores     {}\nshards     {} x up to {} rows, {:.1} MB\n",
        dir.display(),
        if m.complete {
            "complete"
        } else {
            "INCOMPLETE (continue with capture --resume)"
        },
        m.model.spec,
        m.model.architecture,
        m.model.n_layers,
        m.model.d_model,
        &m.model.sha256[..12.min(m.model.sha256.len())],
        m.prompts.file,
        m.prompts.rows,
        &m.prompts.sha256[..12.min(m.prompts.sha256.len())],
        m.row_count,
        m.slice
            .map(|s| format!(" (slice {}/{})", s.index, s.count))
            .unwrap_or_default(),
        summarize_hooks(&m.hooks),
        m.positions
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        m.dtype,
        score_summary(m),
        m.shards.len(),
        m.shard_rows,
        bytes as f64 / 1e6,
    );
    for (field, counts) in labels {
        let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        out.push_str(&format!("{field:<10} {}\n", parts.join(", ")));
    }
    Ok(out)
}

/// What `capture` scored, for `store info`.
fn score_summary(m: &Manifest) -> String {
    let tags = m.score.then_some("logprob, p_accept");
    let refusal = m
        .refusal_openings
        .as_ref()
        .map(|o| format!("p_refuse over {} refusal openings", o.len()));
    match (tags, refusal) {
        (None, None) => "no".into(),
        (a, b) => format!(
            "yes ({} in rows.jsonl)",
            a.into_iter()
                .chain(b.as_deref())
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// `blocks.0..29.hook_resid_post` instead of 30 names.
fn summarize_hooks(hooks: &[String]) -> String {
    let mut kinds: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut others = Vec::new();
    for h in hooks {
        match h.strip_prefix("blocks.").and_then(|r| r.split_once('.')) {
            Some((l, kind)) if l.parse::<usize>().is_ok() => kinds
                .entry(kind.to_string())
                .or_default()
                .push(l.parse().unwrap_or(0)),
            _ => others.push(h.clone()),
        }
    }
    let mut parts = others;
    for (kind, layers) in kinds {
        let contiguous = layers.windows(2).all(|w| w[1] == w[0] + 1);
        parts.push(match (contiguous, layers.first(), layers.last()) {
            (true, Some(a), Some(b)) if a != b => format!("blocks.{a}..{b}.{kind}"),
            _ => format!(
                "blocks.{{{}}}.{kind}",
                layers
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        });
    }
    parts.join(", ")
}
