//! What a run directory holds. Every command that writes a directory writes
//! one marker file last, so the marker both names the kind of run and says
//! that it finished; this is the one place that knows the markers.

use std::path::Path;

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
