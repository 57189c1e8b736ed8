//! Reading a store: rows, labels and activations by tensor name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ndarray::Array2;
use serde_json::Value;

use super::format::{read_manifest, Manifest, ROWS};
use crate::error::{Error, Result};
use crate::io::check_safetensors;

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
        let text = crate::io::read_to_string(&rows_path)?;
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
            parts.push(shard.load(name, self.manifest.model.d_model)?);
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
        let names = self.manifest.tensor_names()?;
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
        check_safetensors(&self.path)?;
        let map = candle_core::safetensors::load(&self.path, &Device::Cpu)
            .map_err(|e| Error::model_file(&self.path, format!("cannot read shard: {e}")))?;
        Ok(map.into_iter().collect())
    }

    /// One 2-D tensor of the shard as f32: `[rows, d_model]` with the block's
    /// rows, or one row per token for `@all` (errors name the shard and tensor).
    pub fn load(&self, name: &str, d_model: usize) -> Result<Array2<f32>> {
        let header = check_safetensors(&self.path)?;
        let rows = self.rows[1] - self.rows[0];
        let ragged = name.ends_with("@all");
        let fits = |shape: &[usize]| match shape {
            [r, c] => *c == d_model && (ragged || *r == rows),
            _ => false,
        };
        let Some(h) = header.get(name) else {
            return Err(Error::model_file(
                &self.path,
                format!("missing tensor `{name}`"),
            ));
        };
        if !fits(&h.shape) || !matches!(h.dtype.as_str(), "F32" | "F16") {
            let want = if ragged {
                "tokens".to_string()
            } else {
                rows.to_string()
            };
            return Err(Error::model_file(
                &self.path,
                format!(
                    "tensor `{name}` is {} {:?}, expected F32 or F16 [{want}, {d_model}]",
                    h.dtype, h.shape
                ),
            ));
        }
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
