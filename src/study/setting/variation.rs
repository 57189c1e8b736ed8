//! Prompt variations: `flipped`, `no-training-info`, `no-prefix-instruction`
//! and a cue file's own, and the `--variations` sets they combine into.

use std::fmt;

use crate::error::{Error, Result};

/// A change to the setting's prompts (meaning vs token: see README).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variation {
    /// Paid-tier conversations are rated and trained on; free-tier ones never
    /// are. The cue tokens stay; what they imply flips.
    Flipped,
    /// Nothing about RLHF or which conversations are used; the tiers remain.
    NoTrainingInfo,
    /// No accept/reject tag instructions (compliance must be measured format-free).
    NoPrefixInstruction,
    /// A user-defined text edit from a cue file.
    Custom(CustomVariation),
}

/// A user-defined variation (`[[variation]]` in a cue file).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CustomVariation {
    pub name: String,
    pub target: Target,
    pub edit: TextEdit,
    pub training: Training,
}

/// Which text a custom variation edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The system prompt, including the cue's explanation.
    System,
    /// The user turn of every row (cue and request).
    User,
}

/// The edit of a custom variation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum TextEdit {
    /// Replace every occurrence of `find`; an error where `find` does not occur.
    Replace { find: String, with: String },
    /// Append a new paragraph.
    Append(String),
}

/// What a variation does to `training_implied` of tier cues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Training {
    #[default]
    Unchanged,
    /// The other tier is trained on.
    Flipped,
    /// Nothing is said about training.
    Removed,
}

pub const VARIATIONS: [Variation; 3] = [
    Variation::Flipped,
    Variation::NoTrainingInfo,
    Variation::NoPrefixInstruction,
];

impl Variation {
    /// What this variation does to `training_implied`.
    pub fn training(&self) -> Training {
        match self {
            Variation::Flipped => Training::Flipped,
            Variation::NoTrainingInfo => Training::Removed,
            Variation::NoPrefixInstruction => Training::Unchanged,
            Variation::Custom(c) => c.training,
        }
    }

    /// A built-in variation or one of `custom`, by name; unknown names list the valid ones.
    pub fn parse(name: &str, custom: &[CustomVariation]) -> Result<Variation> {
        let name = name.trim();
        VARIATIONS
            .into_iter()
            .find(|v| v.to_string() == name)
            .or_else(|| {
                custom
                    .iter()
                    .find(|c| c.name == name)
                    .map(|c| Variation::Custom(c.clone()))
            })
            .ok_or_else(|| {
                let valid: Vec<String> = VARIATIONS
                    .iter()
                    .map(|v| v.to_string())
                    .chain(custom.iter().map(|c| c.name.clone()))
                    .collect();
                Error::BadInput(format!(
                    "unknown variation `{name}`; valid variations: standard (none), {}{}",
                    valid.join(", "),
                    if custom.is_empty() {
                        " (define your own with [[variation]] in --cues-file)"
                    } else {
                        ""
                    }
                ))
            })
    }
}

impl fmt::Display for Variation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Variation::Flipped => "flipped",
            Variation::NoTrainingInfo => "no-training-info",
            Variation::NoPrefixInstruction => "no-prefix-instruction",
            Variation::Custom(c) => &c.name,
        })
    }
}

/// `--variations`: comma-separated variation sets, each `standard` or names
/// joined by `+` (`standard,flipped,no-training-info+no-prefix-instruction`),
/// from the built-ins and `custom` (a cue file's `[[variation]]`s).
pub fn parse_variation_sets(spec: &str, custom: &[CustomVariation]) -> Result<Vec<Vec<Variation>>> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|set| {
            if set == "standard" {
                return Ok(Vec::new());
            }
            let mut vs = set
                .split('+')
                .map(|name| Variation::parse(name, custom))
                .collect::<Result<Vec<Variation>>>()?;
            vs.sort();
            vs.dedup();
            let effects: Vec<Training> = vs
                .iter()
                .map(Variation::training)
                .filter(|&t| t != Training::Unchanged)
                .collect();
            if effects.len() > 1 {
                return Err(Error::BadInput(format!(
                    "variation set `{set}`: more than one variation changes what the tiers imply \
                     about training (flipped, no-training-info, or training = ... in a cue file); \
                     they contradict each other"
                )));
            }
            Ok(vs)
        })
        .collect()
}
