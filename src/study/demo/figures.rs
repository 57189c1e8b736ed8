//! The demo's figures: the plot step into `figures/demo`, and the exact file
//! names REPORT.md links, each of which must have been written (a figure the
//! report expects and cannot find is an error, not a silently missing line).

use std::path::{Path, PathBuf};

use super::interventions::{Interventions, STEER_VARIATIONS};
use crate::error::{Error, Result};
use crate::plot::{plot, PlotSpec};

/// Figure files the plot step wrote, and the directory REPORT.md (which links
/// them by paths relative to it) lies in.
pub(super) struct Figures {
    pub(super) dir: PathBuf,
    pub(super) files: Vec<PathBuf>,
}

impl Figures {
    pub(super) fn len(&self) -> usize {
        self.files.len()
    }

    /// `name` (relative to [`Figures::dir`]) as REPORT.md links it, or an
    /// error naming the file and the directory when the plot step did not
    /// write it.
    pub(super) fn require<'n>(&self, name: &'n str) -> Result<&'n str> {
        let path = self.dir.join(name);
        if self.files.contains(&path) {
            Ok(name)
        } else {
            Err(Error::BadInput(format!(
                "REPORT.md links the figure {name}, but the plot step wrote no such file in {}",
                self.dir.display()
            )))
        }
    }
}

/// Every figure of the demo: probes, steering and patching into `figures/demo`,
/// the meaning probe into `figures/demo/meaning`.
pub(super) fn render_figures(
    probes_dir: &Path,
    meaning_dir: &Path,
    interventions: &Interventions,
    figures_dir: &Path,
) -> Result<Figures> {
    let plot_into = |input: &Path, out: PathBuf| {
        plot(&PlotSpec {
            input: input.to_path_buf(),
            out,
            layer: None,
            position: None,
        })
    };
    let mut files = plot_into(probes_dir, figures_dir.to_path_buf())?;
    for (run, variation) in interventions.steer_dirs.iter().zip(STEER_VARIATIONS) {
        files.extend(plot_into(
            run,
            figures_dir.join(format!("steer-{variation}")),
        )?);
    }
    for run in [&interventions.patch_dir, &interventions.attribute_dir] {
        files.extend(plot_into(run, figures_dir.to_path_buf())?);
    }
    files.extend(plot_into(
        &interventions.meaning_patch_dir,
        figures_dir.join("patch-meaning"),
    )?);
    files.extend(plot_into(meaning_dir, figures_dir.join("meaning"))?);
    Ok(Figures {
        dir: figures_dir.to_path_buf(),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_the_plot_step_wrote_is_linked_by_its_name_and_a_missing_one_is_an_error() {
        let dir = Path::new("figures").join("demo");
        let figures = Figures {
            dir: dir.clone(),
            files: vec![
                dir.join("gap.png"),
                dir.join("meaning").join("transfer.png"),
            ],
        };
        assert_eq!(figures.require("gap.png").unwrap(), "gap.png");
        assert_eq!(
            figures.require("meaning/transfer.png").unwrap(),
            "meaning/transfer.png"
        );
        // A prefix or another extension is not the file.
        for name in ["gap", "gap.svg", "patch.png"] {
            let err = figures.require(name).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
            assert!(err.contains(&dir.display().to_string()), "{err}");
        }
    }
}
