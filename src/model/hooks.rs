//! Hook points (TransformerLens names) and the hooks that read or write them.
//!
//! A [`HookPoint`] parses from and prints as the TransformerLens string
//! (`blocks.12.hook_resid_post`), so the CLI, the activation store and the code
//! share one spelling and typos fail at parse time. [`Hooks`] is what the
//! forward pass calls at every point: it applies the edits registered there
//! (steering, patching, ablation) and then captures the result if the names
//! filter asks for it. Points with neither cost one hash lookup.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, IndexOp, Tensor};

use crate::error::{Error, Result};

/// A named place in the forward pass where activations can be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// Token embeddings (`hook_embed`).
    Embed,
    /// Residual stream entering block `l` (`blocks.{l}.hook_resid_pre`).
    ResidPre(usize),
    /// Attention output of block `l`, after `o_proj` (`blocks.{l}.hook_attn_out`).
    AttnOut(usize),
    /// Residual after attention, before the MLP (`blocks.{l}.hook_resid_mid`).
    ResidMid(usize),
    /// MLP output of block `l` (`blocks.{l}.hook_mlp_out`).
    MlpOut(usize),
    /// Raw residual after block `l`, before any final norm (`blocks.{l}.hook_resid_post`).
    ResidPost(usize),
    /// Final RMSNorm output, the input of the unembedding (`ln_final.hook_normalized`).
    LnFinal,
    /// Queries after q-norm and rope, `[pos, head, d_head]` (`blocks.{l}.attn.hook_q`).
    AttnQ(usize),
    /// Keys after k-norm and rope, `[pos, kv_head, d_head]` (`blocks.{l}.attn.hook_k`).
    AttnK(usize),
    /// Values, `[pos, kv_head, d_head]` (`blocks.{l}.attn.hook_v`).
    AttnV(usize),
    /// Per-head attention output before `o_proj`, `[pos, head, d_head]` (`blocks.{l}.attn.hook_z`).
    AttnZ(usize),
    /// Attention weights after the softmax, `[query_pos, head, key_pos]`
    /// (`blocks.{l}.attn.hook_pattern`; TransformerLens orders it
    /// `[head, query_pos, key_pos]`: `permute((1, 0, 2))`). Rows of earlier calls
    /// are padded with zeros to the latest key length (keys they could not see).
    AttnPattern(usize),
}

/// Where a hook kind's TransformerLens name sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookScope {
    /// Once per model (`hook_embed`, `ln_final.hook_normalized`).
    Model,
    /// Once per block, on the residual stream (`blocks.{l}.hook_resid_post`).
    Block,
    /// Once per block inside attention, capture only (`blocks.{l}.attn.hook_q`).
    Attention,
}

/// One hook kind: its short name (`--hooks`, `--hook`), its TransformerLens
/// name (after `blocks.{l}.` for per-block kinds), and its point at a layer.
pub struct HookKind {
    pub short: &'static str,
    pub name: &'static str,
    pub scope: HookScope,
    at: fn(usize) -> HookPoint,
}

/// Every hook kind, declared once, in forward order (attention internals
/// last). Names, parsing, the lists in `--help` and the unknown-hook error all
/// derive from this table; a new kind is a variant, a row here and an arm in
/// [`HookPoint::kind`].
#[rustfmt::skip]
pub const HOOK_KINDS: [HookKind; 12] = [
    HookKind { short: "embed", name: "hook_embed", scope: HookScope::Model, at: |_| HookPoint::Embed },
    HookKind { short: "resid_pre", name: "hook_resid_pre", scope: HookScope::Block, at: HookPoint::ResidPre },
    HookKind { short: "attn_out", name: "hook_attn_out", scope: HookScope::Block, at: HookPoint::AttnOut },
    HookKind { short: "resid_mid", name: "hook_resid_mid", scope: HookScope::Block, at: HookPoint::ResidMid },
    HookKind { short: "mlp_out", name: "hook_mlp_out", scope: HookScope::Block, at: HookPoint::MlpOut },
    HookKind { short: "resid_post", name: "hook_resid_post", scope: HookScope::Block, at: HookPoint::ResidPost },
    HookKind { short: "ln_final", name: "ln_final.hook_normalized", scope: HookScope::Model, at: |_| HookPoint::LnFinal },
    HookKind { short: "q", name: "attn.hook_q", scope: HookScope::Attention, at: HookPoint::AttnQ },
    HookKind { short: "k", name: "attn.hook_k", scope: HookScope::Attention, at: HookPoint::AttnK },
    HookKind { short: "v", name: "attn.hook_v", scope: HookScope::Attention, at: HookPoint::AttnV },
    HookKind { short: "z", name: "attn.hook_z", scope: HookScope::Attention, at: HookPoint::AttnZ },
    HookKind { short: "pattern", name: "attn.hook_pattern", scope: HookScope::Attention, at: HookPoint::AttnPattern },
];

/// The kinds of `scopes`, in table order.
pub fn hook_kinds(scopes: &[HookScope]) -> impl Iterator<Item = &'static HookKind> + '_ {
    HOOK_KINDS.iter().filter(move |k| scopes.contains(&k.scope))
}

/// Short names of the kinds of `scopes`, comma-separated (for help texts).
pub fn short_kinds(scopes: &[HookScope]) -> String {
    hook_kinds(scopes)
        .map(|k| k.short)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The full names of the model-level and per-block kinds, with `{l}` for the
/// layer, comma-separated (for help and error texts).
pub fn hook_names() -> String {
    hook_kinds(&[HookScope::Model, HookScope::Block])
        .map(|k| k.template())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The error for an unknown hook name, listing the valid ones.
fn unknown_hook(name: &str) -> Error {
    let internals: Vec<&str> = hook_kinds(&[HookScope::Attention])
        .map(|k| k.name.trim_start_matches("attn."))
        .collect();
    Error::UnknownHook {
        name: name.to_string(),
        valid: format!(
            "valid names are {}, and (capture only, library API) blocks.{{l}}.attn.{} (short \
             kinds for --hooks: {})",
            hook_names(),
            internals.join(", "),
            short_kinds(&[HookScope::Model, HookScope::Block])
        ),
    }
}

impl HookKind {
    /// The TransformerLens name with `{l}` for the layer.
    fn template(&self) -> String {
        match self.scope {
            HookScope::Model => self.name.to_string(),
            _ => format!("blocks.{{l}}.{}", self.name),
        }
    }

    /// The kind of `scope` with short name `short`; an unknown-hook error otherwise.
    fn find(scope: HookScope, short: &str) -> Result<&'static HookKind> {
        hook_kinds(&[scope])
            .find(|k| k.short == short)
            .ok_or_else(|| unknown_hook(short))
    }
}

impl HookPoint {
    /// This point's kind (its row of [`HOOK_KINDS`]) and layer (0 for model-level points).
    pub fn kind(&self) -> (&'static HookKind, usize) {
        let (row, layer) = match *self {
            HookPoint::Embed => (0, 0),
            HookPoint::ResidPre(l) => (1, l),
            HookPoint::AttnOut(l) => (2, l),
            HookPoint::ResidMid(l) => (3, l),
            HookPoint::MlpOut(l) => (4, l),
            HookPoint::ResidPost(l) => (5, l),
            HookPoint::LnFinal => (6, 0),
            HookPoint::AttnQ(l) => (7, l),
            HookPoint::AttnK(l) => (8, l),
            HookPoint::AttnV(l) => (9, l),
            HookPoint::AttnZ(l) => (10, l),
            HookPoint::AttnPattern(l) => (11, l),
        };
        (&HOOK_KINDS[row], layer)
    }

    /// Block index for per-block points, `None` for `hook_embed` / `ln_final`.
    pub fn layer(&self) -> Option<usize> {
        match self.kind() {
            (k, _) if k.scope == HookScope::Model => None,
            (_, l) => Some(l),
        }
    }

    /// Whether this is an attention internal (`attn.hook_q` ...): computed only
    /// when asked for, and read-only.
    pub fn is_attention_internal(&self) -> bool {
        self.kind().0.scope == HookScope::Attention
    }

    /// An attention internal of layer `layer` by short kind (`q`, `k`, `v`, `z`, `pattern`).
    pub fn attention(kind: &str, layer: usize) -> Result<HookPoint> {
        Ok((HookKind::find(HookScope::Attention, kind)?.at)(layer))
    }

    /// Builds a per-block point from its short kind name (`resid_post`) and layer.
    pub fn block(kind: &str, layer: usize) -> Result<HookPoint> {
        Ok((HookKind::find(HookScope::Block, kind)?.at)(layer))
    }

    /// Every hook point of a model with `n_layers` blocks, in forward order
    /// (attention internals excepted).
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        let mut points = vec![HookPoint::Embed];
        for l in 0..n_layers {
            points.extend(hook_kinds(&[HookScope::Block]).map(|k| (k.at)(l)));
        }
        points.push(HookPoint::LnFinal);
        points
    }

    /// Errors if this point does not exist in a model with `n_layers` blocks.
    pub fn check_layer(&self, n_layers: usize) -> Result<()> {
        match self.layer() {
            Some(l) if l >= n_layers => Err(Error::BadInput(format!(
                "hook `{self}` names layer {l}, but the model has {n_layers} layers (0-{})",
                n_layers - 1
            ))),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            (k, _) if k.scope == HookScope::Model => f.write_str(k.name),
            (k, l) => write!(f, "blocks.{l}.{}", k.name),
        }
    }
}

impl FromStr for HookPoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<HookPoint> {
        if let Some(k) = hook_kinds(&[HookScope::Model]).find(|k| k.name == s) {
            return Ok((k.at)(0));
        }
        let unknown = || unknown_hook(s);
        let rest = s.strip_prefix("blocks.").ok_or_else(unknown)?;
        let (layer, name) = rest.split_once('.').ok_or_else(unknown)?;
        let layer: usize = layer.parse().map_err(|_| unknown())?;
        let kind = hook_kinds(&[HookScope::Block, HookScope::Attention])
            .find(|k| k.name == name)
            .ok_or_else(unknown)?;
        Ok((kind.at)(layer))
    }
}

/// Parses `--hooks` (short kinds `resid_post`, `embed`, `ln_final`, or full
/// TransformerLens names) and `--layers` (`all`, `0-29`, `0,5,10`, or a mix).
pub fn parse_hooks(hooks: &str, layers: &str, n_layers: usize) -> Result<Vec<HookPoint>> {
    let layers = parse_layers(layers, n_layers)?;
    let mut points = Vec::new();
    for item in hooks.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let short = HOOK_KINDS
            .iter()
            .find(|k| k.short == item && k.scope != HookScope::Attention);
        match short {
            Some(k) if k.scope == HookScope::Model => points.push((k.at)(0)),
            Some(k) => points.extend(layers.iter().map(|&l| (k.at)(l))),
            None => {
                let p: HookPoint = item.parse()?;
                p.check_layer(n_layers)?;
                points.push(p);
            }
        }
    }
    points.sort();
    points.dedup();
    if points.is_empty() {
        return Err(Error::BadInput("--hooks names no hook points".into()));
    }
    Ok(points)
}

fn parse_layers(spec: &str, n_layers: usize) -> Result<Vec<usize>> {
    parse_layer_list("--layers", spec, n_layers)
}

/// A layer list (`all`, `0-29`, `0,5,10`) for the command-line flag `flag`,
/// checked against the model's `n_layers`.
pub fn parse_layer_list(flag: &str, spec: &str, n_layers: usize) -> Result<Vec<usize>> {
    let bad = |msg: String| Error::BadInput(format!("{flag} {spec:?}: {msg}"));
    let mut layers = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if part == "all" {
            layers.extend(0..n_layers);
            continue;
        }
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("`{part}` is not a layer, a range a-b, or all")))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b || b >= n_layers {
            return Err(bad(format!(
                "`{part}` is out of range; the model has layers 0-{}",
                n_layers - 1
            )));
        }
        layers.extend(a..=b);
    }
    layers.sort_unstable();
    layers.dedup();
    if layers.is_empty() {
        return Err(bad("no layers".into()));
    }
    Ok(layers)
}

/// Which hook points to capture, like TransformerLens' `names_filter`.
#[derive(Debug, Clone, Default)]
pub enum NamesFilter {
    /// Capture nothing (the default: hooks cost nothing).
    #[default]
    None,
    /// Capture every hook point.
    All,
    /// Capture exactly these points.
    Only(Vec<HookPoint>),
}

impl NamesFilter {
    pub fn matches(&self, point: HookPoint) -> bool {
        match self {
            NamesFilter::None => false,
            NamesFilter::All => true,
            NamesFilter::Only(points) => points.contains(&point),
        }
    }
}

/// Which token rows of a captured activation to keep.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum CaptureRows {
    /// Every token of the forward call (`[T, d_model]`).
    #[default]
    All,
    /// Only the final token (`[1, d_model]`): what probes at `last` need.
    Last,
    /// These rows of the call, in this order (a token tree's rows that a
    /// batched capture stores).
    Rows(Vec<usize>),
}

/// A write to the residual stream (or any hook point) during the forward pass.
///
/// Positions are absolute token positions in the whole sequence, so an edit
/// registered once applies correctly when the prompt is run in pieces on top
/// of a shared-prefix KV cache.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Add `vector` (`[d_model]`) at the given positions (steering).
    Add {
        vector: Tensor,
        positions: Positions,
    },
    /// Replace the rows at `positions` with the rows of `values` (`[len, d_model]`), patching.
    Replace {
        positions: Vec<usize>,
        values: Tensor,
    },
    /// Remove the component along unit `direction` (`[d_model]`): x ← x − (x·d)d (ablation).
    ProjectOut {
        direction: Tensor,
        positions: Positions,
    },
    /// Call a function with the activation (TransformerLens' `fwd_hooks`; the
    /// Python API's hooks): it returns a replacement of the same shape, or
    /// `None` to leave the activation as it is.
    Call(HookFn),
}

/// The function of an [`Edit::Call`]: called with the point, the activation
/// `x` (`[T, d]` for the residual stream and block outputs, in the model's
/// dtype) and the absolute position of each row of `x`.
#[derive(Clone)]
pub struct HookFn(
    #[allow(clippy::type_complexity)]
    pub  Arc<dyn Fn(HookPoint, &Tensor, &[usize]) -> Result<Option<Tensor>> + Send + Sync>,
);

impl fmt::Debug for HookFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HookFn(..)")
    }
}

/// Which absolute positions an [`Edit`] touches.
#[derive(Debug, Clone, PartialEq)]
pub enum Positions {
    /// Every position.
    All,
    /// Every position from this one on (e.g. from the cue token onward).
    From(usize),
    /// Exactly these positions.
    At(Vec<usize>),
}

impl Positions {
    /// 0/1 mask over rows at the absolute positions `at`.
    fn mask(&self, at: &[usize]) -> Vec<f32> {
        at.iter()
            .map(|&p| match self {
                Positions::All => 1.0,
                Positions::From(first) => (p >= *first) as u8 as f32,
                Positions::At(ps) => ps.contains(&p) as u8 as f32,
            })
            .collect()
    }
}

/// Activations captured in one or more forward calls, by hook point.
#[derive(Debug, Default, Clone)]
pub struct ActivationCache {
    tensors: HashMap<HookPoint, Tensor>,
}

impl ActivationCache {
    /// The captured activation `[rows, d_model]` (f32, on the CPU), if the filter asked for it.
    pub fn get(&self, point: HookPoint) -> Option<&Tensor> {
        self.tensors.get(&point)
    }

    /// Like [`get`](Self::get), but a missing point is an error that names it.
    pub fn require(&self, point: HookPoint) -> Result<&Tensor> {
        self.get(point).ok_or_else(|| {
            Error::BadInput(format!(
                "hook `{point}` was not captured; add it to the names filter"
            ))
        })
    }

    pub fn points(&self) -> impl Iterator<Item = &HookPoint> {
        self.tensors.keys()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// The hooks a forward pass calls: edits to apply and a names filter for capture.
#[derive(Debug, Default, Clone)]
pub struct Hooks {
    filter: NamesFilter,
    rows: CaptureRows,
    edits: HashMap<HookPoint, Vec<Edit>>,
    /// What the filter captured during the last forward calls.
    pub cache: ActivationCache,
}

impl Hooks {
    /// The rows a [`CaptureRows::Rows`] capture keeps; `None` for another kind.
    pub(super) fn captured_rows(&self) -> Option<Vec<usize>> {
        match &self.rows {
            CaptureRows::Rows(rows) => Some(rows.clone()),
            _ => None,
        }
    }

    pub(super) fn set_captured_rows(&mut self, rows: Vec<usize>) {
        self.rows = CaptureRows::Rows(rows);
    }

    /// Joins what a first piece of a call captured (`first`) to what the
    /// second piece left in the cache, point by point, as rows `order` of the two.
    pub(super) fn join_capture(&mut self, first: &ActivationCache, order: &Tensor) -> Result<()> {
        for (point, second) in self.cache.tensors.iter_mut() {
            if let Some(first) = first.tensors.get(point) {
                *second = Tensor::cat(&[first, &*second], 0)?.index_select(order, 0)?;
            }
        }
        Ok(())
    }

    /// No capture, no edits: the plain forward pass.
    pub fn none() -> Hooks {
        Hooks::default()
    }

    /// Capture the points that `filter` selects, keeping `rows` of each.
    pub fn capture(filter: NamesFilter, rows: CaptureRows) -> Hooks {
        Hooks {
            filter,
            rows,
            ..Hooks::default()
        }
    }

    /// Registers an edit at `point`; several edits at one point apply in order.
    pub fn add_edit(&mut self, point: HookPoint, edit: Edit) -> &mut Self {
        self.edits.entry(point).or_default().push(edit);
        self
    }

    /// Checks every registered point exists in a model with `n_layers` blocks.
    pub fn check(&self, n_layers: usize) -> Result<()> {
        if let NamesFilter::Only(points) = &self.filter {
            points.iter().try_for_each(|p| p.check_layer(n_layers))?;
        }
        if let Some(p) = self.edits.keys().find(|p| p.is_attention_internal()) {
            return Err(Error::BadInput(format!(
                "`{p}` is capture only: edit hook_attn_out, the residual stream or hook_mlp_out instead"
            )));
        }
        self.edits.keys().try_for_each(|p| p.check_layer(n_layers))
    }

    /// Whether anything happens at `point`; the forward pass skips the call otherwise.
    #[inline]
    pub fn is_active(&self, point: HookPoint) -> bool {
        self.filter.matches(point) || self.edits.contains_key(&point)
    }

    /// Called by the forward pass at `point` with activations `x` (`[T, d]`) whose
    /// rows sit at the absolute positions `at` (`[start, start + T)` for one
    /// sequence; a token tree's rows share positions across branches). Returns
    /// the (possibly edited) `x`.
    pub fn run(&mut self, point: HookPoint, x: Tensor, at: &[usize]) -> Result<Tensor> {
        if !self.is_active(point) {
            return Ok(x);
        }
        let mut x = x;
        if let Some(edits) = self.edits.get(&point) {
            for edit in edits {
                x = apply_edit(point, edit, &x, at)?;
            }
        }
        if self.filter.matches(point) {
            let kept = match &self.rows {
                CaptureRows::All => x.clone(),
                CaptureRows::Last => x.i(x.dim(0)? - 1..)?,
                CaptureRows::Rows(rows) => {
                    let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                    x.index_select(&Tensor::new(rows, x.device())?, 0)?
                }
            };
            // f32 on the CPU, wherever the model runs: captures go to stores and arrays.
            let kept = kept
                .to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?;
            // Successive calls (prefix, then suffix; or generation steps) append rows.
            let merged = match (self.rows.clone(), self.cache.tensors.remove(&point)) {
                (CaptureRows::All, Some(prev)) => {
                    // Patterns: earlier rows saw fewer keys; their weight on later keys is 0.
                    let prev = match (prev.dims(), kept.dims()) {
                        (&[_, _, a], &[_, _, b]) if a < b => prev.pad_with_zeros(2, 0, b - a)?,
                        _ => prev,
                    };
                    Tensor::cat(&[&prev, &kept], 0)?
                }
                _ => kept,
            };
            self.cache.tensors.insert(point, merged);
        }
        Ok(x)
    }
}

fn apply_edit(point: HookPoint, edit: &Edit, x: &Tensor, at: &[usize]) -> Result<Tensor> {
    let (len, d_model) = x.dims2()?;
    debug_assert_eq!(at.len(), len, "one position per row");
    let check_vector = |v: &Tensor, what: &str| -> Result<Tensor> {
        if v.dims() != [d_model] {
            return Err(Error::BadInput(format!(
                "{what} has shape {:?}, but the residual stream has d_model = {d_model}",
                v.dims()
            )));
        }
        // (edits are made on the CPU; the activation may live on a GPU)
        Ok(v.to_device(x.device())?
            .to_dtype(x.dtype())?
            .reshape((1, d_model))?)
    };
    let column = |positions: &Positions| -> Result<Tensor> {
        let mask = positions.mask(at);
        Ok(Tensor::from_vec(mask, (len, 1), x.device())?.to_dtype(x.dtype())?)
    };
    Ok(match edit {
        Edit::Add { vector, positions } => {
            let v = check_vector(vector, "steering vector")?;
            (x + column(positions)?.broadcast_mul(&v)?)?
        }
        Edit::ProjectOut {
            direction,
            positions,
        } => {
            let d = check_vector(direction, "ablation direction")?;
            let coeff = x.broadcast_mul(&d)?.sum_keepdim(1)?; // [len, 1]
            (x - (coeff * column(positions)?)?.broadcast_mul(&d)?)?
        }
        Edit::Call(f) => match (f.0)(point, x, at)? {
            None => x.clone(),
            Some(y) if y.dims() == x.dims() => y.to_device(x.device())?.to_dtype(x.dtype())?,
            Some(y) => {
                return Err(Error::BadInput(format!(
                    "the hook function at `{point}` returned shape {:?} for an activation of \
                     shape {:?}; return an array of the same shape, or None to keep the activation",
                    y.dims(),
                    x.dims()
                )))
            }
        },
        Edit::Replace { positions, values } => {
            let (n, dv) = values.dims2()?;
            if n != positions.len() || dv != d_model {
                return Err(Error::BadInput(format!(
                    "patch values have shape [{n}, {dv}] for {} positions of width {d_model}",
                    positions.len()
                )));
            }
            // For each row of the window: which row of `values` replaces it, if any.
            let mut source = vec![0u32; len];
            let mut replaced = vec![0u8; len];
            for (row, &p) in positions.iter().enumerate() {
                for (r, _) in at.iter().enumerate().filter(|(_, &q)| q == p) {
                    source[r] = row as u32;
                    replaced[r] = 1;
                }
            }
            let dev = x.device();
            let rows = values
                .to_device(dev)?
                .to_dtype(x.dtype())?
                .index_select(&Tensor::new(source, dev)?, 0)?;
            let mask = Tensor::from_vec(replaced, (len, 1), dev)?.broadcast_as((len, d_model))?;
            // where_cond copies values exactly (no x + (v - x) rounding).
            mask.where_cond(&rows, x)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_in_the_table_names_parses_and_maps_back_to_its_row() {
        for (row, kind) in HOOK_KINDS.iter().enumerate() {
            let point = (kind.at)(3);
            let (back, layer) = point.kind();
            assert!(
                std::ptr::eq(back, &HOOK_KINDS[row]),
                "{} maps to row {row}",
                kind.short
            );
            let name = kind.template().replace("{l}", "3");
            assert_eq!(point.to_string(), name);
            assert_eq!(name.parse::<HookPoint>().unwrap(), point);
            assert_eq!(layer, if kind.scope == HookScope::Model { 0 } else { 3 });
        }
        let err = "blocks.0.hook_nope"
            .parse::<HookPoint>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blocks.{l}.attn.hook_q, hook_k, hook_v, hook_z, hook_pattern"),
            "{err}"
        );
        assert!(
            err.contains("resid_mid, mlp_out, resid_post, ln_final)"),
            "{err}"
        );
    }

    #[test]
    fn names_round_trip_through_display_and_parse() {
        for p in HookPoint::all(3) {
            assert_eq!(p.to_string().parse::<HookPoint>().unwrap(), p);
        }
        assert_eq!(HookPoint::all(3).len(), 2 + 3 * 5);
    }

    #[test]
    fn typos_fail_and_list_valid_names() {
        for bad in [
            "blocks.1.hook_resid_psot",
            "blocks.x.hook_resid_post",
            "hook_embed ",
            "resid_post",
        ] {
            let err = bad.parse::<HookPoint>().unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
            assert!(err.contains("blocks.{l}.hook_resid_post"), "{err}");
        }
    }

    #[test]
    fn edits_touch_only_their_positions() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::ones((4, 2), DType::F32, &dev)?;
        let v = Tensor::new(&[1f32, 2.0], &dev)?;
        let added = apply_edit(
            HookPoint::Embed,
            &Edit::Add {
                vector: v.clone(),
                positions: Positions::From(11),
            },
            &x,
            &[10, 11, 12, 13],
        )?;
        assert_eq!(
            added.to_vec2::<f32>()?,
            vec![vec![1., 1.], vec![2., 3.], vec![2., 3.], vec![2., 3.]]
        );
        let dir = Tensor::new(&[1f32, 0.0], &dev)?;
        let ablated = apply_edit(
            HookPoint::Embed,
            &Edit::ProjectOut {
                direction: dir,
                positions: Positions::At(vec![10]),
            },
            &x,
            &[10, 11, 12, 13],
        )?;
        assert_eq!(ablated.to_vec2::<f32>()?[0], vec![0., 1.]);
        assert_eq!(ablated.to_vec2::<f32>()?[1], vec![1., 1.]);
        let patched = apply_edit(
            HookPoint::Embed,
            &Edit::Replace {
                positions: vec![12, 99],
                values: Tensor::new(&[[5f32, 6.0], [7.0, 8.0]], &dev)?,
            },
            &x,
            &[10, 11, 12, 13],
        )?;
        assert_eq!(patched.to_vec2::<f32>()?[2], vec![5., 6.]);
        assert_eq!(patched.to_vec2::<f32>()?[3], vec![1., 1.]);
        // A token tree: two branches share position 12; both are patched.
        let branched = apply_edit(
            HookPoint::Embed,
            &Edit::Replace {
                positions: vec![12],
                values: Tensor::new(&[[5f32, 6.0]], &dev)?,
            },
            &x,
            &[11, 12, 12, 13],
        )?;
        let rows = branched.to_vec2::<f32>()?;
        assert_eq!((&rows[1], &rows[2]), (&vec![5., 6.], &vec![5., 6.]));
        assert_eq!(rows[3], vec![1., 1.]);
        let wrong = apply_edit(
            HookPoint::Embed,
            &Edit::Add {
                vector: Tensor::new(&[1f32, 2.0, 3.0], &dev)?,
                positions: Positions::All,
            },
            &x,
            &[0, 1, 2, 3],
        );
        assert!(wrong.unwrap_err().to_string().contains("d_model = 2"));
        Ok(())
    }
}
