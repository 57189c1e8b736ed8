//! What a run directory holds. Every command that writes a directory writes
//! one marker file last, so the marker both names the kind of run and says
//! that it finished; this is the one place that knows the markers.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The kinds of run directory afprobe writes, by their marker file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// `afprobe probe`: `report.json`, `metrics.csv`, `probes.safetensors`.
    Probes,
    /// `afprobe capture`: an activation store (`manifest.json`).
    Activations,
    /// `afprobe steer`: `steer.json`.
    Steer,
    /// `afprobe patch`: `patch.json`.
    Patch,
    /// `afprobe ablate`: `ablate.json`.
    Ablate,
    /// `afprobe sample`: `sample.json`.
    Sampling,
    /// `afprobe attribute`: `attribute.json`.
    Attribute,
}

/// The file `afprobe gap` adds to a scored store or a sampling run.
pub const GAP_JSON: &str = "gap.json";

impl RunKind {
    /// Every kind, in the order [`RunKind::detect`] tries them.
    pub const ALL: [RunKind; 7] = [
        RunKind::Probes,
        RunKind::Activations,
        RunKind::Steer,
        RunKind::Patch,
        RunKind::Ablate,
        RunKind::Sampling,
        RunKind::Attribute,
    ];

    /// The marker file of this kind.
    pub const fn marker(self) -> &'static str {
        match self {
            RunKind::Probes => "report.json",
            RunKind::Activations => "manifest.json",
            RunKind::Steer => "steer.json",
            RunKind::Patch => "patch.json",
            RunKind::Ablate => "ablate.json",
            RunKind::Sampling => "sample.json",
            RunKind::Attribute => "attribute.json",
        }
    }

    /// The kind of the finished run in `dir`, if it holds one.
    pub fn detect(dir: &Path) -> Option<RunKind> {
        Self::ALL
            .into_iter()
            .find(|k| dir.join(k.marker()).is_file())
    }
}

/// Whether `afprobe gap` has been run on `dir`.
pub fn has_gap(dir: &Path) -> bool {
    dir.join(GAP_JSON).is_file()
}

/// The rows (`rows.jsonl`) of a finished run of `kind` in `dir`; a run
/// without its marker did not finish and is refused.
pub fn finished_rows(dir: &Path, kind: RunKind) -> Result<Vec<Value>> {
    if !dir.join(kind.marker()).exists() {
        return Err(Error::BadInput(format!(
            "{}: no {}; the run did not finish",
            dir.display(),
            kind.marker()
        )));
    }
    let path = dir.join("rows.jsonl");
    let text = crate::io::read_to_string(&path)?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::BadInput(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}
