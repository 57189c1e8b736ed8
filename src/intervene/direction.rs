//! Where a steering or ablation direction comes from: a probe directory, a
//! mean difference in an activation store, or a vector file. Every direction
//! is returned as a unit vector in the residual basis.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::probe::{self, Labels};
use crate::rows::{Filter, Table};
use crate::run_dir::RunKind;
use crate::store::{Position, Store, TensorName};

/// `--direction`: what to read a direction from.
#[derive(Debug, Clone, PartialEq)]
pub enum DirectionSource {
    /// `probes/NAME`: the unit direction of a fitted probe (`{tensor}.{method}.direction`).
    Probe { dir: PathBuf, method: String },
    /// `activations/NAME`: mean(positive rows) − mean(negative rows) of a
    /// label, over the rows that pass `filter` (e.g. `training_implied` on
    /// `variation=standard,cue=natural`).
    MeanDiff {
        dir: PathBuf,
        label: String,
        positive: Option<String>,
        filter: Filter,
    },
    /// A `.safetensors` file holding one vector (`[d_model]` or `[1, d_model]`),
    /// or a `.json` array of numbers.
    File(PathBuf),
}

impl DirectionSource {
    /// The probe method whose direction is read by default.
    pub const DEFAULT_METHOD: &'static str = "logistic";
    /// The label whose class means give a store's direction by default.
    pub const DEFAULT_LABEL: &'static str = "tier";

    /// Reads `--direction PATH`: a probe directory (has report.json), a store
    /// (has manifest.json; its rows that pass `filter` give the mean
    /// difference), or a vector file.
    pub fn parse(
        path: &Path,
        method: &str,
        label: &str,
        positive: Option<&str>,
        filter: &Filter,
    ) -> Result<Self> {
        let kind = RunKind::detect(path);
        if kind == Some(RunKind::Probes) {
            Ok(DirectionSource::Probe {
                dir: path.into(),
                method: method.into(),
            })
        } else if kind == Some(RunKind::Activations) {
            Ok(DirectionSource::MeanDiff {
                dir: path.into(),
                label: label.into(),
                positive: positive.map(String::from),
                filter: filter.clone(),
            })
        } else if path.is_file() {
            Ok(DirectionSource::File(path.into()))
        } else {
            Err(Error::BadInput(format!(
                "--direction {}: neither a probe directory (report.json), an activation store \
                 (manifest.json) nor a vector file",
                path.display()
            )))
        }
    }

    /// The unit direction for `tensor` (`{hook}@{position}`, e.g.
    /// `blocks.12.hook_resid_post@last`), of width `d_model`.
    pub fn unit(&self, tensor: &str, d_model: usize) -> Result<Vec<f32>> {
        let (v, what) = match self {
            DirectionSource::Probe { dir, method } => {
                let key = format!("{tensor}.{method}.direction");
                let v = probe::load_vector(dir, &key).map_err(|_| {
                    Error::BadInput(format!(
                        "{}: the probe directory has no direction for `{tensor}` ({method}); \
                         probe that hook, layer and position, or pick one it has with \
                         --direction-tensor (see {}/report.json)",
                        dir.display(),
                        dir.display()
                    ))
                })?;
                (v, format!("{}: `{key}`", dir.display()))
            }
            DirectionSource::MeanDiff {
                dir,
                label,
                positive,
                filter,
            } => (
                mean_difference(dir, tensor, label, positive.as_deref(), filter)?,
                format!(
                    "{}: mean difference of `{label}` at `{tensor}` over rows {filter}",
                    dir.display()
                ),
            ),
            DirectionSource::File(path) => (read_vector_file(path)?, path.display().to_string()),
        };
        if v.len() != d_model {
            return Err(Error::BadInput(format!(
                "{what}: the direction has {} values, but the model's residual stream has \
                 d_model = {d_model}",
                v.len()
            )));
        }
        normalise(v, &what)
    }
}

impl std::fmt::Display for DirectionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirectionSource::Probe { dir, method } => {
                write!(f, "probe {} ({method})", dir.display())
            }
            DirectionSource::MeanDiff {
                dir,
                label,
                positive,
                filter,
            } => write!(
                f,
                "mean difference of {label}{} in {} (rows {filter})",
                positive.as_ref().map_or(String::new(), |p| format!("={p}")),
                dir.display()
            ),
            DirectionSource::File(p) => write!(f, "vector file {}", p.display()),
        }
    }
}

/// A uniformly random unit vector (normalised Gaussian draws, Box–Muller).
pub fn random_unit(d: usize, rng: &mut impl rand::Rng) -> Vec<f32> {
    loop {
        let v: Vec<f32> = (0..d)
            .map(|_| {
                let (u1, u2): (f64, f64) =
                    (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        if let Ok(unit) = normalise(v, "random direction") {
            return unit;
        }
    }
}

/// `v / ‖v‖`; a zero or non-finite vector is an error naming its source.
pub fn normalise(v: Vec<f32>, what: &str) -> Result<Vec<f32>> {
    let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(Error::BadInput(format!(
            "{what}: the direction is zero or not finite, so it has no orientation"
        )));
    }
    Ok(v.into_iter().map(|x| (x as f64 / norm) as f32).collect())
}

fn mean_difference(
    dir: &Path,
    tensor: &str,
    label: &str,
    positive: Option<&str>,
    filter: &Filter,
) -> Result<Vec<f32>> {
    let store = Store::open(dir)?;
    if tensor
        .parse::<TensorName>()
        .is_ok_and(|t| t.position == Position::All)
    {
        return Err(Error::BadInput(format!(
            "{}: a mean difference needs one vector per row; `{tensor}` is ragged",
            dir.display()
        )));
    }
    let acts = store.load(tensor)?;
    let table = Table::from_store(&store);
    let labels = Labels::read(&table, label, positive)?;
    let keep = filter.mask(&table)?;
    let d = acts.ncols();
    let (mut pos, mut neg) = (vec![0f64; d], vec![0f64; d]);
    let (mut n_pos, mut n_neg) = (0usize, 0usize);
    for ((row, y), keep) in acts.rows().into_iter().zip(&labels.y).zip(keep) {
        let (sum, n) = match y {
            Some(true) if keep => (&mut pos, &mut n_pos),
            Some(false) if keep => (&mut neg, &mut n_neg),
            _ => continue,
        };
        for (s, x) in sum.iter_mut().zip(row) {
            *s += *x as f64;
        }
        *n += 1;
    }
    if n_pos == 0 || n_neg == 0 {
        return Err(Error::BadInput(format!(
            "{}: a mean difference of `{label}` needs rows of both classes among the rows \
             {filter}; found {n_pos} positive and {n_neg} negative (change --direction-filter or \
             --label)",
            dir.display()
        )));
    }
    Ok(pos
        .iter()
        .zip(&neg)
        .map(|(p, q)| (p / n_pos as f64 - q / n_neg as f64) as f32)
        .collect())
}

/// One vector from a `.safetensors` file (its only tensor, `[d]` or `[1, d]`) or a JSON array.
fn read_vector_file(path: &Path) -> Result<Vec<f32>> {
    let bad = |msg: String| Error::BadInput(format!("{}: {msg}", path.display()));
    let bytes = crate::io::read(path)?;
    if path.extension().is_some_and(|e| e == "json") {
        let values: Vec<f32> = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("not a JSON array of numbers: {e}")))?;
        return Ok(values);
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        bad(format!(
            "not a safetensors file ({e}); give a .safetensors file with one vector or a .json array"
        ))
    })?;
    let names = st.names();
    let [name] = names.as_slice() else {
        return Err(bad(format!(
            "holds {} tensors; a direction file holds exactly one vector",
            names.len()
        )));
    };
    let view = st.tensor(name).map_err(|e| bad(e.to_string()))?;
    let shape = view.shape();
    let is_vector = shape.len() == 1 || (shape.len() == 2 && shape[0] == 1);
    if !is_vector {
        return Err(bad(format!(
            "tensor `{name}` has shape {shape:?}; a direction is a vector ([d_model] or [1, d_model])"
        )));
    }
    if view.dtype() != safetensors::Dtype::F32 {
        return Err(bad(format!(
            "tensor `{name}` is {:?}; write the direction as float32",
            view.dtype()
        )));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}
