//! Writing a store. Writes are crash-safe: a shard is written under a
//! temporary name and renamed, then its rows are appended to `rows.jsonl`,
//! then the manifest is replaced atomically. The manifest is the source of
//! truth: on resume, shards and rows it does not list are discarded, and
//! `complete: true` is written only after the last shard.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::format::{
    read_manifest, shard_file, Manifest, NamedTensors, ShardRecord, FORMAT, MANIFEST, ROWS,
};
use crate::error::{Error, Result};
use crate::io::{sha256_file, tmp_path, write_atomic};

/// Appends shards to a store directory, keeping it consistent after every step.
pub struct StoreWriter {
    dir: PathBuf,
    pub manifest: Manifest,
}

/// What to do when the output directory already holds a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse (the default).
    Refuse,
    /// Continue a run with the same settings.
    Resume,
    /// Delete the old store and start over.
    Overwrite,
    /// Continue the run if its settings match, else start over (the demo).
    ResumeOrOverwrite,
}

impl StoreWriter {
    /// Opens `dir` for the run described by `fresh` (its shard list empty).
    pub fn open(dir: &Path, fresh: Manifest, existing: Existing) -> Result<StoreWriter> {
        let manifest_path = dir.join(MANIFEST);
        let existing = match existing {
            Existing::ResumeOrOverwrite => match read_manifest(dir) {
                Ok(old) if old.settings_differ(&fresh).is_empty() => Existing::Resume,
                _ => Existing::Overwrite,
            },
            other => other,
        };
        if manifest_path.exists() && existing != Existing::Overwrite {
            let old = read_manifest(dir)?;
            let diff = old.settings_differ(&fresh);
            if existing == Existing::Refuse || !diff.is_empty() {
                let why = if diff.is_empty() {
                    format!(
                        "already holds this run ({}); pass --resume to continue it",
                        if old.complete {
                            "complete"
                        } else {
                            "incomplete"
                        }
                    )
                } else {
                    format!("holds a different run (differs in {})", diff.join(", "))
                };
                return Err(Error::BadInput(format!(
                    "{}: {why}, or --force to overwrite it, or choose another --out",
                    dir.display()
                )));
            }
            let writer = StoreWriter {
                dir: dir.to_path_buf(),
                manifest: old,
            };
            writer.discard_unlisted()?;
            return Ok(writer);
        }
        if dir.exists() {
            if existing == Existing::Overwrite {
                remove_store_files(dir)?;
            } else if std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .next()
                .is_some()
            {
                return Err(Error::BadInput(format!(
                    "{}: the output directory exists, is not empty and holds no afprobe store; \
                     choose another --out (or --force to write into it)",
                    dir.display()
                )));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let writer = StoreWriter {
            dir: dir.to_path_buf(),
            manifest: fresh,
        };
        write_atomic(&dir.join(ROWS), b"")?;
        writer.save_manifest()?;
        Ok(writer)
    }

    /// Blocks already written (to skip on resume).
    pub fn done_blocks(&self) -> Vec<usize> {
        self.manifest
            .shards
            .iter()
            .map(|s| s.rows[0] / self.manifest.shard_rows)
            .collect()
    }

    /// Drops rows and shard files that a killed run left beyond the manifest.
    fn discard_unlisted(&self) -> Result<()> {
        let rows_path = self.dir.join(ROWS);
        let text = crate::io::read_to_string_if_exists(&rows_path)?.unwrap_or_default();
        let kept: Vec<&str> = text.lines().take(self.manifest.row_count).collect();
        if kept.len() < self.manifest.row_count {
            return Err(Error::BadInput(format!(
                "{}: has {} rows but the manifest lists {}; the store is damaged, use --force",
                rows_path.display(),
                kept.len(),
                self.manifest.row_count
            )));
        }
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        write_atomic(&rows_path, body.as_bytes())
    }

    /// Writes one shard (rows `[start, end)` of the prompt file) and its rows.
    pub fn write_shard(
        &mut self,
        block: usize,
        rows: [usize; 2],
        records: &[Value],
        tensors: NamedTensors,
    ) -> Result<()> {
        let file = shard_file(block);
        let path = self.dir.join(&file);
        let tmp = tmp_path(&path);
        // One metadata key: a HashMap with several would serialise in random
        // order, and identical runs must give byte-identical shards.
        let metadata: std::collections::HashMap<String, String> = [(
            "afprobe".to_string(),
            json!({"format": FORMAT, "rows": rows}).to_string(),
        )]
        .into();
        safetensors::serialize_to_file(tensors, Some(metadata), &tmp)
            .map_err(|e| Error::model_file(&tmp, format!("cannot write shard: {e}")))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        let rows_path = self.dir.join(ROWS);
        let mut lines = String::new();
        for r in records {
            lines.push_str(&serde_json::to_string(r).expect("JSON values serialise"));
            lines.push('\n');
        }
        let append = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().append(true).open(&rows_path)?;
            f.write_all(lines.as_bytes())?;
            f.sync_all()
        };
        append().map_err(|e| Error::io(&rows_path, e))?;
        self.manifest.shards.push(ShardRecord {
            file,
            rows,
            sha256: sha256_file(&path)?,
        });
        self.manifest.row_count += records.len();
        self.save_manifest()
    }

    /// Marks the store complete once every planned block is written.
    pub fn finish(mut self) -> Result<Manifest> {
        let done = self.done_blocks();
        if done != self.manifest.planned_blocks() {
            return Err(Error::BadInput(format!(
                "{}: not every shard was written; run again with --resume",
                self.dir.display()
            )));
        }
        self.manifest.complete = true;
        self.save_manifest()?;
        Ok(self.manifest)
    }

    fn save_manifest(&self) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.manifest).expect("manifest serialises");
        write_atomic(&self.dir.join(MANIFEST), json.as_bytes())
    }
}

fn remove_store_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let ours = name == MANIFEST
            || name == ROWS
            || (name.starts_with("shard-") && name.ends_with(".safetensors"))
            || (name.starts_with('.') && name.ends_with(".tmp"));
        if ours {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}
