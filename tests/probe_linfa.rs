//! The linfa probes against independent references: linfa-logistic against our
//! solver, the linear SVM and ridge against scikit-learn (`SVC(kernel="linear")`,
//! `LinearSVC`, `Ridge`) on real SmolLM2 activations with scikit-learn's folds
//! (tests/fixtures/linear_ref.json from make_linear_fixture.py).

mod common;

use ndarray::Array2;
use serde_json::Value;

use afprobe::probe::cv::{cross_validate, cross_validate_target, summarize};
use afprobe::probe::fit::fit_target;
use afprobe::probe::{FitSettings, Folds, Method};
use common::{fixtures, load_fixture};

struct Fixture {
    x: Vec<(String, Array2<f32>)>,
    y: Vec<Option<bool>>,
    folds: Folds,
    fold: Vec<usize>,
    linear: Value,
}

fn fixture() -> Fixture {
    let tensors = load_fixture(&fixtures().join("probe_ref.safetensors"));
    let read = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
    };
    let reference = read("probe_ref.json");
    let y: Vec<Option<bool>> = reference["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| Some(l.as_i64() == Some(1)))
        .collect();
    let fold: Vec<usize> = tensors["fold"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|f| f as usize)
        .collect();
    let mut x = Vec::new();
    for layer in ["1", "9", "23", "29"] {
        let t = &tensors[&format!("resid.{layer}")];
        let (r, c) = t.dims2().unwrap();
        let data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        x.push((
            layer.to_string(),
            Array2::from_shape_vec((r, c), data).unwrap(),
        ));
    }
    Fixture {
        x,
        y,
        folds: Folds::explicit(fold.clone()),
        fold,
        linear: read("linear_ref.json"),
    }
}

fn oof_auroc(f: &Fixture, x: &Array2<f32>, method: Method) -> f64 {
    let all = vec![true; f.y.len()];
    let oof = cross_validate(
        x.view(),
        &f.y,
        &f.folds,
        &all,
        std::slice::from_ref(&all),
        method,
        &FitSettings::default(),
    )
    .unwrap();
    let groups: Vec<usize> = (0..f.y.len()).collect();
    summarize(&oof[0], &f.y, &groups, 0, 0).auroc.unwrap()
}

/// linfa-logistic (same objective, its own solver) gives our solver's AUROC within 0.01.
#[test]
fn linfa_logistic_agrees_with_our_solver() {
    let f = fixture();
    for (layer, x) in &f.x {
        let ours = oof_auroc(&f, x, Method::Logistic);
        let linfa = oof_auroc(&f, x, Method::LinfaLogistic);
        eprintln!("layer {layer}: logistic {ours:.4}, linfa-logistic {linfa:.4}");
        assert!(
            (ours - linfa).abs() < 0.01,
            "layer {layer}: {ours} vs {linfa}"
        );
    }
}

/// The linear SVM solves scikit-learn's SVC(kernel="linear", C=1) problem: the
/// fold-0 weights point the same way (cosine > 0.999) and the out-of-fold AUROC
/// is SVC's within 0.005 and LinearSVC's (squared hinge, liblinear) within 0.02.
#[test]
fn svm_matches_scikit_learn() {
    let f = fixture();
    let labels: Vec<bool> = f.y.iter().map(|l| *l == Some(true)).collect();
    for (layer, x) in &f.x {
        let want = &f.linear["layers"][layer];
        let got = oof_auroc(&f, x, Method::Svm);
        let svc = want["svc_auroc"].as_f64().unwrap();
        let linear_svc = want["linear_svc_auroc"].as_f64().unwrap();
        eprintln!("layer {layer}: svm {got:.4}, SVC {svc:.4}, LinearSVC {linear_svc:.4}");
        assert!(
            (got - svc).abs() < 0.005,
            "layer {layer}: {got} vs SVC {svc}"
        );
        assert!(
            (got - linear_svc).abs() < 0.02,
            "layer {layer}: {got} vs {linear_svc}"
        );
        let rows: Vec<usize> = (0..f.y.len()).filter(|&r| f.fold[r] != 0).collect();
        let probe = afprobe::probe::fit::fit(
            x.view(),
            &rows,
            &labels,
            Method::Svm,
            &FitSettings::default(),
            None,
        )
        .unwrap();
        let w_ref: Vec<f64> = want["fold0"]["svc_weight"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let dot: f64 = probe.weight.iter().zip(&w_ref).map(|(a, b)| a * b).sum();
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|a| a * a).sum::<f64>().sqrt();
        let cosine =
            dot / (norm(&mut probe.weight.iter().copied()) * norm(&mut w_ref.iter().copied()));
        assert!(cosine > 0.999, "layer {layer}: cosine {cosine}");
    }
}

/// Ridge (linfa-elasticnet, l1_ratio 0) equals scikit-learn's Ridge(alpha=100):
/// fold-0 weights within 1e-4 relative (L2), out-of-fold R² within 1e-4.
#[test]
fn ridge_matches_scikit_learn() {
    let f = fixture();
    let target: Vec<f64> = f.linear["target"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let t: Vec<Option<f64>> = target.iter().map(|&v| Some(v)).collect();
    let settings = FitSettings {
        alpha: f.linear["ridge_alpha"].as_f64().unwrap(),
        ..FitSettings::default()
    };
    let all = vec![true; t.len()];
    for (layer, x) in &f.x {
        let want = &f.linear["layers"][layer];
        let rows: Vec<usize> = (0..t.len()).filter(|&r| f.fold[r] != 0).collect();
        let probe = fit_target(x.view(), &rows, &target, Method::Ridge, &settings).unwrap();
        let w_ref: Vec<f64> = want["fold0"]["ridge_weight"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let diff: f64 = probe
            .weight
            .iter()
            .zip(&w_ref)
            .map(|(a, b)| (a - b) * (a - b))
            .sum();
        let norm: f64 = w_ref.iter().map(|b| b * b).sum();
        let rel = (diff / norm).sqrt();
        let bias_ref = want["fold0"]["ridge_bias"].as_f64().unwrap();
        assert!(rel < 1e-4, "layer {layer}: relative weight error {rel}");
        assert!((probe.bias - bias_ref).abs() < 1e-6, "layer {layer}: bias");
        let oof = cross_validate_target(
            x.view(),
            &t,
            &f.folds,
            &all,
            std::slice::from_ref(&all),
            Method::Ridge,
            &settings,
        )
        .unwrap();
        let truth: Vec<f64> = oof[0].rows.iter().map(|&r| target[r]).collect();
        let r2 = afprobe::probe::metrics::r_squared(&oof[0].scores, &truth).unwrap();
        let r2_ref = want["ridge_r2"].as_f64().unwrap();
        eprintln!("layer {layer}: ridge R² {r2:.5} vs scikit-learn {r2_ref:.5}, weights {rel:.1e}");
        assert!(
            (r2 - r2_ref).abs() < 1e-4,
            "layer {layer}: R² {r2} vs {r2_ref}"
        );
    }
}
