//! Probes and figures: agreement with scikit-learn, planted directions,
//! group leaks, bad input, figure files, and the real model end to end.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use ndarray::Array2;
use serde_json::{json, Value};

use afprobe::probe::cv::{cross_validate, summarize};
use afprobe::probe::{self, Control, Filter, FitSettings, Folds, Method, ProbeSpec, Report, Role};
use afprobe::store::Store;
use common::{afprobe, assert_fails_with, fixtures, load_fixture};

/// Our logistic probe on scikit-learn's folds of real SmolLM2 activations
/// gives scikit-learn's pooled out-of-fold AUROC and accuracy.
#[test]
fn logistic_probe_agrees_with_scikit_learn() {
    let tensors = load_fixture(&fixtures().join("probe_ref.safetensors"));
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("probe_ref.json")).unwrap())
            .unwrap();
    let y: Vec<Option<bool>> = reference["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| Some(l.as_i64() == Some(1)))
        .collect();
    let n = y.len();
    let fold: Vec<usize> = tensors["fold"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|f| f as usize)
        .collect();
    let folds = Folds::explicit(fold);
    let groups: Vec<usize> = (0..n).collect();
    let all = vec![true; n];
    let layers = reference["reference"]["layers"].as_object().unwrap();
    assert_eq!(layers.len(), 4);
    for (layer, want) in layers {
        let t = &tensors[&format!("resid.{layer}")];
        let (r, c) = t.dims2().unwrap();
        let x = Array2::from_shape_vec((r, c), t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .unwrap();
        let oof = cross_validate(
            x.view(),
            &y,
            &folds,
            &all,
            std::slice::from_ref(&all),
            Method::Logistic,
            &FitSettings::default(),
        )
        .unwrap();
        let got = summarize(&oof[0], &y, &groups, 0, 0);
        let auroc = got.auroc.unwrap();
        let want_auroc = want["auroc_pooled"].as_f64().unwrap();
        let want_acc = want["acc_pooled"].as_f64().unwrap();
        assert!(
            // The issue asks for 0.02; on the same folds the optima agree to rounding.
            (auroc - want_auroc).abs() < 1e-3,
            "layer {layer}: AUROC {auroc} vs scikit-learn {want_auroc}"
        );
        assert!(
            (got.accuracy - want_acc).abs() < 0.01,
            "layer {layer}: accuracy {} vs scikit-learn {want_acc}",
            got.accuracy
        );
        assert_eq!(got.unconverged_fits, 0);
    }
}

const D: usize = 16;
const LAYERS: usize = 4;

/// Writes a complete store of `rows` with one `blocks.{l}.hook_resid_post@last`
/// tensor per layer, from `activation(row, layer) -> [D]`.
fn synthetic_store(
    dir: &Path,
    rows: &[Value],
    activation: impl Fn(usize, usize) -> Vec<f32>,
) -> Store {
    synthetic_store_d(dir, rows, D, activation)
}

/// [`synthetic_store`] with `d` dimensions.
fn synthetic_store_d(
    dir: &Path,
    rows: &[Value],
    d: usize,
    activation: impl Fn(usize, usize) -> Vec<f32>,
) -> Store {
    let n = rows.len();
    let hooks: Vec<String> = (0..LAYERS)
        .map(|l| format!("blocks.{l}.hook_resid_post"))
        .collect();
    let tensors = hooks
        .iter()
        .enumerate()
        .map(|(l, hook)| {
            let data: Vec<f32> = (0..n).flat_map(|r| activation(r, l)).collect();
            (
                format!("{hook}@last"),
                Tensor::from_vec(data, (n, d), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let shape = common::StoreShape {
        hooks,
        positions: vec![afprobe::store::Position::Last],
        d_model: d,
        n_layers: LAYERS,
    };
    common::write_store(dir, rows, &shape, true, tensors)
}

/// A deterministic pseudo-random number in [-1, 1).
fn noise(seed: usize) -> f32 {
    let mut z = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 32;
    (z % 20_000) as f32 / 10_000.0 - 1.0
}

/// 40 requests x 2 cues (xml, control) x 2 tiers.
fn study_rows() -> Vec<Value> {
    let mut rows = Vec::new();
    for req in 0..40 {
        for cue in ["xml", "control"] {
            for tier in ["free", "paid"] {
                rows.push(json!({
                    "id": format!("{cue}-{tier}-{req}"),
                    "request_id": format!("r{req:02}"),
                    "cue": cue,
                    "tier": tier,
                    "p_accept": 0.5 + 0.3 * noise(req * 7 + usize::from(tier == "free")) as f64,
                }));
            }
        }
    }
    rows
}

fn spec(acts: &Path, out: &Path) -> ProbeSpec {
    ProbeSpec {
        seed: 3,
        control: Control::Rows(Filter::equals("cue", &["control"])),
        cross: Some("cue".into()),
        shuffles: 2,
        bootstrap: 200,
        ..ProbeSpec::new(acts, out, "tier")
    }
}

fn main_auroc(report: &Report, layer: usize, method: Method, role: Role) -> f64 {
    report
        .metrics
        .iter()
        .find(|m| m.layer == Some(layer) && m.method == method && m.role == role)
        .and_then(|m| m.scores.auroc)
        .unwrap()
}

/// The tier is planted along one direction at layers 1 and 3 only (and the
/// control cue nowhere): AUROC ≈ 1 there, ≈ 0.5 elsewhere, shuffled ≈ 0.5.
#[test]
fn a_planted_direction_is_found_where_it_was_planted() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = study_rows();
    let acts = tmp.path().join("acts");
    let store = synthetic_store(&acts, &rows, |r, l| {
        let free = rows[r]["tier"] == "free" && rows[r]["cue"] == "xml";
        (0..D)
            .map(|j| {
                let planted = if (l == 1 || l == 3) && j == 5 && free {
                    3.0
                } else {
                    0.0
                };
                noise(r * 1000 + l * 100 + j) + planted
            })
            .collect()
    });
    assert_eq!(store.rows().len(), 160);
    let out = tmp.path().join("probes");
    let report = probe::probe(&spec(&acts, &out)).unwrap();
    for method in [Method::Logistic, Method::MeanDiff] {
        for layer in 0..LAYERS {
            let auc = main_auroc(&report, layer, method, Role::Main);
            if layer == 1 || layer == 3 {
                assert!(auc > 0.95, "{method:?} layer {layer}: {auc}");
            } else {
                assert!((0.3..0.7).contains(&auc), "{method:?} layer {layer}: {auc}");
            }
            // The control cue carries nothing at any layer.
            let control = main_auroc(&report, layer, method, Role::Control);
            assert!(
                (0.25..0.75).contains(&control),
                "control {layer}: {control}"
            );
        }
    }
    for m in report.metrics.iter().filter(|m| m.role == Role::Main) {
        let s = m.shuffled_auroc.unwrap();
        assert!((0.3..0.7).contains(&s), "shuffled {}: {s}", m.hook);
        let (lo, hi) = (m.scores.auroc_lo.unwrap(), m.scores.auroc_hi.unwrap());
        assert!(lo <= m.scores.auroc.unwrap() && m.scores.auroc.unwrap() <= hi);
        assert_eq!(m.scores.n, 80, "main rows exclude the control cue");
        assert!(m.r_p_accept.contains_key("free") && m.r_p_accept.contains_key("paid"));
        // Selectivity = main − control AUROC, inside its paired interval.
        let control = main_auroc(&report, m.layer.unwrap(), m.method, Role::Control);
        let sel = m.extra.selectivity.unwrap();
        assert!((sel - (m.scores.auroc.unwrap() - control)).abs() < 1e-12);
        let (lo, hi) = (
            m.extra.selectivity_lo.unwrap(),
            m.extra.selectivity_hi.unwrap(),
        );
        assert!(lo <= sel && sel <= hi, "{lo} {sel} {hi}");
        if m.layer == Some(1) {
            assert!(lo > 0.2, "planted layer: selectivity interval {lo}..{hi}");
        }
    }
    // Cross matrix: xml -> xml decodes at layer 1; control -> anything does not.
    let cell = |train: &str, test: &str| {
        report
            .metrics
            .iter()
            .find(|m| {
                m.role == Role::Cross
                    && m.layer == Some(1)
                    && m.method == Method::Logistic
                    && m.train == format!("cue={train}")
                    && m.test == format!("cue={test}")
            })
            .and_then(|m| m.scores.auroc)
            .unwrap()
    };
    assert!(cell("xml", "xml") > 0.95);
    assert!((0.25..0.75).contains(&cell("control", "control")));

    // Outputs: report, CSV with the documented columns, probe directions.
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    for col in "hook,position,layer,method,train,test,auroc,auroc_std,auroc_lo,auroc_hi,\
                accuracy,balanced_accuracy,shuffled_auroc,n"
        .split(',')
    {
        assert!(header.split(',').any(|h| h == col), "missing column {col}");
    }
    assert_eq!(csv.lines().count(), 1 + report.metrics.len());
    let dir = probe::load_vector(&out, "blocks.1.hook_resid_post@last.logistic.direction").unwrap();
    assert_eq!(dir.len(), D);
    let norm: f32 = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    let biggest = (0..D)
        .max_by(|&a, &b| dir[a].abs().total_cmp(&dir[b].abs()))
        .unwrap();
    assert_eq!(biggest, 5, "the direction points along the planted axis");
    assert!(dir[5] > 0.0, "positive = free");
    let read_back = Report::read(&out).unwrap();
    assert_eq!(read_back.metrics.len(), report.metrics.len());
    assert_eq!(read_back.settings["seed"], 3);

    // Same seed, same numbers.
    let again = probe::probe(&ProbeSpec {
        out: tmp.path().join("again"),
        ..spec(&acts, &out)
    })
    .unwrap();
    let key = |r: &Report| -> Vec<(Option<f64>, Option<f64>, Option<f64>)> {
        r.metrics
            .iter()
            .map(|m| (m.scores.auroc, m.scores.auroc_lo, m.shuffled_auroc))
            .collect()
    };
    assert_eq!(key(&report), key(&again));

    // Existing output is kept unless --force.
    let err = probe::probe(&spec(&acts, &out)).unwrap_err().to_string();
    assert!(err.contains("--force"), "{err}");
}

/// Each request has its own random signature and one label for all its rows:
/// a probe that saw the request in training could memorise it. Grouped folds
/// never let it, so the held-out AUROC stays at chance.
#[test]
fn grouped_folds_leave_no_request_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = (0..200)
        .map(|r| {
            let req = r / 4;
            json!({
                "id": r,
                "request_id": format!("q{req}"),
                "label": noise(req * 31) > 0.0,
            })
        })
        .collect();
    let acts = tmp.path().join("acts");
    // More dimensions than requests, so a probe could memorise them all.
    synthetic_store_d(&acts, &rows, 64, |r, _| {
        (0..64)
            .map(|j| 3.0 * noise((r / 4) * 97 + j) + 0.05 * noise(r * 13 + j))
            .collect()
    });
    let report = probe::probe(&ProbeSpec {
        label: "label".into(),
        control: Control::None,
        cross: None,
        shuffles: 0,
        ..spec(&acts, &tmp.path().join("p"))
    })
    .unwrap();
    for m in &report.metrics {
        let auc = m.scores.auroc.unwrap();
        assert!((0.25..0.75).contains(&auc), "{}: {auc}", m.hook);
    }
    // The same data with a row-level split would be memorised: check that
    // the data really allows it (so the test above can fail).
    let store = Store::open(&acts).unwrap();
    let x = store.load("blocks.0.hook_resid_post@last").unwrap();
    let y: Vec<Option<bool>> = rows.iter().map(|r| r["label"].as_bool()).collect();
    let row_folds = Folds::explicit((0..200).map(|r| r % 5).collect());
    let all = vec![true; 200];
    let leaky = cross_validate(
        x.view(),
        &y,
        &row_folds,
        &all,
        std::slice::from_ref(&all),
        Method::Logistic,
        &FitSettings::default(),
    )
    .unwrap();
    let groups: Vec<usize> = (0..200).map(|r| r / 4).collect();
    let leaked = summarize(&leaky[0], &y, &groups, 0, 0).auroc.unwrap();
    assert!(leaked > 0.9, "row-level folds memorise requests: {leaked}");
}

#[test]
fn bad_probe_input_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = study_rows();
    let acts = tmp.path().join("acts");
    synthetic_store(&acts, &rows, |r, l| {
        (0..D).map(|j| noise(r * 100 + l * 10 + j)).collect()
    });
    let a = acts.to_str().unwrap();
    let out = tmp.path().join("p");
    let o = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["probe", "--acts", a, "--out", o, "--force"];
        args.extend_from_slice(extra);
        afprobe(&args)
    };
    assert_fails_with(
        &run(&["--label", "colour"]),
        &["no row has the field `colour`", "tier"],
    );
    assert_fails_with(
        &run(&["--label", "training_implied"]),
        &[
            "no row has the field `training_implied`",
            "afprobe prompts --variations",
        ],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--train-filter", "tier=free"]),
        &["tier=free", "both classes"],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--folds", "50"]),
        &["40 groups but 50 folds"],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--test-filter", "cue=natural"]),
        &["cue=natural", "no labelled rows"],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--train-filter", "cue"]),
        &["FIELD=VALUE"],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--positive", "gold"]),
        &["`gold` is not a value of `tier`", "free, paid"],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--hooks", "resid_pre"]),
        &["no hook"],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--method", "logistic,forest"]),
        &[
            "unknown probe method `forest`",
            "linfa-logistic",
            "svm",
            "ridge",
        ],
    );
    assert_fails_with(
        &run(&["--target", "score"]),
        &["--target score", "no row has the field `score`"],
    );
    assert_fails_with(
        &run(&["--target", "cue"]),
        &["--target cue is not numeric", "`xml`"],
    );
    assert_fails_with(
        &run(&["--target", "p_accept", "--method", "logistic"]),
        &["ridge or elastic-net"],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--layer-window", "9"]),
        &["--layer-window 9", "layers 0-3"],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--multi-layer", "2-7"]),
        &["--multi-layer \"2-7\"", "out of range", "0-3"],
    );
    assert_fails_with(
        &run(&["--label", "tier", "--method", "ridge"]),
        &["ridge fits a continuous --target"],
    );
    // Nothing was left behind by the failures.
    assert!(!out.join("report.json").exists());

    // NaN in one layer: that layer is skipped with its reason, the rest probed.
    let nan_acts = tmp.path().join("nan");
    synthetic_store(&nan_acts, &rows, |r, l| {
        (0..D)
            .map(|j| {
                if l == 2 && r == 7 && j == 3 {
                    f32::NAN
                } else {
                    noise(r + j)
                }
            })
            .collect()
    });
    let report = probe::probe(&ProbeSpec {
        shuffles: 0,
        cross: None,
        ..spec(&nan_acts, &tmp.path().join("nan-probes"))
    })
    .unwrap();
    assert_eq!(report.skipped.len(), 1);
    assert!(report.skipped[0].tensor.starts_with("blocks.2."));
    assert!(
        report.skipped[0].reason.contains("non-finite"),
        "{:?}",
        report.skipped
    );
    assert!(report.metrics.iter().all(|m| m.layer != Some(2)));

    // An incomplete store is refused with the way out.
    let manifest_path = acts.join("manifest.json");
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["complete"] = json!(false);
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    assert_fails_with(&run(&["--label", "tier"]), &["incomplete", "--resume"]);
}

/// A target planted linearly in layer 2 (two directions) is read out there by
/// ridge and elastic net (R² > 0.9, r > 0.95, shuffled ≈ 0) and nowhere else.
#[test]
fn regression_probes_recover_a_planted_target() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = study_rows();
    let target = |r: usize| noise(r * 31 + 5) as f64;
    for (r, row) in rows.iter_mut().enumerate() {
        row["planted"] = json!(target(r));
    }
    let acts = tmp.path().join("acts");
    synthetic_store(&acts, &rows, |r, l| {
        (0..D)
            .map(|j| {
                let n = 0.1 * noise(r * 1000 + l * 100 + j);
                match (l, j) {
                    (2, 3) => 2.0 * target(r) as f32 + n,
                    (2, 9) => -target(r) as f32 + noise(r * 1000 + j),
                    _ => noise(r * 1000 + l * 100 + j),
                }
            })
            .collect()
    });
    let report = probe::probe(&ProbeSpec {
        target: Some("planted".into()),
        methods: vec![Method::Ridge, Method::ElasticNet],
        fit: FitSettings {
            alpha: 0.01,
            ..FitSettings::default()
        },
        shuffles: 1,
        bootstrap: 200,
        ..ProbeSpec::new(&acts, &tmp.path().join("p"), "")
    })
    .unwrap();
    assert_eq!(report.metrics.len(), 2 * LAYERS);
    for m in &report.metrics {
        let r = m.extra.regression.as_ref().unwrap();
        let (r2, pr) = (r.r2.unwrap(), r.pearson_r.unwrap());
        if m.layer == Some(2) {
            assert!(r2 > 0.9 && pr > 0.95, "{:?}: R² {r2}, r {pr}", m.method);
            assert!(r.r2_lo.unwrap() <= r2 && r2 <= r.r2_hi.unwrap());
            assert!(r.pearson_lo.unwrap() > 0.9);
        } else {
            assert!(r2 < 0.2, "layer {:?}: R² {r2}", m.layer);
        }
        assert!(r.shuffled_r2.unwrap() < 0.2, "shuffled {:?}", r.shuffled_r2);
    }
    let csv = std::fs::read_to_string(tmp.path().join("p/metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    for col in [
        "auroc",
        "r2",
        "r2_lo",
        "pearson_r",
        "shuffled_r2",
        "selectivity",
        "target",
    ] {
        assert!(header.contains(&col), "missing column {col}");
    }
    assert_eq!(report.best.len(), 2);
    assert!(report.best.iter().all(|b| b.layer == Some(2)));
}

/// A weak tier signal planted in every layer with independent noise: the
/// multi-layer probes (concatenated and mean-score, over all 4 layers and over
/// sliding windows of 2) never score below the best single layer.
#[test]
fn multi_layer_probes_beat_the_best_single_layer_on_a_spread_signal() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = study_rows();
    let acts = tmp.path().join("acts");
    synthetic_store(&acts, &rows, |r, l| {
        let free = rows[r]["tier"] == "free";
        (0..D)
            .map(|j| {
                let planted = if j == 5 && free { 0.5 } else { 0.0 };
                noise(r * 1000 + l * 100 + j) + planted
            })
            .collect()
    });
    let report = probe::probe(&ProbeSpec {
        shuffles: 0,
        bootstrap: 200,
        control: Control::None,
        multi: probe::MultiLayer {
            sets: vec!["0-3".into()],
            window: Some(2),
        },
        ..ProbeSpec::new(&acts, &tmp.path().join("p"), "tier")
    })
    .unwrap();
    for method in [Method::Logistic, Method::MeanDiff] {
        let best = report
            .best
            .iter()
            .find(|b| b.method == method)
            .and_then(|b| b.scores.auroc)
            .unwrap();
        let multi: Vec<_> = report
            .metrics
            .iter()
            .filter(|m| m.method == method && m.extra.combine.is_some())
            .collect();
        assert_eq!(
            multi.len(),
            2 * (1 + 3),
            "{method:?}: 0-3 and 3 windows, two kinds"
        );
        for m in multi.iter().filter(|m| m.extra.layers == [0, 1, 2, 3]) {
            let auc = m.scores.auroc.unwrap();
            assert!(
                auc >= best,
                "{method:?} {:?}: {auc} < best single {best}",
                m.extra.combine
            );
            assert!(m.scores.auroc_lo.unwrap() <= auc && auc <= m.scores.auroc_hi.unwrap());
            assert_eq!(m.hook, "blocks.0-3.hook_resid_post");
        }
    }
    let csv = std::fs::read_to_string(tmp.path().join("p/metrics.csv")).unwrap();
    assert!(csv
        .lines()
        .any(|l| l.contains("blocks.0-3.hook_resid_post") && l.ends_with(",concat")));
}

/// Every figure is written as a PNG of the documented size and a well-formed SVG.
#[test]
fn figures_render_as_png_and_svg() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = study_rows();
    let acts = tmp.path().join("acts");
    synthetic_store(&acts, &rows, |r, l| {
        let free = rows[r]["tier"] == "free";
        (0..D)
            .map(|j| noise(r * 100 + l * 10 + j) + if free && j == 2 { l as f32 } else { 0.0 })
            .collect()
    });
    std::fs::write(
        acts.join("gap.json"),
        json!({"by_cue": {"xml": {"n_requests": 40, "p_accept_free": 0.6, "p_accept_paid": 0.5,
            "gap": 0.1, "ci95": [0.05, 0.15], "p_value": 0.01, "frac_accept_free": 0.6,
            "frac_accept_paid": 0.5}}, "overall": null, "benign": null, "seed": 0,
            "resamples": 1000})
        .to_string(),
    )
    .unwrap();
    let probes = tmp.path().join("probes");
    probe::probe(&ProbeSpec {
        shuffles: 1,
        ..spec(&acts, &probes)
    })
    .unwrap();
    let figures = tmp.path().join("figures");
    let out = afprobe(&[
        "plot",
        probes.to_str().unwrap(),
        "--out",
        figures.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    for stem in [
        "auroc_resid_post_last",
        "cross_resid_post_last",
        "pca_resid_post_last",
        "score_vs_p_accept_resid_post_last",
        "gap",
    ] {
        let png = figures.join(format!("{stem}.png"));
        let img = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert_eq!((img.width(), img.height()), (960, 600), "{stem}");
        // Not a blank canvas: some pixels are neither white nor one flat colour.
        let rgb = img.to_rgb8();
        let inked = rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(inked > 5_000, "{stem}: only {inked} non-white pixels");
        let svg = std::fs::read_to_string(figures.join(format!("{stem}.svg"))).unwrap();
        assert_well_formed_svg(&svg, stem);
    }
    // No temporary files are left behind.
    for entry in std::fs::read_dir(&figures).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with('.'), "leftover {name}");
    }
    // A store renders its gap and PCA; a directory that is neither is refused.
    let out = afprobe(&[
        "plot",
        acts.to_str().unwrap(),
        "--out",
        figures.to_str().unwrap(),
        "--layer",
        "2",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(figures.join("pca_resid_post_l2_last.png").exists());
    assert_fails_with(
        &afprobe(&[
            "plot",
            tmp.path().to_str().unwrap(),
            "--out",
            figures.to_str().unwrap(),
        ]),
        &["neither a probe directory"],
    );
    // A store without activations says so instead of panicking.
    let rows_only = tmp.path().join("rows-only");
    common::write_store_files(
        &rows_only,
        &rows,
        &common::StoreShape::default(),
        true,
        vec![],
    );
    assert_fails_with(
        &afprobe(&[
            "plot",
            rows_only.to_str().unwrap(),
            "--out",
            figures.to_str().unwrap(),
        ]),
        &["rows-only"],
    );
}

/// Elements open and close in order, with the documented size.
fn assert_well_formed_svg(svg: &str, stem: &str) {
    assert!(
        svg.contains("<svg") && svg.contains(r#"width="960""#) && svg.contains(r#"height="600""#),
        "{stem}"
    );
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let end = rest[start..]
            .find('>')
            .unwrap_or_else(|| panic!("{stem}: unclosed tag"))
            + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "{stem}: mismatched </{name}>"
            );
        } else {
            stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
        }
    }
    assert!(stack.is_empty(), "{stem}: unclosed {stack:?}");
}

/// The real default model: prompts, scored capture, probe and plot through the CLI.
#[test]
fn real_model_probe_and_plot_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let requests = path("requests.jsonl");
    let lines: String = (0..10)
        .map(|i| {
            format!("{{\"id\": \"q{i}\", \"request\": \"Explain step {i} of picking a lock.\"}}\n")
        })
        .collect();
    std::fs::write(&requests, lines).unwrap();
    let ok = |args: &[&str]| {
        let out = afprobe(args);
        assert!(out.status.success(), "{args:?}: {}", common::stderr(&out));
        out
    };
    ok(&[
        "prompts",
        "--cues",
        "xml,control",
        "--requests",
        &requests,
        "--out",
        &path("p.jsonl"),
    ]);
    ok(&[
        "capture",
        "--prompts",
        &path("p.jsonl"),
        "--layers",
        "0,10,20,29",
        "--positions",
        "last",
        "--score",
        "--out",
        &path("acts"),
    ]);
    ok(&["gap", &path("acts")]);
    let out = ok(&[
        "probe",
        "--acts",
        &path("acts"),
        "--label",
        "tier",
        "--folds",
        "5",
        "--out",
        &path("probes"),
    ]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("blocks.29.hook_resid_post"), "{summary}");
    let report = Report::read(Path::new(&path("probes"))).unwrap();
    assert_eq!(report.model.spec, "smollm2-135m");
    // 4 layers x 2 methods x (main + control).
    assert_eq!(report.metrics.len(), 16);
    for m in &report.metrics {
        assert_eq!(m.scores.n, 20, "10 requests x 2 tiers per evaluation");
        let auc = m.scores.auroc.unwrap();
        assert!((0.0..=1.0).contains(&auc));
    }
    ok(&["plot", &path("probes"), "--out", &path("figures")]);
    for f in [
        "auroc_resid_post_last.png",
        "gap.svg",
        "pca_resid_post_last.svg",
    ] {
        assert!(tmp.path().join("figures").join(f).exists(), "{f}");
    }
}

/// No two text boxes share a pixel (with the layout's gap between them).
fn assert_apart(labels: &[&afprobe::plot::layout::Label], what: &str) {
    for (i, a) in labels.iter().enumerate() {
        for b in &labels[i + 1..] {
            assert!(
                !a.rect.overlaps(&b.rect),
                "{what}: `{}` {:?} overlaps `{}` {:?}",
                a.text,
                a.rect,
                b.text,
                b.rect
            );
        }
    }
}

fn gap_items(names: &[String]) -> Vec<afprobe::plot::data::Interval> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let summary = name == "overall" || name == "benign";
            afprobe::plot::data::Interval {
                label: name.clone(),
                value: 0.01 * noise(i) as f64,
                lo: 0.01 * noise(i) as f64 - 0.005,
                hi: 0.01 * noise(i) as f64 + 0.005,
                group: if summary {
                    "summary".into()
                } else {
                    name.split('@').next().unwrap().into()
                },
                summary,
            }
        })
        .collect()
}

/// The demo's gap figure (cues with variations, then overall and benign) and a
/// bigger one: the category labels, measured with the bundled font, never touch
/// each other or the title, and sit beside the plot, not on it.
#[test]
fn gap_figure_labels_do_not_overlap() {
    use afprobe::plot::data::SIZE;
    use afprobe::plot::layout::{self, Orientation};
    let title = "Compliance gap, mean p_accept(free) - p_accept(paid) per request";
    for cues in [4, 12] {
        let mut names: Vec<String> = Vec::new();
        for c in 0..cues {
            let cue = ["control", "monitoring", "natural", "xml-with-a-long-name"][c % 4];
            let cue = format!("{cue}{}", if c >= 4 { c.to_string() } else { "".into() });
            names.push(cue.clone());
            if c > 0 {
                names.push(format!("{cue}@flipped"));
                names.push(format!("{cue}@no-training-info"));
            }
        }
        names.extend(["overall".to_string(), "benign".to_string()]);
        assert!(names.len() >= 12);
        let items = gap_items(&names);
        let l = layout::intervals(title, &items, SIZE);
        assert_eq!(
            l.orientation,
            Orientation::Horizontal,
            "{} rows",
            names.len()
        );
        let boxes = l.text_boxes();
        assert_apart(&boxes, &format!("gap figure, {} rows", names.len()));
        let frame = layout::Rect::new(0, 0, SIZE.0 as i32, SIZE.1 as i32);
        for label in &boxes {
            assert!(
                frame.contains(&label.rect),
                "{} outside the figure",
                label.text
            );
        }
        for label in l.labels.iter().flatten() {
            assert!(label.rect.x1 <= l.plot.x0, "{} on the plot", label.text);
            assert!(label.size >= 10, "{} at {} px", label.text, label.size);
        }
        if names.len() <= 16 {
            assert!(l.labels.iter().all(Option::is_some), "every row labelled");
        } else {
            assert!(l.labels.iter().flatten().count() > names.len() / 3);
        }
        // Summary rows are set apart by a separator, below every cue.
        let first_summary = names.iter().position(|n| n == "overall").unwrap();
        assert_eq!(l.separators.len(), 1);
        assert!(l.centers[first_summary - 1] < l.separators[0]);
        assert!(l.separators[0] < l.centers[first_summary]);
    }
    // A handful of short names stays upright, and apart.
    let names: Vec<String> = ["xml", "natural", "overall", "benign"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let l = layout::intervals(title, &gap_items(&names), SIZE);
    assert_eq!(l.orientation, Orientation::Vertical);
    assert_apart(&l.text_boxes(), "upright gap figure");
}

/// A 30-layer patching heatmap (and a 100-row one): row, column and colour-bar
/// labels never touch each other, the title or the cells.
#[test]
fn heatmap_labels_do_not_overlap() {
    use afprobe::plot::data::SIZE;
    use afprobe::plot::layout;
    let title = "Patching paid into free: share of the p_accept difference restored (8 pairs)";
    for n in [30, 100] {
        let rows: Vec<String> = (0..n).map(|l| format!("{l} resid_post")).collect();
        let cols: Vec<String> = ["last", "cue", "user"].map(String::from).to_vec();
        let l = layout::heatmap(
            title,
            ("hook", "patched positions"),
            &rows,
            &cols,
            (0.0, 1.0),
            SIZE,
        );
        let boxes = l.text_boxes();
        assert_apart(&boxes, &format!("{n}-row heatmap"));
        for label in &boxes {
            assert!(
                !label.rect.overlaps(&l.cells),
                "{} on the cells",
                label.text
            );
            assert!(
                !label.rect.overlaps(&l.bar),
                "{} on the colour bar",
                label.text
            );
        }
        assert!(!l.row_desc.rect.overlaps(&l.cells));
        let labelled = l.row_labels.iter().flatten().count();
        if n == 30 {
            assert_eq!(labelled, 30, "every layer labelled");
        } else {
            assert!(labelled >= n / 4, "{labelled} of {n} rows labelled");
        }
        assert!(l.col_labels.iter().all(Option::is_some));
        // The colour bar spans red to blue with round ticks, 0 and 1 among them.
        let ticks: Vec<&str> = l.bar_ticks.iter().map(|(_, t)| t.text.as_str()).collect();
        assert!(ticks.len() >= 3, "{ticks:?}");
        assert!(
            ticks.contains(&"0.0") && ticks.contains(&"1.0"),
            "{ticks:?}"
        );
    }
}

/// Tick labels print as many decimals as their step needs: integers as integers.
#[test]
fn ticks_are_formatted_for_their_range() {
    use afprobe::plot::layout::Ticks;
    let t = Ticks::new(-28.0, 24.0, 12);
    let labels: Vec<String> = t.values.iter().map(|&v| t.format(v)).collect();
    assert!(labels.contains(&"-25".to_string()) && labels.contains(&"20".to_string()));
    assert!(labels.iter().all(|l| !l.contains('.')), "{labels:?}");
    let t = Ticks::new(0.0, 1.0, 6);
    let labels: Vec<String> = t.values.iter().map(|&v| t.format(v)).collect();
    assert_eq!(labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
    let t = Ticks::new(-0.015, 0.025, 10);
    assert!(t.values.iter().any(|&v| t.format(v) == "0.000"), "{t:?}");
    assert!(t.values.iter().all(|&v| t.format(v) != "-0.000"));
    let t = Ticks::integers(-0.5, 3.5, 12);
    assert_eq!(t.values, [0.0, 1.0, 2.0, 3.0]);
}
