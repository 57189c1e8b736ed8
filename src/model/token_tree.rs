//! What one forward call computes beyond a linear run of tokens: which rows
//! get logits, and token trees (many continuations of a cached prompt in one call).

use std::collections::HashMap;

use crate::error::{Error, Result};

/// Which positions of a forward call get logits (the LM head is a quarter of
/// a small model's FLOPs per token, so only compute what is used).
#[derive(Debug, Clone, PartialEq)]
pub enum LogitsAt {
    None,
    Last,
    All,
    /// Positions relative to the tokens of this call.
    Rows(Vec<usize>),
}

impl LogitsAt {
    /// The rows of a `t`-token call that get logits; an error for a row past the call.
    pub fn rows(&self, t: usize) -> Result<Vec<usize>> {
        let rows = match self {
            LogitsAt::None => vec![],
            LogitsAt::Last => vec![t - 1],
            LogitsAt::All => (0..t).collect(),
            LogitsAt::Rows(rows) => rows.clone(),
        };
        if let Some(&bad) = rows.iter().find(|&&r| r >= t) {
            return Err(Error::BadInput(format!(
                "logits requested at row {bad} of a {t}-token forward call"
            )));
        }
        Ok(rows)
    }
}

/// Several continuations of a cached prompt as one tree of tokens: token `i`
/// follows `parents[i]` (an earlier token of the tree), or the cached tokens
/// when `None`. A branch is the path from a root to a token.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenTree {
    pub tokens: Vec<u32>,
    pub parents: Vec<Option<usize>>,
}

impl TokenTree {
    /// The prefix tree (trie) of `branches`, one node per distinct non-empty
    /// prefix; returns it and, per branch, the node of each of its tokens.
    pub fn trie(branches: &[&[u32]]) -> (TokenTree, Vec<Vec<usize>>) {
        let mut tree = TokenTree::default();
        let mut nodes: HashMap<(Option<usize>, u32), usize> = HashMap::new();
        let paths = branches
            .iter()
            .map(|branch| {
                let mut parent = None;
                branch
                    .iter()
                    .map(|&token| {
                        let node = *nodes.entry((parent, token)).or_insert_with(|| {
                            tree.tokens.push(token);
                            tree.parents.push(parent);
                            tree.tokens.len() - 1
                        });
                        parent = Some(node);
                        node
                    })
                    .collect()
            })
            .collect();
        (tree, paths)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether some branch through a node from `from` on, read after the
    /// linear tokens `cached`, ends with `pattern` at that node.
    pub(super) fn completes(&self, from: usize, cached: &[u32], pattern: &[u32]) -> bool {
        (from..self.len()).any(|i| {
            // The branch's last tokens up to i, newest first, continued into the cache.
            let mut node = Some(i);
            let branch = std::iter::from_fn(|| {
                let n = node?;
                node = self.parents[n];
                Some(self.tokens[n])
            });
            let newest_first = branch.chain(cached.iter().rev().copied());
            newest_first
                .take(pattern.len())
                .eq(pattern.iter().rev().copied())
        })
    }
}
