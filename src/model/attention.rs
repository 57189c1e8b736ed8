//! Causal grouped-query attention on the CPU, fused and query-chunked.
//!
//! Work is split into (kv head, query chunk) tasks run in parallel. A task
//! stacks the query heads that share its kv head, computes their scores with
//! one GEMM per run of consecutive keys the chunk may see (so the keys are
//! packed once per group, not once per head; in a token tree the runs skip the
//! nodes no query of the chunk descends from, such as the other rows of a
//! batch), applies a masked softmax in place, and multiplies by the values with
//! one more GEMM per run. Memory stays at one
//! `heads-per-group x chunk x keys` buffer per thread, never `[heads, T, T]`,
//! and the exponentials (billions of them for a long prompt) use a vectorised
//! polynomial, not libm ([`super::kernels`]).

use std::cell::RefCell;

use rayon::prelude::*;

use super::kernels::{gemm_into, gemm_strided, softmax_in_place, Operand, OutPtr};

/// Query positions per task (times the heads in a group gives the GEMM's rows).
const QUERY_CHUNK: usize = 64;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnDims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// New tokens (queries).
    pub t: usize,
    /// Tokens already in the cache before this call.
    pub past: usize,
    /// Scores are `q·k · scale` (usually `1/√head_dim`).
    pub scale: f32,
    /// Scores become `cap · tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
    /// A query sees only the last `window` keys, itself included (sliding window).
    pub window: Option<usize>,
}

/// Row-major `[rows, stride]` buffer holding heads side by side.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    /// Column where head 0 starts.
    pub offset: usize,
}

/// Which keys each query sees when the cache ends in a token tree (many
/// continuations of one prompt, or samples decoded in lockstep): the cache's
/// `start` linear rows, then tree nodes, the cached ones and this call's.
/// A query sees every linear row and its own ancestors in the tree (itself
/// included); a node sits at position `start + depth`.
#[derive(Debug, Clone)]
pub(crate) struct TreeMask {
    /// Linear cache rows before the tree.
    pub start: usize,
    /// Tree nodes already in the cache (this call's queries follow them).
    cached: usize,
    /// Absolute position of every tree node.
    pub positions: Vec<usize>,
    /// Query `i` (node `cached + i`), bit `j`: node `j` is it or its ancestor.
    sees: Vec<u64>,
    words: usize,
}

impl TreeMask {
    /// From every tree node's parent (an earlier node, or `None` for the end of
    /// the `start` linear rows); the last `parents.len() - cached` nodes are
    /// this call's queries. Errors name a parent that is not earlier.
    pub fn new(parents: &[Option<usize>], start: usize, cached: usize) -> Result<TreeMask, String> {
        let n = parents.len();
        let mut positions: Vec<usize> = Vec::with_capacity(n);
        for (i, parent) in parents.iter().enumerate() {
            positions.push(match *parent {
                Some(p) if p >= i => {
                    return Err(format!(
                        "token {i} of the tree names token {p} as its parent; a parent must come earlier"
                    ))
                }
                Some(p) => positions[p] + 1,
                None => start,
            });
        }
        let words = n.div_ceil(64);
        let mut sees = vec![0u64; (n - cached) * words];
        for (q, row) in sees.chunks_exact_mut(words.max(1)).enumerate() {
            let mut node = Some(cached + q);
            while let Some(j) = node {
                row[j / 64] |= 1 << (j % 64);
                node = parents[j];
            }
        }
        Ok(TreeMask {
            start,
            cached,
            positions,
            sees,
            words,
        })
    }

    /// Position of query `i` of this call.
    pub fn query_position(&self, i: usize) -> usize {
        self.positions[self.cached + i]
    }

    /// Whether query `query` of this call sees tree node `node` (it or an ancestor).
    pub fn sees(&self, query: usize, node: usize) -> bool {
        self.sees[query * self.words + node / 64] & (1 << (node % 64)) != 0
    }

    /// The key runs a chunk of `queries` computes: the linear rows, then the
    /// tree nodes that at least one of the queries sees, as maximal runs of
    /// consecutive keys `(first key, first column, width)` with the columns
    /// packed. The nodes no query of the chunk sees (other rows of a batch, other
    /// branches of a trie) cost nothing.
    fn key_runs(&self, queries: std::ops::Range<usize>) -> Vec<KeyRun> {
        let mut any = vec![0u64; self.words];
        for q in queries {
            let row = &self.sees[q * self.words..][..self.words];
            any.iter_mut().zip(row).for_each(|(a, r)| *a |= r);
        }
        let mut runs = Vec::new();
        if self.start > 0 {
            runs.push(KeyRun {
                key: 0,
                column: 0,
                width: self.start,
            });
        }
        let mut column = self.start;
        let mut node = 0;
        let n = self.positions.len();
        while node < n {
            if any[node / 64] & (1 << (node % 64)) == 0 {
                node += 1;
                continue;
            }
            let first = node;
            while node < n && any[node / 64] & (1 << (node % 64)) != 0 {
                node += 1;
            }
            // A run that continues the previous one joins it: with nothing hidden
            // the chunk is one GEMM over all its keys, summed as without a tree.
            match runs.last_mut() {
                Some(last) if last.key + last.width == self.start + first => {
                    last.width += node - first
                }
                _ => runs.push(KeyRun {
                    key: self.start + first,
                    column,
                    width: node - first,
                }),
            }
            column += node - first;
        }
        runs
    }
}

/// Keys `key..key + width` of the cache (never empty), held in score columns
/// `column..column + width`; a chunk's first run starts at column 0.
#[derive(Debug, Clone, Copy)]
struct KeyRun {
    key: usize,
    column: usize,
    width: usize,
}

/// The score column of key `j`: its own if a run holds it, else the first
/// column after it (so `[column(a), column(b))` holds exactly the computed keys in `[a, b)`).
fn column(runs: &[KeyRun], j: usize) -> usize {
    for r in runs {
        if j < r.key {
            return r.column;
        }
        if j < r.key + r.width {
            return r.column + j - r.key;
        }
    }
    runs.last().map_or(0, |r| r.column + r.width)
}

/// Per-thread scratch: stacked queries, scores, and the group's output.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// softmax(cap(q kᵀ · scale) + causal (and window) mask) v for every query
/// head, as `[T, n_heads * head_dim]`.
///
/// `q` holds `T` rows; `k` and `v` hold `past + T` rows (the cache including the
/// new tokens). Query `i` sees keys `0..=past + i`, or with a `tree` the cached
/// keys and its ancestors' (the window then counts tree positions). Query head
/// `h` reads kv head `h / (n_heads / n_kv_heads)`, as HF's `repeat_kv` does.
///
/// Panics if the buffers are shorter than `d` implies or the head counts do not
/// group (the model checks its config at load; these O(1) checks keep the
/// raw-pointer GEMMs below in bounds whatever the caller passes).
pub(crate) fn causal_attention(
    q: Strided,
    k: Strided,
    v: Strided,
    d: AttnDims,
    tree: Option<&TreeMask>,
) -> Vec<f32> {
    let AttnDims {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        t,
        past,
        scale,
        softcap,
        window,
    } = d;
    assert!(
        n_kv_heads > 0 && n_heads % n_kv_heads == 0,
        "attention: {n_heads} query heads do not group over {n_kv_heads} kv heads"
    );
    let fits = |s: &Strided, rows: usize, heads: usize| {
        rows == 0
            || (s.offset + heads * hd <= s.stride
                && (rows - 1) * s.stride + s.offset + heads * hd <= s.data.len())
    };
    assert!(
        fits(&q, t, n_heads),
        "attention: q is shorter than {t} rows of {n_heads} heads"
    );
    assert!(
        fits(&k, past + t, n_kv_heads),
        "attention: k is shorter than the cache"
    );
    assert!(
        fits(&v, past + t, n_kv_heads),
        "attention: v is shorter than the cache"
    );
    let rep = n_heads / n_kv_heads;
    let out_stride = n_heads * hd;
    let mut out = vec![0f32; t * out_stride];
    let out_ptr = OutPtr::new(&mut out);
    let tasks: Vec<(usize, usize)> = (0..n_kv_heads)
        .flat_map(|g| (0..t).step_by(QUERY_CHUNK).map(move |s| (g, s)))
        .collect();
    // Each chunk's keys, shared by its kv heads' tasks: without a tree every key
    // up to the chunk's last query; with one, only the runs of keys some query
    // of the chunk sees. The tree's nodes past the chunk's last query are never
    // among them (a parent comes earlier).
    let chunk_runs: Vec<Vec<KeyRun>> = (0..t)
        .step_by(QUERY_CHUNK)
        .map(|start| {
            let len = QUERY_CHUNK.min(t - start);
            tree.map_or_else(
                || {
                    vec![KeyRun {
                        key: 0,
                        column: 0,
                        width: past + start + len,
                    }]
                },
                |m| m.key_runs(start..start + len),
            )
        })
        .collect();
    let run = |&(g, start): &(usize, usize)| {
        let len = QUERY_CHUNK.min(t - start);
        let runs = &chunk_runs[start / QUERY_CHUNK];
        let n_used = runs.last().map_or(0, |r| r.column + r.width);
        let rows = rep * len; // row r * len + i: head g * rep + r, query start + i
        SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            scratch.q.clear();
            for r in 0..rep {
                for i in start..start + len {
                    let at = i * q.stride + q.offset + (g * rep + r) * hd;
                    scratch.q.extend_from_slice(&q.data[at..at + hd]);
                }
            }
            scratch.scores.resize(rows * n_used, 0.0);
            scratch.out.resize(rows * hd, 0.0);
            let k_at = |key: usize| &k.data[key * k.stride + k.offset + g * hd..];
            let v_at = |key: usize| &v.data[key * v.stride + v.offset + g * hd..];
            // One scores GEMM per run. Safety (every GEMM below): the scratch
            // buffers were sized above; the runs end at the chunk's last query, so their
            // k/v rows and the group's columns are inside their buffers.
            for r in runs {
                unsafe {
                    gemm_into(
                        (rows, r.width, hd),
                        scratch.scores.as_mut_ptr().add(r.column),
                        n_used,
                        Operand::rows(&scratch.q, hd),
                        Operand::transposed(k_at(r.key), k.stride),
                        scale,
                    );
                }
            }
            let mut hidden = Vec::new();
            for (row, scores) in scratch.scores.chunks_exact_mut(n_used).enumerate() {
                // Keys [first, visible): causal, and within the window if any.
                let query = start + row % len;
                let visible = past + query + 1;
                let position = tree.map_or(past + query, |m| m.query_position(query));
                let lowest = window.map_or(0, |w| (position + 1).saturating_sub(w));
                let first = lowest.min(past + query);
                let (first_col, visible_col) = (column(runs, first), column(runs, visible));
                if let Some(cap) = softcap {
                    for s in &mut scores[first_col..visible_col] {
                        *s = cap * (*s / cap).tanh();
                    }
                }
                // Computed tree keys that are not the query's ancestors (another
                // query of the chunk sees them), or fell out of its window.
                hidden.clear();
                if let Some(m) = tree {
                    let lo = first.max(m.start);
                    for r in runs {
                        hidden.extend(
                            (lo.max(r.key)..visible.min(r.key + r.width))
                                .filter(|&j| {
                                    let node = j - m.start;
                                    !m.sees(query, node) || m.positions[node] < lowest
                                })
                                .map(|j| r.column + j - r.key),
                        );
                    }
                }
                // exp(-inf) clamps to ~1e-38 in the softmax; zeroed after it.
                hidden.iter().for_each(|&c| scores[c] = f32::NEG_INFINITY);
                softmax_in_place(&mut scores[first_col..visible_col]);
                hidden.iter().for_each(|&c| scores[c] = 0.0);
                scores[..first_col].fill(0.0);
                scores[visible_col..].fill(0.0);
            }
            // As outᵀ = Vᵀ · scoresᵀ: both operands then run along the keys, so
            // `gemm` reads them in place instead of repacking the [rows, keys]
            // scores with strided scalar copies (a quarter of a short call's time).
            // Every run after the first adds to the product so far.
            for r in runs {
                unsafe {
                    gemm_strided(
                        (hd, rows, r.width),
                        scratch.out.as_mut_ptr(),
                        (1, hd),
                        Operand::transposed(v_at(r.key), v.stride),
                        Operand::transposed(&scratch.scores[r.column..], n_used),
                        1.0,
                        r.column > 0,
                    );
                }
            }
            for (row, head_out) in scratch.out.chunks_exact(hd).enumerate() {
                let (r, i) = (row / len, start + row % len);
                // Safety: this task owns output rows start..start+len of the group's heads.
                unsafe {
                    let dst = out_ptr.at(i * out_stride + (g * rep + r) * hd);
                    std::ptr::copy_nonoverlapping(head_out.as_ptr(), dst, hd);
                }
            }
        });
    };
    if tasks.len() == 1 {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive attention, one query at a time, for comparison: query `i` sees the
    /// cached keys and, causally or along `parents` (a token tree), the new ones.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: AttnDims,
        parents: Option<&[Option<usize>]>,
    ) -> Vec<f32> {
        let (nh, nkv, hd) = (d.n_heads, d.n_kv_heads, d.head_dim);
        // (key row, position) of every key query i sees.
        let seen = |i: usize| -> Vec<(usize, usize)> {
            let mut new = vec![];
            match parents {
                None => new.extend((0..=i).map(|j| (d.past + j, d.past + j))),
                Some(parents) => {
                    let mut chain = vec![i];
                    while let Some(p) = parents[*chain.last().unwrap()] {
                        chain.push(p);
                    }
                    let depth = chain.len() - 1;
                    new.extend(
                        chain
                            .iter()
                            .rev()
                            .enumerate()
                            .map(|(dep, &j)| (d.past + j, d.past + dep)),
                    );
                    debug_assert_eq!(new.last().unwrap().1, d.past + depth);
                }
            }
            let pos = new.last().unwrap().1;
            (0..d.past)
                .map(|j| (j, j))
                .chain(new)
                .filter(|&(_, p)| d.window.is_none_or(|w| pos - p < w))
                .collect()
        };
        let mut out = vec![0f32; d.t * nh * hd];
        for i in 0..d.t {
            let keys = seen(i);
            for h in 0..nh {
                let g = h / (nh / nkv);
                let qi = &q[i * nh * hd + h * hd..][..hd];
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&(j, _)| {
                        let kj = &k[j * nkv * hd + g * hd..][..hd];
                        let s = qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            * d.scale as f64;
                        d.softcap.map_or(s, |c| c as f64 * (s / c as f64).tanh())
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..hd {
                    out[i * nh * hd + h * hd + c] = keys
                        .iter()
                        .zip(&s)
                        .map(|(&(j, _), sj)| {
                            (sj - m).exp() / z * v[j * nkv * hd + g * hd + c] as f64
                        })
                        .sum::<f64>() as f32;
                }
            }
        }
        out
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn a_parent_must_come_earlier() {
        let err = TreeMask::new(&[None, Some(2), Some(0)], 0, 0).unwrap_err();
        assert!(err.contains("token 1") && err.contains("earlier"), "{err}");
    }

    #[test]
    fn fused_attention_equals_naive_attention() {
        let cases = [
            (1, 0, None, None),
            (5, 0, None, None),
            (300, 0, None, None),
            (3, 200, None, None),
            (130, 7, None, None),
            (130, 7, Some(9), Some(1.5)),
            (3, 200, Some(50), None),
            (70, 0, Some(1), Some(0.7)),
        ];
        for (t, past, window, softcap) in cases {
            let d = AttnDims {
                n_heads: 6,
                n_kv_heads: 2,
                head_dim: 8,
                t,
                past,
                scale: 0.3,
                softcap,
                window,
            };
            let gen = |n: usize, seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0)
                    .collect()
            };
            let q = gen(t * 48, 1);
            let k = gen((past + t) * 16, 2);
            let v = gen((past + t) * 16, 3);
            fn s(data: &[f32], stride: usize) -> Strided<'_> {
                Strided {
                    data,
                    stride,
                    offset: 0,
                }
            }
            let got = causal_attention(s(&q, 48), s(&k, 16), s(&v, 16), d, None);
            let want = naive(&q, &k, &v, d, None);
            let err = max_abs_diff(&got, &want);
            assert!(err < 1e-5, "t={t} past={past}: max error {err}");
            // The same tokens as a tree: branches of several depths (past one query
            // chunk), and rows packed side by side as a batched capture packs them
            // (later chunks then skip the rows before theirs).
            let branchy: Vec<Option<usize>> = (0..t)
                .map(|i| match i % 7 {
                    0 => None,
                    3 => Some(i / 2),
                    _ => Some(i - 1),
                })
                .collect();
            let packed: Vec<Option<usize>> = (0..t).map(|i| (i % 45 != 0).then(|| i - 1)).collect();
            for parents in [branchy, packed] {
                let mask = TreeMask::new(&parents, past, 0).unwrap();
                let got = causal_attention(s(&q, 48), s(&k, 16), s(&v, 16), d, Some(&mask));
                let want = naive(&q, &k, &v, d, Some(&parents));
                let err = max_abs_diff(&got, &want);
                assert!(err < 1e-5, "tree t={t} past={past}: max error {err}");
                // The tree's first third already cached, the rest queried.
                let c = t / 3;
                let split = TreeMask::new(&parents, past, c).unwrap();
                let dims = AttnDims {
                    t: t - c,
                    past: past + c,
                    ..d
                };
                let got = causal_attention(
                    s(&q[c * 48..], 48),
                    s(&k, 16),
                    s(&v, 16),
                    dims,
                    Some(&split),
                );
                let err = max_abs_diff(&got, &want[c * 48..]);
                assert!(err < 1e-5, "cached tree t={t} past={past}: max error {err}");
            }
        }
    }
}
