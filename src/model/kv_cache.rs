//! The key/value cache of one sequence, with the tokens (and token-tree
//! branches) it was computed from.

use candle_core::Tensor;

use super::portable::Engine;
use super::token_tree::TokenTree;
use crate::error::{Error, Result};

/// Keys and values of one layer for the tokens seen so far: the fused
/// engine's f32 `[len, n_kv_heads * head_dim]` buffers, or the portable
/// engine's tensors `[len, n_kv_heads, head_dim]` on its device.
#[derive(Debug, Clone, Default)]
pub(super) struct LayerKv {
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    pub(super) tensors: Option<(Tensor, Tensor)>,
}

impl LayerKv {
    pub(super) fn len(&self, kv_width: usize) -> usize {
        match &self.tensors {
            Some((k, _)) => k.dims()[0],
            None => self.k.len() / kv_width,
        }
    }

    /// Appends the k and v columns of fused `[T, width]` qkv rows (k starts at `k_offset`).
    pub(super) fn append(&mut self, qkv: &[f32], width: usize, k_offset: usize, kv_width: usize) {
        // A prompt's rows at once and exactly: growing row by row doubles, which
        // leaves each layer's buffers up to twice the cache and the outgrown
        // copies as holes in the heap (an 8B model's 1,024-token cache is
        // 268 MB). Small appends (decoding) grow by a quarter, so that a token
        // at a time stays amortized linear.
        let added = qkv.len() / width * kv_width;
        if self.k.capacity() - self.k.len() < added {
            let grow = added.max(self.k.len() / 4);
            self.k.reserve_exact(grow);
            self.v.reserve_exact(grow);
        }
        for row in qkv.chunks_exact(width) {
            self.k
                .extend_from_slice(&row[k_offset..k_offset + kv_width]);
            self.v
                .extend_from_slice(&row[k_offset + kv_width..k_offset + 2 * kv_width]);
        }
    }

    pub(super) fn truncate(&mut self, len: usize, kv_width: usize) -> Result<()> {
        self.k.truncate(len * kv_width);
        self.v.truncate(len * kv_width);
        if let Some((k, v)) = self.tensors.take() {
            let rows = k.dim(0)?;
            self.tensors = match len {
                0 => None,
                n if n < rows => Some((k.narrow(0, 0, n)?, v.narrow(0, 0, n)?)),
                _ => Some((k, v)),
            };
        }
        Ok(())
    }
}

/// The key/value cache of one sequence, with the tokens it was computed from.
///
/// Cloning copies every layer's keys and values (the fused engine's `Vec<f32>`
/// buffers; the portable engine's tensors are shared, and never written in
/// place), so a caller that reuses a shared prompt prefix keeps one cache and
/// truncates it to the longest run of token ids the next prompt shares with
/// it, cloning only where two continuations must branch from the same prefix.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerKv>,
    pub(super) tokens: Vec<u32>,
    pub(super) kv_width: usize,
    /// First cached position computed with activated-LoRA weights (`transformer.rs`).
    pub(super) adapted_from: Option<usize>,
    /// Nodes kept after the linear tokens by `Transformer::grow_tree`.
    pub(super) branches: TokenTree,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Number of linear tokens cached (branches not counted).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token ids the cache holds.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Keeps only the first `len` tokens (and no branches).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if !self.branches.is_empty() {
            self.forget_after(self.tokens.len())?;
            self.branches = TokenTree::default();
        }
        if len < self.tokens.len() {
            self.tokens.truncate(len);
            self.adapted_from = self.adapted_from.filter(|&a| a < len);
            self.forget_after(len)?;
        }
        Ok(())
    }

    /// Drops keys and values past the first `len` tokens that no token records
    /// (those a token tree appended for its own call).
    pub(super) fn forget_after(&mut self, len: usize) -> Result<()> {
        let width = self.kv_width;
        self.layers
            .iter_mut()
            .try_for_each(|l| l.truncate(len, width))
    }

    /// Length of the longest run of token ids this cache shares with the start of `tokens`.
    pub fn shared_prefix_len(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// A copy of this cache cut to the longest prefix it shares with `tokens`,
    /// always leaving at least one token of `tokens` to run (logits need one).
    pub fn reuse_for(&self, tokens: &[u32]) -> Result<KvCache> {
        let shared = self
            .shared_prefix_len(tokens)
            .min(tokens.len().saturating_sub(1));
        let mut cache = self.clone();
        cache.truncate(shared)?;
        Ok(cache)
    }

    /// Errors unless `engine` filled this cache (or nothing did): the engines
    /// keep their keys and values in different forms.
    pub(super) fn check_engine(&self, engine: Engine) -> Result<()> {
        let filled = self
            .layers
            .iter()
            .find_map(|l| match (&l.tensors, l.k.is_empty()) {
                (Some(_), _) => Some(Engine::Portable),
                (None, false) => Some(Engine::Fused),
                (None, true) => None,
            });
        match filled {
            Some(other) if other != engine => Err(Error::BadInput(format!(
                "this KV cache was filled by the {} engine; run the whole sequence with one engine",
                other.name()
            ))),
            _ => Ok(()),
        }
    }

    pub(super) fn ensure_layers(&mut self, n: usize, kv_width: usize) {
        if self.layers.len() != n || self.kv_width != kv_width {
            self.layers = vec![LayerKv::default(); n];
            self.tokens.clear();
            self.adapted_from = None;
            self.branches = TokenTree::default();
            self.kv_width = kv_width;
        }
    }
}
