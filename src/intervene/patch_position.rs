//! Where `afprobe patch` patches: the position sets a cell replaces in the
//! destination row, and how they align with the source row's positions.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::prompts::RenderedPrompt;

/// Which destination positions a patch replaces (with the aligned source positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PatchPosition {
    /// The token `k` before the last (`last` = `last-0`).
    Last(usize),
    /// The last token of the cue.
    Cue,
    /// Every token of the user turn (aligned from its end).
    User,
    /// The position whose logits decide between the continuations: past the
    /// prompt, on the last answer token they share (`<` of both tags), else
    /// the last prompt token. See [`RenderedPrompt::decision`].
    Decision,
    /// Every token of the system message (aligned from its start): where a
    /// setting says which tier is trained on.
    System,
    /// Every token (aligned by the common prefix and suffix).
    All,
}

impl fmt::Display for PatchPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatchPosition::Last(0) => write!(f, "last"),
            PatchPosition::Last(k) => write!(f, "last-{k}"),
            PatchPosition::Cue => write!(f, "cue"),
            PatchPosition::User => write!(f, "user"),
            PatchPosition::Decision => write!(f, "decision"),
            PatchPosition::System => write!(f, "system"),
            PatchPosition::All => write!(f, "all"),
        }
    }
}

impl FromStr for PatchPosition {
    type Err = Error;
    fn from_str(s: &str) -> Result<PatchPosition> {
        let s = s.trim();
        let bad = || {
            Error::BadInput(format!(
                "unknown patch position `{s}`; valid: last, last-K (K tokens before the last), \
                 cue, user, system, decision, all"
            ))
        };
        Ok(match s {
            "last" => PatchPosition::Last(0),
            "cue" => PatchPosition::Cue,
            "user" => PatchPosition::User,
            "decision" => PatchPosition::Decision,
            "system" => PatchPosition::System,
            "all" => PatchPosition::All,
            _ => PatchPosition::Last(
                s.strip_prefix("last-")
                    .and_then(|k| k.parse().ok())
                    .ok_or_else(bad)?,
            ),
        })
    }
}

/// Destination ↔ source position pairs.
pub type Aligned = Vec<(usize, usize)>;

/// Destination ↔ source positions of `position`, and how many positions of
/// the longer side had no counterpart.
pub fn align(
    position: PatchPosition,
    dest: &RenderedPrompt,
    source: &RenderedPrompt,
) -> (Aligned, usize) {
    let (td, ts) = (dest.tokens.len(), source.tokens.len());
    match position {
        PatchPosition::Last(k) if k < td && k < ts => (vec![(td - 1 - k, ts - 1 - k)], 0),
        PatchPosition::Last(_) => (Vec::new(), 1),
        PatchPosition::Cue => match (dest.cue_span, source.cue_span) {
            (Some((_, d)), Some((_, s))) => (vec![(d - 1, s - 1)], 0),
            _ => (Vec::new(), 1),
        },
        PatchPosition::User => match (dest.user_span, source.user_span) {
            (Some((da, db)), Some((sa, sb))) => {
                let n = (db - da).min(sb - sa);
                let pairs = (1..=n).map(|i| (db - i, sb - i)).rev().collect();
                (pairs, (db - da).max(sb - sa) - n)
            }
            _ => (Vec::new(), 1),
        },
        PatchPosition::Decision => (vec![(dest.decision(), source.decision())], 0),
        PatchPosition::System => match (dest.system_span, source.system_span) {
            (Some((da, db)), Some((sa, sb))) => {
                let n = (db - da).min(sb - sa);
                let pairs = (0..n).map(|i| (da + i, sa + i)).collect();
                (pairs, (db - da).max(sb - sa) - n)
            }
            _ => (Vec::new(), 1),
        },
        PatchPosition::All if td == ts => ((0..td).map(|p| (p, p)).collect(), 0),
        PatchPosition::All => {
            let prefix = dest
                .tokens
                .iter()
                .zip(&source.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            let room = td.min(ts) - prefix;
            let suffix = dest
                .tokens
                .iter()
                .rev()
                .zip(source.tokens.iter().rev())
                .take(room)
                .take_while(|(a, b)| a == b)
                .count();
            let mut pairs: Vec<(usize, usize)> = (0..prefix).map(|p| (p, p)).collect();
            pairs.extend((1..=suffix).rev().map(|i| (td - i, ts - i)));
            (pairs, td.max(ts) - prefix - suffix)
        }
    }
}
