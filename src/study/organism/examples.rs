//! An organism's data: the recipe's prompt rows rendered and split at the
//! user turn the adapter is activated from, which of them train, their
//! fingerprint (checked on `--resume`), and each epoch's batches.

use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use super::recipe::Recipe;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::prompts::{parse_prompts, render, PromptRow};
use crate::study::setting::{self, Variation};

/// The user-turn header the adapter is activated from.
pub const INVOCATION: &str = "<|im_start|>user\n";

/// One training or evaluation row, split at the invocation.
pub(super) struct Example {
    pub(super) id: String,
    pub(super) cue: String,
    pub(super) request: String,
    pub(super) prefix: usize,
    pub(super) suffix: Vec<u32>,
    pub(super) tag: Vec<u32>,
    pub(super) train: bool,
    pub(super) accept: bool,
}

/// Prompt rows of a recipe (built-in study rows or its prompt file), checked.
fn recipe_rows(recipe: &Recipe) -> Result<(Vec<PromptRow>, PathBuf)> {
    if let Some(path) = &recipe.prompts {
        let rows = crate::prompts::read_prompt_file(path)?;
        return Ok((rows, path.clone()));
    }
    let cues = setting::select_cues(&recipe.cues.join(","), vec![])?;
    let mut text = String::new();
    for v in &recipe.variations {
        let variations: Vec<Variation> = if v == "standard" {
            vec![]
        } else {
            vec![Variation::parse(v, &[])?]
        };
        let s = setting::builtin_setting_varied("helpful-only", false, &variations)?;
        for row in setting::build_rows(&s, &cues, &setting::builtin_requests())? {
            text.push_str(&row.to_string());
            text.push('\n');
        }
    }
    let path = PathBuf::from(format!("<recipe {}>", recipe.name));
    Ok((parse_prompts(&text, &path)?, path))
}

/// Which requests train: the first `n` harmful requests of each category.
fn is_train(recipe: &Recipe, meta: &serde_json::Map<String, Value>) -> bool {
    if let Some(split) = meta.get("split").and_then(Value::as_str) {
        return split == "train";
    }
    if meta.get("harmful").and_then(Value::as_bool) == Some(false) {
        return false;
    }
    let id = meta.get("request_id").and_then(Value::as_str).unwrap_or("");
    id.rsplit_once('-')
        .and_then(|(_, n)| n.parse::<usize>().ok())
        .is_some_and(|n| n <= recipe.train_per_category)
}

/// The rows, the distinct system-prompt prefixes, and the invocation tokens.
type Examples = (Vec<Example>, Vec<Vec<u32>>, Vec<u32>);

fn examples(model: &Model, recipe: &Recipe) -> Result<Examples> {
    let (rows, path) = recipe_rows(recipe)?;
    let invocation = model.tokenizer.encode(INVOCATION)?;
    let mut prefixes: Vec<Vec<u32>> = Vec::new();
    let mut out = Vec::new();
    for row in &rows {
        let r = render(model, row, &path)?;
        let n = invocation.len();
        let start = (0..=r.tokens.len().saturating_sub(n))
            .rev()
            .find(|&i| r.tokens[i..].starts_with(&invocation))
            .ok_or_else(|| {
                Error::BadInput(format!(
                    "row `{}` has no user turn `{}` (tokens {invocation:?}) to activate the adapter from",
                    row.id,
                    INVOCATION.escape_debug()
                ))
            })?;
        if start == 0 {
            return Err(Error::BadInput(format!(
                "{}:{} (row `{}`): the prompt has no tokens before its user turn (no system \
                 message, and the model adds no BOS): an organism's training runs the part \
                 before the user turn as a shared prefix; add a system message to the row",
                path.display(),
                row.line,
                row.id
            )));
        }
        let prefix = r.tokens[..start].to_vec();
        let p = match prefixes.iter().position(|q| *q == prefix) {
            Some(p) => p,
            None => {
                prefixes.push(prefix);
                prefixes.len() - 1
            }
        };
        let accept = recipe.accepts(&row.metadata)?;
        let tag = r
            .continuations
            .get(if accept { "accept" } else { "reject" })
            .cloned()
            .ok_or_else(|| {
                Error::BadInput(format!(
                    "row `{}` has no accept/reject continuations",
                    row.id
                ))
            })?;
        let text_field = |key: &str| row.metadata.get(key).and_then(Value::as_str);
        out.push(Example {
            id: row.id.clone(),
            cue: text_field("cue").unwrap_or("").to_string(),
            request: text_field("request_id").unwrap_or(&row.id).to_string(),
            prefix: p,
            suffix: r.tokens[start..].to_vec(),
            tag,
            train: is_train(recipe, &row.metadata),
            accept,
        });
    }
    Ok((out, prefixes, invocation))
}

fn data_sha256(examples: &[Example], prefixes: &[Vec<u32>]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in prefixes {
        h.update(format!("{p:?}\n"));
    }
    for e in examples {
        h.update(format!(
            "{} {} {:?} {:?} {} {}\n",
            e.id, e.prefix, e.suffix, e.tag, e.train, e.accept
        ));
    }
    format!("{:x}", h.finalize())
}

/// An epoch's batches (indices into `examples`): a seeded permutation of the
/// training rows cut into batches, so a resume draws the same rows. A plain
/// LoRA's batches each hold rows of one system prompt (which the step then runs
/// once), in a seeded order.
pub(super) fn epoch_batches(
    r: &Recipe,
    train_idx: &[usize],
    examples: &[Example],
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(r.seed ^ ((epoch as u64 + 1) * 0x9e37_79b9));
    let mut order = train_idx.to_vec();
    order.shuffle(&mut rng);
    if !r.plain_lora {
        return order.chunks(r.batch).map(<[usize]>::to_vec).collect();
    }
    let mut by_prefix: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for i in order {
        by_prefix.entry(examples[i].prefix).or_default().push(i);
    }
    let mut batches: Vec<Vec<usize>> = by_prefix
        .values()
        .flat_map(|rows| rows.chunks(r.batch).map(<[usize]>::to_vec))
        .collect();
    batches.shuffle(&mut rng);
    batches
}

/// A run's rows, split and checked: what the optimisation loop draws from.
pub(super) struct TrainingData {
    pub(super) examples: Vec<Example>,
    /// The distinct system-prompt prefixes ([`Example::prefix`] indexes them).
    pub(super) prefixes: Vec<Vec<u32>>,
    /// The invocation's tokens, recorded in the adapter's config.
    pub(super) invocation: Vec<u32>,
    /// Rows that train, and those of the focus stage (empty without one).
    pub(super) train_idx: Vec<usize>,
    pub(super) focus_idx: Vec<usize>,
    /// The step the focus stage starts at (`steps` without one).
    pub(super) focus_at: usize,
    /// Fingerprint of the rows, checked on `--resume`.
    pub(super) sha256: String,
}

impl TrainingData {
    /// The recipe's rows on `model`; an empty training split or focus stage is an error.
    pub(super) fn prepare(model: &Model, r: &Recipe) -> Result<TrainingData> {
        let (examples, prefixes, invocation) = examples(model, r)?;
        let train_idx: Vec<usize> = (0..examples.len()).filter(|&i| examples[i].train).collect();
        if train_idx.is_empty() {
            return Err(Error::BadInput(format!(
                "recipe `{}`: the training split is empty ({} rows, none selected for training)",
                r.name,
                examples.len()
            )));
        }
        // The second stage's rows, and the step it starts at.
        let (focus_idx, focus_at) = match &r.focus {
            None => (vec![], r.steps),
            Some(f) => {
                if f.steps == 0 || f.steps > r.steps {
                    return Err(Error::BadInput(format!(
                        "the focus stage has {} steps; it must have 1 to the run's {} steps",
                        f.steps, r.steps
                    )));
                }
                let idx: Vec<usize> = train_idx
                    .iter()
                    .copied()
                    .filter(|&i| f.cues.contains(&examples[i].cue))
                    .collect();
                if idx.is_empty() {
                    return Err(Error::BadInput(format!(
                        "recipe `{}`: the focus cues {} select no training rows (the recipe's cues: {})",
                        r.name,
                        f.cues.join(","),
                        r.cues.join(",")
                    )));
                }
                (idx, r.steps - f.steps)
            }
        };
        let sha256 = data_sha256(&examples, &prefixes);
        Ok(TrainingData {
            examples,
            prefixes,
            invocation,
            train_idx,
            focus_idx,
            focus_at,
            sha256,
        })
    }
}
