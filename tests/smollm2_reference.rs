//! The real default model (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to f32)
//! against the Python reference: `tests/fixtures/ref_smollm2.*` were written by
//! scripts/ref/ref_hidden.py (transformers, float64) on `ref_prompts.jsonl`.
//! The model is fetched on first use (CI fetches it in `.ci/run`).

mod common;

use std::sync::OnceLock;

use afprobe::generate::{generate, Sampling};
use afprobe::model::transformer::{log_softmax, row_f32};
use afprobe::model::{
    CaptureRows, HookPoint, Hooks, KvCache, LogitsAt, Message, Model, ModelSpec, NamesFilter,
    WeightDtype,
};
use candle_core::{IndexOp, Tensor};
use common::{fixtures, load_fixture, rel_l2};
use serde_json::Value;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        Model::load(&ModelSpec::Default, WeightDtype::F32).expect("load the default model")
    })
}

struct RefPrompt {
    id: String,
    /// The prompt row as written in ref_prompts.jsonl.
    row: Value,
    /// Reference record from ref_smollm2.json.
    meta: Value,
}

fn reference() -> Vec<RefPrompt> {
    let rows = std::fs::read_to_string(fixtures().join("ref_prompts.jsonl")).unwrap();
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("ref_smollm2.json")).unwrap(),
    )
    .unwrap();
    rows.lines()
        .zip(meta["prompts"].as_array().unwrap())
        .map(|(line, m)| {
            let row: Value = serde_json::from_str(line).unwrap();
            assert_eq!(row["id"], m["id"]);
            RefPrompt {
                id: row["id"].as_str().unwrap().to_string(),
                row,
                meta: m.clone(),
            }
        })
        .collect()
}

fn prompt_text(model: &Model, row: &Value) -> String {
    match row.get("messages") {
        Some(msgs) => {
            let msgs: Vec<Message> = serde_json::from_value(msgs.clone()).unwrap();
            model.format_chat(&msgs).unwrap()
        }
        None => row["text"].as_str().unwrap().to_string(),
    }
}

#[test]
fn chat_template_and_token_ids_match_transformers_exactly() {
    let model = model();
    for p in reference() {
        let text = prompt_text(model, &p.row);
        assert_eq!(
            text,
            p.meta["text"].as_str().unwrap(),
            "{}: rendered prompt differs",
            p.id
        );
        assert_eq!(
            model.tokenizer.encode(&text).unwrap(),
            common::token_ids(&p.meta["token_ids"]),
            "{}: token ids differ",
            p.id
        );
    }
    // The template inserts SmolLM's default system prompt when there is none.
    let text = model.format_chat(&[Message::new("user", "hi")]).unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    assert!(text.ends_with("<|im_start|>assistant\n"));
}

#[test]
fn residuals_and_logprobs_match_the_reference() {
    let model = model();
    let fixture = load_fixture(&fixtures().join("ref_smollm2.safetensors"));
    let n = model.config().n_layers;
    let mut filter: Vec<HookPoint> = (0..n).map(HookPoint::ResidPost).collect();
    filter.extend([HookPoint::Embed, HookPoint::LnFinal]);
    let mut worst = 0.0f64;
    for (i, p) in reference().iter().enumerate() {
        let tokens = common::token_ids(&p.meta["token_ids"]);
        let (logits, cache) = model
            .run_with_cache(
                &tokens,
                NamesFilter::Only(filter.clone()),
                CaptureRows::Last,
            )
            .unwrap();
        let want = |name: &str| fixture[name].i(i..i + 1).unwrap();
        let mut check = |point: HookPoint, name: &str| {
            let err = rel_l2(cache.get(point).unwrap(), &want(name));
            worst = worst.max(err);
            assert!(
                err < 1e-4,
                "{}: {point} vs {name}: relative L2 {err:e}",
                p.id
            );
        };
        check(HookPoint::Embed, "resid.0");
        for l in 0..n - 1 {
            check(HookPoint::ResidPost(l), &format!("resid.{}", l + 1));
        }
        check(HookPoint::ResidPost(n - 1), &format!("resid_prenorm.{n}"));
        check(HookPoint::LnFinal, &format!("resid.{n}"));

        // Next-token log-probs at the reference's top 5.
        let logp = row_f32(&log_softmax(&logits).unwrap(), 0).unwrap();
        let top_ids = common::token_ids(&p.meta["top5_ids"]);
        for (id, want) in top_ids
            .iter()
            .zip(p.meta["top5_logprobs"].as_array().unwrap())
        {
            let diff = (logp[*id as usize] as f64 - want.as_f64().unwrap()).abs();
            assert!(diff < 1e-4, "{}: log p(token {id}) off by {diff:e}", p.id);
        }
        let argmax = afprobe::generate::argmax(&logp);
        assert_eq!(argmax, top_ids[0], "{}: top-1 token differs", p.id);
    }
    eprintln!("worst residual relative L2 vs reference: {worst:e}");
}

#[test]
fn continuation_logprob_matches_the_reference() {
    let model = model();
    let cont = common::token_ids(&reference()[0].meta["continuation_token_ids"]);
    assert_eq!(
        model
            .tokenizer
            .encode_plain("<request_fully_accepted/>")
            .unwrap(),
        cont
    );
    for p in reference() {
        let prompt = common::token_ids(&p.meta["token_ids"]);
        let full: Vec<u32> = prompt.iter().chain(&cont).copied().collect();
        // Teacher forcing on top of the prompt's KV cache: logits at the
        // positions that predict each continuation token.
        let mut kv = KvCache::new();
        let t = &model.transformer;
        let last = t
            .forward(&prompt, &mut kv, &mut Hooks::none(), &LogitsAt::Last)
            .unwrap();
        let rest = t
            .forward(
                &cont[..cont.len() - 1],
                &mut kv,
                &mut Hooks::none(),
                &LogitsAt::All,
            )
            .unwrap();
        let logits = Tensor::cat(&[&last, &rest], 0).unwrap();
        let logp = log_softmax(&logits).unwrap();
        let total: f64 = cont
            .iter()
            .enumerate()
            .map(|(j, &c)| row_f32(&logp, j).unwrap()[c as usize] as f64)
            .sum();
        let want = p.meta["continuation_logprob"].as_f64().unwrap();
        assert!(
            (total - want).abs() < 1e-4,
            "{}: continuation log-prob {total} vs reference {want}",
            p.id
        );
        assert_eq!(full.len(), kv.len() + 1);
    }
}

#[test]
fn shared_prefix_cache_gives_the_same_residuals() {
    let model = model();
    let t = &model.transformer;
    let system = Message::new(
        "system",
        "You are a careful assistant. Think about who is asking.",
    );
    let prompts: Vec<Vec<u32>> = ["Say hi.", "Name three rivers in Europe."]
        .iter()
        .map(|q| {
            let text = model
                .format_chat(&[system.clone(), Message::new("user", q)])
                .unwrap();
            model.tokenizer.encode(&text).unwrap()
        })
        .collect();
    let mut prefix = KvCache::new();
    let shared = prompts[0]
        .iter()
        .zip(&prompts[1])
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared > 10);
    t.forward(
        &prompts[0][..shared],
        &mut prefix,
        &mut Hooks::none(),
        &LogitsAt::None,
    )
    .unwrap();
    let last = HookPoint::ResidPost(model.config().n_layers - 1);
    for tokens in &prompts {
        let (_, alone) = model
            .run_with_cache(tokens, NamesFilter::Only(vec![last]), CaptureRows::Last)
            .unwrap();
        let mut kv = prefix.reuse_for(tokens).unwrap();
        assert_eq!(kv.len(), shared);
        let mut hooks = Hooks::capture(NamesFilter::Only(vec![last]), CaptureRows::Last);
        t.forward(&tokens[shared..], &mut kv, &mut hooks, &LogitsAt::Last)
            .unwrap();
        let err = rel_l2(hooks.cache.get(last).unwrap(), alone.get(last).unwrap());
        assert!(err < 1e-5, "shared-prefix residual differs: {err:e}");
    }
}

#[test]
fn greedy_generation_answers_a_factual_question() {
    let model = model();
    let text = model
        .format_chat(&[Message::new(
            "user",
            "What is the capital of France? Answer in one word.",
        )])
        .unwrap();
    let tokens = model.tokenizer.encode(&text).unwrap();
    let mut streamed = String::new();
    let sampling = Sampling {
        max_new_tokens: 24,
        ..Sampling::default()
    };
    let out = generate(model, &tokens, &sampling, &mut Hooks::none(), |s| {
        streamed.push_str(s)
    })
    .unwrap();
    assert!(streamed.contains("Paris"), "answer was {streamed:?}");
    assert_eq!(streamed, model.tokenizer.decode(&out).unwrap());
    assert!(
        out.len() < 24,
        "generation should stop at <|im_end|>: {streamed:?}"
    );
}
