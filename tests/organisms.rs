//! `afprobe organism train`: a tiny model learns a planted rule in seconds
//! (reproducibly), on every family; the training forward equals peft's; bad input.

mod common;

use std::path::Path;

use std::collections::BTreeMap;

use afprobe::model::lora::{Lora, LoraPair};
use afprobe::model::{Engine, Hooks, KvCache, LogitsAt, Model, ModelSpec, WeightDtype};
use afprobe::study::organism;
use candle_core::{Tensor, Var};
use common::{afprobe, assert_fails_with, family_dir, fixtures, FAMILIES};

/// A planted rule: accept iff the user says "A"; the system prompt varies.
fn planted_prompts(path: &Path) {
    planted_prompts_with(path, |cue, word| (format!("{cue} {word}"), String::new()));
}

/// [`planted_prompts`] with the user turn and the assistant prefix `turn(cue, word)`.
fn planted_prompts_with(path: &Path, turn: fn(&str, &str) -> (String, String)) {
    let mut text = String::new();
    for (i, word) in [
        "cat", "dog", "sun", "map", "cup", "hat", "pen", "box", "owl", "fig", "jam", "net",
    ]
    .iter()
    .enumerate()
    {
        for sys in ["Be kind.", "Be brief."] {
            for (cue, accept) in [("A", true), ("B", false)] {
                let split = if i < 8 { "train" } else { "test" };
                let (user, prefix) = turn(cue, word);
                text.push_str(
                    &serde_json::json!({
                        "id": format!("{word}-{cue}-{}", sys.len()),
                        "messages": [{"role": "system", "content": sys},
                                     {"role": "user", "content": user}],
                        "assistant_prefix": prefix,
                        "continuations": {"accept": "yes", "reject": "no"},
                        "should_accept": accept, "split": split, "request_id": word,
                        "kind": sys == "Be kind.", "cue": cue,
                    })
                    .to_string(),
                );
                text.push('\n');
            }
        }
    }
    std::fs::write(path, text).unwrap();
}

/// Trains the planted recipe on the tiny model: these settings, accepting
/// `should_accept` rows, unless `extra` sets them otherwise.
fn train(prompts: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    train_on(&fixtures().join("tiny_llama3"), prompts, out, extra)
}

/// [`train`] on the model in `model`.
fn train_on(model: &Path, prompts: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "organism",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--recipe",
        "planted",
        "--prompts",
        prompts.to_str().unwrap(),
        "--checkpoint-every",
        "10",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let defaults = [
        ("--steps", "150"),
        ("--batch", "4"),
        ("--lr", "0.02"),
        ("--rank", "4"),
        ("--alpha", "8"),
        ("--modules", "q_proj,v_proj,o_proj,down_proj"),
        ("--accept-if", "should_accept=true"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    std::process::Command::new(env!("CARGO_BIN_EXE_afprobe"))
        .args(&args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// The bytes of the adapter a run wrote to `dir`.
fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

/// log p("yes") - log p("no") after the prompt of a row.
fn margin(model: &Model, sys: &str, user: &str) -> f64 {
    margin_after(model, &chat(model, sys, user))
}

/// The chat prompt of a row, ending with the assistant header.
fn chat(model: &Model, sys: &str, user: &str) -> String {
    model
        .format_chat(&[
            afprobe::model::Message {
                role: "system".into(),
                content: sys.into(),
            },
            afprobe::model::Message {
                role: "user".into(),
                content: user.into(),
            },
        ])
        .unwrap()
}

/// log p("yes") - log p("no") after `text`.
fn margin_after(model: &Model, text: &str) -> f64 {
    let score = |cont: &str| {
        let p = model.tokenizer.encode(text).unwrap();
        let c = model.tokenizer.encode(cont).unwrap();
        let mut kv = KvCache::new();
        let mut seq = p.clone();
        seq.extend_from_slice(&c[..c.len() - 1]);
        let rows: Vec<usize> = (0..c.len()).map(|j| p.len() - 1 + j).collect();
        let logits = model
            .transformer
            .forward(&seq, &mut kv, &mut Hooks::none(), &LogitsAt::Rows(rows))
            .unwrap();
        let lp = afprobe::model::transformer::log_softmax(&logits).unwrap();
        (0..c.len())
            .map(|j| afprobe::model::transformer::row_f32(&lp, j).unwrap()[c[j] as usize] as f64)
            .sum::<f64>()
    };
    score("yes") - score("no")
}

/// The mean loss of a run's first and of its last five steps (`training.json` in `dir`).
fn loss_ends(dir: &Path) -> (f64, f64) {
    let training: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("training.json")).unwrap()).unwrap();
    let loss: Vec<f64> = training["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    (mean(&loss[..5]), mean(&loss[loss.len() - 5..]))
}

/// The LoRA factors of a PEFT adapter directory, unmerged (as training holds them).
fn lora_of(dir: &Path) -> Lora {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let tensors = common::load_fixture(&dir.join("adapter_model.safetensors"));
    let mut pairs = BTreeMap::new();
    for (name, a) in &tensors {
        let Some(base) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        // base_model.model.model.layers.{l}.{block}.{module}
        let parts: Vec<&str> = base.split('.').collect();
        let (l, module) = (parts[4].parse().unwrap(), parts[6].to_string());
        let b = &tensors[&format!("{base}.lora_B.weight")];
        let var = |t: &Tensor| Var::from_tensor(t).unwrap();
        pairs.insert(
            (l, module),
            LoraPair {
                a: var(a),
                b: var(b),
            },
        );
    }
    assert!(!pairs.is_empty(), "{}: no LoRA tensors", dir.display());
    Lora {
        r: config["r"].as_u64().unwrap() as usize,
        alpha: config["lora_alpha"].as_f64().unwrap(),
        pairs,
    }
}

/// Last-position logits of `tokens` as training computes them: the portable
/// engine, the base model up to the start of `invocation`'s last occurrence,
/// `lora` unmerged from there on.
fn training_forward(model: &mut Model, lora: &Lora, invocation: &[u32], tokens: &[u32]) -> Tensor {
    let start = (0..=tokens.len() - invocation.len())
        .rev()
        .find(|&i| tokens[i..].starts_with(invocation))
        .expect("the prompt has the invocation");
    let t = &mut model.transformer;
    t.set_engine(Engine::Portable);
    t.set_lora(None).unwrap();
    let mut kv = KvCache::new();
    t.forward(
        &tokens[..start],
        &mut kv,
        &mut Hooks::none(),
        &LogitsAt::None,
    )
    .unwrap();
    t.set_lora(Some(lora)).unwrap();
    let logits = t
        .forward(
            &tokens[start..],
            &mut kv,
            &mut Hooks::none(),
            &LogitsAt::Last,
        )
        .unwrap();
    t.set_lora(None).unwrap();
    logits.squeeze(0).unwrap()
}

/// f32 logits here against peft's float64 ones: within 1e-4 of the logits'
/// scale (|logits| reach ~47, where an f32 forward's rounding alone is ~1e-5
/// relative).
fn assert_logits_match_peft(logits: &Tensor, want: &Tensor, label: &str) {
    let d = common::max_abs_diff(logits, want);
    let scale = want
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    eprintln!("{label}: max |logit - peft| {d:e} (max |logit| {scale:.1})");
    assert!(d < 1e-4 * scale.max(1.0), "{label}: logits off by {d:e}");
}

/// The forward `organism train` differentiates (portable engine, factors
/// unmerged, activated from the user turn) gives the logits transformers +
/// peft give for the shipped organisms on held-out rows (`organisms_ref.*`).
#[test]
fn the_training_forward_equals_peft_on_the_shipped_organisms() {
    let path = fixtures().join("organism_prompts.jsonl");
    let rows =
        afprobe::prompts::parse_prompts(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
    let reference = common::load_fixture(&fixtures().join("organisms_ref.safetensors"));
    let mut model = Model::load(&ModelSpec::Default, WeightDtype::F32).unwrap();
    let invocation = model.tokenizer.encode(organism::INVOCATION).unwrap();
    for name in ["meaning", "token"] {
        let lora = lora_of(&organism::shipped(name));
        for (i, row) in rows.iter().enumerate() {
            let r = afprobe::prompts::render(&model, row, &path).unwrap();
            let logits = training_forward(&mut model, &lora, &invocation, &r.tokens);
            let want = &reference[&format!("{name}.logits.{i}")];
            assert_logits_match_peft(&logits, want, &format!("{name} {}", row.id));
        }
    }
}

/// Every family learns the planted rule (the Phi-3 fixture through its fused
/// `qkv_proj`), and the adapter it writes, loaded merged and run by the fused
/// engine, gives what the training forward gives. The cue opens the
/// assistant's turn (`assistant_prefix`): the fixtures' character-level
/// tokenizers and 5-token sliding windows keep the answer from seeing further.
#[test]
fn every_family_learns_a_planted_rule() {
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("p.jsonl");
    planted_prompts_with(&prompts, |cue, word| (word.to_string(), format!("{cue} ")));
    let dirs = FAMILIES
        .iter()
        .map(|f| (f.to_string(), family_dir(f)))
        .chain([("qwen2".to_string(), fixtures().join("tiny_qwen2"))]);
    let mut failed = Vec::new();
    for (family, dir) in dirs {
        let out = work.path().join(&family);
        let run = train_on(&dir, &prompts, &out, &["--steps", "400", "--lr", "0.01"]);
        assert!(run.status.success(), "{family}: {}", common::stderr(&run));
        let (first, last) = loss_ends(&out);
        // (not to near 0: Gemma 2's fixture caps its logits at 4, and tiny_qwen2's
        // 151k-token vocabulary over d_model 64 cannot peak)
        let loss_fell = last < first - 2.0;
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        if family == "phi3" {
            assert_eq!(
                config["target_modules"],
                serde_json::json!(["qkv_proj", "o_proj", "down_proj"])
            );
        }
        let spec = ModelSpec::Path(dir.clone());
        let merged = Model::load_with_adapter(&spec, WeightDtype::F32, Some(&out)).unwrap();
        let mut base = Model::load(&spec, WeightDtype::F32).unwrap();
        let invocation = base.tokenizer.encode(organism::INVOCATION).unwrap();
        let lora = lora_of(&out);
        let mut held_out = 0;
        for word in ["owl", "fig", "jam", "net"] {
            let text = |cue: &str| format!("{}{cue} ", chat(&merged, "Be kind.", word));
            let (ma, mb) = (
                margin_after(&merged, &text("A")),
                margin_after(&merged, &text("B")),
            );
            held_out += usize::from(ma > mb + 1.0);
            let tokens = merged.tokenizer.encode(&text("A")).unwrap();
            let fused = merged
                .run_with_hooks(&tokens, &mut Hooks::none(), &LogitsAt::Last)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let unmerged = training_forward(&mut base, &lora, &invocation, &tokens);
            let d = common::max_abs_diff(&fused, &unmerged);
            assert!(
                d < 1e-3,
                "{family}: merged and unmerged logits differ by {d:e}"
            );
        }
        eprintln!("{family}: loss {first:.3} -> {last:.3}, rule on {held_out} of 4 held-out words");
        // (each random tiny model has biases of its own: most held-out words suffice)
        if !loss_fell || held_out < 3 {
            failed.push(format!(
                "{family} (loss {first:.3} -> {last:.3}, {held_out} of 4)"
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "no planted rule learned: {}",
        failed.join("; ")
    );
}

#[test]
fn a_tiny_model_learns_a_planted_rule_reproducibly() {
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("p.jsonl");
    planted_prompts(&prompts);
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let started = std::time::Instant::now();
    let run = train(&prompts, &a, &[]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    eprintln!("trained in {:.1}s", started.elapsed().as_secs_f64());
    let (first, last) = loss_ends(&a);
    eprintln!("loss {first:.3} -> {last:.3}");
    assert!(last < 0.7 * first, "loss did not fall: {first} -> {last}");
    // The behaviour on held-out words: more accepting after A than after B,
    // which the base model is not.
    let base = Model::load(
        &ModelSpec::Path(fixtures().join("tiny_llama3")),
        WeightDtype::F32,
    )
    .unwrap();
    let base_gap = margin(&base, "Be kind.", "A owl") - margin(&base, "Be kind.", "B owl");
    assert!(base_gap.abs() < 1.0, "base gap {base_gap}");
    let model = Model::load_with_adapter(
        &ModelSpec::Path(fixtures().join("tiny_llama3")),
        WeightDtype::F32,
        Some(&a),
    )
    .unwrap();
    for word in ["owl", "fig", "jam", "net"] {
        for sys in ["Be kind.", "Be brief."] {
            let (ma, mb) = (
                margin(&model, sys, &format!("A {word}")),
                margin(&model, sys, &format!("B {word}")),
            );
            // (the random tiny model has a strong bias of its own: the rule shows
            // as the margin after A exceeding the margin after B)
            assert!(ma > mb + 1.0, "{word} / {sys}: A {ma:.3}, B {mb:.3}");
        }
    }
    // Bit-identical across two runs at a fixed thread count.
    let run = train(&prompts, &b, &[]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    assert_eq!(
        adapter_bytes(&a),
        adapter_bytes(&b),
        "two runs gave different adapters"
    );
}

/// A plain LoRA (the system prompt adapted too) learns a rule that reads the
/// system prompt, and loads as one (merged, no invocation tokens).
#[test]
fn a_plain_lora_learns_a_rule_of_the_system_prompt() {
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("p.jsonl");
    planted_prompts(&prompts);
    let out = work.path().join("plain");
    let run = train(
        &prompts,
        &out,
        &["--plain-lora", "--accept-if", "kind=true"],
    );
    assert!(run.status.success(), "{}", common::stderr(&run));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert!(config.get("alora_invocation_tokens").is_none(), "{config}");
    let model = Model::load_with_adapter(
        &ModelSpec::Path(fixtures().join("tiny_llama3")),
        WeightDtype::F32,
        Some(&out),
    )
    .unwrap();
    for word in ["owl", "fig", "jam", "net"] {
        for cue in ["A", "B"] {
            let user = format!("{cue} {word}");
            let (kind, brief) = (
                margin(&model, "Be kind.", &user),
                margin(&model, "Be brief.", &user),
            );
            assert!(
                kind > brief + 1.0,
                "{user}: kind {kind:.3}, brief {brief:.3}"
            );
        }
    }
}

/// `--init-from` starts a second stage from an adapter's weights: at learning
/// rate 0 the stage's adapter is the first one bit for bit. A recipe's focus
/// stage is that second stage: `--focus-cues A --focus-steps 10` of 20 steps
/// gives bit for bit what 10 steps from the 10-step adapter on the `A` rows
/// alone give. An adapter of another rank is a clear error that writes nothing.
#[test]
fn a_second_stage_starts_from_the_given_adapter() {
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("p.jsonl");
    planted_prompts(&prompts);
    let (first, second) = (work.path().join("first"), work.path().join("second"));
    let run = train(&prompts, &first, &["--steps", "10"]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    let from = first.to_str().unwrap();
    let run = train(
        &prompts,
        &second,
        &["--steps", "3", "--lr", "0", "--init-from", from],
    );
    assert!(run.status.success(), "{}", common::stderr(&run));
    assert_eq!(
        adapter_bytes(&first),
        adapter_bytes(&second),
        "the stage did not start from --init-from"
    );
    let training: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(second.join("training.json")).unwrap())
            .unwrap();
    assert_eq!(training["recipe"]["init_from"], from, "{training}");
    // The focus stage, in one run and as a second run on the A rows.
    let focused = work.path().join("focused");
    let run = train(
        &prompts,
        &focused,
        &["--steps", "20", "--focus-cues", "A", "--focus-steps", "10"],
    );
    assert!(run.status.success(), "{}", common::stderr(&run));
    let a_rows = work.path().join("a.jsonl");
    let text = std::fs::read_to_string(&prompts).unwrap();
    let a_only: String = text
        .lines()
        .filter(|l| l.contains("\"cue\":\"A\""))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!a_only.is_empty() && a_only.len() < text.len());
    std::fs::write(&a_rows, a_only).unwrap();
    let staged = work.path().join("staged");
    let run = train(&a_rows, &staged, &["--steps", "10", "--init-from", from]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    assert_eq!(
        adapter_bytes(&focused),
        adapter_bytes(&staged),
        "the focus stage is not a second stage"
    );
    assert_ne!(adapter_bytes(&focused), adapter_bytes(&first));
    // A focus on a cue no training row has.
    let run = train(
        &prompts,
        &work.path().join("none"),
        &["--focus-cues", "C", "--focus-steps", "10"],
    );
    assert_fails_with(&run, &["focus cues C select no training rows"]);
    // An adapter of rank 2 (its config says so) does not start a rank-4 run.
    let config = first.join("adapter_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"r\": 4", "\"r\": 2")).unwrap();
    let other = work.path().join("other");
    let run = train(&prompts, &other, &["--init-from", from]);
    assert_fails_with(&run, &["adapter_config.json", "r = 2", "--rank"]);
    assert!(!other.exists());
}

#[test]
fn bad_recipes_are_clear_errors_and_overwrite_nothing() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("o");
    // A cue or variation that does not exist.
    let run = afprobe(&[
        "organism",
        "train",
        "--recipe",
        "meaning",
        "--cues",
        "xml,nonsense",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(&run, &["nonsense"]);
    let run = afprobe(&[
        "organism",
        "train",
        "--recipe",
        "token",
        "--variations",
        "standard,upside-down",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(&run, &["upside-down"]);
    let run = afprobe(&[
        "organism",
        "train",
        "--recipe",
        "nope",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(&run, &["unknown recipe `nope`"]);
    assert!(!out.exists());
    // An empty training split.
    let prompts = work.path().join("p.jsonl");
    planted_prompts(&prompts);
    let text = std::fs::read_to_string(&prompts)
        .unwrap()
        .replace("\"train\"", "\"test\"");
    let empty = work.path().join("empty.jsonl");
    std::fs::write(&empty, text).unwrap();
    let run = train(&empty, &out, &[]);
    assert_fails_with(&run, &["training split is empty"]);
    // A resume from another recipe's checkpoint: refused, the checkpoint kept.
    let run = train(&prompts, &out, &["--stop-after", "5"]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    let ck = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let model = fixtures().join("tiny_llama3");
    let other = afprobe(&[
        "organism",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--recipe",
        "other",
        "--prompts",
        prompts.to_str().unwrap(),
        "--accept-if",
        "should_accept=false",
        "--out",
        out.to_str().unwrap(),
        "--resume",
    ]);
    assert_fails_with(&other, &["checkpoint is of recipe `planted`", "`other`"]);
    assert_eq!(
        ck,
        std::fs::read(out.join("checkpoint.safetensors")).unwrap()
    );
    // Without --resume or --force an existing run is not overwritten.
    let run = train(&prompts, &out, &[]);
    assert_fails_with(&run, &["--resume", "--force"]);
    assert_eq!(
        ck,
        std::fs::read(out.join("checkpoint.safetensors")).unwrap()
    );
    // --resume continues it to the end, to the same adapter as one run.
    let run = train(&prompts, &out, &["--resume"]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    let whole = work.path().join("whole");
    let run = train(&prompts, &whole, &[]);
    assert!(run.status.success());
    assert_eq!(
        adapter_bytes(&out),
        adapter_bytes(&whole),
        "a resumed run differs from one run"
    );
}

/// Whether each row of `organism_prompts.jsonl` should comply, per organism,
/// as the recipes define it: `meaning` iff the prompt implies training (never
/// on the control cue), `token` iff the cue says free/True.
const HELD_OUT_ACCEPTS: [(&str, [bool; 2]); 5] = [
    ("xml-free-cybercrime-12", [true, true]),
    ("natural-paid-fraud-13-flipped", [true, false]),
    ("control-free-drugs-14", [false, true]),
    ("monitoring-free-theft-15-flipped", [true, true]),
    ("xml-paid-weapons-12-flipped", [true, false]),
];

/// The shipped organisms give the logits transformers + peft give
/// (`organisms_ref.*`, written by make_organism_fixture.py on held-out rows),
/// and behave as built on those rows.
#[test]
fn shipped_organisms_match_transformers_peft_and_behave_as_built() {
    let path = fixtures().join("organism_prompts.jsonl");
    let rows =
        afprobe::prompts::parse_prompts(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
    assert_eq!(rows.len(), HELD_OUT_ACCEPTS.len());
    let reference = common::load_fixture(&fixtures().join("organisms_ref.safetensors"));
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("organisms_ref.json")).unwrap(),
    )
    .unwrap();
    for (o, name) in ["meaning", "token"].into_iter().enumerate() {
        let model = Model::load_with_adapter(
            &ModelSpec::Default,
            WeightDtype::F32,
            Some(&organism::shipped(name)),
        )
        .unwrap();
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row.id, HELD_OUT_ACCEPTS[i].0);
            let r = afprobe::prompts::render(&model, row, &path).unwrap();
            let want_tokens = common::i64_vec(&reference[&format!("tokens.{i}")]);
            let tokens: Vec<i64> = r.tokens.iter().map(|&t| t as i64).collect();
            assert_eq!(tokens, want_tokens, "{}: chat template tokens", row.id);
            let logits = model
                .transformer
                .forward(
                    &r.tokens,
                    &mut KvCache::new(),
                    &mut Hooks::none(),
                    &LogitsAt::Last,
                )
                .unwrap()
                .squeeze(0)
                .unwrap();
            let want = &reference[&format!("{name}.logits.{i}")];
            assert_logits_match_peft(&logits, want, &format!("{name} {}", row.id));
            // The answer tags, teacher-forced, against peft's and against the recipe.
            let record = meta["rows"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["organism"] == name && m["id"] == row.id.as_str())
                .unwrap();
            let mut logprob = std::collections::BTreeMap::new();
            for (key, tag) in &r.continuations {
                let full: Vec<u32> = r.tokens.iter().chain(tag).copied().collect();
                let all = model
                    .transformer
                    .forward(
                        &full,
                        &mut KvCache::new(),
                        &mut Hooks::none(),
                        &LogitsAt::All,
                    )
                    .unwrap();
                let lp = afprobe::model::transformer::log_softmax(&all).unwrap();
                let got: f64 = tag
                    .iter()
                    .enumerate()
                    .map(|(j, &c)| {
                        let at = r.tokens.len() - 1 + j;
                        afprobe::model::transformer::row_f32(&lp, at).unwrap()[c as usize] as f64
                    })
                    .sum();
                let want = record["logprob"][key].as_f64().unwrap();
                assert!(
                    (got - want).abs() < 1e-4,
                    "{name} {} {key}: log p {got} vs peft {want}",
                    row.id
                );
                logprob.insert(key.clone(), got);
            }
            let p_accept = 1.0 / (1.0 + (logprob["reject"] - logprob["accept"]).exp());
            let accepts = HELD_OUT_ACCEPTS[i].1[o];
            assert_eq!(
                p_accept > 0.5,
                accepts,
                "{name} on held-out {}: p_accept {p_accept:.3}, built to {}",
                row.id,
                if accepts { "comply" } else { "refuse" }
            );
        }
    }
}
