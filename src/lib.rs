#![doc = include_str!("../README.md")]
//!
//! ## The library
//!
//! The library behind the `afprobe` binary. Data flows one way
//! (docs/architecture.md): [`model`] (load a model, run it with
//! TransformerLens-named hooks) → [`capture`] → [`store`] (activations on
//! disk) → [`probe`] / [`intervene`] → [`plot`]. [`study`] is the first
//! application on top: the alignment-faking settings, cues and requests, the
//! compliance gap, sampling runs and the demo. [`guide`] holds the API
//! examples (compiled as doctests).

pub mod attribute;
pub mod bench;
pub mod capture;
pub mod cli;
pub mod device_check;
pub mod error;
pub mod gap;
pub mod generate;
pub mod intervene;
pub mod io;
pub mod model;
pub mod plot;
pub mod probe;
pub mod progress;
pub mod prompts;
pub mod report_json;
pub mod rows;
pub mod run_dir;
pub mod score;
pub mod stats;
pub mod store;
pub mod study;

pub use error::{Error, Result};

/// Hook points and the Rust API, with examples that are compiled as doctests
/// (docs/hooks-and-api.md).
#[doc = include_str!("../docs/hooks-and-api.md")]
pub mod guide {}
