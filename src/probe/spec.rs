//! What `afprobe probe` is asked to do: [`ProbeSpec`] with the command line's
//! defaults, the control rows ([`Control`]), the bounds on the counts that
//! size a run, and the store tensors it names.

use std::path::{Path, PathBuf};

use super::{multi, FitSettings, Method};
use crate::error::{Error, Result};
use crate::model::parse_hooks;
use crate::rows::{Filter, Table};
use crate::store::{Position, Store, TensorName};

/// What `afprobe probe` does.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub acts: PathBuf,
    pub out: PathBuf,
    /// The label field and its positive value (see [`Labels::read`](super::Labels::read)).
    pub label: String,
    pub positive: Option<String>,
    /// Rows sharing this field's value are always in the same fold.
    pub group: String,
    /// Hook kinds or names and layers to probe (`None`: every tensor of the store).
    pub hooks: Option<String>,
    pub layers: String,
    pub positions: Option<Vec<Position>>,
    pub methods: Vec<Method>,
    pub folds: usize,
    pub seed: u64,
    pub train_filter: Filter,
    pub test_filter: Filter,
    /// Rows of a control condition (same label, no meaning), probed on their
    /// own and left out of the main probe.
    pub control: Control,
    /// A field whose values give the train × test generalisation matrix.
    pub cross: Option<String>,
    pub fit: FitSettings,
    /// Shuffled-label refits per evaluation (the permutation baseline).
    pub shuffles: usize,
    /// Group-bootstrap resamples for AUROC intervals.
    pub bootstrap: usize,
    pub force: bool,
    /// Multi-layer probes (`--multi-layer`, `--layer-window`), main evaluation only.
    pub multi: multi::MultiLayer,
    /// A numeric row field to regress on (`--target`) instead of a label: ridge
    /// or elastic-net probes reporting out-of-fold R² and Pearson r.
    pub target: Option<String>,
}

impl ProbeSpec {
    /// The command line's defaults: both methods, 5 grouped folds by
    /// `request_id`, seed 0, no filters, no control, no cross matrix, one
    /// shuffle, 1,000 bootstrap resamples.
    pub fn new(acts: &Path, out: &Path, label: &str) -> ProbeSpec {
        ProbeSpec {
            acts: acts.into(),
            out: out.into(),
            label: label.into(),
            positive: None,
            group: "request_id".into(),
            hooks: None,
            layers: "all".into(),
            positions: None,
            methods: vec![Method::Logistic, Method::MeanDiff],
            folds: 5,
            seed: 0,
            train_filter: Filter::default(),
            test_filter: Filter::default(),
            control: Control::None,
            cross: None,
            fit: FitSettings::default(),
            shuffles: 1,
            bootstrap: 1000,
            force: false,
            target: None,
            multi: multi::MultiLayer::default(),
        }
    }
}

/// The control rows of a probe run (`--control auto|none|FILTER`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// `cue=control` when the store has that cue, else none.
    Auto,
    /// No control.
    None,
    /// These rows.
    Rows(Filter),
}

impl std::str::FromStr for Control {
    type Err = Error;
    fn from_str(s: &str) -> Result<Control> {
        match s {
            "auto" => Ok(Control::Auto),
            "none" => Ok(Control::None),
            filter => filter.parse().map(Control::Rows),
        }
    }
}

impl Control {
    /// The control rows' filter in `table`, if there is a control.
    pub fn resolve(&self, table: &Table) -> Option<Filter> {
        match self {
            Control::None => None,
            Control::Rows(filter) => Some(filter.clone()),
            Control::Auto => {
                let has_control = table
                    .column("cue")
                    .is_ok_and(|c| c.iter().any(|c| c.as_deref() == Some("control")));
                has_control.then(|| Filter::equals("cue", &["control"]))
            }
        }
    }
}

/// The most shuffled-label refits (`--shuffles`): each one refits every probe.
pub const MAX_SHUFFLES: usize = 1000;
/// The most folds (`--folds`): each is a fit; leave-one-group-out on more groups is not useful.
pub const MAX_FOLDS: usize = 1000;

/// Bounds the counts that size a probe run's work and memory before anything is read.
pub(super) fn check_sizes(spec: &ProbeSpec) -> Result<()> {
    use crate::error::check_range;
    check_range(
        "--folds",
        spec.folds,
        2,
        MAX_FOLDS,
        "grouped cross-validation needs 2 folds, and every fold is a fit of every probe",
    )?;
    check_range(
        "--shuffles",
        spec.shuffles,
        0,
        MAX_SHUFFLES,
        "each shuffle refits every probe on every fold; a few give the permutation baseline",
    )?;
    check_range(
        "--bootstrap",
        spec.bootstrap,
        0,
        crate::stats::MAX_RESAMPLES,
        "group-bootstrap resamples: past a million the interval no longer moves while each \
         costs time and memory",
    )
}

/// The store tensors to probe (per-row ones: not `@all`), in store order.
pub(super) fn select_tensors(store: &Store, spec: &ProbeSpec) -> Result<Vec<String>> {
    let m = &store.manifest;
    let hooks: Vec<String> = match &spec.hooks {
        None => m.hooks.clone(),
        Some(h) => {
            let wanted = parse_hooks(h, &spec.layers, m.model.n_layers)?;
            let names: Vec<String> = wanted.iter().map(|p| p.to_string()).collect();
            if let Some(missing) = names.iter().find(|n| !m.hooks.contains(n)) {
                return Err(Error::BadInput(format!(
                    "{}: the store has no hook `{missing}`; it has {} hooks ({} ... {})",
                    spec.acts.display(),
                    m.hooks.len(),
                    m.hooks.first().map_or("", String::as_str),
                    m.hooks.last().map_or("", String::as_str)
                )));
            }
            names
        }
    };
    let positions: Vec<Position> = match &spec.positions {
        None => m
            .positions
            .iter()
            .copied()
            .filter(|&p| p != Position::All)
            .collect(),
        Some(ps) => {
            for p in ps {
                if *p == Position::All || !m.positions.contains(p) {
                    return Err(Error::BadInput(format!(
                        "{}: no per-row position `{p}`; the store has {}",
                        spec.acts.display(),
                        m.positions
                            .iter()
                            .filter(|&&p| p != Position::All)
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
            ps.clone()
        }
    };
    let mut names = Vec::new();
    for &position in &positions {
        for hook in &hooks {
            names.push(TensorName::of(hook, position)?.to_string());
        }
    }
    if names.is_empty() {
        return Err(Error::BadInput(format!(
            "{}: no per-row tensors to probe (positions `all` are ragged; capture with \
             --positions last or cue)",
            spec.acts.display()
        )));
    }
    Ok(names)
}
