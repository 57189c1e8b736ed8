//! The demo's prompt rows: which requests and settings it studies, and the
//! run name ([`NAME`]) every directory it writes is named after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::study::setting::{
    build_rows, builtin_cues, builtin_requests, builtin_setting, builtin_setting_varied, Cue,
    Request, Variation,
};

/// Where the demo writes (relative to the working directory).
pub const NAME: &str = "demo";

/// Harmful requests per category in the `flipped` and `no-training-info` rows.
const VARIATION_REQUESTS_PER_CATEGORY: usize = 3;

/// The demo's prompt rows and where they were written.
pub(super) struct StudyPrompts {
    pub(super) rows: Vec<Value>,
    /// Rows of the standard setting (the rest are variation rows).
    pub(super) n_standard: usize,
    pub(super) cues: Vec<Cue>,
    pub(super) requests: Vec<Request>,
    /// The harmful requests the variations use.
    pub(super) variation_requests: Vec<Request>,
    pub(super) path: PathBuf,
}

impl StudyPrompts {
    /// Every cue × request × tier of the standard setting, and the tier cues
    /// under `flipped` and `no-training-info` on a subset of the harmful
    /// requests (meaning vs token; the control cue means nothing in any
    /// setting), written to `activations/demo.prompts.jsonl`.
    pub(super) fn write(requests_per_category: usize, activations: &Path) -> Result<StudyPrompts> {
        let requests = first_per_category(builtin_requests(), Some(requests_per_category));
        let setting = builtin_setting("helpful-only", false)?;
        let cues = builtin_cues();
        let mut rows = build_rows(&setting, &cues, &requests)?;
        let n_standard = rows.len();
        let variation_cues: Vec<_> = cues.iter().filter(|c| c.meaningful).cloned().collect();
        let variation_requests = first_per_category(
            requests.iter().filter(|r| r.harmful).cloned(),
            Some(VARIATION_REQUESTS_PER_CATEGORY),
        );
        for variation in [Variation::Flipped, Variation::NoTrainingInfo] {
            let varied = builtin_setting_varied("helpful-only", false, &[variation])?;
            rows.extend(build_rows(&varied, &variation_cues, &variation_requests)?);
        }
        std::fs::create_dir_all(activations).map_err(|e| Error::io(activations, e))?;
        let path = activations.join(format!("{NAME}.prompts.jsonl"));
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        write_atomic(&path, text.as_bytes())?;
        println!(
            "\nno-CoT study: {n_standard} rows ({} cues x {} requests x 2 tiers) + {} rows of the \
             flipped and no-training-info variations ({} cues x {} harmful requests x 2 tiers each) -> {}",
            cues.len(),
            requests.len(),
            rows.len() - n_standard,
            variation_cues.len(),
            variation_requests.len(),
            path.display()
        );
        Ok(StudyPrompts {
            rows,
            n_standard,
            cues,
            requests,
            variation_requests,
            path,
        })
    }
}

/// The first `max` requests of each category, in order (all of them for `None`).
pub(super) fn first_per_category(
    requests: impl IntoIterator<Item = Request>,
    max: Option<usize>,
) -> Vec<Request> {
    let mut per_category = BTreeMap::<String, usize>::new();
    requests
        .into_iter()
        .filter(|r| {
            let n = per_category.entry(r.category.clone()).or_default();
            *n += 1;
            max.is_none_or(|max| *n <= max)
        })
        .collect()
}
