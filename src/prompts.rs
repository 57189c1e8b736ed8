//! Prompt files (README, "The activation store"): JSONL rows, rendered to token ids with the token
//! positions that capture needs.
//!
//! A row is `{"id", "text"}` (verbatim) or `{"id", "messages"}` (chat template
//! with the generation prompt), with an optional `assistant_prefix` appended.
//! `continuations` (`{"accept": "...", "reject": "..."}`) are scored by
//! `capture --score`; `cue_text` marks the cue span; `user_text` marks the
//! user turn of a `text` row. Every other field is metadata, copied to `rows.jsonl`.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::{Message, Model};

/// Fields with a meaning for afprobe; everything else is metadata.
const RESERVED: [&str; 6] = [
    "id",
    "text",
    "messages",
    "assistant_prefix",
    "continuations",
    "user_text",
];

/// What a row asks the model to read.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptBody {
    Text(String),
    Messages(Vec<Message>),
}

/// One row of a prompt file.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub id: String,
    /// 1-based line number in the file, for error messages.
    pub line: usize,
    pub body: PromptBody,
    pub assistant_prefix: String,
    /// Continuations to score, by name, in a stable order.
    pub continuations: BTreeMap<String, String>,
    /// For `text` rows: the user turn, to locate `eoi` and `mean`.
    pub user_text: Option<String>,
    /// Every other field, including `cue_text` and labels such as `tier`.
    pub metadata: Map<String, Value>,
}

impl PromptRow {
    pub fn cue_text(&self) -> Option<&str> {
        self.metadata.get("cue_text").and_then(Value::as_str)
    }
}

/// Reads a prompt JSONL file; errors name the file and line.
pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptRow>> {
    let text = crate::io::read_to_string(path)?;
    parse_prompts(&text, path)
}

/// Parses prompt JSONL text (`path` is only for messages).
pub fn parse_prompts(text: &str, path: &Path) -> Result<Vec<PromptRow>> {
    let mut rows = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::BadInput(format!("{}:{}: {msg}", path.display(), i + 1));
        let value: Value =
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        let Value::Object(mut obj) = value else {
            return Err(at("expected a JSON object per line".into()));
        };
        let id = match obj.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(at("missing `id` (a string or number)".into())),
        };
        if !seen.insert(id.clone()) {
            return Err(at(format!(
                "duplicate id `{id}`; every row needs its own id"
            )));
        }
        let string_field = |obj: &Map<String, Value>, name: &str| -> Result<Option<String>> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(at(format!("`{name}` must be a string"))),
            }
        };
        let body = match (obj.get("text"), obj.get("messages")) {
            (Some(_), Some(_)) => {
                return Err(at("a row has either `text` or `messages`, not both".into()))
            }
            (Some(_), None) => PromptBody::Text(string_field(&obj, "text")?.unwrap_or_default()),
            (None, Some(m)) => {
                PromptBody::Messages(serde_json::from_value(m.clone()).map_err(|e| {
                    at(format!(
                        "`messages` must be a list of {{\"role\", \"content\"}} objects: {e}"
                    ))
                })?)
            }
            (None, None) => {
                return Err(at(
                    "row has neither `text` nor `messages`; give the prompt as one of them".into(),
                ))
            }
        };
        let continuations = match obj.get("continuations") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(c)) => c
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(at(format!("continuation `{k}` must be a string"))),
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(at(
                    "`continuations` must be an object such as {\"accept\": \"...\", \"reject\": \"...\"}"
                        .into(),
                ))
            }
        };
        if obj.get("cue_text").is_some_and(|c| !c.is_string()) {
            return Err(at("`cue_text` must be a string".into()));
        }
        let assistant_prefix = string_field(&obj, "assistant_prefix")?.unwrap_or_default();
        let user_text = string_field(&obj, "user_text")?;
        for key in RESERVED {
            obj.remove(key);
        }
        rows.push(PromptRow {
            id,
            line: i + 1,
            body,
            assistant_prefix,
            continuations,
            user_text,
            metadata: obj,
        });
    }
    if rows.is_empty() {
        return Err(Error::BadInput(format!(
            "{}: no prompt rows (one JSON object per line)",
            path.display()
        )));
    }
    Ok(rows)
}

/// A row rendered for one model: its token ids and the positions capture uses.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedPrompt {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Token range `[start, end)` of the user turn, if it can be located.
    pub user_span: Option<(usize, usize)>,
    /// Token range `[start, end)` of the system message's text, when the row
    /// has one (where a study's setting says what the tiers mean for training).
    pub system_span: Option<(usize, usize)>,
    /// Token range `[start, end)` covering `cue_text`, if the row has one.
    pub cue_span: Option<(usize, usize)>,
    /// Token ids of each continuation, by name.
    pub continuations: BTreeMap<String, Vec<u32>>,
}

impl RenderedPrompt {
    pub fn last(&self) -> usize {
        self.tokens.len() - 1
    }

    /// The tokens every continuation starts with (`<` of both answer tags,
    /// for most tokenizers): the model reads them before it decides.
    pub fn shared_answer_prefix(&self) -> &[u32] {
        let mut conts = self.continuations.values();
        let Some(first) = conts.next() else {
            return &[];
        };
        let shared = conts.fold(first.len(), |n, c| {
            n.min(first.iter().zip(c).take_while(|(a, b)| a == b).count())
        });
        // A continuation that is all prefix still differs from the others after it.
        let shortest = self.continuations.values().map(Vec::len).min().unwrap_or(0);
        &first[..shared.min(shortest.saturating_sub(1))]
    }

    /// The position whose logits choose between the continuations: the last
    /// token they share, or the last prompt token when they share none (an
    /// absolute position, past the prompt for tags that share a prefix).
    pub fn decision(&self) -> usize {
        self.last() + self.shared_answer_prefix().len()
    }
}

/// Renders `row` for `model` and locates its spans; `path` names the file in errors.
pub fn render(model: &Model, row: &PromptRow, path: &Path) -> Result<RenderedPrompt> {
    let at = |msg: String| {
        Error::BadInput(format!(
            "{}:{} (id `{}`): {msg}",
            path.display(),
            row.line,
            row.id
        ))
    };
    let (mut text, user_text, system_text) = match &row.body {
        PromptBody::Text(t) => (t.clone(), row.user_text.clone(), None),
        PromptBody::Messages(msgs) => {
            let content = |m: &Message| m.content.clone();
            (
                model.format_chat(msgs).map_err(|e| at(e.to_string()))?,
                msgs.iter().rev().find(|m| m.role == "user").map(content),
                msgs.iter().find(|m| m.role == "system").map(content),
            )
        }
    };
    text.push_str(&row.assistant_prefix);
    let (tokens, offsets) = model
        .tokenizer
        .encode_with_offsets(&text)
        .map_err(|e| at(e.to_string()))?;
    if tokens.is_empty() {
        return Err(at("the prompt is empty".into()));
    }
    // A template may trim a message (Llama 3's `| trim`): the turn is found
    // as written, else trimmed.
    let locate = |turn: &str, last: bool| -> Option<(usize, usize)> {
        [turn, turn.trim()].into_iter().find_map(|t| {
            let start = if last { text.rfind(t) } else { text.find(t) }?;
            Some(token_span(&offsets, start, start + t.len()))
        })
    };
    let user_span = match user_text.filter(|u| !u.trim().is_empty()) {
        Some(u) => Some(locate(&u, true).ok_or_else(|| {
            at(
                "the user turn does not appear in the rendered prompt, as written or trimmed"
                    .into(),
            )
        })?),
        None => None,
    };
    // The first occurrence: the system message comes first. A template that
    // rewrites it otherwise leaves the span unknown rather than wrong.
    let system_span = system_text
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| locate(&s, false));
    let cue_span = match row.cue_text() {
        Some(cue) => {
            // The last occurrence: a system prompt may quote the cue while explaining it.
            let start = text.rfind(cue).ok_or_else(|| {
                at(format!(
                    "cue_text {cue:?} does not appear in the rendered prompt; it must be an exact substring"
                ))
            })?;
            Some(token_span(&offsets, start, start + cue.len()))
        }
        None => None,
    };
    let continuations = row
        .continuations
        .iter()
        .map(|(name, c)| {
            let ids = model
                .tokenizer
                .encode_plain(c)
                .map_err(|e| at(format!("continuation `{name}`: {e}")))?;
            Ok((name.clone(), ids))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    if let Some((name, _)) = continuations.iter().find(|(_, ids)| ids.is_empty()) {
        return Err(at(format!("continuation `{name}` is empty")));
    }
    Ok(RenderedPrompt {
        text,
        tokens,
        user_span,
        system_span,
        cue_span,
        continuations,
    })
}

/// Tokens overlapping the byte range `[start, end)`, as a token range.
fn token_span(offsets: &[(usize, usize)], start: usize, end: usize) -> (usize, usize) {
    let first = offsets
        .iter()
        .position(|&(_, e)| e > start)
        .unwrap_or(offsets.len() - 1);
    let last = offsets
        .iter()
        .rposition(|&(s, _)| s < end)
        .unwrap_or(first)
        .max(first);
    (first, last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<PromptRow>> {
        parse_prompts(text, Path::new("p.jsonl"))
    }

    #[test]
    fn rows_keep_their_metadata() {
        let rows = parse(
            r#"{"id": 7, "messages": [{"role": "user", "content": "hi"}], "tier": "free", "cue_text": "hi", "continuations": {"reject": "<rejected/>", "accept": "<request_fully_accepted/>"}}
{"id": "b", "text": "raw", "assistant_prefix": "<", "user_text": "raw"}"#,
        )
        .unwrap();
        assert_eq!(rows[0].id, "7");
        assert_eq!(rows[0].metadata["tier"], "free");
        assert_eq!(rows[0].cue_text(), Some("hi"));
        assert_eq!(
            rows[0].continuations.keys().collect::<Vec<_>>(),
            ["accept", "reject"]
        );
        assert!(!rows[0].metadata.contains_key("continuations"));
        assert_eq!(rows[1].assistant_prefix, "<");
        assert_eq!(rows[1].user_text.as_deref(), Some("raw"));
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        for (text, needle) in [
            (
                "{\"id\": 1, \"text\": \"a\"}\nnot json",
                "p.jsonl:2: not valid JSON",
            ),
            (
                "{\"id\": 1}",
                "p.jsonl:1: row has neither `text` nor `messages`",
            ),
            (
                "{\"id\": 1, \"text\": \"a\"}\n\n{\"id\": 1, \"text\": \"b\"}",
                "p.jsonl:3: duplicate id `1`",
            ),
            ("{\"text\": \"a\"}", "p.jsonl:1: missing `id`"),
            ("[1, 2]", "p.jsonl:1: expected a JSON object"),
            ("", "no prompt rows"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn spans_cover_the_overlapping_tokens() {
        // Tokens: "ab" [0,2), "cd" [2,4), "e" [4,5).
        let offsets = [(0, 2), (2, 4), (4, 5)];
        assert_eq!(token_span(&offsets, 2, 4), (1, 2));
        assert_eq!(token_span(&offsets, 1, 3), (0, 2));
        assert_eq!(token_span(&offsets, 4, 5), (2, 3));
    }
}
