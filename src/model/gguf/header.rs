//! The GGUF header: a bounds-checked reader of its metadata and tensor table
//! (every count, length, type, dimension, offset and size checked against the
//! file before anything is allocated), and the metadata-value conversions the
//! rest of the GGUF reader shares.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// Most metadata array elements a header may hold in all (a 256k vocabulary,
/// its merges, scores and types fit many times over); bounds the memory a
/// header can make the reader allocate, whatever the file claims.
const MAX_ARRAY_ELEMENTS: u64 = 1 << 25;
/// Deepest nesting of arrays in a metadata value.
const MAX_VALUE_DEPTH: usize = 4;
/// Most tensors and metadata entries a header may declare.
const MAX_ENTRIES: u64 = 1 << 20;
/// ggml's `GGML_MAX_DIMS`.
const MAX_TENSOR_DIMS: u32 = 4;

/// Reads and validates a GGUF header (spec: ggml's docs/gguf.md, versions 1-3)
/// without handing the bytes to candle: header counts, string and array
/// lengths against the bytes left, value types, `general.alignment` (uint32, a
/// power of two), tensor dimensions (at most 4, product within `i64`), ggml
/// types, and each tensor's offset (aligned) and size (inside the file).
/// Every error names the file and the key or tensor.
pub fn read_header<R: Read>(reader: R, file_size: u64, path: &Path) -> Result<Content> {
    let mut r = HeaderReader {
        reader,
        pos: 0,
        file_size,
        path,
        wide: true,
        array_budget: MAX_ARRAY_ELEMENTS,
    };
    let (magic, tensor_count, kv_count) = r.preamble()?;
    let metadata = r.metadata(kv_count)?;
    let alignment = r.alignment(&metadata)?;
    let tensors = r.tensors(tensor_count)?;
    // Tensor data starts at the next multiple of the alignment after the header.
    let data_start = r
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or_else(|| r.err("the tensor data offset overflows".into()))?;
    let tensor_infos = r.placed(tensors, data_start, alignment)?;
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset: data_start,
    })
}

/// One entry of the tensor table, before it is placed in the file.
struct RawTensor {
    name: String,
    /// Innermost first, as GGUF lists them.
    dims: Vec<u64>,
    dtype: GgmlDType,
    offset: u64,
    bytes: u64,
}

/// Bytes of a tensor with GGUF dims (innermost first), or what is wrong with them.
fn tensor_bytes(dims: &[u64], dtype: GgmlDType) -> std::result::Result<u64, String> {
    // ggml keeps element counts in int64_t.
    let mut elems: u64 = 1;
    for &d in dims {
        elems = elems
            .checked_mul(d)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| {
                format!("has dimensions {dims:?}: more elements than ggml can address (2^63 - 1)")
            })?;
    }
    let block = dtype.block_size() as u64;
    if dims
        .first()
        .is_some_and(|inner| !inner.is_multiple_of(block))
    {
        return Err(format!(
            "has dimensions {dims:?}: the innermost is not a multiple of the {dtype:?} block \
             size {block}"
        ));
    }
    if !elems.is_multiple_of(block) {
        return Err(format!(
            "has {elems} elements, not a multiple of the {dtype:?} block size {block}"
        ));
    }
    (elems / block)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(|| format!("has dimensions {dims:?}, whose byte size overflows"))
}

/// The ggml type codes candle reads (ggml.h's `ggml_type`).
fn ggml_dtype(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A bounds-checked little-endian reader over a GGUF header.
struct HeaderReader<'p, R> {
    reader: R,
    pos: u64,
    file_size: u64,
    path: &'p Path,
    /// Version 2+ lengths are u64; version 1 lengths are u32.
    wide: bool,
    /// Array elements the rest of the header may still hold.
    array_budget: u64,
}

impl<R: Read> HeaderReader<'_, R> {
    /// The magic number, the version (which sets the width of lengths) and the
    /// tensor and metadata counts, which must fit in the file.
    fn preamble(&mut self) -> Result<(VersionedMagic, u64, u64)> {
        let (path, file_size) = (self.path, self.file_size);
        let mut magic = [0u8; 4];
        self.bytes(&mut magic, "the magic number")?;
        if &magic != b"GGUF" {
            return Err(Error::model_file(
                path,
                "not a GGUF file (it does not start with the bytes `GGUF`); pass a .gguf file or a \
                 directory with config.json + *.safetensors",
            ));
        }
        let version = self.u32("the version")?;
        let magic = match version {
            1 => VersionedMagic::GgufV1,
            2 => VersionedMagic::GgufV2,
            3 => VersionedMagic::GgufV3,
            v => {
                return Err(Error::model_file(
                    path,
                    format!("GGUF version {v} is not supported (versions 1 to 3 are)"),
                ))
            }
        };
        self.wide = version > 1;
        let tensor_count = self.len("the tensor count")?;
        let kv_count = self.len("the metadata entry count")?;
        // Smallest possible entries: a key (length prefix + 1 byte), a type, 1 byte of value;
        // a tensor name, n_dims, type and offset.
        let prefix = if self.wide { 8 } else { 4 };
        let needed = kv_count
            .saturating_mul(prefix + 1 + 4 + 1)
            .saturating_add(tensor_count.saturating_mul(prefix + 1 + 4 + 4 + 8));
        if tensor_count > MAX_ENTRIES || kv_count > MAX_ENTRIES || needed > self.remaining() {
            return Err(Error::model_file(
                path,
                format!(
                    "GGUF header declares {tensor_count} tensors and {kv_count} metadata entries, \
                     more than its {file_size} bytes can hold (truncated or corrupt file)"
                ),
            ));
        }
        Ok((magic, tensor_count, kv_count))
    }

    /// The `kv_count` metadata entries; a key may appear once.
    fn metadata(&mut self, kv_count: u64) -> Result<HashMap<String, Value>> {
        let mut metadata = HashMap::new();
        for i in 0..kv_count {
            let key = self.string(&format!("the key of metadata entry {i}"))?;
            let what = format!("metadata key `{key}`");
            let ty = self.u32(&what)?;
            let value = self.value(ty, 0, &what)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(self.err(format!("metadata key `{key}` appears twice")));
            }
        }
        Ok(metadata)
    }

    /// `general.alignment`: a uint32 power of two, 32 when absent.
    fn alignment(&self, metadata: &HashMap<String, Value>) -> Result<u64> {
        match metadata.get("general.alignment") {
            None => Ok(candle_core::quantized::gguf_file::DEFAULT_ALIGNMENT),
            Some(Value::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some(v) => Err(self.err(format!(
                "GGUF key `general.alignment` is {}; it must be a uint32 power of two (the \
                 default is 32)",
                describe(v)
            ))),
        }
    }

    /// The tensor table: names, dimensions, ggml types, offsets and sizes.
    fn tensors(&mut self, tensor_count: u64) -> Result<Vec<RawTensor>> {
        let mut tensors = Vec::new();
        for i in 0..tensor_count {
            let name = self.string(&format!("the name of tensor {i}"))?;
            let what = format!("tensor `{name}`");
            let n_dims = self.u32(&what)?;
            if n_dims > MAX_TENSOR_DIMS {
                return Err(self.err(format!(
                    "{what} has {n_dims} dimensions; GGUF tensors have at most {MAX_TENSOR_DIMS}"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(if self.wide {
                    self.u64(&what)?
                } else {
                    u64::from(self.u32(&what)?)
                });
            }
            let dtype = ggml_dtype(self.u32(&what)?).ok_or_else(|| {
                self.err(format!("{what} has an unknown or unsupported ggml type"))
            })?;
            let offset = self.u64(&what)?;
            let bytes = tensor_bytes(&dims, dtype).map_err(|m| self.err(format!("{what} {m}")))?;
            tensors.push(RawTensor {
                name,
                dims,
                dtype,
                offset,
                bytes,
            });
        }
        Ok(tensors)
    }

    /// The tensors as candle lists them, each checked to start aligned and end
    /// inside the file.
    fn placed(
        &self,
        tensors: Vec<RawTensor>,
        data_start: u64,
        alignment: u64,
    ) -> Result<HashMap<String, TensorInfo>> {
        let file_size = self.file_size;
        let mut tensor_infos = HashMap::new();
        for RawTensor {
            name,
            dims,
            dtype,
            offset,
            bytes,
        } in tensors
        {
            if !offset.is_multiple_of(alignment) {
                return Err(self.err(format!(
                    "tensor `{name}` starts at data offset {offset}, which is not a multiple of the \
                     alignment {alignment}"
                )));
            }
            let end = data_start
                .checked_add(offset)
                .and_then(|s| s.checked_add(bytes));
            // (An empty tensor may sit at the very end, where the data would start.)
            if bytes > 0 && end.is_none_or(|e| e > file_size) {
                return Err(self.err(format!(
                    "tensor `{name}` needs {bytes} bytes at data offset {offset}, past the end of the \
                     {file_size}-byte file (truncated or corrupt)"
                )));
            }
            // GGUF lists the innermost dimension first; candle (and HF) the outermost.
            let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
            let info = TensorInfo {
                ggml_dtype: dtype,
                shape: candle_core::Shape::from(shape),
                offset,
            };
            if tensor_infos.insert(name.clone(), info).is_some() {
                return Err(self.err(format!("tensor `{name}` appears twice")));
            }
        }
        Ok(tensor_infos)
    }

    fn err(&self, message: String) -> Error {
        Error::model_file(self.path, format!("GGUF header: {message}"))
    }

    fn remaining(&self) -> u64 {
        self.file_size.saturating_sub(self.pos)
    }

    fn bytes(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.reader.read_exact(buf).map_err(|_| {
            self.err(format!(
                "the file ends inside {what} at byte {} (truncated or corrupt)",
                self.pos
            ))
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        let mut b = [0u8; 1];
        self.bytes(&mut b, what)?;
        Ok(b[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        let mut b = [0u8; 2];
        self.bytes(&mut b, what)?;
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.bytes(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.bytes(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn len(&mut self, what: &str) -> Result<u64> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.len(what)?;
        if len > self.remaining() {
            return Err(self.err(format!(
                "{what}: a string of {len} bytes at byte {}, past the end of the {}-byte file",
                self.pos, self.file_size
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.bytes(&mut buf, what)?;
        // Writers sometimes include a terminating NUL; strings are UTF-8 but
        // not always valid (candle reads them the same way).
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Smallest encoding of one value of GGUF type `ty`, or `None` if unknown.
    fn min_size(&self, ty: u32) -> Option<u64> {
        let prefix = if self.wide { 8 } else { 4 };
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => prefix,
            9 => 4 + prefix,
            _ => return None,
        })
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.u8(what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("{what}: bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_VALUE_DEPTH {
                    return Err(self.err(format!(
                        "{what}: arrays nested more than {MAX_VALUE_DEPTH} deep"
                    )));
                }
                let elem_ty = self.u32(what)?;
                let Some(min) = self.min_size(elem_ty) else {
                    return Err(self.err(format!("{what}: unknown array element type {elem_ty}")));
                };
                let len = self.len(what)?;
                if len.saturating_mul(min) > self.remaining() {
                    return Err(self.err(format!(
                        "{what}: an array of {len} elements, more than the {} bytes left in the \
                         file can hold (truncated or corrupt)",
                        self.remaining()
                    )));
                }
                if len > self.array_budget {
                    return Err(self.err(format!(
                        "{what}: an array of {len} elements; a header may hold at most \
                         {MAX_ARRAY_ELEMENTS} array elements in all"
                    )));
                }
                self.array_budget -= len;
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(elem_ty, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(self.err(format!("{what}: unknown value type {t}"))),
        })
    }
}

/// An integer-typed metadata value that is non-negative (floats are refused:
/// a `-1.0` must not become a size).
pub(super) fn value_as_usize(v: &Value) -> Option<usize> {
    let x: u64 = match v {
        Value::U8(x) => u64::from(*x),
        Value::U16(x) => u64::from(*x),
        Value::U32(x) => u64::from(*x),
        Value::U64(x) => *x,
        Value::I8(x) => u64::try_from(*x).ok()?,
        Value::I16(x) => u64::try_from(*x).ok()?,
        Value::I32(x) => u64::try_from(*x).ok()?,
        Value::I64(x) => u64::try_from(*x).ok()?,
        _ => return None,
    };
    usize::try_from(x).ok()
}

/// A metadata value for an error message: its type and, for scalars, the value.
pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::Array(items) => format!("an array of {} values", items.len()),
        Value::String(s) => format!("the string {s:?}"),
        Value::Bool(b) => format!("the bool {b}"),
        other => format!("{other:?}"),
    }
}

pub(super) fn value_as_f64(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => *x as f64,
        Value::I8(x) => *x as f64,
        Value::U16(x) => *x as f64,
        Value::I16(x) => *x as f64,
        Value::U32(x) => *x as f64,
        Value::I32(x) => *x as f64,
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        _ => return None,
    })
}
