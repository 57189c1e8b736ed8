//! Interventions: hooks that write instead of read. `afprobe steer` adds a
//! direction to the residual stream, `afprobe patch` copies activations from
//! one row into its paired row, `afprobe ablate` projects a direction out;
//! each measures how the answer scores (`p_accept`) move.
//!
//! An edit that starts at position p changes nothing before p, so every edited
//! run reuses the row's unedited KV cache up to p and recomputes only the rest
//! ([`RowCache`]); rows reuse the shared system prompt of the row before them.

pub mod ablate;
pub mod direction;
pub mod head_patch;
pub mod patch;
pub mod patch_position;
pub mod patch_spec;
pub mod steer;
pub mod steer_report;
pub mod steer_spec;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::io::write_atomic;
use candle_core::Tensor;

use crate::model::{
    ActivationCache, CaptureRows, HookPoint, Hooks, KvCache, LogitsAt, Model, NamesFilter,
};
use crate::prompts::{read_prompt_file, render, PromptRow, RenderedPrompt};
use crate::rows::cell;
use crate::rows::{Filter, Table};
use crate::score::{score_prompt, score_rest_as_tree, Scores};

/// A prompt row rendered for the model.
pub struct Row {
    pub prompt: PromptRow,
    pub rendered: RenderedPrompt,
}

impl Row {
    /// A metadata field as a string (`None` where absent); lists as in probe filters.
    pub fn field(&self, name: &str) -> Option<String> {
        field_of(&self.prompt.metadata, name)
    }

    /// The row's identity and labels for `rows.jsonl`.
    pub fn record(&self) -> Map<String, Value> {
        let mut record = Map::new();
        record.insert("id".into(), json!(self.prompt.id));
        for (k, v) in &self.prompt.metadata {
            record.insert(k.clone(), v.clone());
        }
        record
    }
}

/// Reads and renders the rows of a prompt file that pass `filter`; every row
/// needs `continuations` with `accept` and `reject` (what the edits are measured by).
pub fn load_rows(model: &Model, path: &Path, filter: &Filter) -> Result<Vec<Row>> {
    let prompts = read_prompt_file(path)?;
    let keep = if filter.fields().next().is_none() {
        vec![true; prompts.len()]
    } else {
        let columns: BTreeMap<String, Vec<Option<String>>> = filter
            .fields()
            .map(|f| {
                let column = prompts.iter().map(|p| field_of(&p.metadata, f)).collect();
                (f.to_string(), column)
            })
            .collect();
        filter.mask(&Table::from_columns(columns))?
    };
    let mut rows = Vec::new();
    for (prompt, keep) in prompts.into_iter().zip(keep) {
        if !keep {
            continue;
        }
        for tag in ["accept", "reject"] {
            if !prompt.continuations.contains_key(tag) {
                return Err(Error::BadInput(format!(
                    "{}:{} (id `{}`): no `{tag}` continuation; interventions are measured by \
                     p_accept, so every row needs \"continuations\": {{\"accept\": ..., \"reject\": ...}} \
                     (as `afprobe prompts` writes)",
                    path.display(),
                    prompt.line,
                    prompt.id
                )));
            }
        }
        let rendered = render(model, &prompt, path)?;
        let longest = rendered
            .continuations
            .values()
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        model
            .transformer
            .check_length(rendered.tokens.len() + longest)?;
        rows.push(Row { prompt, rendered });
    }
    if rows.is_empty() {
        return Err(Error::BadInput(format!(
            "{}: no rows{}",
            path.display(),
            if filter.fields().next().is_some() {
                format!(" pass the filter `{filter}`")
            } else {
                String::new()
            }
        )));
    }
    Ok(rows)
}

/// A metadata field as probe filters and labels read it (lists joined by `+`).
fn field_of(metadata: &Map<String, Value>, name: &str) -> Option<String> {
    metadata.get(name).and_then(cell)
}

/// Tokens run through the model, against one full forward per measurement.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct TokenCount {
    /// Token-forwards actually computed (prompt pieces and continuations).
    pub computed: usize,
    /// What one full forward of prompt + continuations per measurement would cost.
    pub naive: usize,
}

/// An unedited run from one start: its scores and the clean `hook_resid_pre`
/// rows edited runs from the same start resume from.
pub struct Clean {
    pub scores: Scores,
    resid_pre: ActivationCache,
}

impl Clean {
    /// Where a run edited at `point` can start: its block and the clean rows
    /// there (`None`: from the embedding).
    pub fn resume(&self, point: HookPoint) -> Option<(usize, &Tensor)> {
        let l = point.layer()?;
        Some((l, self.resid_pre.get(HookPoint::ResidPre(l))?))
    }
}

/// What [`RowCache::run_capturing`] captured: the prompt's computed
/// positions (from `from` on) and the shared answer prefix after it.
pub struct Captured {
    prompt: ActivationCache,
    from: usize,
    prompt_len: usize,
    answer: ActivationCache,
}

impl Captured {
    /// `point` at absolute position `pos` (`None`: a reused prefix position,
    /// or past what was run).
    pub fn at(&self, point: HookPoint, pos: usize) -> Result<Option<Tensor>> {
        let (cache, row) = match pos.checked_sub(self.prompt_len) {
            None if pos < self.from => return Ok(None),
            None => (&self.prompt, pos - self.from),
            Some(k) => (&self.answer, k),
        };
        match cache.get(point) {
            Some(t) if row < t.dim(0)? => Ok(Some(t.get(row)?)),
            _ => Ok(None),
        }
    }
}

/// A row's KV cache: its first `clean` positions hold the unedited run, so an
/// edit starting at p reuses them when p ≤ `clean`.
pub struct RowCache {
    kv: KvCache,
    clean: usize,
}

impl RowCache {
    /// Runs the whole row with `hooks` (none, or edits every row shares, such
    /// as an ablation, whose runs then chain their own caches),
    /// reusing the clean prefix `previous` shares with it; returns the cache
    /// (clean = run with these hooks) and the scores.
    pub fn run(
        model: &Model,
        row: &Row,
        previous: Option<&RowCache>,
        hooks: &mut Hooks,
        count: &mut TokenCount,
    ) -> Result<(RowCache, Scores)> {
        let mut cache = RowCache::reusing(row, previous)?;
        let start = cache.kv.len();
        let scores =
            cache.forward_and_score(model, row, start, std::slice::from_mut(hooks), count)?;
        cache.clean = row.rendered.tokens.len();
        Ok((cache, scores))
    }

    /// An empty cache for `row` holding the clean prefix it shares with `previous`.
    fn reusing(row: &Row, previous: Option<&RowCache>) -> Result<RowCache> {
        let kv = match previous {
            Some(p) => {
                let mut kv = p.kv.reuse_for(&row.rendered.tokens)?;
                kv.truncate(kv.len().min(p.clean))?;
                kv
            }
            None => KvCache::new(),
        };
        Ok(RowCache { kv, clean: 0 })
    }

    /// [`RowCache::run`] without edits, capturing `points` (attention
    /// internals included) on the prompt positions it computes (the prefix
    /// shared with `previous` is reused, not recomputed) and on the answer
    /// tokens every continuation starts with, where the decision is read.
    pub fn run_capturing(
        model: &Model,
        row: &Row,
        previous: Option<&RowCache>,
        points: &[HookPoint],
        count: &mut TokenCount,
    ) -> Result<(RowCache, Scores, Captured)> {
        let mut cache = RowCache::reusing(row, previous)?;
        let (t, tokens) = (&model.transformer, &row.rendered.tokens);
        let start = cache.kv.len();
        let mut capture = Hooks::capture(NamesFilter::Only(points.to_vec()), CaptureRows::All);
        let logits = t.forward(
            &tokens[start..],
            &mut cache.kv,
            &mut capture,
            &LogitsAt::Last,
        )?;
        let (scores, scored) = score_prompt(
            t,
            &mut cache.kv,
            &mut [Hooks::none()],
            &logits,
            &row.rendered.continuations,
            None,
        )?;
        let shared = row.rendered.shared_answer_prefix();
        let mut answer = Hooks::capture(NamesFilter::Only(points.to_vec()), CaptureRows::All);
        if !shared.is_empty() {
            t.forward(shared, &mut cache.kv, &mut answer, &LogitsAt::None)?;
            cache.kv.truncate(tokens.len())?;
        }
        count.computed += tokens.len() - start + scored + shared.len();
        count.naive += tokens.len() + scored;
        cache.clean = tokens.len();
        let captured = Captured {
            prompt: capture.cache,
            from: start,
            prompt_len: tokens.len(),
            answer: answer.cache,
        };
        Ok((cache, scores, captured))
    }

    /// Runs the row with `hooks` (edits at positions ≥ `start`, absolute) and
    /// scores its continuations; positions before `start` come from the clean
    /// cache. The prompt runs with `hooks[0]`, continuation i with `hooks[i]`
    /// (the last entry past the end: one entry serves all). `from` (a block and
    /// the `hook_resid_pre` rows a clean run from the same `start` captured
    /// there) lets a one-entry run skip the blocks below, which its edits
    /// cannot change; it is ignored where the run is not one token tree.
    pub fn run_edited(
        &mut self,
        model: &Model,
        row: &Row,
        start: usize,
        hooks: &mut [Hooks],
        count: &mut TokenCount,
        from: Option<(usize, &Tensor)>,
    ) -> Result<Scores> {
        let tokens = &row.rendered.tokens;
        let start = start.min(tokens.len() - 1);
        if start > self.clean {
            // A previous edit dirtied positions the new one keeps: recompute them clean.
            self.kv.truncate(self.clean)?;
            model.transformer.forward(
                &tokens[self.clean..start],
                &mut self.kv,
                &mut Hooks::none(),
                &LogitsAt::None,
            )?;
            count.computed += start - self.clean;
            self.clean = start;
        }
        let t = &model.transformer;
        self.kv.truncate(start)?;
        let rest = &tokens[start..];
        // One hooks entry: the rest of the prompt and every continuation as one token tree.
        if let [one] = hooks {
            let named = &row.rendered.continuations;
            if let Some((scores, n)) =
                score_rest_as_tree(t, &mut self.kv, one, rest, named, None, from)?
            {
                count.computed += n;
                count.naive += start + n;
                self.clean = start;
                return Ok(scores);
            }
        }
        let scores = self.forward_and_score(model, row, start, hooks, count)?;
        self.clean = start;
        Ok(scores)
    }

    /// The unedited run from `start` (as [`run_edited`](Self::run_edited) with
    /// no hooks), also capturing `hook_resid_pre` at the blocks of `points`:
    /// what [`Clean::resume`] hands edited runs from the same `start`, so that
    /// each skips the blocks below its edit.
    pub fn run_clean(
        &mut self,
        model: &Model,
        row: &Row,
        start: usize,
        points: &[HookPoint],
        count: &mut TokenCount,
    ) -> Result<Clean> {
        let blocks: BTreeSet<usize> = points.iter().filter_map(HookPoint::layer).collect();
        let mut hooks = Hooks::capture(
            NamesFilter::Only(blocks.into_iter().map(HookPoint::ResidPre).collect()),
            CaptureRows::All,
        );
        let scores = self.run_edited(
            model,
            row,
            start,
            std::slice::from_mut(&mut hooks),
            count,
            None,
        )?;
        // Where the run was not one tree (an activated adapter's walk), edited
        // runs from this start cannot be one either, and never read these rows.
        Ok(Clean {
            scores,
            resid_pre: hooks.cache,
        })
    }

    fn forward_and_score(
        &mut self,
        model: &Model,
        row: &Row,
        start: usize,
        hooks: &mut [Hooks],
        count: &mut TokenCount,
    ) -> Result<Scores> {
        let t = &model.transformer;
        let tokens = &row.rendered.tokens;
        self.kv.truncate(start)?;
        let logits = t.forward(
            &tokens[start..],
            &mut self.kv,
            &mut hooks[0],
            &LogitsAt::Last,
        )?;
        let (scores, scored) = score_prompt(
            t,
            &mut self.kv,
            hooks,
            &logits,
            &row.rendered.continuations,
            None,
        )?;
        count.computed += tokens.len() - start + scored;
        count.naive += tokens.len() + scored;
        Ok(scores)
    }
}

/// Serialises a list by its items' `Display` (hook names, positions).
fn names<S: serde::Serializer, T: std::fmt::Display>(
    items: &[T],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(items.iter().map(|i| i.to_string()))
}

/// Serialises a value by its `Display` (filters).
pub(crate) fn display<S: serde::Serializer, T: std::fmt::Display>(
    item: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(item)
}

/// `p_accept` of scores that have both tags (rows are checked on loading).
pub fn p_accept(scores: &Scores) -> f64 {
    scores.p_accept().unwrap_or(f64::NAN)
}

/// Writes a finished run: `rows.jsonl`, then the report under `marker`, last,
/// so a directory with the marker always holds a complete run.
pub fn write_run(
    dir: &Path,
    marker: &str,
    records: &str,
    report: &impl serde::Serialize,
) -> Result<()> {
    write_atomic(&dir.join("rows.jsonl"), records.as_bytes())?;
    let json = serde_json::to_string_pretty(report).expect("reports serialise");
    write_atomic(&dir.join(marker), json.as_bytes())
}

/// Prepares an output directory: refuses one holding a finished run of `kind`
/// (`steer.json`, ...) unless `force`, and removes the marker so a killed run
/// never looks finished.
pub fn prepare_out(dir: &Path, marker: &str, force: bool) -> Result<()> {
    if dir.join(marker).exists() && !force {
        return Err(Error::BadInput(format!(
            "{}: already holds a run ({marker}); pass --force to overwrite it or choose another --out",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    match std::fs::remove_file(dir.join(marker)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(dir.join(marker), e)),
        _ => Ok(()),
    }
}
