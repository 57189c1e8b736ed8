//! Chat templates, rendered with minijinja in the environment transformers
//! gives templates (`transformers.utils.chat_template_utils`): `trim_blocks`,
//! `lstrip_blocks`, the `loopcontrols` extension (`{% break %}`,
//! `{% continue %}`), the `{% generation %}` block of its `AssistantTracker`
//! (rendered as its content), a `tojson` filter with Python `json.dumps`
//! semantics, the globals `raise_exception` and `strftime_now`, Python string
//! methods, and `messages`, `tools`, `documents`, `add_generation_prompt`,
//! `bos_token`, `eos_token` in the context. So the text equals
//! `apply_chat_template(..., add_generation_prompt=True)`.
//!
//! A template that does not parse is not an error at load: it is reported,
//! naming the file it came from, when a chat prompt is rendered, so raw
//! prompts and `model info` still work. Resources are bounded: a render has a
//! fixed instruction budget (minijinja fuel), `tojson` output and `indent`
//! widths are capped.

mod json_dumps;

use minijinja::value::{ArgType, Kwargs, StringInput};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use json_dumps::tojson;

/// Instructions one render may execute (a chat template needs thousands).
const RENDER_FUEL: u64 = 50_000_000;
/// The widest `indent` a template may ask for (of `indent` and `tojson`).
const MAX_INDENT_WIDTH: usize = 4096;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A chat template (compiled, or the reason it does not compile), where it
/// came from, and the special tokens it may refer to.
pub struct ChatTemplate {
    compiled: std::result::Result<Environment<'static>, String>,
    source: String,
    origin: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from (a file, and the key
    /// inside it) for error messages. Never fails: a parse error is kept and
    /// reported by [`ChatTemplate::render`].
    pub fn new(
        source: &str,
        origin: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> ChatTemplate {
        let mut env = environment();
        let compiled = match env.add_template_owned("chat", rewrite_generation_tags(source)) {
            Ok(()) => Ok(env),
            Err(e) => Err(format!("{e:#}")),
        };
        ChatTemplate {
            compiled,
            source: source.to_string(),
            origin: origin.to_string(),
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        }
    }

    /// The template text, as stored in the model files.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (file, and key), as errors name it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The parse error, if the template does not compile.
    pub fn parse_error(&self) -> Option<&str> {
        self.compiled.as_ref().err().map(String::as_str)
    }

    /// Renders `messages`, ending with the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.compiled.as_ref().map_err(|e| {
            Error::Template(format!(
                "{}: the chat template does not parse: {e}; fix the template, or use raw \
                 prompts (--raw, or `text` prompt rows)",
                self.origin
            ))
        })?;
        let fail = |e: JinjaError| {
            Error::Template(format!(
                "{}: cannot render the chat template: {e:#}",
                self.origin
            ))
        };
        let template = env.get_template("chat").map_err(fail)?;
        template
            .render(minijinja::context! {
                messages => messages,
                tools => Value::from(()),
                documents => Value::from(()),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(fail)
    }
}

/// transformers' template environment, on minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| strftime_fixed(&fmt));
    env.add_filter("tojson", tojson);
    env.add_filter(
        "indent",
        |value: Value,
         width: Option<usize>,
         first: Option<bool>,
         blank: Option<bool>,
         kwargs: Kwargs|
         -> std::result::Result<Value, JinjaError> {
            let w = width.or(kwargs.get::<Option<usize>>("width")?);
            if w.is_some_and(|w| w > MAX_INDENT_WIDTH) {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("indent width above {MAX_INDENT_WIDTH}"),
                ));
            }
            let input = <StringInput as ArgType>::from_value(Some(&value))?;
            minijinja::filters::indent(input, width, first, blank, kwargs)
        },
    );
    env
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' `AssistantTracker`
/// marks the assistant's tokens with it; the text is the block's content) become
/// `{% if true %}` / `{% endif %}`, keeping whitespace-control markers.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let replaced = generation_tag(tag);
        match replaced {
            Some((text, len)) => {
                out.push_str(&text);
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` (starting at `{%`) is a generation tag: its replacement and length.
fn generation_tag(tag: &str) -> Option<(String, usize)> {
    let body_start = 2;
    let end = tag.find("%}")?;
    let inner = tag.get(body_start..end)?;
    let (open, inner) = match inner.strip_prefix(['-', '+']) {
        Some(r) => (&inner[..1], r),
        None => ("", inner),
    };
    let (inner, close) = match inner.strip_suffix(['-', '+']) {
        Some(r) => (r, &inner[inner.len() - 1..]),
        None => (inner, ""),
    };
    let word = match inner.trim() {
        "generation" => "if true",
        "endgeneration" => "endif",
        _ => return None,
    };
    Some((format!("{{%{open} {word} {close}%}}"), end + 2))
}

/// `strftime_now(format)`: transformers gives the current local time; afprobe
/// renders a fixed date, 2026-01-01 00:00:00 (a Thursday), so a study's
/// prompts are the same on every run. The C/glibc directives are supported.
fn strftime_fixed(fmt: &str) -> String {
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `%-d` (no padding) and friends.
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let padded = |s: &'static str, bare: &'static str| if no_pad { bare } else { s };
        out.push_str(match d {
            'Y' | 'G' => "2026",
            'y' | 'g' => "26",
            'C' => "20",
            'm' => padded("01", "1"),
            'd' => padded("01", "1"),
            'e' => padded(" 1", "1"),
            'j' => padded("001", "1"),
            'H' | 'M' | 'S' => padded("00", "0"),
            'I' | 'l' => padded("12", "12"),
            'p' => "AM",
            'P' => "am",
            'a' => "Thu",
            'A' => "Thursday",
            'b' | 'h' => "Jan",
            'B' => "January",
            'u' | 'w' => "4",
            'U' | 'W' => "00",
            'V' => "01",
            'c' => "Thu Jan  1 00:00:00 2026",
            'x' | 'D' => "01/01/26",
            'F' => "2026-01-01",
            'X' | 'T' => "00:00:00",
            'R' => "00:00",
            'r' => "12:00:00 AM",
            'z' => "+0000",
            'Z' => "UTC",
            's' => "1767225600",
            'f' => "000000",
            'n' => "\n",
            't' => "\t",
            '%' => "%",
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
                continue;
            }
        });
    }
    out
}

/// The plain-text conversation format for base models without a chat
/// template: the system message as a paragraph, each turn as `User: …` or
/// `Assistant: …` followed by a blank line, and `Assistant:` last, where the
/// model continues (the answer tags follow it directly).
pub fn plain_conversation(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        match m.role.as_str() {
            "system" => out.push_str(&format!("{}\n\n", m.content)),
            "assistant" => out.push_str(&format!("Assistant: {}\n\n", m.content)),
            _ => out.push_str(&format!("User: {}\n\n", m.content)),
        }
    }
    out.push_str("Assistant:");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: &[Message]) -> Result<String> {
        ChatTemplate::new(src, "test.jinja", None, None).render(messages, true)
    }

    #[test]
    fn python_methods_and_trimming_behave_like_jinja2() {
        let out = render(
            "{% for m in messages %}\n  {{ m['role'] | upper }}: {{ m['content'].strip() }}\n  {% if true %}x{% endif %}\n{% endfor %}",
            &[Message::new("user", "  hi  ")],
        )
        .unwrap();
        // What jinja2 gives with trim_blocks + lstrip_blocks (checked with jinja2 3.1).
        assert_eq!(out, "  USER: hi\nx");
    }

    #[test]
    fn raise_exception_reports_its_message_and_the_file() {
        let err = render("{{ raise_exception('only user turns') }}", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only user turns") && err.contains("test.jinja"),
            "{err}"
        );
    }

    #[test]
    fn a_template_that_does_not_parse_fails_at_render_naming_its_file() {
        let t = ChatTemplate::new("{% for %}", "dir/chat_template.jinja", None, None);
        assert!(t.parse_error().is_some());
        assert_eq!(t.source(), "{% for %}");
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(
            err.contains("dir/chat_template.jinja") && err.contains("--raw"),
            "{err}"
        );
    }

    #[test]
    fn loop_controls_and_generation_blocks() {
        let out = render(
            "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }};{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}{%- generation -%} G {%- endgeneration %}",
            &[
                Message::new("system", "s"),
                Message::new("user", "a"),
                Message::new("user", "b"),
                Message::new("user", "c"),
            ],
        )
        .unwrap();
        assert_eq!(out, "a;b;G");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let cases = [
            ("{{ 'Be <b> & \\'x\\'' | tojson }}", "\"Be <b> & 'x'\""),
            ("{{ 'héllo' | tojson }}", "\"héllo\""),
            (
                "{{ 'héllo😀' | tojson(ensure_ascii=True) }}",
                "\"h\\u00e9llo\\ud83d\\ude00\"",
            ),
            (
                "{{ {'b': 1, 'a': [1, 2.5, none, true]} | tojson }}",
                "{\"b\": 1, \"a\": [1, 2.5, null, true]}",
            ),
            (
                "{{ {'b': 1, 'a': 2} | tojson(sort_keys=True) }}",
                "{\"a\": 2, \"b\": 1}",
            ),
            (
                "{{ {'a': [1, {}], 'b': []} | tojson(indent=2) }}",
                "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}",
            ),
            ("{{ [1, 2] | tojson(separators=(',', ':')) }}", "[1,2]"),
            (
                "{{ [1.0, 1e16, 1e-7, 0.0001, 123456.789, -0.0] | tojson }}",
                "[1.0, 1e+16, 1e-07, 0.0001, 123456.789, -0.0]",
            ),
            (
                "{{ 'a\nb\t\"\\\\\x01' | tojson }}",
                "\"a\\nb\\t\\\"\\\\\\u0001\"",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(render(src, &[]).unwrap(), want, "{src}");
        }
    }

    #[test]
    fn absurd_widths_are_refused_not_allocated() {
        for src in [
            "{{ messages | tojson(indent=1000000000000) }}",
            "{{ messages | tojson(indent=5000) }}",
            "{{ 'x\ny' | indent(1000000000000) }}",
        ] {
            let err = render(src, &[Message::new("user", "hi")]).unwrap_err();
            assert!(err.to_string().contains("test.jinja"), "{err}");
        }
        let err = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("fuel"), "{err}");
    }

    #[test]
    fn strftime_now_is_a_fixed_date() {
        assert_eq!(
            render("{{ strftime_now('%d %b %Y, %A %-d %B') }}", &[]).unwrap(),
            "01 Jan 2026, Thursday 1 January"
        );
    }

    #[test]
    fn tools_and_documents_are_none() {
        assert_eq!(
            render(
                "{% if tools is not none %}T{% endif %}{% if documents is none %}D{% endif %}",
                &[]
            )
            .unwrap(),
            "D"
        );
    }
}
