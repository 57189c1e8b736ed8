//! File I/O shared by every writer: streamed sha256, atomic writes (temporary
//! file + rename, so a reader never sees half a file) and f32 safetensors.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The largest file afprobe reads whole into memory (prompt files, JSON
/// configs, tokenizers, store row tables, safetensors tensors loaded at once):
/// 2 GiB, half of a 4 GiB address space. Weights are memory-mapped or
/// streamed, so only [`regular_file`]'s check applies to them.
pub const MAX_READ_BYTES: u64 = 2 << 30;

/// Checks that `path` (symlinks followed) is a regular file and returns its
/// size. A device (`/dev/zero`), FIFO, socket or directory never ends or is
/// not a file at all: reading or hashing it would hang or fail late, so it is
/// refused here, before anything reads it, with an error naming the file.
pub fn regular_file(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let kind = if meta.is_dir() {
        "a directory"
    } else {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_fifo() {
            "a FIFO (named pipe)"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        }
    };
    let link = std::fs::read_link(path)
        .map(|to| format!(" (a link to {})", to.display()))
        .unwrap_or_default();
    Err(Error::model_file(
        path,
        format!(
            "is {kind}{link}, not a regular file: afprobe reads only regular files of known \
             size (a device or pipe may never end); replace it with the file itself"
        ),
    ))
}

/// Reads a whole regular file (see [`regular_file`]) of at most
/// [`MAX_READ_BYTES`], naming the file in every error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let len = regular_file(path)?;
    if len > MAX_READ_BYTES {
        return Err(Error::model_file(
            path,
            format!(
                "is {len} bytes; afprobe reads files of at most {MAX_READ_BYTES} bytes whole \
                 (split it, or check it is the file you meant)"
            ),
        ));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::with_capacity(len as usize);
    // At most one byte past the size: a file that grows meanwhile is refused, not followed.
    file.take(MAX_READ_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_READ_BYTES {
        return Err(Error::model_file(
            path,
            format!("grew past {MAX_READ_BYTES} bytes while being read"),
        ));
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path) -> Result<String> {
    String::from_utf8(read(path)?).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        )
    })
}

/// [`read_to_string`], or `None` where `path` does not exist (other errors,
/// a device in its place included, are errors).
pub fn read_to_string_if_exists(path: &Path) -> Result<Option<String>> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => read_to_string(path).map(Some),
    }
}

/// Hex sha256 of a regular file (see [`regular_file`]), streamed; reads at
/// most the size the file had when opened.
pub fn sha256_file(path: &Path) -> Result<String> {
    let len = regular_file(path)?;
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::io(path, e))?
        .take(len);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A file written piece by piece through a temporary name and renamed into
/// place by [`AtomicFile::commit`], so a reader never sees half a file and a
/// large output is never held in memory whole. Dropped without a commit (an
/// error on the way), the temporary file is removed and `path` is untouched.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<std::io::BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            out: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
        })
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("not committed");
        out.write_all(bytes).map_err(|e| Error::io(&self.tmp, e))
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let out = self.out.take().expect("not committed");
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes 1-D or 2-D f32 tensors `(name, shape, values)` as a safetensors
/// file (through a temporary name). One metadata key keeps the bytes stable.
pub fn save_f32_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: Option<String>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, values)| {
            // Safety: f32 has no padding or invalid bit patterns; u8 has alignment 1.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    values.as_ptr() as *const u8,
                    std::mem::size_of_val(values.as_slice()),
                )
            };
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::BadInput(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata: Option<HashMap<String, String>> =
        metadata.map(|m| [("afprobe".to_string(), m)].into());
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::BadInput(format!("cannot serialise {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// One tensor of a safetensors header: dtype name (`F32`, ...) and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorHeader {
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// The largest safetensors header read (the format's own reader caps it at 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Reads and checks a safetensors file's header before any library maps the
/// file: the 8-byte little-endian header length, the JSON header, and for
/// every tensor a known dtype, a shape whose byte size does not overflow, and
/// `data_offsets` `[begin, end)` inside the data section with `end - begin`
/// equal to that size. Format: the safetensors README ("Format"). Returns
/// the tensors by name; errors name the file and the tensor.
pub fn check_safetensors(path: &Path) -> Result<BTreeMap<String, TensorHeader>> {
    let bad = |msg: String| Error::model_file(path, format!("not a valid safetensors file: {msg}"));
    let len = regular_file(path)?;
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|_| {
        bad(format!(
            "{len} bytes is shorter than the 8-byte header length"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > len - 8 || n > MAX_HEADER {
        return Err(bad(format!(
            "header length {n} does not fit the file ({len} bytes)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_len = len - 8 - n;
    let mut tensors = BTreeMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let at = |msg: &str| bad(format!("tensor `{name}`: {msg}"));
        let dtype = entry["dtype"]
            .as_str()
            .ok_or_else(|| at("no dtype"))?
            .to_string();
        let size: u64 = match dtype.as_str() {
            "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
            "U16" | "I16" | "F16" | "BF16" => 2,
            "U32" | "I32" | "F32" => 4,
            "U64" | "I64" | "F64" => 8,
            other => return Err(at(&format!("unknown dtype `{other}`"))),
        };
        let shape = entry["shape"]
            .as_array()
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| at("shape is not a list of sizes"))?;
        let bytes = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| at("shape overflows"))?;
        let offsets = entry["data_offsets"]
            .as_array()
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
            .ok_or_else(|| at("data_offsets is not [begin, end]"))?;
        if offsets.0 > offsets.1 || offsets.1 > data_len || offsets.1 - offsets.0 != bytes {
            return Err(at(&format!(
                "data_offsets [{}, {}) do not hold {bytes} bytes inside the {data_len}-byte data section",
                offsets.0, offsets.1
            )));
        }
        tensors.insert(name, TensorHeader { dtype, shape });
    }
    Ok(tensors)
}
