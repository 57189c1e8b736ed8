//! `afprobe bench device`: the portable engine on a device against the fused
//! engine on the CPU (the reference every other test ties to transformers),
//! on rows of the study (or a prompt file): every `hook_resid_post` at the
//! last prompt token (relative L2 distance, worst layer and row) and the
//! continuations' summed log-probs (absolute difference), in f32 (held to
//! limits) and bf16 (reported).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::{
    load_model_placed, load_model_with_adapter, CaptureRows, DeviceSpec, Engine, HookPoint, Hooks,
    KvCache, LogitsAt, Model, ModelSpec, NamesFilter, Placement, WeightDtype,
};
use crate::prompts::{parse_prompts, read_prompt_file, render};
use crate::score::score_prompts;
use crate::study::setting;

/// The largest relative L2 distance of a `hook_resid_post` (f32 on a device
/// against the CPU) that passes: float rounding of another summation order.
pub const RESID_LIMIT: f64 = 1e-4;
/// The largest |Δ Σ log p| of a continuation (f32) that passes.
pub const LOGPROB_LIMIT: f64 = 1e-4;

/// What one row of the CPU reference or a device run gives.
struct RowResult {
    /// `hook_resid_post` at the last prompt token, per layer, f32 `[d_model]`.
    resid: Vec<Vec<f32>>,
    /// Σ log p of the accept and reject tags.
    logprobs: Vec<f64>,
}

/// One weight precision on the device against the CPU reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Parity {
    pub dtype: &'static str,
    /// Worst relative L2 distance over rows and layers.
    pub resid_rel_l2: f64,
    /// Worst |Δ Σ log p| over rows and continuations.
    pub logprob_abs: f64,
    /// Seconds the device took for the rows (model loading excluded).
    pub seconds: f64,
    /// Whether it is held to the limits (f32) and met them.
    pub held: bool,
    pub passed: bool,
}

/// A prompt's tokens and its continuations' (the answer tags).
type StudyRow = (Vec<u32>, Vec<Vec<u32>>);

/// The first `rows` rows of `prompts`, or of the study (the `xml` cue, both
/// tiers, the first requests: real system prompts, cues and answer tags),
/// with their continuations.
fn study_rows(model: &Model, prompts: Option<&Path>, rows: usize) -> Result<Vec<StudyRow>> {
    let (parsed, path) = match prompts {
        Some(path) => (read_prompt_file(path)?, path.to_path_buf()),
        None => {
            let setting = setting::builtin_setting("helpful-only", false)?;
            let cues = setting::select_cues("xml", vec![])?;
            let requests = setting::builtin_requests();
            let mut text = String::new();
            for row in setting::build_rows(&setting, &cues, &requests[..rows.div_ceil(2)])? {
                text.push_str(&row.to_string());
                text.push('\n');
            }
            let path = PathBuf::from("<study rows>");
            (parse_prompts(&text, &path)?, path)
        }
    };
    parsed
        .iter()
        .take(rows)
        .map(|row| {
            let r = render(model, row, &path)?;
            if r.continuations.is_empty() {
                return Err(Error::BadInput(format!(
                    "{}:{} (id `{}`): the row has no continuations to score",
                    path.display(),
                    row.line,
                    row.id
                )));
            }
            Ok((r.tokens, r.continuations.values().cloned().collect()))
        })
        .collect()
}

/// Runs the rows on `model` as it is placed.
fn run_rows(model: &Model, rows: &[StudyRow]) -> Result<Vec<RowResult>> {
    let n = model.config().n_layers;
    rows.iter()
        .map(|(tokens, conts)| {
            let points = (0..n).map(HookPoint::ResidPost).collect();
            let mut hooks = Hooks::capture(NamesFilter::Only(points), CaptureRows::Last);
            model
                .transformer
                .forward(tokens, &mut KvCache::new(), &mut hooks, &LogitsAt::None)?;
            let resid = (0..n)
                .map(|l| {
                    let t: &Tensor = hooks.cache.require(HookPoint::ResidPost(l))?;
                    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                })
                .collect::<Result<_>>()?;
            let logprobs = score_prompts(
                &model.transformer,
                std::slice::from_ref(tokens),
                conts,
                &mut Hooks::none(),
            )?
            .remove(0);
            Ok(RowResult { resid, logprobs })
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖ in f64.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        diff += (f64::from(*x) - f64::from(*y)).powi(2);
        norm += f64::from(*y).powi(2);
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// The portable engine on `device` at f32 and bf16 against the fused CPU
/// engine at f32, on the first `rows` rows of `prompts` (default: the
/// study's) on the model `spec` (with `adapter`).
pub fn device_parity(
    spec: &ModelSpec,
    adapter: Option<&Path>,
    device: DeviceSpec,
    prompts: Option<&Path>,
    rows: usize,
) -> Result<Vec<Parity>> {
    if rows == 0 {
        return Err(Error::BadInput("--rows must be at least 1".into()));
    }
    let on_device = Placement {
        device,
        engine: Some(Engine::Portable),
    };
    // Before any loading: a device this build cannot reach is a quick error.
    on_device.device.device()?;
    let reference_model = load_model_with_adapter(spec, WeightDtype::F32, adapter)?;
    let inputs = study_rows(&reference_model, prompts, rows)?;
    eprintln!(
        "afprobe: reference: the fused engine on the CPU, {} rows",
        inputs.len()
    );
    let reference = run_rows(&reference_model, &inputs)?;
    drop(reference_model);
    let mut out = Vec::new();
    for (dtype, held) in [(WeightDtype::F32, true), (WeightDtype::Bf16, false)] {
        let model = load_model_placed(spec, dtype, adapter, on_device)?;
        eprintln!(
            "afprobe: the portable engine on {device} at {}",
            dtype.name()
        );
        let started = Instant::now();
        let got = run_rows(&model, &inputs)?;
        let seconds = started.elapsed().as_secs_f64();
        let (mut resid, mut logprob) = (0f64, 0f64);
        for (g, r) in got.iter().zip(&reference) {
            for (a, b) in g.resid.iter().zip(&r.resid) {
                resid = resid.max(rel_l2(a, b));
            }
            for (a, b) in g.logprobs.iter().zip(&r.logprobs) {
                logprob = logprob.max((a - b).abs());
            }
        }
        out.push(Parity {
            dtype: dtype.name(),
            resid_rel_l2: resid,
            logprob_abs: logprob,
            seconds,
            held,
            passed: !held || (resid <= RESID_LIMIT && logprob <= LOGPROB_LIMIT),
        });
    }
    Ok(out)
}

/// The table `bench device` prints.
pub fn format_parity(device: DeviceSpec, rows: usize, parity: &[Parity]) -> String {
    let mut s = format!(
        "portable engine on {device} vs the fused engine on the CPU (f32), {rows} rows\n\
         {:<6} {:>22} {:>20} {:>9}  verdict\n",
        "dtype", "resid_post@last rel L2", "|Δ log p| (conts)", "seconds"
    );
    for p in parity {
        let verdict = match (p.held, p.passed) {
            (false, _) => "reported".to_string(),
            (true, true) => format!("ok (limits {RESID_LIMIT:e}, {LOGPROB_LIMIT:e})"),
            (true, false) => format!("FAILED (limits {RESID_LIMIT:e}, {LOGPROB_LIMIT:e})"),
        };
        s.push_str(&format!(
            "{:<6} {:>22.3e} {:>20.3e} {:>9.2}  {verdict}\n",
            p.dtype, p.resid_rel_l2, p.logprob_abs, p.seconds
        ));
    }
    s
}
