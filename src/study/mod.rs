//! The alignment-faking study, afprobe's first application of the toolkit:
//! settings, cues, variations and requests ([`setting`]), the compliance gap
//! ([`gap`]), the refusal classifier ([`refusal`]), sampling runs
//! ([`sample`]) and the end-to-end demo ([`demo`]).

pub mod demo;
pub mod organism;
pub mod refusal;
pub mod sample;
pub mod setting;
