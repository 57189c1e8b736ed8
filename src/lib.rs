//! afprobe: look inside open language models while they read alignment-faking prompts.
//!
//! The library behind the `afprobe` binary. Data flows one way (README, "Layout"):
//! [`model`] (load a model, run it with TransformerLens-named hooks) →
//! [`capture`] → [`store`] (activations on disk) → [`probe`] / [`intervene`] →
//! [`plot`]. [`study`] is the first application on top: the alignment-faking
//! settings, cues and requests, the compliance gap, sampling runs and the demo.

pub mod attribute;
pub mod bench;
pub mod capture;
pub mod error;
pub mod generate;
pub mod intervene;
pub mod io;
pub mod model;
pub mod plot;
pub mod probe;
pub mod progress;
pub mod prompts;
pub mod rows;
pub mod run_dir;
pub mod score;
pub mod stats;
pub mod store;
pub mod study;

pub use error::{Error, Result};
