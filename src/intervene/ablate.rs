//! `afprobe ablate`: project one direction out of the residual stream at every
//! chosen hook point and position (x ← x − (x·d)d, as in directional-ablation
//! work on refusal) and report what it does to the compliance gap and to
//! compliance overall (harmful and benign requests).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::direction::DirectionSource;
use super::{load_rows, p_accept, prepare_out, write_run, RowCache, TokenCount};
use crate::error::{Error, Result};
use crate::gap::{gap_from_rows, GapReport};
use crate::model::{Edit, HookPoint, Hooks, Model, Positions};
use crate::progress::Progress;
use crate::report_json::{interval, number};
use crate::rows::Filter;
use crate::stats::mean_ci;

/// The file that marks a finished ablation run.
pub const ABLATE_JSON: &str = crate::run_dir::RunKind::Ablate.marker();

/// Settings of one ablation run.
#[derive(Debug, Clone, Serialize)]
pub struct AblateSpec {
    pub prompts: PathBuf,
    pub out: PathBuf,
    #[serde(serialize_with = "super::display")]
    pub direction: DirectionSource,
    /// The tensor whose direction is ablated (`{hook}@{position}`), the same at every point.
    pub direction_tensor: String,
    #[serde(serialize_with = "super::names")]
    pub points: Vec<HookPoint>,
    #[serde(serialize_with = "super::display")]
    pub filter: Filter,
    pub resamples: usize,
    pub seed: u64,
    pub force: bool,
}

/// Mean p_accept of a set of rows before and after, and the mean change with
/// its interval (a NaN is written `null` and read back as NaN).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    pub n: usize,
    #[serde(deserialize_with = "number")]
    pub before: f64,
    #[serde(deserialize_with = "number")]
    pub after: f64,
    #[serde(deserialize_with = "number")]
    pub change: f64,
    #[serde(deserialize_with = "interval")]
    pub change_ci95: [f64; 2],
}

/// `ablate.json`.
#[derive(Debug, Clone, Serialize)]
pub struct AblateReport {
    pub format: String,
    pub afprobe_version: String,
    pub model: String,
    pub settings: AblateSpec,
    pub n_rows: usize,
    /// The compliance gap without and with the ablation.
    pub before: GapReport,
    pub after: GapReport,
    /// The gap of the per-row changes (after − before): its `gap` is the change
    /// in the compliance gap, with a paired bootstrap interval over requests.
    pub gap_change: GapReport,
    /// Compliance overall: `harmful` and `benign` rows (refusal baselines).
    pub compliance: BTreeMap<String, Change>,
    pub tokens: TokenCount,
    pub seconds: f64,
}

/// Runs every row with and without the ablation and writes `rows.jsonl` and `ablate.json`.
pub fn ablate(model: &Model, spec: &AblateSpec) -> Result<AblateReport> {
    let config = model.config();
    spec.points
        .iter()
        .try_for_each(|p| p.check_layer(config.n_layers))?;
    if spec.points.is_empty() {
        return Err(Error::BadInput(
            "ablate needs at least one hook point".into(),
        ));
    }
    crate::stats::check_resamples(spec.resamples)?;
    let rows = load_rows(model, &spec.prompts, &spec.filter)?;
    let unit = spec
        .direction
        .unit(&spec.direction_tensor, config.d_model)?;
    let direction = Tensor::from_vec(unit, config.d_model, &candle_core::Device::Cpu)?;
    let ablating = || {
        let mut hooks = Hooks::none();
        for &point in &spec.points {
            hooks.add_edit(
                point,
                Edit::ProjectOut {
                    direction: direction.clone(),
                    positions: Positions::All,
                },
            );
        }
        hooks
    };
    prepare_out(&spec.out, ABLATE_JSON, spec.force)?;

    let started = Instant::now();
    let mut count = TokenCount::default();
    let progress = Progress::new("ablate", "rows", rows.len());
    // Two cache chains: the edit is the same for every row and position, so
    // ablated rows share their ablated system prompt as plain rows share theirs.
    let (mut plain_prev, mut ablated_prev): (Option<RowCache>, Option<RowCache>) = (None, None);
    let (mut before_rows, mut after_rows, mut change_rows) = (Vec::new(), Vec::new(), Vec::new());
    let mut records = String::new();
    for row in &rows {
        let (plain, before) = RowCache::run(
            model,
            row,
            plain_prev.as_ref(),
            &mut Hooks::none(),
            &mut count,
        )?;
        let (ablated, after) = RowCache::run(
            model,
            row,
            ablated_prev.as_ref(),
            &mut ablating(),
            &mut count,
        )?;
        let (before, after) = (p_accept(&before), p_accept(&after));
        let mut record = row.record();
        let with = |record: &serde_json::Map<String, Value>, p: f64| {
            let mut r = record.clone();
            r.insert("p_accept".into(), json!(p));
            Value::Object(r)
        };
        before_rows.push(with(&record, before));
        after_rows.push(with(&record, after));
        change_rows.push(with(&record, after - before));
        record.insert("p_accept".into(), json!(before));
        record.insert("p_ablated".into(), json!(after));
        records.push_str(&format!("{}\n", Value::Object(record)));
        plain_prev = Some(plain);
        ablated_prev = Some(ablated);
        progress.advance(1, None);
    }
    progress.finish();

    let gap = |rows: &[Value]| gap_from_rows(rows, &spec.out, spec.resamples, spec.seed);
    let compliance = compliance_change(&before_rows, &after_rows, &change_rows, spec);
    let report = AblateReport {
        format: "afprobe-ablate/1".into(),
        afprobe_version: env!("CARGO_PKG_VERSION").into(),
        model: model.spec.to_string(),
        settings: spec.clone(),
        n_rows: rows.len(),
        before: gap(&before_rows)?,
        after: gap(&after_rows)?,
        gap_change: gap(&change_rows)?,
        compliance,
        tokens: count,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_run(&spec.out, ABLATE_JSON, &records, &report)?;
    Ok(report)
}

/// Mean p_accept before and after on harmful and on benign rows, and the mean
/// change with its bootstrap interval (rows without `harmful` count as harmful).
fn compliance_change(
    before_rows: &[Value],
    after_rows: &[Value],
    change_rows: &[Value],
    spec: &AblateSpec,
) -> BTreeMap<String, Change> {
    let mut compliance = BTreeMap::new();
    for (name, harmful) in [("harmful", true), ("benign", false)] {
        let pick = |rows: &[Value]| -> Vec<f64> {
            rows.iter()
                .filter(|r| r.get("harmful").and_then(Value::as_bool).unwrap_or(true) == harmful)
                .filter_map(|r| r["p_accept"].as_f64())
                .collect()
        };
        let (b, a, c) = (pick(before_rows), pick(after_rows), pick(change_rows));
        if c.is_empty() {
            continue;
        }
        let (change, change_ci95) = mean_ci(&c, spec.resamples, spec.seed);
        compliance.insert(
            name.to_string(),
            Change {
                n: c.len(),
                before: b.iter().sum::<f64>() / b.len() as f64,
                after: a.iter().sum::<f64>() / a.len() as f64,
                change,
                change_ci95,
            },
        );
    }
    compliance
}

/// The report as a short table: the gap before, after and its change per cue.
pub fn format_table(report: &AblateReport) -> String {
    let mut out = format!(
        "{} rows; direction {} of `{}` projected out at {} hook point(s), every position\n\
         {:<16} {:>9} {:>9} {:>9} {:>22}\n",
        report.n_rows,
        report.settings.direction,
        report.settings.direction_tensor,
        report.settings.points.len(),
        "gap",
        "before",
        "after",
        "change",
        "95% CI of change"
    );
    let named = |g: &GapReport| -> Vec<(String, f64, [f64; 2])> {
        g.by_cue
            .iter()
            .map(|(c, s)| (c.clone(), s.gap, s.ci95))
            .chain(
                g.overall
                    .iter()
                    .map(|s| ("overall".to_string(), s.gap, s.ci95)),
            )
            .chain(
                g.benign
                    .iter()
                    .map(|s| ("benign".to_string(), s.gap, s.ci95)),
            )
            .collect()
    };
    let (before, after, change) = (
        named(&report.before),
        named(&report.after),
        named(&report.gap_change),
    );
    for ((name, b, _), ((_, a, _), (_, c, ci))) in before.iter().zip(after.iter().zip(&change)) {
        out.push_str(&format!(
            "{name:<16} {b:>+9.4} {a:>+9.4} {c:>+9.4} {:>22}\n",
            format!("[{:+.4}, {:+.4}]", ci[0], ci[1])
        ));
    }
    for (name, c) in &report.compliance {
        out.push_str(&format!(
            "mean p_accept on {name} rows: {:.4} -> {:.4} ({:+.4} [{:+.4}, {:+.4}], n = {})\n",
            c.before, c.after, c.change, c.change_ci95[0], c.change_ci95[1], c.n
        ));
    }
    out
}
