//! The `tojson` filter: Python's `json.dumps` (separators, `ensure_ascii`,
//! `sort_keys`, float `repr`), with its output and indent bounded.

use minijinja::value::{from_args, Kwargs, Rest};
use minijinja::{Error as JinjaError, ErrorKind, Value};

use super::MAX_INDENT_WIDTH;

/// Largest `tojson` output a template may ask for.
const MAX_JSON_BYTES: usize = 16 << 20;

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, positional arguments in that order.
/// Unlike minijinja's built-in, nothing is HTML-escaped and the separators
/// are Python's (`", "`, `": "`; `","` between items when indenting).
pub(super) fn tojson(value: Value, args: Rest<Value>) -> std::result::Result<Value, JinjaError> {
    type Args = (
        Option<Value>,
        Option<Value>,
        Option<Value>,
        Option<Value>,
        Kwargs,
    );
    let (ensure_ascii, indent, separators, sort_keys, kwargs): Args = from_args(&args)?;
    let arg = |pos: Option<Value>, name: &str| -> std::result::Result<Option<Value>, JinjaError> {
        Ok(match pos {
            Some(v) => Some(v),
            None => kwargs.get::<Option<Value>>(name)?,
        })
    };
    let ensure_ascii = arg(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = arg(indent, "indent")?.filter(|v| !v.is_none() && !v.is_undefined());
    let separators = arg(separators, "separators")?.filter(|v| !v.is_none() && !v.is_undefined());
    let sort_keys = arg(sort_keys, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let bad = |msg: String| JinjaError::new(ErrorKind::InvalidOperation, msg);

    // Python: an int indent is that many spaces (negative: none), a str is used as is.
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.kind() == minijinja::value::ValueKind::Bool => {
            Some(if v.is_true() { " " } else { "" }.to_string())
        }
        Some(v) if v.as_str().is_some() => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => {
            let n = i64::try_from(v.clone())
                .map_err(|_| bad(format!("tojson: indent must be an int or a str, not {v}")))?;
            let n = usize::try_from(n.max(0)).unwrap_or(usize::MAX);
            if n > MAX_INDENT_WIDTH {
                return Err(bad(format!(
                    "tojson: indent {n} is wider than {MAX_INDENT_WIDTH}"
                )));
            }
            Some(" ".repeat(n))
        }
    };
    if indent.as_ref().is_some_and(|i| i.len() > MAX_INDENT_WIDTH) {
        return Err(bad(format!(
            "tojson: indent is wider than {MAX_INDENT_WIDTH}"
        )));
    }
    let (item_sep, key_sep) = match separators {
        None => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
        Some(v) => {
            let parts: Vec<Value> = v
                .try_iter()
                .map_err(|_| bad("tojson: separators must be a pair of strings".into()))?
                .collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_string(),
                    b.as_str().unwrap_or_default().to_string(),
                ),
                _ => return Err(bad("tojson: separators must be a pair of strings".into())),
            }
        }
    };
    let mut w = JsonWriter {
        out: String::new(),
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    w.value(&value, 0)?;
    Ok(Value::from_safe_string(w.out))
}

struct JsonWriter {
    out: String,
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonWriter {
    fn push(&mut self, s: &str) -> std::result::Result<(), JinjaError> {
        if self.out.len() + s.len() > MAX_JSON_BYTES {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: the output would exceed {MAX_JSON_BYTES} bytes"),
            ));
        }
        self.out.push_str(s);
        Ok(())
    }

    fn newline(&mut self, level: usize) -> std::result::Result<(), JinjaError> {
        let Some(unit) = self.indent.clone() else {
            return Ok(());
        };
        if self.out.len() + 1 + unit.len().saturating_mul(level) > MAX_JSON_BYTES {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: the output would exceed {MAX_JSON_BYTES} bytes"),
            ));
        }
        self.out.push('\n');
        for _ in 0..level {
            self.out.push_str(&unit);
        }
        Ok(())
    }

    fn value(&mut self, v: &Value, level: usize) -> std::result::Result<(), JinjaError> {
        use minijinja::value::ValueKind;
        match v.kind() {
            ValueKind::None => self.push("null"),
            ValueKind::Bool => self.push(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                let text = number_repr(v);
                self.push(&text)
            }
            ValueKind::String => {
                let text = json_string(v.as_str().unwrap_or_default(), self.ensure_ascii);
                self.push(&text)
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(level, '[', ']', items.len(), |w, i, level| {
                    w.value(&items[i], level)
                })
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    entries.push((json_key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container(level, '{', '}', entries.len(), |w, i, level| {
                    let key = json_string(&entries[i].0, w.ensure_ascii);
                    w.push(&key)?;
                    let sep = w.key_sep.clone();
                    w.push(&sep)?;
                    w.value(&entries[i].1, level)
                })
            }
            _ => Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: object of type {} is not JSON serializable",
                    v.kind()
                ),
            )),
        }
    }

    fn container(
        &mut self,
        level: usize,
        open: char,
        close: char,
        len: usize,
        mut item: impl FnMut(&mut Self, usize, usize) -> std::result::Result<(), JinjaError>,
    ) -> std::result::Result<(), JinjaError> {
        if len == 0 {
            return self.push(&format!("{open}{close}"));
        }
        self.push(&open.to_string())?;
        for i in 0..len {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.push(&sep)?;
            }
            self.newline(level + 1)?;
            item(self, i, level + 1)?;
        }
        self.newline(level)?;
        self.push(&close.to_string())
    }
}

/// A dict key as `json.dumps` writes it (keys become strings).
fn json_key(key: &Value) -> std::result::Result<String, JinjaError> {
    use minijinja::value::ValueKind;
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => Ok(number_repr(key)),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::None => Ok("null".to_string()),
        other => Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {other}"),
        )),
    }
}

/// An int as its digits, a float as Python's `repr` (`1.0`, `1e+16`, `NaN`).
fn number_repr(v: &Value) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    match f64::try_from(v.clone()) {
        Ok(x) => py_float_repr(x),
        Err(_) => v.to_string(),
    }
}

/// Python's `repr(float)`: the shortest round-tripping digits, positional for
/// exponents -4..16, else `d.ddde+XX`.
fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    // `{:e}` gives the shortest round-trip digits: "1.2345e17", "5e-7", "0e0".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let body = if exp >= 0 {
            let point = exp as usize + 1;
            let padded = format!("{digits:0<point$}");
            let (int, frac) = padded.split_at(point);
            format!("{int}.{}", if frac.is_empty() { "0" } else { frac })
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// A JSON string literal as Python's `json.dumps` writes it.
fn json_string(s: &str, ensure_ascii: bool) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
