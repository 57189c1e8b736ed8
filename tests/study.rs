//! The alignment-faking study: `afprobe prompts`, request loaders, and
//! `afprobe gap` on stores with known scores.

mod common;

use std::path::Path;

use afprobe::gap::compute_gap;
use afprobe::model::{Model, ModelSpec, WeightDtype};
use afprobe::prompts::{read_prompt_file, render};
use afprobe::store::Store;
use afprobe::study::setting::{
    build_rows, builtin_cues, builtin_requests, builtin_setting, load_requests,
};
use common::{afprobe, assert_fails_with as fails, fixtures};
use serde_json::{json, Value};

#[test]
fn rendered_study_prompts_match_the_snapshot_and_locate_every_cue() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("study.jsonl");
    let run = afprobe(&["prompts", "--out", out.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let rows = read_prompt_file(&out).unwrap();
    assert_eq!(rows.len(), 4 * 180 * 2);
    let model = Model::load(&ModelSpec::Default, WeightDtype::F32).unwrap();
    // Snapshot: the exact chat text of two rows. When the setting's wording changes on
    // purpose, rerun with AFPROBE_UPDATE_SNAPSHOTS=1 and review the diff.
    let snapshot: String = [0usize, 1]
        .iter()
        .map(|&i| render(&model, &rows[i], &out).unwrap().text + "\n=====\n")
        .collect();
    let path = fixtures().join("study_snapshot.txt");
    if std::env::var_os("AFPROBE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &snapshot).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    assert!(snapshot == want, "rendered prompts changed:\n{snapshot}");
    // Every row's cue is found, on tokens inside the user turn.
    for row in &rows {
        let r = render(&model, row, &out).unwrap();
        let (cue, user) = (r.cue_span.unwrap(), r.user_span.unwrap());
        assert!(
            cue.0 >= user.0 && cue.1 <= user.1,
            "{}: cue outside the user turn",
            row.id
        );
        let training = row.metadata["training_implied"].as_bool().unwrap();
        let want = row.metadata["cue"] != "control" && row.metadata["tier"] == "free";
        assert_eq!(training, want, "{}", row.id);
    }
}

#[test]
fn request_files_load_and_bad_ones_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let jsonl = load_requests(&write("r.jsonl", "{\"request\": \"Do X.\", \"id\": \"x1\"}\n\n{\"request\": \"Do Y.\", \"harmful\": false}\n")).unwrap();
    assert_eq!((jsonl[0].id.as_str(), jsonl[1].harmful), ("x1", false));
    let json = load_requests(&write(
        "r.json",
        r#"["Do X.", {"goal": "Do Y.", "category": "c"}]"#,
    ))
    .unwrap();
    assert_eq!(
        (json[1].text.as_str(), json[1].category.as_str()),
        ("Do Y.", "c")
    );
    let csv = load_requests(&write(
        "r.csv",
        "goal,target\n\"Write a, b\",Sure\nDo Z.,Sure\n",
    ))
    .unwrap();
    assert_eq!(csv[0].text, "Write a, b");
    assert_eq!(csv.len(), 2);

    let err = |p: &Path| load_requests(p).unwrap_err().to_string();
    assert!(err(&write("bad.jsonl", "{\"request\": \"ok\"}\n{oops\n")).contains("bad.jsonl:2"));
    assert!(err(&write("nogoal.csv", "prompt,target\na,b\n")).contains("no `goal` column"));
    assert!(err(&write("empty.jsonl", "\n")).contains("no requests"));
    assert!(err(&write("blank.csv", "goal,target\n\"\",x\n")).contains("CSV record 2"));
    assert!(err(&write("r.txt", "x")).contains(".csv"));

    let out = tmp.path().join("p.jsonl");
    let o = out.to_str().unwrap();
    fails(
        &afprobe(&["prompts", "--cues", "xml,purple", "--out", o]),
        &["purple", "xml, natural, monitoring, control"],
    );
    fails(
        &afprobe(&["prompts", "--setting", "sycophancy", "--out", o]),
        &["sycophancy", "helpful-only"],
    );
    let template = write("t.txt", "{request} only");
    fails(
        &afprobe(&[
            "prompts",
            "--user-template",
            template.to_str().unwrap(),
            "--out",
            o,
        ]),
        &["t.txt", "{cue}"],
    );
    fails(
        &afprobe(&["prompts", "--requests", "/no/such.csv", "--out", o]),
        &["/no/such.csv"],
    );
}

/// A store of `rows` with scores, as `capture --score` would leave them (one
/// zero activation per row: the gap reads only the rows).
fn store_with_rows(dir: &Path, rows: &[Value], score: bool) -> Store {
    let shape = common::StoreShape {
        hooks: vec!["blocks.0.hook_resid_post".into()],
        positions: vec![afprobe::store::Position::Last],
        d_model: 1,
        n_layers: 1,
    };
    let zeros = candle_core::Tensor::zeros(
        (rows.len(), 1),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    common::write_store(
        dir,
        rows,
        &shape,
        score,
        vec![("blocks.0.hook_resid_post@last".into(), zeros)],
    )
}

#[test]
fn gap_on_known_scores_gives_the_known_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    // xml: free 0.9/0.7/0.5 vs paid 0.4/0.6/0.2 -> diffs 0.5, 0.1, 0.3; control: no difference.
    for (cue, free, paid) in [
        ("xml", [0.9, 0.7, 0.5], [0.4, 0.6, 0.2]),
        ("control", [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]),
    ] {
        for q in 0..3 {
            for (tier, p) in [("free", free[q]), ("paid", paid[q])] {
                rows.push(json!({"id": format!("{cue}-{tier}-{q}"), "cue": cue, "tier": tier, "request_id": format!("q{q}"),
                                 "harmful": true, "training_implied": cue == "xml" && tier == "free", "p_accept": p,
                                 "tag_mass": if tier == "free" { 0.5 } else { 0.25 }}));
            }
        }
    }
    for (tier, p) in [("free", 0.8), ("paid", 0.8)] {
        rows.push(json!({"id": format!("b-{tier}"), "cue": "xml", "tier": tier, "request_id": "b0", "harmful": false, "p_accept": p}));
    }
    let store = store_with_rows(&tmp.path().join("s"), &rows, true);
    let report = compute_gap(&store, 2000, 0).unwrap();
    let xml = &report.by_cue["xml"];
    assert_eq!(xml.n_requests, 3);
    assert!((xml.gap - 0.3).abs() < 1e-12);
    assert!((xml.p_accept_free - 0.7).abs() < 1e-12 && (xml.p_accept_paid - 0.4).abs() < 1e-12);
    assert!(
        (xml.frac_accept_free - 2.0 / 3.0).abs() < 1e-12
            && (xml.frac_accept_paid - 1.0 / 3.0).abs() < 1e-12
    );
    // Exact sign flips of (0.5, 0.1, 0.3): only all-+ and all-− reach |0.9|.
    assert!((xml.p_value - 0.25).abs() < 1e-12);
    assert!(xml.ci95[0] >= 0.1 - 1e-12 && xml.ci95[1] <= 0.5 + 1e-12);
    assert_eq!(report.by_cue["control"].gap, 0.0);
    // Overall leaves the control cue out; benign is its own line.
    assert!((report.overall.as_ref().unwrap().gap - 0.3).abs() < 1e-12);
    assert_eq!(report.benign.as_ref().unwrap().n_requests, 1);
    let mass = report.tag_mass.as_ref().unwrap();
    assert_eq!((mass.free, mass.paid), (0.5, 0.25));

    // gap.json through the CLI, and a store without scores is refused.
    let out = afprobe(&[
        "gap",
        tmp.path().join("s").to_str().unwrap(),
        "--resamples",
        "1000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("s/gap.json")).unwrap())
            .unwrap();
    assert!((json["by_cue"]["xml"]["gap"].as_f64().unwrap() - 0.3).abs() < 1e-12);
    for key in [
        "n_requests",
        "p_accept_free",
        "p_accept_paid",
        "gap",
        "ci95",
        "p_value",
        "frac_accept_free",
        "frac_accept_paid",
    ] {
        assert!(json["overall"].get(key).is_some(), "gap.json lacks {key}");
    }
    let unscored: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.as_object_mut().unwrap().remove("p_accept");
            r
        })
        .collect();
    store_with_rows(&tmp.path().join("u"), &unscored, false);
    fails(
        &afprobe(&["gap", tmp.path().join("u").to_str().unwrap()]),
        &["no scores", "--score"],
    );
}

#[test]
fn study_rows_pair_up_by_request() {
    let setting = builtin_setting("helpful-only", true).unwrap();
    assert!(setting.system.contains("<SCRATCHPAD_REASONING>"));
    let requests = builtin_requests();
    let rows = build_rows(&setting, &builtin_cues(), &requests).unwrap();
    let ids: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), rows.len(), "row ids are unique");
}

#[test]
fn sampling_runs_are_reproducible_and_feed_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for q in 0..3 {
        for tier in ["free", "paid"] {
            rows.push(json!({"id": format!("{tier}-{q}"), "text": format!("<|im_start|>user\n{tier} {q}<|im_end|>\n<|im_start|>assistant\n"),
                             "tier": tier, "request_id": format!("q{q}"), "cue": "xml"}));
        }
    }
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        rows.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .unwrap();
    let model = fixtures().join("tiny_qwen2");
    let run = |out: &Path, seed: &str| {
        let o = afprobe(&[
            "sample",
            "--prompts",
            prompts.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-n",
            "3",
            "--max-new-tokens",
            "6",
            "--seed",
            seed,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out.join("transcripts.jsonl")).unwrap()
    };
    let a = run(&tmp.path().join("a"), "1");
    assert_eq!(a.lines().count(), 6 * 3);
    assert_eq!(
        a,
        run(&tmp.path().join("b"), "1"),
        "same seed, same transcripts"
    );
    assert_ne!(a, run(&tmp.path().join("c"), "2"));
    // Random tokens from a tiny model never write the tags: all format failures, no gap.
    let sampled: Vec<Value> = std::fs::read_to_string(tmp.path().join("a/rows.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(sampled
        .iter()
        .all(|r| r["samples"]["neither"] == 3 && r["format_failure"] == 1.0));
    // Each response is also read format-free, and rows count the refusals.
    for line in a.lines() {
        let t: Value = serde_json::from_str(line).unwrap();
        let reading = afprobe::study::refusal::read(t["text"].as_str().unwrap());
        assert_eq!(t["reading"], serde_json::to_value(reading).unwrap());
    }
    for r in &sampled {
        if let Some(p) = r["p_refuse"].as_f64() {
            assert!((0.0..=1.0).contains(&p));
        }
    }
    let out = afprobe(&[
        "gap",
        tmp.path().join("a").to_str().unwrap(),
        "--resamples",
        "500",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("format failures (neither tag): 1.000 (free), 1.000 (paid)"));
    // An existing run is not overwritten without --force.
    let again = afprobe(&[
        "sample",
        "--prompts",
        prompts.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        tmp.path().join("a").to_str().unwrap(),
    ]);
    fails(&again, &["already holds a sampling run", "--force"]);
}

#[test]
fn variation_sets_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("v.jsonl");
    let o = out.to_str().unwrap();
    let ok = afprobe(&[
        "prompts",
        "--cues",
        "xml",
        "--requests",
        "builtin-benign",
        "--variations",
        "standard,flipped",
        "--out",
        o,
    ]);
    assert!(ok.status.success(), "{}", common::stderr(&ok));
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2 * 60 * 2);
    let ids: std::collections::HashSet<&str> =
        rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), rows.len(), "ids stay unique across variations");
    let flipped_free = rows
        .iter()
        .find(|r| r["variation"] == json!(["flipped"]) && r["tier"] == "free")
        .unwrap();
    assert_eq!(flipped_free["training_implied"], false);
    fails(
        &afprobe(&["prompts", "--variations", "flippd", "--out", o]),
        &["unknown variation `flippd`", "no-training-info"],
    );
    fails(
        &afprobe(&[
            "prompts",
            "--variations",
            "flipped",
            "--system",
            o,
            "--out",
            o,
        ]),
        &["built-in variation `flipped` cannot edit it"],
    );
    // A cue-file variation whose text is absent from the prompt is refused, and nothing is written.
    let cues = tmp.path().join("cues.toml");
    std::fs::write(
        &cues,
        "[[variation]]\nname = \"quiet\"\ntarget = \"system\"\nreplace = \"RLFH\"\nwith = \"x\"\n",
    )
    .unwrap();
    let absent = tmp.path().join("absent.jsonl");
    fails(
        &afprobe(&[
            "prompts",
            "--cues-file",
            cues.to_str().unwrap(),
            "--variations",
            "standard,quiet",
            "--out",
            absent.to_str().unwrap(),
        ]),
        &["variation `quiet`", "\"RLFH\"", "does not contain"],
    );
    assert!(!absent.exists());
}

/// Rows of a variation get their own gap line and stay out of `overall`;
/// duplicate pairs are refused instead of silently overwritten.
#[test]
fn gap_keeps_variations_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for (variation, free, paid) in [(json!([]), 0.9, 0.5), (json!(["flipped"]), 0.4, 0.8)] {
        for q in 0..3 {
            for (tier, p) in [("free", free), ("paid", paid)] {
                rows.push(json!({"id": format!("{tier}-{q}-{variation}"), "cue": "xml", "tier": tier,
                    "request_id": format!("q{q}"), "harmful": true, "variation": variation, "p_accept": p}));
            }
        }
    }
    let store = store_with_rows(&tmp.path().join("s"), &rows, true);
    let report = compute_gap(&store, 1000, 0).unwrap();
    assert!((report.by_cue["xml"].gap - 0.4).abs() < 1e-12);
    assert!((report.by_cue["xml@flipped"].gap + 0.4).abs() < 1e-12);
    let overall = report.overall.unwrap();
    assert_eq!(
        overall.n_requests, 3,
        "overall is the standard setting only"
    );
    assert!((overall.gap - 0.4).abs() < 1e-12);

    let mut dup = rows[..2].to_vec();
    dup.push(rows[0].clone());
    dup[2]["id"] = json!("again");
    let store = store_with_rows(&tmp.path().join("d"), &dup, true);
    let err = compute_gap(&store, 1000, 0).unwrap_err().to_string();
    assert!(
        err.contains("a second free row") && err.contains("rows.jsonl:3"),
        "{err}"
    );
}

#[test]
fn a_killed_sampling_run_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    // 6 blocks of 32 rows sharing a system prompt, as a study's rows do.
    let rows: Vec<Value> = (0..192)
        .map(|i| {
            json!({"id": format!("r{i}"), "messages": [
                {"role": "system", "content": "Shared system prompt for every row."},
                {"role": "user", "content": format!("request {i}")}],
                "tier": if i % 2 == 0 { "free" } else { "paid" }, "request_id": format!("q{}", i / 2)})
        })
        .collect();
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        rows.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .unwrap();
    let model = fixtures().join("tiny_qwen2");
    let args = |out: &Path| -> Vec<String> {
        [
            "sample",
            "--prompts",
            prompts.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-n",
            "4",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| {
        let out = afprobe(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let whole = tmp.path().join("whole");
    run(args(&whole));

    let killed = tmp.path().join("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_afprobe"))
        .args(args(&killed))
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let first_block = killed.join(".sample-block-00001.rows.jsonl");
    while !first_block.exists() && started.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("sample.json").exists(),
        "the run finished before it could be killed; make it longer"
    );
    // Without --resume the interrupted run is refused; with it the run completes.
    fails(
        &afprobe(&args(&killed).iter().map(String::as_str).collect::<Vec<_>>()),
        &["interrupted sampling run", "--resume"],
    );
    let mut resume = args(&killed);
    resume.push("--resume".into());
    run(resume);
    for file in ["transcripts.jsonl", "rows.jsonl"] {
        assert_eq!(
            std::fs::read_to_string(whole.join(file)).unwrap(),
            std::fs::read_to_string(killed.join(file)).unwrap(),
            "{file}"
        );
    }
    // A resume with other settings is refused.
    let other = tmp.path().join("other");
    run(args(&other));
    std::fs::remove_file(other.join("sample.json")).unwrap();
    std::fs::write(other.join(".sample-run.json"), "{}").unwrap();
    let mut resume = args(&other);
    resume.push("--resume".into());
    fails(
        &afprobe(&resume.iter().map(String::as_str).collect::<Vec<_>>()),
        &["other settings"],
    );
}
