//! The `afprobe` binary: help pages, commands on a tiny model, and bad input
//! (clear message, non-zero exit, never a panic).

mod common;

use std::process::Command;

use common::{afprobe, assert_fails_with, fixtures, stderr};

fn tiny(arch: &str) -> String {
    fixtures()
        .join(format!("tiny_{arch}"))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn every_command_has_a_manual_page() {
    for args in [
        vec!["--help"],
        vec!["model", "--help"],
        vec!["model", "fetch", "--help"],
        vec!["model", "info", "--help"],
        vec!["generate", "--help"],
        vec!["bench", "prefill", "--help"],
        vec!["demo", "--help"],
    ] {
        let out = afprobe(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.len() > 300, "{args:?} help is too thin:\n{text}");
    }
    let top = String::from_utf8_lossy(&afprobe(&["--help"]).stdout).into_owned();
    for needle in ["--model", "smollm2-135m", "hook_resid_post", "HF_HUB_CACHE"] {
        assert!(top.contains(needle), "top-level help lacks {needle}");
    }
}

#[test]
fn model_info_reports_the_architecture_as_json() {
    let out = afprobe(&["model", "info", "--model", &tiny("qwen2"), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "qwen2");
    assert_eq!(info["n_layers"], 3);
    assert_eq!(info["n_kv_heads"], 2);
    assert_eq!(info["tied_embeddings"], true);
    assert_eq!(info["weights_sha256"].as_str().unwrap().len(), 64);
    assert!(info["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}

#[test]
fn generate_is_reproducible_from_its_seed() {
    let run = |seed: &str| {
        let out = afprobe(&[
            "generate",
            "--model",
            &tiny("llama3"),
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
            "hello",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        out.stdout
    };
    assert_eq!(run("5"), run("5"));
    assert_ne!(run("5"), run("6"));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let out = afprobe(&["generate", "--model", "/no/such/model.gguf", "hi"]);
    assert_fails_with(&out, &["/no/such/model.gguf", "no such file", "--model"]);

    let long = "word ".repeat(400);
    let out = afprobe(&["generate", "--model", &tiny("llama3"), "--raw", &long]);
    assert_fails_with(&out, &["context window is 256 tokens"]);

    let out = afprobe(&["model", "info", "--model", "some-org/not-cached"]);
    assert_fails_with(&out, &["some-org/not-cached", "local hub cache"]);

    let out = afprobe(&["generate", "--dtype", "f8", "hi"]);
    assert_fails_with(&out, &["f8", "f32"]);
}

#[test]
fn a_failed_fetch_says_how_to_pass_a_model_instead() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_afprobe"))
        .args(["model", "fetch"])
        .env("AFPROBE_HOME", home.path())
        .env("AFPROBE_PYTHON", "/no/such/python3")
        .output()
        .unwrap();
    assert_fails_with(&out, &["could not fetch the default model", "--model PATH"]);
    // Nothing half-written is left where the model belongs.
    assert!(!home
        .path()
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        .exists());
}

/// `afprobe bench prefill --ref-script` runs each peer with the same flags
/// (`bench::Reference::measure` and `Reference::on`); a peer that rejects one
/// fails the whole benchmark. `--help` needs only Python's standard library.
#[test]
fn the_prefill_peers_accept_every_flag_bench_prefill_passes() {
    for script in [
        "scripts/ref/bench_prefill.py",
        "scripts/bench/llamacpp_prefill.py",
    ] {
        let out = std::process::Command::new("python3")
            .args([script, "--help"])
            .output()
            .expect("python3 runs");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{script} --help: {help}");
        for flag in [
            "--model",
            "--lengths",
            "--threads",
            "--repeats",
            "--device",
            "--dtype",
        ] {
            assert!(
                help.contains(flag),
                "{script} does not take {flag}:\n{help}"
            );
        }
    }
}
