//! Direct logit attribution: the embedding and every layer's attention and MLP
//! terms sum to the logit difference (the identity is exact with the norm scale
//! frozen), and that difference equals the one in the model's own logits — on a
//! tiny model and on the default model; bad input is refused.

mod common;

use std::path::Path;

use common::{afprobe, assert_fails_with, fixtures};
use serde_json::{json, Value};

fn write_rows(path: &Path, with_continuations: bool) {
    let mut text = String::new();
    for q in 0..3 {
        for tier in ["free", "paid"] {
            let mut row = json!({"id": format!("{tier}-{q}"),
                "messages": [{"role": "system", "content": "Shared system prompt."},
                             {"role": "user", "content": format!("{tier} tier. Request {q}: help.")}],
                "tier": tier, "request_id": format!("q{q}"), "cue": "natural"});
            if with_continuations {
                row["continuations"] =
                    json!({"accept": "<request_fully_accepted/>", "reject": "<rejected/>"});
            }
            text.push_str(&format!("{row}\n"));
        }
    }
    std::fs::write(path, text).unwrap();
}

fn check_run(model: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    write_rows(&prompts, true);
    let out = tmp.path().join("dla");
    let mut args = vec!["attribute", "--prompts", prompts.to_str().unwrap()];
    if !model.is_empty() {
        args.extend(["--model", model]);
    }
    args.extend(["--out", out.to_str().unwrap()]);
    let o = afprobe(&args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("attribute.json")).unwrap())
            .unwrap();
    assert_eq!(report["n_pairs"], 3);
    assert!(report["max_head_sum_error"].as_f64().unwrap() < 1e-3);
    assert!(!report["heads"].as_array().unwrap().is_empty());
    for line in std::fs::read_to_string(out.join("rows.jsonl"))
        .unwrap()
        .lines()
    {
        let r: Value = serde_json::from_str(line).unwrap();
        let diff = r["logit_diff"].as_f64().unwrap();
        let model_diff = r["logit_diff_model"].as_f64().unwrap();
        let sum = r["embed"].as_f64().unwrap()
            + ["attn_out", "mlp_out"]
                .iter()
                .flat_map(|k| {
                    r[*k]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap())
                })
                .sum::<f64>();
        let tol = 1e-3 * diff.abs().max(1.0);
        assert!(
            (sum - diff).abs() < tol,
            "{model}: components {sum} vs {diff}"
        );
        assert!(
            (diff - model_diff).abs() < tol,
            "{model}: DLA {diff} vs logits {model_diff}"
        );
        // Each layer's attention heads sum to its attn_out term.
        let heads = r["heads"]
            .as_array()
            .expect("per-head terms (Llama blocks)");
        for (l, layer) in heads.iter().enumerate() {
            let sum: f64 = layer
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .sum();
            let attn = r["attn_out"][l].as_f64().unwrap();
            assert!(
                (sum - attn).abs() < 1e-3 * attn.abs().max(1.0),
                "{model}: layer {l} heads {sum} vs attn_out {attn}"
            );
        }
    }
    // The figure renders.
    let fig = tmp.path().join("fig");
    let o = afprobe(&[
        "plot",
        out.to_str().unwrap(),
        "--out",
        fig.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(fig.join("attribute.png").exists());
}

#[test]
fn components_sum_to_the_logit_difference_of_a_tiny_model() {
    check_run(fixtures().join("tiny_llama3").to_str().unwrap());
}

#[test]
fn components_sum_to_the_logit_difference_of_the_default_model() {
    check_run("");
}

#[test]
fn attribution_needs_both_tags_and_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    write_rows(&prompts, false);
    let model = fixtures().join("tiny_llama3");
    let out = tmp.path().join("dla");
    let args = |filter: &str| {
        vec![
            "attribute".to_string(),
            "--prompts".into(),
            prompts.to_str().unwrap().into(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--filter".into(),
            filter.into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let run = |a: Vec<String>| afprobe(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_fails_with(&run(args("all")), &["no `accept` continuation"]);
    write_rows(&prompts, true);
    assert_fails_with(&run(args("tier=free")), &["has no tier=paid row"]);
}
