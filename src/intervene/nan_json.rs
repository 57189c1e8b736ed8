//! Reading back the numbers of a report: serde_json writes NaN and ±∞ as
//! `null`, so where a report may hold one, `null` reads back as NaN.

use serde::{Deserialize, Deserializer};

/// An `f64` that may have been written as `null`.
pub(super) fn number<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// An interval `[lo, hi]` whose ends may have been written as `null`.
pub(super) fn interval<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 2], D::Error> {
    let [lo, hi] = <[Option<f64>; 2]>::deserialize(d)?;
    Ok([lo.unwrap_or(f64::NAN), hi.unwrap_or(f64::NAN)])
}
