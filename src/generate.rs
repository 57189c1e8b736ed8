//! Text generation: greedy or seeded temperature / top-p sampling, streamed,
//! on a KV cache (so hooks and edits apply to every generated token too).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use std::io::Write;

use crate::error::Result;
use crate::model::transformer::row_f32;
use crate::model::{Hooks, KvCache, LogitsAt, Message, Model, Tokenizer};

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 128,
        }
    }
}

/// Errors unless `--max-new-tokens` fits the model's context window (no
/// generation can go past it).
pub fn check_max_new_tokens(model: &Model, max_new_tokens: usize) -> Result<()> {
    let window = model.config().max_position_embeddings;
    crate::error::check_range(
        "--max-new-tokens",
        max_new_tokens,
        0,
        window,
        &format!("the model's context window is {window} tokens, prompt included"),
    )
}

/// Generates from `prompt` (token ids), calling `on_text` with each new piece of
/// decoded text as soon as it is complete UTF-8. Returns the generated ids
/// (without the stop token).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    sampling: &Sampling,
    hooks: &mut Hooks,
    on_text: impl FnMut(&str),
) -> Result<Vec<u32>> {
    generate_with_cache(model, &mut KvCache::new(), prompt, sampling, hooks, on_text)
}

/// Like [`generate`], continuing from `kv`, which must hold a prefix of `prompt`
/// (a shared system prompt, or the prompt minus its last token for repeated
/// samples). On return `kv` also holds the generated tokens.
pub fn generate_with_cache(
    model: &Model,
    kv: &mut KvCache,
    prompt: &[u32],
    sampling: &Sampling,
    hooks: &mut Hooks,
    mut on_text: impl FnMut(&str),
) -> Result<Vec<u32>> {
    check_max_new_tokens(model, sampling.max_new_tokens)?;
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut stream = TextStream::default();
    // Logits for the first new token need the prompt's last token to run.
    kv.truncate(kv.len().min(prompt.len() - 1))?;
    let mut next_input = prompt[kv.len()..].to_vec();
    for _ in 0..sampling.max_new_tokens {
        let logits = model
            .transformer
            .forward(&next_input, kv, hooks, &LogitsAt::Last)?;
        let next = pick(&row_f32(&logits, 0)?, sampling, &mut rng);
        if model.tokenizer.stop_ids.contains(&next) {
            break;
        }
        if let Some(piece) = stream.push(next, &model.tokenizer)? {
            on_text(&piece);
        }
        next_input = vec![next];
    }
    if let Some(piece) = stream.finish(&model.tokenizer)? {
        on_text(&piece);
    }
    Ok(stream.tokens)
}

/// Incremental detokenization for streamed text. Decoding all tokens so far
/// and printing the new suffix breaks on byte-fallback vocabularies
/// (SentencePiece): a run of byte tokens that is not yet valid UTF-8 decodes
/// to one U+FFFD per byte, so text already printed changes. As Hugging Face's
/// text-generation-inference does, decode a window from `prefix` twice, up to
/// `read` and to the end, and emit the difference only once it is whole
/// characters that extend the earlier decoding.
#[derive(Debug, Default)]
struct TextStream {
    tokens: Vec<u32>,
    /// Start of the decoding window (tokens before it are printed and settled).
    prefix: usize,
    /// End of what has been printed.
    read: usize,
}

impl TextStream {
    /// Adds a token; returns the text it completes, if any.
    fn push(&mut self, token: u32, tokenizer: &Tokenizer) -> Result<Option<String>> {
        self.tokens.push(token);
        let piece = self.pending(tokenizer)?;
        if piece.as_deref().is_some_and(|p| p.ends_with('\u{FFFD}')) {
            return Ok(None);
        }
        if piece.is_some() {
            self.prefix = self.read;
            self.read = self.tokens.len();
        }
        Ok(piece)
    }

    /// The text not yet emitted when generation stops (an incomplete
    /// character stays as U+FFFD, as a full decode shows it).
    fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let piece = self.pending(tokenizer)?;
        self.read = self.tokens.len();
        Ok(piece)
    }

    /// The decoded text of the tokens after `read`, when it extends the
    /// decoding of `prefix..read` (never a slice across a character).
    fn pending(&self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        if self.read == self.tokens.len() {
            return Ok(None);
        }
        let settled = tokenizer.decode(&self.tokens[self.prefix..self.read])?;
        let text = tokenizer.decode(&self.tokens[self.prefix..])?;
        Ok(text
            .strip_prefix(settled.as_str())
            .filter(|p| !p.is_empty())
            .map(str::to_string))
    }
}

/// Samples continuations of several prompts in lockstep: `samplings[p]`
/// holds one [`Sampling`] per sample of `prompts[p]`. The prompts' tokens past
/// the part they share run as one token tree on that shared cache, then each
/// forward call carries the next token of every unfinished sample, as
/// branches kept on the cache ([`Transformer::grow_tree`]), so one read of the
/// weights serves every sample of every prompt. Each sample picks with its
/// own seed exactly as [`generate_with_cache`] would, so it gives the same
/// tokens up to float rounding of the logits (~1e-6), which can only matter at
/// a near-exact tie. Returns per prompt, per sample, the ids (without the stop
/// token), or `None` where the model cannot run the tree (then generate one by
/// one). `kv` is reused up to the prompts' shared part and holds that part and
/// the branches after.
///
/// [`Transformer::grow_tree`]: crate::model::Transformer::grow_tree
pub fn generate_lockstep(
    model: &Model,
    kv: &mut KvCache,
    prompts: &[&[u32]],
    samplings: &[Vec<Sampling>],
) -> Result<Option<Vec<Vec<Vec<u32>>>>> {
    for s in samplings.iter().flatten() {
        check_max_new_tokens(model, s.max_new_tokens)?;
    }
    let t = &model.transformer;
    // The linear part every prompt shares, leaving each at least its last token.
    let shared = prompts
        .iter()
        .map(|p| {
            let common = p.iter().zip(prompts[0]).take_while(|(a, b)| a == b).count();
            common.min(p.len() - 1)
        })
        .min()
        .unwrap_or(0);
    kv.truncate(kv.shared_prefix_len(&prompts[0][..shared]))?;
    if kv.len() < shared {
        let head = &prompts[0][kv.len()..shared];
        t.forward(head, kv, &mut Hooks::none(), &LogitsAt::None)?;
    }
    let rests: Vec<&[u32]> = prompts.iter().map(|p| &p[shared..]).collect();
    let (tree, paths) = crate::model::TokenTree::trie(&rests);
    let ends: Vec<usize> = paths.iter().map(|p| *p.last().expect("a token")).collect();
    let Some(first) = t.grow_tree(&tree, kv, &mut Hooks::none(), &LogitsAt::Rows(ends.clone()))?
    else {
        return Ok(None);
    };
    // Every sample of every prompt, flattened: (prompt, sampling).
    let all: Vec<(usize, &Sampling)> = samplings
        .iter()
        .enumerate()
        .flat_map(|(p, s)| s.iter().map(move |s| (p, s)))
        .collect();
    let mut rngs: Vec<StdRng> = all
        .iter()
        .map(|(_, s)| StdRng::seed_from_u64(s.seed))
        .collect();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); all.len()];
    // Per sample: its last node in the cache's branches; `None` once it stopped.
    let mut last: Vec<Option<usize>> = all.iter().map(|&(p, _)| Some(ends[p])).collect();
    let mut logits: Vec<Vec<f32>> = all
        .iter()
        .map(|&(p, _)| row_f32(&first, p))
        .collect::<Result<_>>()?;
    let mut nodes = tree.len();
    loop {
        let mut step = crate::model::TokenTree::default();
        let mut running = Vec::new();
        for (k, &(_, sampling)) in all.iter().enumerate() {
            let Some(parent) = last[k] else { continue };
            last[k] = None;
            if sampling.max_new_tokens == 0 {
                continue;
            }
            let next = pick(&logits[k], sampling, &mut rngs[k]);
            if model.tokenizer.stop_ids.contains(&next) {
                continue;
            }
            generated[k].push(next);
            if generated[k].len() < sampling.max_new_tokens {
                step.tokens.push(next);
                step.parents.push(Some(parent));
                last[k] = Some(nodes + running.len());
                running.push(k);
            }
        }
        if running.is_empty() {
            break;
        }
        let Some(out) = t.grow_tree(&step, kv, &mut Hooks::none(), &LogitsAt::All)? else {
            return Ok(None);
        };
        nodes += running.len();
        for (row, &k) in running.iter().enumerate() {
            logits[k] = row_f32(&out, row)?;
        }
    }
    let mut samples = generated.into_iter();
    Ok(Some(
        samplings
            .iter()
            .map(|s| samples.by_ref().take(s.len()).collect())
            .collect(),
    ))
}

/// Picks the next token from one row of logits.
pub fn pick(logits: &[f32], sampling: &Sampling, rng: &mut impl Rng) -> u32 {
    if sampling.temperature <= 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / sampling.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) * inv_t).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= sampling.top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * mass;
    for &(id, p) in &probs {
        if r < p {
            return id;
        }
        r -= p;
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

/// Index of the largest value (the first one on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// The prompt for `afprobe generate`: chat-formatted unless `raw`.
pub fn prompt_tokens(
    model: &Model,
    prompt: &str,
    system: Option<&str>,
    raw: bool,
) -> Result<Vec<u32>> {
    let text = if raw {
        prompt.to_string()
    } else {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", prompt));
        model.format_chat(&messages)?
    };
    model.tokenizer.encode(&text)
}

/// `afprobe generate`: streams the completion to stdout.
pub fn generate_to_stdout(
    model: &Model,
    tokens: &[u32],
    sampling: &Sampling,
    hooks: &mut Hooks,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    generate(model, tokens, sampling, hooks, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_top_p_keeps_the_nucleus() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let mut rng = StdRng::seed_from_u64(7);
        assert_eq!(pick(&logits, &Sampling::default(), &mut rng), 1);
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            ..Sampling::default()
        };
        for _ in 0..200 {
            let id = pick(&logits, &nucleus, &mut rng);
            assert!(id == 1 || id == 2, "sampled {id} outside the nucleus");
        }
    }

    /// Lockstep samples equal one-by-one generation (greedy and seeded
    /// sampling, samples of different lengths, a shared cached prefix), on the
    /// tiny Llama and on a family with a sliding window.
    #[test]
    fn lockstep_samples_equal_one_by_one_generation() {
        use crate::model::{ModelSpec, WeightDtype};
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for dir in [
            fixtures.join("tiny_llama3"),
            fixtures.join("families/gemma2"),
        ] {
            let model = Model::load(&ModelSpec::Path(dir.clone()), WeightDtype::F32).unwrap();
            let prompt: Vec<u32> = (0..17).map(|i| (i * 37 + 11) % 200 + 3).collect();
            let samplings: Vec<Sampling> = (0..6)
                .map(|k| Sampling {
                    temperature: if k == 0 { 0.0 } else { 1.0 },
                    top_p: 0.95,
                    seed: 40 + k as u64,
                    max_new_tokens: 5 + 3 * k,
                })
                .collect();
            let mut kv = KvCache::new();
            model
                .transformer
                .forward(&prompt[..9], &mut kv, &mut Hooks::none(), &LogitsAt::None)
                .unwrap();
            // A second prompt sharing the first 12 tokens, a third sharing 5.
            let second: Vec<u32> = prompt[..12].iter().chain(&[7, 8, 9]).copied().collect();
            let third: Vec<u32> = prompt[..5].iter().chain(&[50, 60]).copied().collect();
            let prompts: Vec<&[u32]> = vec![&prompt, &second, &third];
            let per_prompt = vec![
                samplings.clone(),
                samplings[1..4].to_vec(),
                samplings[..1].to_vec(),
            ];
            let lockstep = generate_lockstep(&model, &mut kv, &prompts, &per_prompt)
                .unwrap()
                .expect("no adapter: the tree runs");
            for (p, samplings) in per_prompt.iter().enumerate() {
                for (k, sampling) in samplings.iter().enumerate() {
                    let alone = generate_with_cache(
                        &model,
                        &mut KvCache::new(),
                        prompts[p],
                        sampling,
                        &mut Hooks::none(),
                        |_| {},
                    )
                    .unwrap();
                    assert_eq!(
                        lockstep[p][k],
                        alone,
                        "{} prompt {p} sample {k}",
                        dir.display()
                    );
                }
            }
            // The cache holds the shared part: a truncation drops the branches.
            kv.truncate(5).unwrap();
            assert_eq!(kv.tokens(), &prompt[..5]);
        }
    }

    #[test]
    fn sampling_is_reproducible_from_the_seed() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Sampling {
            temperature: 1.0,
            seed: 3,
            ..Sampling::default()
        };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| pick(&logits, &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
