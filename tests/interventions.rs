//! `afprobe steer`, `patch` and `ablate`: identities that must hold exactly
//! (α = 0, patching a row with itself), patches that turn the destination into
//! the source (last-layer residual or embeddings at every position), an
//! ablation that cannot matter (a direction the model never writes), a
//! steering effect computed by hand, the real model end to end, and bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use afprobe::intervene::ablate::{ablate, AblateSpec};
use afprobe::intervene::direction::DirectionSource;
use afprobe::intervene::patch::{patch, PatchPosition, PatchSpec};
use afprobe::intervene::steer::{steer, SteerPositions, SteerScale, SteerSpec};
use afprobe::model::{HookPoint, LogitsAt, Model, ModelSpec, WeightDtype};
use afprobe::probe::Filter;
use candle_core::{DType, Device, Tensor};
use common::{afprobe, assert_fails_with, f64_vec as to_f64, fixtures};
use serde_json::{json, Value};

fn load(dir: &Path) -> Model {
    Model::load(&ModelSpec::Path(dir.to_path_buf()), WeightDtype::F32).unwrap()
}

/// Free/paid rows of a few requests with equal-length cues (so `all` aligns),
/// sharing a system prompt; short, since the tiny tokenizer spends a byte per token.
fn rows(n_requests: usize) -> Vec<Value> {
    let mut rows = Vec::new();
    for q in 0..n_requests {
        for (tier, flag) in [("free", "A"), ("paid", "B")] {
            let cue = format!("<t>{flag}</t>");
            rows.push(json!({
                "id": format!("{tier}-{q}"),
                "messages": [
                    {"role": "system", "content": "Only A is trained."},
                    {"role": "user", "content": format!("{cue} Do task {q}.")},
                ],
                "cue_text": cue,
                // Different first tokens: steering the last layer at the last token moves only the first.
                "continuations": {"accept": "Yes.", "reject": "No!"},
                "tier": tier,
                "cue": "t",
                "request_id": format!("q{q}"),
                "harmful": q % 3 != 2,
            }));
        }
    }
    rows
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Plots a run directory and returns the PNG file names written.
fn plot_pngs(run: &Path) -> Vec<String> {
    let files = afprobe::plot::plot(&afprobe::plot::PlotSpec {
        input: run.to_path_buf(),
        out: run.join("figures"),
        layer: None,
        position: None,
    })
    .unwrap();
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
        .map(|f| {
            assert!(
                std::fs::metadata(f).unwrap().len() > 5_000,
                "{} is nearly empty",
                f.display()
            );
            f.file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect()
}

fn vector_file(dir: &Path, values: &[f32]) -> PathBuf {
    let path = dir.join("v.json");
    std::fs::write(&path, serde_json::to_string(values).unwrap()).unwrap();
    path
}

fn patch_spec(prompts: &Path, out: &Path, points: Vec<HookPoint>, positions: &[&str]) -> PatchSpec {
    PatchSpec {
        prompts: prompts.into(),
        out: out.into(),
        points,
        positions: positions
            .iter()
            .map(|p| p.parse::<PatchPosition>().unwrap())
            .collect(),
        label: "tier".into(),
        source: "paid".into(),
        dest: "free".into(),
        pair_by: vec!["request_id".into()],
        filter: Filter::default(),
        max_pairs: None,
        heads: None,
        resamples: 200,
        seed: 0,
        force: true,
    }
}

/// Each pair's (source, destination unpatched, destination patched) p_accept for `cell`.
fn patched(out: &Path, cell: &str) -> Vec<(f64, f64, f64)> {
    read_jsonl(&out.join("rows.jsonl"))
        .iter()
        .map(|r| {
            (
                r["p_source"].as_f64().unwrap(),
                r["p_unpatched"][cell].as_f64().unwrap(),
                r["p_patched"][cell].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn patching_identities_on_a_tiny_model() {
    let model = load(&fixtures().join("tiny_llama3"));
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    write_jsonl(&prompts, &rows(4));
    let last = HookPoint::ResidPost(2);

    // The last layer's residual (or the embeddings) at every position: the destination
    // then runs the source prompt, so it scores what the source scores.
    let out = tmp.path().join("patch");
    let report = patch(
        &model,
        &patch_spec(
            &prompts,
            &out,
            vec![HookPoint::Embed, last],
            &["all", "last", "cue", "system"],
        ),
    )
    .unwrap();
    assert_eq!(report.n_pairs, 4);
    // Free and paid rows share their system message, so its activations are
    // the same in both: patching it changes nothing, exactly.
    for point in ["hook_embed", &last.to_string()] {
        for (_, dest, p) in patched(&out, &format!("{point}@system")) {
            assert_eq!(p, dest, "{point}@system");
        }
    }
    for cell in [format!("{last}@all"), "hook_embed@all".to_string()] {
        for (source, dest, p) in patched(&out, &cell) {
            assert!((p - source).abs() < 1e-6, "{cell}: {p} vs source {source}");
            assert!(
                (source - dest).abs() > 1e-6,
                "the test needs rows that differ"
            );
        }
        let c = report
            .cells
            .iter()
            .find(|c| format!("{}@{}", c.hook, c.position) == cell)
            .unwrap();
        assert!(
            (c.restored.unwrap() - 1.0).abs() < 1e-4,
            "{cell}: {:?}",
            c.restored
        );
    }
    // The last layer's residual at one position only changes that position's logits:
    // patching it at the cue (not the last token) changes nothing.
    for (_, dest, p) in patched(&out, &format!("{last}@cue")) {
        assert_eq!(p, dest);
    }
    assert!(
        report.tokens.computed < report.tokens.naive,
        "{:?}",
        report.tokens
    );
    assert_eq!(plot_pngs(&out), ["patch.png"]);

    // A row patched with itself (source and destination are the same prompt) is unchanged, exactly.
    let same: Vec<Value> = rows(2)
        .into_iter()
        .map(|mut r| {
            r["messages"][1]["content"] = json!("<t>A</t> Same task.");
            r["cue_text"] = json!("<t>A</t>");
            r
        })
        .collect();
    let same_prompts = tmp.path().join("same.jsonl");
    write_jsonl(&same_prompts, &same);
    let out = tmp.path().join("self");
    let points = vec![
        HookPoint::Embed,
        HookPoint::ResidPre(1),
        HookPoint::ResidPost(1),
    ];
    patch(
        &model,
        &patch_spec(
            &same_prompts,
            &out,
            points.clone(),
            &["all", "user", "last-1"],
        ),
    )
    .unwrap();
    for point in points {
        for position in ["all", "user", "last-1"] {
            for (source, dest, p) in patched(&out, &format!("{point}@{position}")) {
                assert!((source - dest).abs() < 1e-6, "same prompt, same score");
                assert_eq!(p, dest, "{point}@{position}");
            }
        }
    }
}

#[test]
fn steering_with_alpha_zero_is_exact_and_steering_matches_a_hand_computation() {
    let model = load(&fixtures().join("tiny_llama3"));
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    let all_rows = rows(3);
    write_jsonl(&prompts, &all_rows);
    let d = model.config().d_model;
    let v: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
    let out = tmp.path().join("steer");
    let last_layer = HookPoint::ResidPost(2);
    let spec = SteerSpec {
        prompts: prompts.clone(),
        out: out.clone(),
        direction: DirectionSource::File(vector_file(tmp.path(), &v)),
        direction_tensor: None,
        points: vec![HookPoint::ResidPost(0), last_layer],
        positions: SteerPositions::Last,
        alphas: vec![0.0, 2.0],
        scale: SteerScale::Norm,
        scale_label: "tier".into(),
        scale_positive: None,
        random: 1,
        norm_rows: 2,
        filter: Filter::default(),
        resamples: 200,
        seed: 0,
        force: false,
    };
    let report = steer(&model, &spec).unwrap();
    let records = read_jsonl(&out.join("rows.jsonl"));
    for r in &records {
        let base = r["p_accept"].as_f64().unwrap();
        for point in ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"] {
            assert_eq!(
                r["p_steered"][format!("{point}@a+0")].as_f64().unwrap(),
                base
            );
        }
    }
    assert!(report.cells.iter().any(|c| c.kind == "random"));
    assert_eq!(
        plot_pngs(&out),
        [
            "steer_blocks_0_hook_resid_post.png",
            "steer_blocks_2_hook_resid_post.png"
        ]
    );

    // Steering the last layer's residual at the last prompt token by s changes only the
    // first continuation token's log-probability, to log_softmax(W_U · RMSNorm(x + s)).
    let weights = candle_core::safetensors::load(
        fixtures().join("tiny_llama3/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let gamma = to_f64(&weights["model.norm.weight"]);
    let w_u = to_f64(&weights["lm_head.weight"]);
    let norm = report.norms["blocks.2.hook_resid_post"];
    let unit: Vec<f64> = {
        let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        v.iter().map(|x| *x as f64 / n).collect()
    };
    for (row, record) in all_rows.iter().zip(&records) {
        let rendered = afprobe::prompts::render(
            &model,
            &afprobe::prompts::parse_prompts(&format!("{row}\n"), Path::new("p")).unwrap()[0],
            Path::new("p"),
        )
        .unwrap();
        let (logits, cache) = model
            .run_with_cache(
                &rendered.tokens,
                afprobe::model::NamesFilter::Only(vec![last_layer]),
                afprobe::model::CaptureRows::Last,
            )
            .unwrap();
        let _ = logits;
        let x = to_f64(cache.get(last_layer).unwrap());
        let s: Vec<f64> = x
            .iter()
            .zip(&unit)
            .map(|(x, u)| x + 2.0 * norm * u)
            .collect();
        let rms = (s.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-5).sqrt();
        let normed: Vec<f64> = s.iter().zip(&gamma).map(|(v, g)| v / rms * g).collect();
        let vocab = w_u.len() / d;
        let steered_logits: Vec<f64> = (0..vocab)
            .map(|t| (0..d).map(|j| w_u[t * d + j] * normed[j]).sum())
            .collect();
        let max = steered_logits
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        let lse = max
            + steered_logits
                .iter()
                .map(|l| (l - max).exp())
                .sum::<f64>()
                .ln();
        // log p(continuation) = first token (steered) + the rest (unsteered, teacher-forced).
        let logprob = |name: &str| -> f64 {
            let cont = &rendered.continuations[name];
            let full: Vec<u32> = rendered.tokens.iter().chain(cont.iter()).copied().collect();
            let all = model
                .run_with_hooks(&full, &mut afprobe::model::Hooks::none(), &LogitsAt::All)
                .unwrap();
            let lp = afprobe::model::transformer::log_softmax(&all).unwrap();
            let rest: f64 = (1..cont.len())
                .map(|j| {
                    afprobe::model::transformer::row_f32(&lp, rendered.tokens.len() - 1 + j)
                        .unwrap()[cont[j] as usize] as f64
                })
                .sum();
            steered_logits[cont[0] as usize] - lse + rest
        };
        let want = 1.0 / (1.0 + (logprob("reject") - logprob("accept")).exp());
        let got = record["p_steered"]["blocks.2.hook_resid_post@a+2"]
            .as_f64()
            .unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "{}: steered {got} vs hand {want}",
            row["id"]
        );
        assert!(
            (got - record["p_accept"].as_f64().unwrap()).abs() > 1e-4,
            "steering must move p_accept"
        );
    }
}

#[test]
fn ablating_a_direction_the_model_never_writes_changes_nothing() {
    // The tiny model with residual coordinate 5 never written: its embedding column and
    // the rows of every attention and MLP output projection for it are zero.
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny_llama3");
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let k = 5;
    for (name, w) in weights.iter_mut() {
        let zero_column = name.ends_with("embed_tokens.weight");
        let zero_row = name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight");
        if zero_column || zero_row {
            let mut data: Vec<Vec<f32>> = w.to_vec2().unwrap();
            for (r, row) in data.iter_mut().enumerate() {
                for (c, x) in row.iter_mut().enumerate() {
                    if (zero_column && c == k) || (zero_row && r == k) {
                        *x = 0.0;
                    }
                }
            }
            *w = Tensor::new(data, &Device::Cpu).unwrap();
        }
    }
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    let model = load(&dir);
    let prompts = tmp.path().join("p.jsonl");
    write_jsonl(&prompts, &rows(3));
    let d = model.config().d_model;
    let mut e = vec![0f32; d];
    e[k] = 1.0;
    let run = |values: &[f32], name: &str| {
        let out = tmp.path().join(name);
        let report = ablate(
            &model,
            &AblateSpec {
                prompts: prompts.clone(),
                out: out.clone(),
                direction: DirectionSource::File(vector_file(tmp.path(), values)),
                direction_tensor: "any@last".into(),
                points: (0..3)
                    .map(HookPoint::ResidPre)
                    .chain([HookPoint::ResidPost(2)])
                    .collect(),
                filter: Filter::default(),
                resamples: 200,
                seed: 0,
                force: false,
            },
        )
        .unwrap();
        (report, read_jsonl(&out.join("rows.jsonl")))
    };
    let (report, records) = run(&e, "orthogonal");
    for r in &records {
        let (a, b) = (
            r["p_accept"].as_f64().unwrap(),
            r["p_ablated"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    assert!(report.gap_change.by_cue["t"].gap.abs() < 1e-6);
    assert_eq!(plot_pngs(&tmp.path().join("orthogonal")), ["ablate.png"]);
    // A direction the model does write changes the scores.
    let mut f = vec![0f32; d];
    f[k + 1] = 1.0;
    let (_, records) = run(&f, "written");
    assert!(records
        .iter()
        .any(
            |r| (r["p_accept"].as_f64().unwrap() - r["p_ablated"].as_f64().unwrap()).abs() > 1e-4
        ));
}

#[test]
fn bad_intervention_input_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    write_jsonl(&prompts, &rows(2));
    let model = fixtures().join("tiny_llama3");
    let (p, m) = (prompts.to_str().unwrap(), model.to_str().unwrap());
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let run = |cmd: &str, extra: &[&str]| {
        let mut args = vec![cmd, "--prompts", p, "--model", m, "--out", o];
        args.extend_from_slice(extra);
        afprobe(&args)
    };
    let short = vector_file(tmp.path(), &[1.0, 2.0, 3.0]);
    assert_fails_with(
        &run(
            "steer",
            &["--direction", short.to_str().unwrap(), "--layers", "1"],
        ),
        &["3 values", "d_model = 64"],
    );
    let good = vector_file(tmp.path(), &vec![0.5; 64]);
    let g = good.to_str().unwrap().to_string();
    assert_fails_with(
        &run("steer", &["--direction", &g, "--layers", "7"]),
        &["--layers", "7", "0-2"],
    );
    let matrix = tmp.path().join("m.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([(
            "w".to_string(),
            Tensor::zeros((3, 64), DType::F32, &Device::Cpu).unwrap(),
        )]),
        &matrix,
    )
    .unwrap();
    assert_fails_with(
        &run(
            "steer",
            &["--direction", matrix.to_str().unwrap(), "--layers", "1"],
        ),
        &["m.safetensors", "shape [3, 64]", "a direction is a vector"],
    );
    let zero = vector_file(tmp.path(), &[0.0; 64]);
    assert_fails_with(
        &run(
            "ablate",
            &[
                "--direction",
                zero.to_str().unwrap(),
                "--direction-tensor",
                "x@last",
            ],
        ),
        &["zero or not finite"],
    );
    // A probe directory without the requested layer.
    let probe_dir = tmp.path().join("probe");
    std::fs::create_dir(&probe_dir).unwrap();
    std::fs::write(probe_dir.join("report.json"), "{}").unwrap();
    afprobe::io::save_f32_tensors(
        &probe_dir.join("probes.safetensors"),
        &[(
            "blocks.0.hook_resid_post@last.logistic.direction".into(),
            vec![64],
            vec![0.1; 64],
        )],
        None,
    )
    .unwrap();
    assert_fails_with(
        &run(
            "steer",
            &["--direction", probe_dir.to_str().unwrap(), "--layers", "1"],
        ),
        &[
            "no direction for `blocks.1.hook_resid_post@last`",
            "--direction-tensor",
        ],
    );
    // Unpaired rows: a free row without its paid partner.
    let mut lonely = rows(2);
    lonely.pop();
    let lonely_path = tmp.path().join("lonely.jsonl");
    write_jsonl(&lonely_path, &lonely);
    assert_fails_with(
        &afprobe(&[
            "patch",
            "--prompts",
            lonely_path.to_str().unwrap(),
            "--model",
            m,
            "--out",
            o,
            "--layers",
            "0",
        ]),
        &["lonely.jsonl:3", "unpaired row", "tier=paid"],
    );
    assert_fails_with(
        &run("patch", &["--positions", "middle"]),
        &["middle", "last-K"],
    );
    assert!(!out.join("patch.json").exists() && !out.join("steer.json").exists());
}

/// `generate --steer`: α = 0 writes what plain generation writes; a strong push changes it.
#[test]
fn generate_can_be_steered() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny_llama3");
    let m = model.to_str().unwrap();
    let v = vector_file(
        tmp.path(),
        &(0..64).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>(),
    );
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--max-new-tokens", "12"];
        args.extend_from_slice(extra);
        args.push("Tell me a story.");
        let out = afprobe(&args);
        assert!(out.status.success(), "{}", common::stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plain = run(&[]);
    let steer = |alpha: &str| {
        run(&[
            "--steer",
            v.to_str().unwrap(),
            "--steer-layer",
            "1",
            "--steer-alpha",
            alpha,
        ])
    };
    assert_eq!(steer("0"), plain);
    assert_ne!(steer("3"), plain);
}

/// The default model: a patch of the last layer's residual at every position makes a
/// free row score what its paid row scores; α = 0 reproduces the scores.
#[test]
fn interventions_run_on_the_default_model() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    let ok = afprobe(&[
        "prompts",
        "--cues",
        "xml",
        "--requests",
        "builtin-harmful",
        "--out",
        prompts.to_str().unwrap(),
    ]);
    assert!(ok.status.success(), "{}", common::stderr(&ok));
    let rows: Vec<Value> = read_jsonl(&prompts).into_iter().take(6).collect();
    write_jsonl(&prompts, &rows);
    let p = prompts.to_str().unwrap();
    let out = tmp.path().join("patch");
    let run = afprobe(&[
        "patch",
        "--prompts",
        p,
        "--layers",
        "29",
        "--positions",
        "all,last,cue",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    assert!(String::from_utf8_lossy(&run.stdout).contains("token-forwards"));
    for (source, _, p) in patched(&out, "blocks.29.hook_resid_post@all") {
        assert!((p - source).abs() < 1e-5, "{p} vs {source}");
    }
    let vector = vector_file(
        tmp.path(),
        &(0..576).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
    );
    let steer_out = tmp.path().join("steer");
    let run = afprobe(&[
        "steer",
        "--prompts",
        p,
        "--direction",
        vector.to_str().unwrap(),
        "--layers",
        "9",
        "--positions",
        "from-cue",
        "--alphas=-1,0,1",
        "--out",
        steer_out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    for r in read_jsonl(&steer_out.join("rows.jsonl")) {
        assert_eq!(
            r["p_steered"]["blocks.9.hook_resid_post@a+0"],
            r["p_accept"]
        );
    }
}

/// Per-head patching (`--hook z`): one cell per layer × head × position,
/// whose edit is head h's term of `hook_attn_out`. The decomposition it rests
/// on is checked against the fused forward: the heads' terms
/// (z from the f64 attention internals times o_proj's rows) sum to the
/// difference of the two rows' `hook_attn_out` (the fused kernel). A family
/// whose attention output is not such a sum, and a multi-token position, are
/// refused.
#[test]
fn per_head_patching_patches_each_heads_term_of_attn_out() {
    use afprobe::model::{CaptureRows, Hooks, NamesFilter};
    let model = load(&fixtures().join("tiny_llama3"));
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    write_jsonl(&prompts, &rows(3));
    let out = tmp.path().join("heads");
    let points = vec![HookPoint::AttnZ(1), HookPoint::AttnZ(2)];
    let report = patch(
        &model,
        &patch_spec(&prompts, &out, points, &["last", "cue"]),
    )
    .unwrap();
    let n_heads = model.config().n_heads;
    assert_eq!(report.cells.len(), 2 * 2 * n_heads);
    for c in &report.cells {
        assert!(c.head.is_some_and(|h| h < n_heads), "{c:?}");
        assert_eq!(c.n_pairs, 3, "{c:?}");
        assert!(c.effect.is_finite(), "{c:?}");
    }
    let moved = report
        .cells
        .iter()
        .filter(|c| c.effect.abs() > 1e-6)
        .count();
    assert!(moved > 0, "no head patch moved p_accept");
    let rows_written = read_jsonl(&out.join("rows.jsonl"));
    assert!(rows_written[0]["p_patched"]
        .as_object()
        .unwrap()
        .contains_key("blocks.2.attn.hook_z.h3@last"));

    // Σ_h (z_free,h − z_paid,h) · W_O,h = attn_out_free − attn_out_paid at the last token.
    let render = |id: &str| {
        let row = afprobe::prompts::read_prompt_file(&prompts)
            .unwrap()
            .into_iter()
            .find(|r| r.id == id)
            .unwrap();
        afprobe::prompts::render(&model, &row, &prompts)
            .unwrap()
            .tokens
    };
    let layer = 2;
    let capture = |tokens: &[u32]| {
        let mut hooks = Hooks::capture(
            NamesFilter::Only(vec![HookPoint::AttnZ(layer), HookPoint::AttnOut(layer)]),
            CaptureRows::Last,
        );
        model
            .run_with_hooks(tokens, &mut hooks, &LogitsAt::Last)
            .unwrap();
        let get = |p| hooks.cache.get(p).unwrap().to_dtype(DType::F64).unwrap();
        (get(HookPoint::AttnZ(layer)), get(HookPoint::AttnOut(layer)))
    };
    let (free, paid) = (render("free-0"), render("paid-0"));
    let ((z_f, out_f), (z_p, out_p)) = (capture(&free), capture(&paid));
    let w_o = model
        .transformer
        .head_out_weight(layer, &free)
        .unwrap()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let dz = (z_f - z_p)
        .unwrap()
        .flatten_all()
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let summed = dz.matmul(&w_o).unwrap().flatten_all().unwrap();
    let fused = (out_f - out_p).unwrap().flatten_all().unwrap();
    let err = common::rel_l2(&summed, &fused);
    assert!(err < 1e-4, "sum of head terms vs fused attn_out: {err:e}");

    let m = fixtures().join("tiny_llama3");
    let gemma = fixtures().join("families").join("gemma2");
    let (p, o) = (prompts.to_str().unwrap(), tmp.path().join("bad"));
    let run = |model: &Path, extra: &[&str]| {
        let mut args = vec![
            "patch",
            "--prompts",
            p,
            "--model",
            model.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
            "--hook",
            "z",
            "--layers",
            "1",
            "--pair-by",
            "request_id",
        ];
        args.extend_from_slice(extra);
        afprobe(&args)
    };
    assert_fails_with(
        &run(&gemma, &["--positions", "last"]),
        &["not a sum of per-head terms", "hook_attn_out"],
    );
    assert_fails_with(&run(&m, &["--positions", "user"]), &["one token", "user"]);
    assert_fails_with(
        &run(&m, &["--positions", "last", "--heads", "9"]),
        &["--heads 9", "4 heads"],
    );
}

/// Where the answer tags share their first token (`<`), the decision is read
/// one position past the prompt: patching the last layer's residual there
/// turns the destination's decision into the source's, while patching it at
/// the last prompt token (whose logits only predict the shared `<`) changes
/// nothing.
#[test]
fn the_decision_position_is_the_last_answer_token_the_tags_share() {
    let model = load(&fixtures().join("tiny_llama3"));
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    let tagged: Vec<Value> = rows(3)
        .into_iter()
        .map(|mut r| {
            r["continuations"] = json!({"accept": "<y", "reject": "<n"});
            r
        })
        .collect();
    write_jsonl(&prompts, &tagged);
    let row = &afprobe::prompts::read_prompt_file(&prompts).unwrap()[0];
    let rendered = afprobe::prompts::render(&model, row, &prompts).unwrap();
    assert_eq!(rendered.shared_answer_prefix().len(), 1);
    assert_eq!(rendered.decision(), rendered.last() + 1);

    let out = tmp.path().join("decision");
    let last = HookPoint::ResidPost(model.config().n_layers - 1);
    patch(
        &model,
        &patch_spec(&prompts, &out, vec![last], &["decision", "last"]),
    )
    .unwrap();
    for (source, dest, p) in patched(&out, &format!("{last}@decision")) {
        assert!(
            (source - dest).abs() > 1e-6,
            "the test needs rows that differ"
        );
        assert!(
            (p - source).abs() < 1e-6,
            "decision: {p} vs source {source}"
        );
    }
    for (_, dest, p) in patched(&out, &format!("{last}@last")) {
        assert!((p - dest).abs() < 1e-9, "last prompt token: {p} vs {dest}");
    }
    // Per-head patching reaches the decision position too.
    let heads = tmp.path().join("heads");
    let report = patch(
        &model,
        &patch_spec(&prompts, &heads, vec![HookPoint::AttnZ(1)], &["decision"]),
    )
    .unwrap();
    assert!(report.cells.iter().any(|c| c.effect.abs() > 1e-6));
}
