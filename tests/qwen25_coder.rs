//! The demo's subject, Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, fetched like
//! the default model), against transformers on the same dequantized weights
//! (fixture: tests/fixtures/make_qwen25_coder.py): the tokenizer rebuilt from
//! GGUF metadata on varied texts, Qwen's chat template on three conversations
//! and on the study's own rows (rendered text and token ids), every layer's
//! `hook_resid_post` and `ln_final` at the last token, the logits, and the
//! teacher-forced log-probabilities of the two answer tags.

mod common;

use std::path::Path;

use afprobe::model::fetch::QWEN25_CODER_05B;
use afprobe::model::{
    CaptureRows, HookPoint, Hooks, LogitsAt, Message, Model, ModelSpec, NamesFilter, WeightDtype,
};
use afprobe::prompts::{parse_prompts, render};
use common::{fixtures, load_fixture, rel_l2};
use serde_json::{json, Value};

fn model() -> Model {
    Model::load(&ModelSpec::Fetch(QWEN25_CODER_05B), WeightDtype::F32)
        .unwrap_or_else(|e| panic!("loading qwen2.5-coder-0.5b: {e}"))
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

#[test]
fn qwen25_coder_tokenizer_template_and_activations_match_transformers() {
    let model = model();
    let c = model.config();
    assert_eq!(
        (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim),
        (24, 896, 14, 2, 64)
    );
    let dir = fixtures().join("qwen25_coder");
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap();

    for (text, want) in fixture["texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(fixture["ids"].as_array().unwrap())
    {
        let got = model.tokenizer.encode(text.as_str().unwrap()).unwrap();
        assert_eq!(got, common::token_ids(want), "{text}");
    }

    let template = model
        .template
        .as_ref()
        .expect("the GGUF has a chat template");
    for chat in fixture["chat"].as_array().unwrap() {
        let rendered = template.render(&messages(&chat["messages"]), true).unwrap();
        assert_eq!(rendered, chat["rendered"].as_str().unwrap());
        assert_eq!(
            model.tokenizer.encode(&rendered).unwrap(),
            common::token_ids(&chat["ids"])
        );
    }

    // The study's rows as `afprobe capture` renders them: text, ids and answer tags.
    for row in fixture["study"].as_array().unwrap() {
        let line = json!({"id": row["id"], "messages": row["messages"], "continuations": row["continuations"]});
        let parsed = parse_prompts(&format!("{line}\n"), Path::new("study.jsonl")).unwrap();
        let rendered = render(&model, &parsed[0], Path::new("study.jsonl")).unwrap();
        assert_eq!(
            rendered.text,
            row["rendered"].as_str().unwrap(),
            "{}",
            row["id"]
        );
        assert_eq!(
            rendered.tokens,
            common::token_ids(&row["ids"]),
            "{}",
            row["id"]
        );
    }

    let reference = load_fixture(&dir.join("reference.safetensors"));
    let ids: Vec<u32> = common::i64_vec(&reference["tokens"])
        .into_iter()
        .map(|t| t as u32)
        .collect();
    assert_eq!(
        model
            .tokenizer
            .encode(fixture["prompt"].as_str().unwrap())
            .unwrap(),
        ids
    );
    let mut points: Vec<HookPoint> = (0..c.n_layers).map(HookPoint::ResidPost).collect();
    points.push(HookPoint::LnFinal);
    let mut hooks = Hooks::capture(NamesFilter::Only(points.clone()), CaptureRows::Last);
    let logits = model
        .run_with_hooks(&ids, &mut hooks, &LogitsAt::Last)
        .unwrap();
    for p in points {
        let key = match p {
            HookPoint::ResidPost(l) => format!("resid_post.{l}"),
            _ => "ln_final".to_string(),
        };
        let got = hooks.cache.get(p).unwrap().flatten_all().unwrap();
        let err = rel_l2(&got, &reference[&key]);
        assert!(err < 1e-4, "{p}: relative L2 {err:e}");
    }
    let err = rel_l2(&logits.flatten_all().unwrap(), &reference["logits_last"]);
    assert!(err < 1e-4, "logits: relative L2 {err:e}");

    // Teacher-forced answer tags: the summed log-probability of each tag's tokens.
    for (tag, key) in [
        ("accept_ids", "logprob_accept"),
        ("reject_ids", "logprob_reject"),
    ] {
        let tag_ids: Vec<u32> = common::i64_vec(&reference[tag])
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let tokens = [ids.as_slice(), &tag_ids].concat();
        let rows: Vec<usize> = (ids.len() - 1..tokens.len() - 1).collect();
        let logits = model
            .run_with_hooks(&tokens, &mut Hooks::none(), &LogitsAt::Rows(rows))
            .unwrap();
        let logp = afprobe::model::transformer::log_softmax(&logits).unwrap();
        let got: f64 = tag_ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                afprobe::model::transformer::row_f32(&logp, i).unwrap()[t as usize] as f64
            })
            .sum();
        let want = reference[key]
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        assert!(
            (got - want).abs() < 1e-4,
            "{key}: afprobe {got} vs transformers {want}"
        );
    }
}
