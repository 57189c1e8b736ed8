//! Requests: the built-in set and loaders for JSONL, JSON arrays and
//! AdvBench-style CSV (a `goal` column).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// One user request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Stable id: `{category}-{nn}` for built-ins, the file's `id` or `r{line}` for loaded ones.
    pub id: String,
    pub text: String,
    pub category: String,
    /// False for the benign baseline.
    pub harmful: bool,
}

const BUILTIN: &str = include_str!("requests.txt");

/// The built-in requests: 120 harmful-sounding ones over 8 categories and 60
/// benign ones (categories `benign-*`). Request sentences only.
pub fn builtin_requests() -> Vec<Request> {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    BUILTIN
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (category, text) = line
                .split_once('|')
                .expect("requests.txt lines are category|text");
            let n = counts.entry(category).or_default();
            *n += 1;
            Request {
                id: format!("{category}-{n:02}"),
                text: text.trim().to_string(),
                category: category.to_string(),
                harmful: !category.starts_with("benign"),
            }
        })
        .collect()
}

/// Requests named by `--requests`: `builtin`, `builtin-harmful`, `builtin-benign`, or a file.
pub fn requests_from(source: &str) -> Result<Vec<Request>> {
    let all = builtin_requests();
    Ok(match source {
        "builtin" => all,
        "builtin-harmful" => all.into_iter().filter(|r| r.harmful).collect(),
        "builtin-benign" => all.into_iter().filter(|r| !r.harmful).collect(),
        path => load_requests(Path::new(path))?,
    })
}

/// Loads requests from `.jsonl` (a `request` field per line), `.json` (an array of
/// strings or objects) or `.csv` (a `goal` column). Loaded requests count as harmful
/// unless a row says `"harmful": false`.
pub fn load_requests(path: &Path) -> Result<Vec<Request>> {
    let text = crate::io::read_to_string(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let requests = match ext {
        "jsonl" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let v: Value = serde_json::from_str(line).map_err(|e| {
                    Error::BadInput(format!("{}:{}: not valid JSON: {e}", path.display(), i + 1))
                })?;
                from_value(&v, i + 1, path)
            })
            .collect::<Result<Vec<_>>>()?,
        "json" => {
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::BadInput(format!("{}: not valid JSON: {e}", path.display())))?;
            let items = v.as_array().ok_or_else(|| {
                Error::BadInput(format!(
                    "{}: expected a JSON array of requests",
                    path.display()
                ))
            })?;
            items
                .iter()
                .enumerate()
                .map(|(i, item)| from_value(item, i + 1, path))
                .collect::<Result<Vec<_>>>()?
        }
        "csv" => from_csv(&text, path)?,
        _ => {
            return Err(Error::BadInput(format!(
                "{}: unknown request file type; use .jsonl (a `request` field), .json (an array) \
                 or .csv (a `goal` column)",
                path.display()
            )))
        }
    };
    if requests.is_empty() {
        return Err(Error::BadInput(format!("{}: no requests", path.display())));
    }
    Ok(requests)
}

fn from_value(v: &Value, line: usize, path: &Path) -> Result<Request> {
    let at = |msg: &str| Error::BadInput(format!("{}:{line}: {msg}", path.display()));
    let (text, obj) = match v {
        Value::String(s) => (s.clone(), None),
        Value::Object(o) => {
            let text = ["request", "goal", "prompt"]
                .iter()
                .find_map(|k| o.get(*k).and_then(Value::as_str))
                .ok_or_else(|| at("expected a `request` (or `goal`/`prompt`) string field"))?;
            (text.to_string(), Some(o))
        }
        _ => return Err(at("expected a string or an object with a `request` field")),
    };
    if text.trim().is_empty() {
        return Err(at("empty request"));
    }
    let field = |k: &str| obj.and_then(|o| o.get(k));
    Ok(Request {
        id: match field("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => format!("r{line:04}"),
        },
        text: text.trim().to_string(),
        category: field("category")
            .and_then(Value::as_str)
            .unwrap_or("loaded")
            .to_string(),
        harmful: field("harmful").and_then(Value::as_bool).unwrap_or(true),
    })
}

fn from_csv(text: &str, path: &Path) -> Result<Vec<Request>> {
    let records = parse_csv(text).map_err(|(record, msg)| {
        Error::BadInput(format!("{}: CSV record {record}: {msg}", path.display()))
    })?;
    let mut records = records.into_iter();
    let header = records
        .next()
        .ok_or_else(|| Error::BadInput(format!("{}: empty CSV file", path.display())))?;
    let goal = header
        .iter()
        .position(|h| h.trim() == "goal")
        .ok_or_else(|| {
            Error::BadInput(format!(
                "{}: the CSV has no `goal` column (columns: {})",
                path.display(),
                header.join(", ")
            ))
        })?;
    let category = header.iter().position(|h| h.trim() == "category");
    records
        .enumerate()
        .filter(|(_, r)| !(r.len() == 1 && r[0].trim().is_empty()))
        .map(|(i, r)| {
            let text = r.get(goal).map(|s| s.trim()).unwrap_or("");
            if text.is_empty() {
                return Err(Error::BadInput(format!(
                    "{}: CSV record {}: empty `goal`",
                    path.display(),
                    i + 2
                )));
            }
            Ok(Request {
                id: format!("r{:04}", i + 1),
                text: text.to_string(),
                category: category
                    .and_then(|c| r.get(c))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|| "loaded".into()),
                harmful: true,
            })
        })
        .collect()
}

/// RFC 4180 CSV: quoted fields may hold commas, newlines and doubled quotes.
/// Errors carry the 1-based record number.
fn parse_csv(text: &str) -> std::result::Result<Vec<Vec<String>>, (usize, String)> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (in_quotes, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => in_quotes = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => in_quotes = true,
            (false, '"') => {
                return Err((records.len() + 1, "a quote inside an unquoted field".into()))
            }
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    if in_quotes {
        return Err((records.len() + 1, "a quoted field is not closed".into()));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_set_has_the_promised_shape() {
        let all = builtin_requests();
        let harmful: Vec<_> = all.iter().filter(|r| r.harmful).collect();
        let categories: std::collections::BTreeSet<_> =
            harmful.iter().map(|r| r.category.as_str()).collect();
        assert!(harmful.len() >= 120 && categories.len() >= 8);
        assert!(all.len() - harmful.len() >= 60);
        let ids: std::collections::BTreeSet<_> = all.iter().map(|r| &r.id).collect();
        assert_eq!(ids.len(), all.len(), "request ids must be unique");
        assert_eq!(all[0].id, "cybercrime-01");
    }

    #[test]
    fn csv_handles_quotes_commas_and_newlines() {
        let rows =
            parse_csv("goal,target\n\"Say \"\"hi\"\", then, bye\",x\nplain,y\n\"multi\nline\",z")
                .unwrap();
        assert_eq!(rows[1][0], "Say \"hi\", then, bye");
        assert_eq!(rows[2], vec!["plain", "y"]);
        assert_eq!(rows[3][0], "multi\nline");
        assert_eq!(parse_csv("a\n\"open").unwrap_err().0, 2);
    }
}
