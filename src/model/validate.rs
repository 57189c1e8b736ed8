//! Checks a model's weights against its config before any weight is read:
//! every tensor the forward pass uses must exist with exactly the shape the
//! config implies (the error names the tensor), and the memory the loaded model
//! needs is compared with what the machine has, so a corrupt size fails with a
//! message instead of an abort inside an allocation or a panic in a kernel.

use std::path::Path;

use candle_core::{CpuStorage, Storage, Tensor};

use super::config::ModelConfig;
use crate::error::{Error, Result};

pub use super::expected_weights::{expected_weights, ExpectedWeight};

/// Checks that the file can hold `config.n_layers` layers at all (before
/// listing them: a corrupt layer count of 2^33 must not become a loop or an
/// allocation), then that every expected weight exists with its shape.
/// `shape_of(hf_name)` gives a tensor's shape and its name in the file;
/// `size_key` names the config field holding the layer count, for the message.
pub fn check_weights<'a>(
    config: &ModelConfig,
    tensors_in_file: usize,
    source: &Path,
    size_key: &str,
    shape_of: impl Fn(&str) -> Option<(String, &'a [usize])>,
) -> Result<Vec<ExpectedWeight>> {
    let per_layer = super::expected_weights::layer_weights(config, 0).len();
    if config.n_layers.saturating_mul(per_layer) > tensors_in_file {
        return Err(Error::model_file(
            source,
            format!(
                "`{size_key}` says {} layers, but the weights hold only {tensors_in_file} \
                 tensors (a layer has {per_layer}); the config does not match the weights",
                config.n_layers
            ),
        ));
    }
    let expected = expected_weights(config);
    for w in &expected {
        match shape_of(&w.name) {
            None => {
                return Err(Error::model_file(
                    source,
                    format!(
                        "the model has no weight `{}` (the config implies {} layers{}); the \
                         config does not match the weights",
                        w.name,
                        config.n_layers,
                        if w.name == "lm_head.weight" {
                            " and untied embeddings"
                        } else {
                            ""
                        }
                    ),
                ))
            }
            Some((file_name, shape)) if shape != w.shape.as_slice() => {
                return Err(Error::model_file(
                    source,
                    format!(
                        "tensor `{file_name}` has shape {shape:?}, but the config implies {:?} \
                         ({}); the config does not match the weights",
                        w.shape,
                        config_summary(config)
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(expected)
}

fn config_summary(c: &ModelConfig) -> String {
    format!(
        "d_model {}, {} heads / {} key-value heads of size {}, d_mlp {}, vocab {}",
        c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_mlp, c.vocab_size
    )
}

/// Bytes the loaded model needs at peak: every weight at `elem_bytes` per element,
/// plus working copies while the largest tensors are converted and fused
/// (dequantized f32, the q/k/v and gate/up concatenations and their transposes).
pub fn estimate_bytes(expected: &[ExpectedWeight], elem_bytes: usize) -> u128 {
    let elems = |w: &ExpectedWeight| w.shape.iter().map(|&d| d as u128).product::<u128>();
    let total: u128 = expected.iter().map(elems).sum();
    let largest = expected.iter().map(elems).max().unwrap_or(0);
    total * elem_bytes as u128 + largest * (4 + 3 * elem_bytes as u128)
}

/// Refuses to load when the estimate exceeds what the machine can give:
/// the address-space limit (`ulimit -v`, minus what is mapped already, plus
/// `mapped_bytes` for memory-mapped weight files) and the available memory
/// (`MemAvailable` + free swap, Linux). Unknown limits are not checked.
pub fn check_memory(needed: u128, mapped_bytes: u64, source: &Path) -> Result<()> {
    let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
    if let Some(avail) = available_memory() {
        if needed > u128::from(avail) {
            return Err(Error::model_file(
                source,
                format!(
                    "loading this model needs about {:.2} GiB of memory, but the machine has \
                     {:.2} GiB available; check the sizes in the model's config (a corrupt size \
                     asks for absurd memory), use --dtype bf16 or f16, or a smaller model",
                    gib(needed),
                    gib(u128::from(avail))
                ),
            ));
        }
    }
    if let Some(room) = address_space_room() {
        let want = needed + u128::from(mapped_bytes);
        if want > u128::from(room) {
            return Err(Error::model_file(
                source,
                format!(
                    "loading this model needs about {:.2} GiB of address space, but the \
                     process limit (ulimit -v) leaves {:.2} GiB; raise the limit, use --dtype \
                     bf16 or f16, or a smaller model",
                    gib(want),
                    gib(u128::from(room))
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `needed` bytes leave a quarter of the available memory free (true
/// where the available memory is unknown): `--dtype auto`'s test for f32.
pub fn fits_comfortably(needed: u128) -> bool {
    available_memory().is_none_or(|avail| needed <= u128::from(avail) / 4 * 3)
}

/// `MemAvailable + SwapFree` from /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    };
    Some(field("MemAvailable:")?.saturating_add(field("SwapFree:").unwrap_or(0)))
}

/// The address-space limit minus the process's current virtual size, in bytes;
/// `None` when there is no limit.
fn address_space_room() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Safety: getrlimit writes one rlimit struct through the valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok();
    let used = status
        .as_deref()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmSize:")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib.saturating_mul(1024));
    Some(lim.rlim_cur.saturating_sub(used))
}

/// Errors unless every value of the float tensor `t` is finite: a NaN or an
/// infinity in a weight turns every activation after it into NaN, silently.
/// One pass over the tensor's own storage (no copy); integer tensors pass.
/// The error names the tensor, the file and the first bad element.
pub fn check_finite(t: &Tensor, name: &str, path: &Path) -> Result<()> {
    match first_non_finite(t)? {
        None => Ok(()),
        Some((i, value)) => Err(non_finite(name, t.dims(), i, value, path)),
    }
}

/// The index and value of `t`'s first non-finite element (CPU float tensors).
fn first_non_finite(t: &Tensor) -> Result<Option<(usize, f64)>> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        drop(storage);
        return first_non_finite(&t.contiguous()?);
    };
    fn first<T: Copy>(
        v: &[T],
        finite: impl Fn(T) -> bool,
        as_f64: impl Fn(T) -> f64,
    ) -> Option<(usize, f64)> {
        v.iter()
            .position(|&x| !finite(x))
            .map(|i| (i, as_f64(v[i])))
    }
    Ok(match cpu {
        CpuStorage::F32(v) => first(&v[a..b], f32::is_finite, f64::from),
        CpuStorage::F64(v) => first(&v[a..b], f64::is_finite, |x| x),
        CpuStorage::F16(v) => first(&v[a..b], |x| x.is_finite(), |x| x.to_f64()),
        CpuStorage::BF16(v) => first(&v[a..b], |x| x.is_finite(), |x| x.to_f64()),
        _ => None,
    })
}

fn non_finite(name: &str, dims: &[usize], i: usize, value: f64, path: &Path) -> Error {
    Error::model_file(
        path,
        format!(
            "tensor `{name}` (shape {dims:?}) holds the non-finite value {value} at element {i}: \
             the weights are damaged (a NaN or infinity would make every activation after \
             it NaN); re-download or re-convert the file"
        ),
    )
}

/// Weights dequantized at a time by [`check_finite_quantized`], so that a
/// large table (an 8B model's 128k-token embedding: 2.1 GB as f32) never
/// exists in f32 at once.
const CHECK_CHUNK: usize = 1 << 20;

/// [`check_finite`] for a block-quantized tensor: checked dequantized, a few
/// rows at a time (block scales are half floats that may be NaN or infinite).
pub fn check_finite_quantized(
    q: &candle_core::quantized::QTensor,
    name: &str,
    path: &Path,
) -> Result<()> {
    let fail = |e: candle_core::Error| Error::model_file(path, format!("tensor `{name}`: {e}"));
    let dims = q.shape().dims().to_vec();
    let cols = *dims.last().unwrap_or(&1);
    let rows = q.shape().elem_count() / cols.max(1);
    let row_bytes = cols / q.dtype().block_size() * q.dtype().type_size();
    let data = q.data().map_err(fail)?;
    let step = (CHECK_CHUNK / cols.max(1)).max(1);
    for first in (0..rows).step_by(step) {
        let n = step.min(rows - first);
        let chunk = candle_core::quantized::ggml_file::qtensor_from_ggml(
            q.dtype(),
            &data[first * row_bytes..(first + n) * row_bytes],
            vec![n, cols],
            &candle_core::Device::Cpu,
        )
        .and_then(|c| c.dequantize(&candle_core::Device::Cpu))
        .map_err(fail)?;
        if let Some((i, value)) = first_non_finite(&chunk)? {
            return Err(non_finite(name, &dims, first * cols + i, value, path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Architecture, FamilyConfig};

    fn config(n_layers: usize) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Qwen2,
            family: FamilyConfig::default(),
            n_layers,
            d_model: 8,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            d_mlp: 12,
            vocab_size: 10,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            rope_scaling: None,
            rope_freq_factors: None,
            max_position_embeddings: 16,
            tied_embeddings: true,
        }
    }

    #[test]
    fn expected_shapes_follow_the_config() {
        let w = expected_weights(&config(2));
        assert_eq!(w.len(), 2 + 2 * 12);
        let find = |n: &str| w.iter().find(|x| x.name == n).unwrap().shape.clone();
        assert_eq!(find("model.layers.1.self_attn.k_proj.weight"), vec![4, 8]);
        assert_eq!(find("model.layers.0.self_attn.o_proj.weight"), vec![8, 8]);
        assert_eq!(find("model.layers.0.mlp.down_proj.weight"), vec![8, 12]);
        assert_eq!(find("model.layers.0.self_attn.v_proj.bias"), vec![4]);
    }

    #[test]
    fn a_layer_count_the_file_cannot_hold_is_refused_before_listing() {
        let err = check_weights(
            &config(1 << 12),
            30,
            Path::new("m.gguf"),
            "block_count",
            |_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("block_count") && err.contains("4096 layers"),
            "{err}"
        );
    }

    #[test]
    fn an_absurd_estimate_is_refused() {
        let err = check_memory(1 << 80, 0, Path::new("m.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("GiB") && err.contains("m.gguf"), "{err}");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn auto_dtype_keeps_f32_for_what_fits_and_not_for_what_cannot() {
        assert!(fits_comfortably(1 << 20));
        assert!(!fits_comfortably(1 << 80));
    }

    #[test]
    fn a_nan_block_scale_is_found_past_the_first_chunk_at_its_element() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let (rows, cols) = (2 * CHECK_CHUNK / 32 + 5, 32);
        let w = Tensor::ones(
            (rows, cols),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let path = Path::new("m.gguf");
        check_finite_quantized(&q, "w", path).unwrap();
        // Q8_0 blocks are 34 bytes, the f16 scale first; 0x7e00 is a NaN.
        let bad_row = rows - 3;
        let mut bytes = q.data().unwrap().into_owned();
        bytes[bad_row * 34..bad_row * 34 + 2].copy_from_slice(&[0x00, 0x7e]);
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &bytes,
            vec![rows, cols],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let err = check_finite_quantized(&q, "w", path)
            .unwrap_err()
            .to_string();
        let at = format!("element {}", bad_row * cols);
        assert!(err.contains("non-finite") && err.contains(&at), "{err}");
    }
}
