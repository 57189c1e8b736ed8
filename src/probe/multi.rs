//! Multi-layer probes (`--multi-layer 10-14`, `--layer-window 3`): one probe on
//! the concatenated standardised activations of a set of layers (`concat`), and
//! the mean of the per-layer probes' out-of-fold scores (`mean-score`), on the
//! main evaluation, reported beside the single layers.

use rayon::prelude::*;

use super::cv::{cross_validate, summarize, OutOfFold};
use super::{derive_seed, metric_row, Context, TensorResult};
use crate::error::{Error, Result};
use crate::model::parse_layer_list;
use crate::store::{Position, Store, TensorName};

/// The layer sets to probe together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MultiLayer {
    /// Explicit sets (`--multi-layer`, each `a-b` or `a,b,c`).
    pub sets: Vec<String>,
    /// Sliding windows of this many consecutive layers (`--layer-window`).
    pub window: Option<usize>,
}

impl MultiLayer {
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty() && self.window.is_none()
    }

    /// The layer sets, checked against the model.
    pub fn resolve(&self, n_layers: usize) -> Result<Vec<Vec<usize>>> {
        let mut out = Vec::new();
        for s in &self.sets {
            let set = parse_layer_list("--multi-layer", s, n_layers)?;
            if set.len() < 2 {
                return Err(Error::BadInput(format!(
                    "--multi-layer {s:?}: a multi-layer probe needs at least two layers"
                )));
            }
            out.push(set);
        }
        if let Some(w) = self.window {
            if w < 2 || w > n_layers {
                return Err(Error::BadInput(format!(
                    "--layer-window {w}: the window must be 2 to {n_layers} layers (the model has \
                     layers 0-{})",
                    n_layers.saturating_sub(1)
                )));
            }
            out.extend((0..=n_layers - w).map(|a| (a..a + w).collect()));
        }
        Ok(out)
    }
}

/// One multi-layer probe: a set of stored tensors of one hook kind and position.
pub(super) struct Group {
    /// `blocks.10-14.hook_resid_post@last` style label (`+` between non-consecutive layers).
    pub(super) name: String,
    pub(super) hook: String,
    pub(super) position: Position,
    pub(super) layers: Vec<usize>,
    pub(super) members: Vec<String>,
}

/// The multi-layer groups over the selected tensors: per hook kind and
/// position, each layer set (every member must be among the tensors).
pub(super) fn groups(tensors: &[String], sets: &[Vec<usize>]) -> Result<Vec<Group>> {
    let mut kinds: Vec<(String, Position)> = Vec::new();
    for t in tensors {
        let TensorName { hook, position } = t.parse()?;
        if let Some(l) = hook.layer() {
            let kind = hook.to_string().replacen(&format!(".{l}."), ".{}.", 1);
            if !kinds.contains(&(kind.clone(), position)) {
                kinds.push((kind, position));
            }
        }
    }
    let mut out = Vec::new();
    for (kind, position) in &kinds {
        for set in sets {
            let members: Vec<String> = set
                .iter()
                .map(|l| format!("{}@{position}", kind.replacen("{}", &l.to_string(), 1)))
                .collect();
            if let Some(missing) = members.iter().find(|m| !tensors.contains(m)) {
                return Err(Error::BadInput(format!(
                    "multi-layer probe: `{missing}` is not among the probed tensors (the store or \
                     --hooks/--layers leave it out)"
                )));
            }
            let consecutive = set.windows(2).all(|w| w[1] == w[0] + 1);
            let label = if consecutive {
                format!("{}-{}", set[0], set[set.len() - 1])
            } else {
                set.iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join("+")
            };
            let hook = kind.replacen("{}", &label, 1);
            out.push(Group {
                name: format!("{hook}@{position}"),
                hook,
                position: *position,
                layers: set.clone(),
                members,
            });
        }
    }
    Ok(out)
}

/// The concatenated and mean-score probes of every group, per method, on the main evaluation.
pub(super) fn probe_groups(
    store: &Store,
    groups: &[Group],
    offset: u64,
    ctx: &Context,
) -> Vec<(usize, Result<TensorResult>)> {
    groups
        .par_iter()
        .enumerate()
        .map(|(i, g)| (i, probe_group(store, g, offset + i as u64, ctx)))
        .collect()
}

fn probe_group(store: &Store, g: &Group, index: u64, ctx: &Context) -> Result<TensorResult> {
    let xs: Vec<ndarray::Array2<f32>> = g
        .members
        .iter()
        .map(|m| store.load(m))
        .collect::<Result<_>>()?;
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let concat = ndarray::concatenate(ndarray::Axis(1), &views)
        .map_err(|e| Error::BadInput(format!("{}: {e}", g.name)))?;
    super::check_finite(&concat, &ctx.used)?;
    let spec = ctx.spec;
    let y = &ctx.labels.y;
    let (plan, train, tests) = &ctx.plans[0];
    let main = std::slice::from_ref(&tests[0]);
    let mut metrics = Vec::new();
    for (mi, &method) in spec.methods.iter().enumerate() {
        let seed = derive_seed(spec.seed, &[index, mi as u64, 11]);
        let cv = |x: ndarray::ArrayView2<f32>| -> Result<OutOfFold> {
            let mut o = cross_validate(x, y, &ctx.folds, train, main, method, &spec.fit)?;
            Ok(o.remove(0))
        };
        let joint = cv(concat.view())?;
        // Mean of the per-layer scores: the folds and rows are the same for every layer.
        let mut mean = cv(xs[0].view())?;
        for x in &xs[1..] {
            let o = cv(x.view())?;
            mean.scores
                .iter_mut()
                .zip(&o.scores)
                .for_each(|(a, b)| *a += b);
            mean.unconverged += o.unconverged;
        }
        let k = xs.len() as f64;
        mean.scores.iter_mut().for_each(|s| *s /= k);
        for (combine, oof) in [("concat", joint), ("mean-score", mean)] {
            let scores = summarize(&oof, y, &ctx.groups, spec.bootstrap, seed);
            let mut row = metric_row(
                &g.hook,
                g.position,
                None,
                method,
                plan,
                &plan.tests[0],
                scores,
                None,
                Default::default(),
            );
            row.extra.layers = g.layers.clone();
            row.extra.combine = Some(combine.into());
            metrics.push(row);
        }
    }
    Ok(TensorResult {
        metrics,
        weights: Vec::new(),
        distinct: 0,
        used: 0,
    })
}
