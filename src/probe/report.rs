//! What `afprobe probe` writes: `report.json` (settings, seeds, counts, every
//! metric), `metrics.csv`, `probes.safetensors`, and the text summary.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Context, Labels, Method, MetricRow, ProbeSpec, Report, Role, METRICS, PROBES, REPORT};
use crate::error::{Error, Result};
use crate::io::{save_f32_tensors, write_atomic};
use crate::rows::{Filter, Table};
use crate::store::Position;

/// The best main probe per method and position (by AUROC).
pub(super) fn best_rows(metrics: &[MetricRow]) -> Vec<MetricRow> {
    let mut best: BTreeMap<(Method, Position), &MetricRow> = BTreeMap::new();
    // Single tensors only: multi-layer rows are reported beside them.
    for m in metrics
        .iter()
        .filter(|m| m.role == Role::Main && m.extra.combine.is_none())
    {
        let key = (m.method, m.position);
        let better = match best.get(&key) {
            None => true,
            Some(b) => headline(m) > headline(b),
        };
        if better {
            best.insert(key, m);
        }
    }
    best.into_values().cloned().collect()
}

/// What "best" ranks by: AUROC, or R² for a regression probe.
fn headline(m: &MetricRow) -> f64 {
    match &m.extra.regression {
        Some(r) => r.r2.unwrap_or(f64::NEG_INFINITY),
        None => m.scores.auroc.unwrap_or(0.0),
    }
}

pub(super) fn settings_json(
    spec: &ProbeSpec,
    labels: &Labels,
    tier_field: &str,
    control: Option<Filter>,
) -> serde_json::Value {
    serde_json::json!({
        "label": labels.field,
        "positive": labels.positive,
        "negative": labels.negative,
        "group": spec.group,
        "folds": spec.folds,
        "fold_assignment": "grouped: largest groups first (ties in seeded order) to the lightest fold",
        "seed": spec.seed,
        "methods": spec.methods,
        "logistic": spec.fit,
        "standardize": "per training fold (mean, population std)",
        "train_filter": spec.train_filter.to_string(),
        "test_filter": spec.test_filter.to_string(),
        "control": control.as_ref().map(ToString::to_string),
        "cross": spec.cross,
        "shuffles": spec.shuffles,
        "bootstrap": spec.bootstrap,
        "bootstrap_unit": spec.group,
        "threshold": "score 0 (probability 0.5; mean-diff: midpoint of the class means)",
        "p_accept_correlation_within": tier_field,
    })
}

pub(super) fn data_json(ctx: &Context, table: &Table) -> serde_json::Value {
    let count = |mask: &[bool]| mask.iter().filter(|&&m| m).count();
    let plans: Vec<serde_json::Value> = ctx
        .plans
        .iter()
        .map(|(plan, train, tests)| {
            serde_json::json!({
                "role": plan.role,
                "train": plan.train.to_string(),
                "train_rows": count(train),
                "tests": plan.tests.iter().zip(tests).map(|(t, m)| serde_json::json!({
                    "test": t.to_string(), "rows": count(m)})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let n_groups = ctx.groups.iter().copied().max().map_or(0, |m| m + 1);
    serde_json::json!({
        "rows": table.len(),
        "labelled": ctx.labels.y.iter().filter(|l| l.is_some()).count(),
        "positive": ctx.labels.y.iter().filter(|l| **l == Some(true)).count(),
        "groups": n_groups,
        "evaluations": plans,
    })
}

/// The fixed `metrics.csv` columns, then one `r_p_accept_{tier}` per tier value,
/// then [`EXTRA_COLUMNS`].
const CSV_COLUMNS: &str = "hook,position,layer,method,role,train,test,auroc,auroc_mean,auroc_std,\
auroc_lo,auroc_hi,accuracy,accuracy_std,balanced_accuracy,majority_accuracy,shuffled_auroc,n";

/// Selectivity (main − control AUROC, paired interval) and the regression columns.
const EXTRA_COLUMNS: &str = "selectivity,selectivity_lo,selectivity_hi,target,r2,r2_lo,r2_hi,\
pearson_r,pearson_lo,pearson_hi,shuffled_r2,shuffled_r,layers,combine";

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `metrics.csv` text.
pub fn metrics_csv(metrics: &[MetricRow]) -> String {
    let tiers: std::collections::BTreeSet<&String> =
        metrics.iter().flat_map(|m| m.r_p_accept.keys()).collect();
    let mut out = String::from(CSV_COLUMNS);
    for t in &tiers {
        out.push_str(&format!(",r_p_accept_{t}"));
    }
    out.push(',');
    out.push_str(EXTRA_COLUMNS);
    out.push('\n');
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for m in metrics {
        let mut fields = vec![
            csv_field(&m.hook),
            m.position.to_string(),
            m.layer.map_or(String::new(), |l| l.to_string()),
            m.method.name().into(),
            serde_json::to_value(m.role)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            csv_field(&m.train),
            csv_field(&m.test),
            opt(m.scores.auroc),
            opt(m.scores.auroc_mean),
            opt(m.scores.auroc_std),
            opt(m.scores.auroc_lo),
            opt(m.scores.auroc_hi),
            format!("{:.6}", m.scores.accuracy),
            format!("{:.6}", m.scores.accuracy_std),
            format!("{:.6}", m.scores.balanced_accuracy),
            format!("{:.6}", m.scores.majority_accuracy),
            opt(m.shuffled_auroc),
            m.scores.n.to_string(),
        ];
        for t in &tiers {
            fields.push(opt(m.r_p_accept.get(*t).copied().flatten()));
        }
        let e = &m.extra;
        fields.extend([
            opt(e.selectivity),
            opt(e.selectivity_lo),
            opt(e.selectivity_hi),
        ]);
        let reg = e.regression.clone().unwrap_or_default();
        fields.push(csv_field(&reg.target));
        fields.extend(
            [
                reg.r2,
                reg.r2_lo,
                reg.r2_hi,
                reg.pearson_r,
                reg.pearson_lo,
                reg.pearson_hi,
                reg.shuffled_r2,
                reg.shuffled_r,
            ]
            .map(opt),
        );
        let layers: Vec<String> = e.layers.iter().map(ToString::to_string).collect();
        fields.push(csv_field(&layers.join(" ")));
        fields.push(e.combine.clone().unwrap_or_default());
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

pub(super) fn write_outputs(
    report: &Report,
    weights: Vec<(String, Vec<f32>)>,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = weights
        .into_iter()
        .map(|(name, values)| (name, vec![values.len()], values))
        .collect();
    let metadata = serde_json::json!({
        "label": report.settings["label"],
        "positive": report.settings["positive"],
        "score": "norm * (x . direction) + bias; > 0 favours the positive class",
    });
    save_f32_tensors(&out.join(PROBES), &tensors, Some(metadata.to_string()))?;
    write_atomic(&out.join(METRICS), metrics_csv(&report.metrics).as_bytes())?;
    let json = serde_json::to_string_pretty(report).expect("report serialises");
    // The report last: its presence marks a complete probe directory.
    write_atomic(&out.join(REPORT), json.as_bytes())
}

/// A text table of the main probes: one line per hook, with AUROC and its
/// interval, the shuffled baseline and the control per position and method.
pub fn format_summary(report: &Report) -> String {
    let f = |v: Option<f64>| v.map_or("  -  ".into(), |v| format!("{v:.3}"));
    if report.is_regression() {
        let mut out = format!(
            "{:<28}  {:<12}  {:<26}  {:<26}  shuffled R², r\n",
            "tensor", "method", "R² [95% CI]", "r [95% CI]"
        );
        for m in &report.metrics {
            let r = m.extra.regression.clone().unwrap_or_default();
            out.push_str(&format!(
                "{:<28}  {:<12}  {:<26}  {:<26}  {}, {}\n",
                format!("{}@{}", m.hook, m.position),
                m.method.name(),
                format!("{} [{}, {}]", f(r.r2), f(r.r2_lo), f(r.r2_hi)),
                format!(
                    "{} [{}, {}]",
                    f(r.pearson_r),
                    f(r.pearson_lo),
                    f(r.pearson_hi)
                ),
                f(r.shuffled_r2),
                f(r.shuffled_r)
            ));
        }
        return out;
    }
    let find = |role: Role, hook: &str, pos: Position, method: Method| {
        report
            .metrics
            .iter()
            .find(|m| m.role == role && m.hook == hook && m.position == pos && m.method == method)
    };
    let mut panels: Vec<(Position, Method)> = report
        .metrics
        .iter()
        .filter(|m| m.role == Role::Main)
        .map(|m| (m.position, m.method))
        .collect();
    panels.sort();
    panels.dedup();
    let mut hooks: Vec<&str> = Vec::new();
    for m in &report.metrics {
        if !hooks.contains(&m.hook.as_str()) {
            hooks.push(&m.hook);
        }
    }
    let mut out = format!("{:<28}", "AUROC [95% CI] shuffled ctrl");
    for (pos, method) in &panels {
        out.push_str(&format!("  {:<32}", format!("@{pos} {}", method.name())));
    }
    out.push('\n');
    for hook in hooks {
        out.push_str(&format!("{hook:<28}"));
        for &(pos, method) in &panels {
            let cell = match find(Role::Main, hook, pos, method) {
                Some(m) => format!(
                    "{} [{},{}] {} {}",
                    f(m.scores.auroc),
                    f(m.scores.auroc_lo),
                    f(m.scores.auroc_hi),
                    f(m.shuffled_auroc),
                    f(find(Role::Control, hook, pos, method).and_then(|c| c.scores.auroc))
                ),
                None => "-".into(),
            };
            out.push_str(&format!("  {cell:<32}"));
        }
        out.push('\n');
    }
    for b in &report.best {
        out.push_str(&format!(
            "best {} @{}: {} AUROC {} [{}, {}]\n",
            b.method.name(),
            b.position,
            b.hook,
            f(b.scores.auroc),
            f(b.scores.auroc_lo),
            f(b.scores.auroc_hi)
        ));
    }
    for m in report.metrics.iter().filter(|m| m.extra.combine.is_some()) {
        out.push_str(&format!(
            "multi-layer {} {} @{} {}: AUROC {} [{}, {}]\n",
            m.extra.combine.as_deref().unwrap_or_default(),
            m.method.name(),
            m.position,
            m.hook,
            f(m.scores.auroc),
            f(m.scores.auroc_lo),
            f(m.scores.auroc_hi)
        ));
    }
    out
}

/// One vector of `probes.safetensors` by name, e.g.
/// `blocks.12.hook_resid_post@last.logistic.direction`.
pub fn load_vector(dir: &Path, key: &str) -> Result<Vec<f32>> {
    let path = dir.join(PROBES);
    let bytes = crate::io::read(&path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::model_file(&path, format!("not a safetensors file: {e}")))?;
    let view = st.tensor(key).map_err(|_| {
        Error::model_file(
            &path,
            format!("no tensor `{key}` (report.json lists what was probed)"),
        )
    })?;
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}
