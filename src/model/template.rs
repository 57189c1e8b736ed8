//! Chat templates, rendered with minijinja the way transformers renders them
//! (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`),
//! so the text equals `apply_chat_template(..., add_generation_prompt=True)`.

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| {
            // Templates use it for "today's date" lines; a fixed date keeps runs reproducible.
            fmt.replace("%Y", "2026")
                .replace("%m", "01")
                .replace("%d", "01")
                .replace("%b", "Jan")
                .replace("%B", "January")
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(format!("cannot parse the template: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The template text, as stored in the model files.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`, ending with the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new()");
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| Error::Template(format!("cannot render the template: {e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_methods_and_trimming_behave_like_jinja2() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m['role'] | upper }}: {{ m['content'].strip() }}\n  {% if true %}x{% endif %}\n{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&[Message::new("user", "  hi  ")], true).unwrap();
        // What jinja2 gives with trim_blocks + lstrip_blocks (checked with jinja2 3.1).
        assert_eq!(out, "  USER: hi\nx");
    }

    #[test]
    fn raise_exception_reports_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", None, None).unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("only user turns"), "{err}");
    }
}
