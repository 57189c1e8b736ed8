//! The activation store: one capture's rows, labels and activations on disk.
//!
//! [`format`] is the file format (manifest, tensor names, positions),
//! [`writer`] appends shards crash-safely, [`reader`] opens a finished store,
//! and [`tools`] implements `afprobe store verify|merge|info`.

pub mod format;
pub mod reader;
pub mod tools;
pub mod writer;

pub use format::{
    read_manifest, shard_file, Manifest, ModelRecord, NamedTensors, Position, PromptsRecord,
    ShardRecord, Slice, TensorName, FORMAT, MANIFEST, POSITIONS, ROWS,
};
pub use reader::{Shard, Store};
pub use tools::{info, merge, verify};
pub use writer::{Existing, StoreWriter};
