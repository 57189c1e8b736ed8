//! afprobe: look inside open language models while they read alignment-faking prompts.
//!
//! The library behind the `afprobe` binary: load a Llama-family model
//! ([`model::Model`]), run it with TransformerLens-named hooks that capture or
//! edit the residual stream ([`model::Hooks`]), and generate text ([`generate`]).

pub mod bench;
pub mod capture;
pub mod commands;
pub mod demo;
pub mod error;
pub mod gap;
pub mod generate;
pub mod intervene;
pub mod model;
pub mod plot;
pub mod probe;
pub mod progress;
pub mod prompts;
pub mod refusal;
pub mod sample;
pub mod score;
pub mod setting;
pub mod store;

pub use error::{Error, Result};
