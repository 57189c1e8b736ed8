//! `afprobe bench prefill`: prefill throughput with every `hook_resid_post`
//! captured at the last token, and peak RSS, beside the Python reference.
//!
//! Each length runs in its own process (ours and the reference's), so peak RSS
//! is per length rather than the maximum over the whole run.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{CaptureRows, HookPoint, Hooks, LogitsAt, Model, NamesFilter};

/// One measured length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefillResult {
    pub tokens: usize,
    pub median_s: f64,
    pub tok_per_s: f64,
    pub peak_rss_mb: f64,
}

/// Times `repeats` prefills of `tokens` random non-special ids (after a warm-up).
pub fn measure_prefill(model: &Model, tokens: usize, repeats: usize) -> Result<PrefillResult> {
    let c = model.config();
    let mut rng = StdRng::seed_from_u64(0);
    // Skip the special tokens at the start of the vocabulary, as the reference does.
    let low = model.tokenizer.stop_ids.iter().max().map_or(0, |&m| m + 1);
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(low..c.vocab_size as u32))
            .collect()
    };
    let filter = NamesFilter::Only((0..c.n_layers).map(HookPoint::ResidPost).collect());
    let run = |ids: &[u32]| -> Result<f64> {
        let mut hooks = Hooks::capture(filter.clone(), CaptureRows::Last);
        let started = Instant::now();
        model.run_with_hooks(ids, &mut hooks, &LogitsAt::Last)?;
        Ok(started.elapsed().as_secs_f64())
    };
    run(&ids(32))?;
    let prompt = ids(tokens);
    let mut times = (0..repeats.max(1))
        .map(|_| run(&prompt))
        .collect::<Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    let median_s = times[times.len() / 2];
    Ok(PrefillResult {
        tokens,
        median_s,
        tok_per_s: tokens as f64 / median_s,
        peak_rss_mb: peak_rss_mb(),
    })
}

/// Peak resident set size of this process (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// How to run the Python reference's `bench_prefill.py`.
#[derive(Debug, Clone)]
pub struct Reference {
    pub python: PathBuf,
    pub script: PathBuf,
    pub model_dir: PathBuf,
    pub threads: usize,
}

impl Reference {
    /// Runs the reference for one length in its own process.
    pub fn measure(&self, tokens: usize, repeats: usize) -> Result<PrefillResult> {
        let out = Command::new(&self.python)
            .arg(&self.script)
            .arg("--model")
            .arg(&self.model_dir)
            .args(["--lengths", &tokens.to_string()])
            .args(["--threads", &self.threads.to_string()])
            .args(["--repeats", &repeats.to_string()])
            .output()
            .map_err(|e| Error::io(&self.python, e))?;
        if !out.status.success() {
            return Err(Error::BadInput(format!(
                "reference benchmark failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json: serde_json::Value = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| Error::BadInput(format!("reference printed no JSON: {stdout}")))?;
        let row = &json["lengths"][tokens.to_string()];
        let median_s = row["median_s"].as_f64().unwrap_or(f64::NAN);
        Ok(PrefillResult {
            tokens,
            median_s,
            tok_per_s: row["tok_per_s_median"].as_f64().unwrap_or(f64::NAN),
            peak_rss_mb: json["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
        })
    }
}

/// Prints the side-by-side table.
pub fn print_table(ours: &[PrefillResult], reference: &[Option<PrefillResult>]) {
    println!(
        "{:>7}  {:>12}  {:>12}  {:>8}  {:>13}  {:>13}",
        "tokens", "afprobe tok/s", "ref tok/s", "speedup", "afprobe RSS MB", "ref RSS MB"
    );
    for (o, r) in ours.iter().zip(reference) {
        let (rt, rr) = r
            .as_ref()
            .map_or((f64::NAN, f64::NAN), |r| (r.tok_per_s, r.peak_rss_mb));
        println!(
            "{:>7}  {:>12.1}  {:>12.1}  {:>7.2}x  {:>13.0}  {:>13.0}",
            o.tokens,
            o.tok_per_s,
            rt,
            o.tok_per_s / rt,
            o.peak_rss_mb,
            rr
        );
    }
}
