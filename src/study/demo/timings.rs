//! Seconds each stage of the demo took, for REPORT.md.

use std::time::Instant;

use crate::error::Result;

/// Seconds each stage took, for REPORT.md.
#[derive(Default)]
pub(super) struct Timings {
    pub(super) stages: Vec<(&'static str, f64)>,
}

impl Timings {
    pub(super) fn time<T>(
        &mut self,
        stage: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let out = f()?;
        self.stages.push((stage, started.elapsed().as_secs_f64()));
        Ok(out)
    }
}
