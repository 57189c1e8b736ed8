//! `afprobe store verify|merge|info`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::format::{Manifest, ShardRecord, ROWS};
use super::reader::{Shard, Store};
use super::writer::{Existing, StoreWriter};
use crate::error::{Error, Result};
use crate::io::sha256_file;

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
        for name in m.tensor_names()? {
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
            check_finite_rows(t, &name, &shard.path)?;
        }
        for (i, r) in store.rows()[row..row + n].iter().enumerate() {
            // A score that is present must be a number: null is what a NaN becomes in JSON.
            for key in ["p_accept", "tag_mass", "p_refuse"] {
                if r.get(key)
                    .is_some_and(|v| !v.as_f64().is_some_and(f64::is_finite))
                {
                    return Err(Error::BadInput(format!(
                        "{}:{}: `{key}` is {} instead of a probability: the row's scores were \
                         not finite (NaN logits: check the model's weights with `afprobe model \
                         info`), so gap and probes cannot use it; capture the store again",
                        dir.join(ROWS).display(),
                        row + i + 1,
                        r[key]
                    )));
                }
            }
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
        m.tensor_names()?.len() + 2,
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

/// Errors unless every value of the activation tensor `name` (`[rows, d]`) is
/// finite, naming the shard, the tensor and the first bad row.
fn check_finite_rows(t: &candle_core::Tensor, name: &str, shard: &Path) -> Result<()> {
    let d = t.dim(1)?.max(1);
    let values = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    match values.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::model_file(
            shard,
            format!(
                "tensor `{name}` holds the non-finite value {} at row {} (column {}) of the \
                 shard: the model produced NaN or infinite activations (check its weights with \
                 `afprobe model info`); probes on this tensor would be meaningless",
                values[i],
                i / d,
                i % d
            ),
        )),
    }
}
