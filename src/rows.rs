//! Row tables and filters: the metadata of a store's or a prompt file's rows
//! as string columns, and `FIELD=V|W,FIELD!=X` filters over them (probes,
//! the gap and the interventions all select rows this way).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::store::Store;

/// One condition of a filter: `FIELD=V1|V2` or `FIELD!=V1|V2`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    field: String,
    values: Vec<String>,
    negate: bool,
}

/// Selects rows by metadata: conditions joined by `,` must all hold; `|`
/// separates alternative values. `all` (or empty) selects every row.
/// Examples: `cue=xml`, `cue!=control`, `cue=xml|natural,harmful=true`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    conditions: Vec<Condition>,
}

impl FromStr for Filter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Filter> {
        let s = s.trim();
        if s.is_empty() || s == "all" {
            return Ok(Filter::default());
        }
        let conditions = s
            .split(',')
            .map(|part| {
                let (field, values, negate) = if let Some((f, v)) = part.split_once("!=") {
                    (f, v, true)
                } else if let Some((f, v)) = part.split_once('=') {
                    (f, v, false)
                } else {
                    return Err(Error::BadInput(format!(
                        "filter `{s}`: `{part}` is not FIELD=VALUE or FIELD!=VALUE \
                         (join conditions with `,`, alternative values with `|`)"
                    )));
                };
                let values: Vec<String> = values.split('|').map(|v| v.trim().to_string()).collect();
                if field.trim().is_empty() || values.iter().any(String::is_empty) {
                    return Err(Error::BadInput(format!(
                        "filter `{s}`: empty field or value in `{part}`"
                    )));
                }
                Ok(Condition {
                    field: field.trim().to_string(),
                    values,
                    negate,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Filter { conditions })
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.conditions.is_empty() {
            return f.write_str("all");
        }
        let parts: Vec<String> = self
            .conditions
            .iter()
            .map(|c| {
                let op = if c.negate { "!=" } else { "=" };
                format!("{}{op}{}", c.field, c.values.join("|"))
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Filter {
    /// Rows where `field` equals one of `values`.
    pub fn equals(field: &str, values: &[&str]) -> Filter {
        Filter {
            conditions: vec![Condition {
                field: field.into(),
                values: values.iter().map(|v| v.to_string()).collect(),
                negate: false,
            }],
        }
    }

    /// `self` with the condition that `field` is not `value`.
    pub fn excluding(&self, field: &str, value: &str) -> Filter {
        let mut out = self.clone();
        out.conditions.push(Condition {
            field: field.into(),
            values: vec![value.into()],
            negate: true,
        });
        out
    }

    /// Rows that pass both filters.
    pub fn and(&self, other: &Filter) -> Filter {
        let mut out = self.clone();
        out.conditions.extend(other.conditions.iter().cloned());
        out
    }

    /// Whether any condition tests `field`.
    pub fn mentions(&self, field: &str) -> bool {
        self.conditions.iter().any(|c| c.field == field)
    }

    /// Fields the filter reads.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.conditions.iter().map(|c| c.field.as_str())
    }

    /// The per-row mask over a store's rows.
    pub fn mask(&self, table: &Table) -> Result<Vec<bool>> {
        let mut mask = vec![true; table.len()];
        for c in &self.conditions {
            let column = table.column(&c.field)?;
            for (m, v) in mask.iter_mut().zip(column) {
                let hit = v.as_ref().is_some_and(|v| c.values.contains(v));
                *m &= hit != c.negate;
            }
        }
        Ok(mask)
    }
}

/// The metadata columns of a store, as strings (JSON booleans and numbers
/// are written as JSON: `true`, `3`; a list of strings such as `variation`
/// as its items joined by `+`, `standard` when empty).
pub struct Table {
    columns: BTreeMap<String, Vec<Option<String>>>,
    len: usize,
}

impl Table {
    pub fn from_store(store: &Store) -> Table {
        let mut names = std::collections::BTreeSet::new();
        for row in store.rows() {
            if let Some(obj) = row.as_object() {
                names.extend(obj.keys().cloned());
            }
        }
        let columns = names
            .into_iter()
            .map(|name| {
                let col = store
                    .rows()
                    .iter()
                    .map(|r| r.get(&name).and_then(cell))
                    .collect();
                (name, col)
            })
            .collect();
        Table {
            columns,
            len: store.rows().len(),
        }
    }

    /// A table from explicit columns (tests, other front ends).
    pub fn from_columns(columns: BTreeMap<String, Vec<Option<String>>>) -> Table {
        let len = columns.values().next().map_or(0, Vec::len);
        Table { columns, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A column by name; the error lists the fields there are.
    pub fn column(&self, field: &str) -> Result<&[Option<String>]> {
        self.columns.get(field).map(Vec::as_slice).ok_or_else(|| {
            let names: Vec<&str> = self.columns.keys().map(String::as_str).collect();
            // The meaning label comes from the prompt writer, not from capture.
            let hint = match field {
                "training_implied" | "variation" => {
                    " (write the prompts with `afprobe prompts --variations ...`, which labels \
                     every row, and capture them again)"
                }
                _ => "",
            };
            Error::BadInput(format!(
                "no row has the field `{field}`; rows have: {}{hint}",
                names.join(", ")
            ))
        })
    }

    /// Distinct values of a column among the rows of `mask`, sorted.
    pub fn values(&self, field: &str, mask: &[bool]) -> Result<Vec<String>> {
        let mut values: Vec<String> = self
            .column(field)?
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .filter_map(|(v, _)| v.clone())
            .collect();
        values.sort();
        values.dedup();
        Ok(values)
    }

    /// A numeric column (`None` where absent or not a number).
    pub fn numbers(&self, field: &str) -> Vec<Option<f64>> {
        match self.columns.get(field) {
            Some(col) => col
                .iter()
                .map(|v| v.as_ref().and_then(|s| s.parse().ok()))
                .collect(),
            None => vec![None; self.len],
        }
    }
}

/// One metadata value as the string filters and labels compare.
pub fn cell(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(items) if items.iter().all(Value::is_string) => Some(if items.is_empty() {
            "standard".into()
        } else {
            items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("+")
        }),
        v => Some(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_print() {
        for s in ["cue=xml", "cue!=control", "cue=xml|natural,harmful=true"] {
            assert_eq!(s.parse::<Filter>().unwrap().to_string(), s);
        }
        assert_eq!("all".parse::<Filter>().unwrap(), Filter::default());
        assert!("cue".parse::<Filter>().is_err());
        assert!("cue=".parse::<Filter>().is_err());
    }

    #[test]
    fn filter_mask() {
        let table = Table::from_columns(BTreeMap::from([
            (
                "cue".to_string(),
                vec![Some("xml".into()), Some("control".into()), None],
            ),
            (
                "tier".to_string(),
                vec![
                    Some("free".into()),
                    Some("paid".into()),
                    Some("free".into()),
                ],
            ),
        ]));
        let mask = |s: &str| s.parse::<Filter>().unwrap().mask(&table).unwrap();
        assert_eq!(mask("cue=xml"), [true, false, false]);
        assert_eq!(mask("cue!=control"), [true, false, true]);
        assert_eq!(mask("cue=xml|control,tier=paid"), [false, true, false]);
        let err = mask_err(&table);
        assert!(err.contains("no row has the field `variant`"), "{err}");
    }

    fn mask_err(table: &Table) -> String {
        "variant=a"
            .parse::<Filter>()
            .unwrap()
            .mask(table)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn list_cells_read_as_joined_items() {
        assert_eq!(cell(&serde_json::json!([])).as_deref(), Some("standard"));
        assert_eq!(
            cell(&serde_json::json!(["flipped", "no-prefix-instruction"])).as_deref(),
            Some("flipped+no-prefix-instruction")
        );
        assert_eq!(cell(&serde_json::json!(true)).as_deref(), Some("true"));
        assert_eq!(cell(&serde_json::Value::Null), None);
    }
}
