//! Reports read back typed. serde_json writes NaN and ±∞ as `null`, so where
//! a report may hold one, `null` reads back as NaN ([`number`], [`interval`]);
//! a report that does not read is an error naming its file and the field.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// An `f64` that may have been written as `null`.
pub(crate) fn number<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// An interval `[lo, hi]` whose ends may have been written as `null`.
pub(crate) fn interval<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<[f64; 2], D::Error> {
    let [lo, hi] = <[Option<f64>; 2]>::deserialize(d)?;
    Ok([lo.unwrap_or(f64::NAN), hi.unwrap_or(f64::NAN)])
}

/// The report at `path` as `T`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(path, &text)
}

/// The report at `path` (its `text`) as `T`: a field missing, renamed or of
/// the wrong type is an error naming the file and the field, never a default
/// that plots zeros.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        let what = if e.is_data() {
            "not a report this afprobe version reads"
        } else {
            "not valid JSON"
        };
        Error::model_file(path, format!("{what}: {e}"))
    })
}

/// `part` of the report at `path`, already read as JSON (`value`), as `T`
/// (errors as [`parse`]'s, naming the part).
pub fn part<'a, T: Deserialize<'a>>(
    path: &Path,
    part: &str,
    value: &'a serde_json::Value,
) -> Result<T> {
    T::deserialize(value).map_err(|e| {
        Error::model_file(
            path,
            format!("not a report this afprobe version reads: {part}: {e}"),
        )
    })
}
