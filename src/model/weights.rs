//! A model's weights as the decoder holds them: projections (dense, stored
//! transposed for the CPU GEMM, or GGUF block-quantized) and the
//! embedding/unembedding tables, loaded by HF name.

use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::kernels::{self, WeightLayout};
use super::lora::Lora;
use super::portable::{self, Engine};
use crate::error::{Error, Result};

/// Weights by HF name (`model.layers.0.self_attn.q_proj.weight`), q/k in the
/// half-split rope layout. Loaders fill this; the transformer consumes it.
pub type WeightSource<'a> = dyn FnMut(&str) -> Result<Option<Tensor>> + 'a;

/// Block-quantized weights by HF name, in their GGUF types (`--dtype quantized`);
/// `None` for a weight the source keeps dense.
pub type QuantSource<'a> = dyn FnMut(&str) -> Result<Option<QTensor>> + 'a;

/// A projection `y = x W + b`, plus unmerged LoRA terms while training.
#[derive(Debug, Clone)]
pub(super) struct Linear {
    pub(super) weight: LinearWeight,
    pub(super) bias: Option<Tensor>,
    /// The checkpoint's modules fused here, in order, with their output widths
    /// (`q_proj`, `k_proj`, `v_proj`; or Phi-3's one `qkv_proj`).
    parts: Vec<(String, usize)>,
    lora: Option<LoraTerms>,
}

/// Per part of a [`Linear`], LoRA factors (`A` `[r, in]`, `B` `[out, r]`), and their scale.
#[derive(Debug, Clone)]
struct LoraTerms {
    factors: Vec<Option<(Tensor, Tensor)>>,
    scale: f64,
}

#[derive(Debug, Clone)]
pub(super) enum LinearWeight {
    /// `W` stored transposed as `[in, out]` (a contiguous right-hand side is the
    /// fast case for the CPU GEMM); fused parts are concatenated.
    DenseT(Tensor),
    /// GGUF block-quantized parts (q, k, v or gate, up), each `[out, in]`,
    /// multiplied by [`kernels::quantized_matmul`]; the outputs are concatenated.
    Quantized(Vec<Arc<QTensor>>),
}

/// The module name of a weight's HF name (`model.layers.0.self_attn.q_proj.weight` → `q_proj`).
fn module_of(name: &str) -> String {
    name.rsplit('.').nth(1).unwrap_or(name).to_string()
}

impl Linear {
    /// From PyTorch-layout weights `[out, in]` named `names` (fused parts in order).
    fn new(names: &[String], parts: Vec<Tensor>, bias: Option<Tensor>) -> Result<Linear> {
        let parts_named = names
            .iter()
            .zip(&parts)
            .map(|(n, p)| Ok((module_of(n), p.dim(0)?)))
            .collect::<Result<_>>()?;
        Ok(Linear {
            weight: LinearWeight::DenseT(transposed(&Tensor::cat(&parts, 0)?)?),
            bias,
            parts: parts_named,
            lora: None,
        })
    }

    /// Attaches `lora`'s factors of layer `layer` on this projection's
    /// modules (none there: nothing attached), or detaches them (`None`).
    pub(super) fn set_lora(&mut self, lora: Option<&Lora>, layer: usize) {
        self.lora = lora.and_then(|lora| {
            let per_part: Vec<_> = self
                .parts
                .iter()
                .map(|(m, _)| lora.factors(layer, m))
                .collect();
            per_part.iter().any(Option::is_some).then_some(LoraTerms {
                factors: per_part,
                scale: lora.scale(),
            })
        });
    }

    /// `Σ_parts s · (x Aᵀ) Bᵀ`, zero columns for the parts without factors.
    fn lora_delta(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(LoraTerms { factors, scale }) = &self.lora else {
            return Ok(None);
        };
        let x = x.to_dtype(DType::F32)?;
        let rows = x.dim(0)?;
        let deltas = self
            .parts
            .iter()
            .zip(factors)
            .map(|((_, out), f)| match f {
                Some((a, b)) => Ok((x.matmul(&a.t()?)?.matmul(&b.t()?)? * *scale)?),
                None => Ok(Tensor::zeros((rows, *out), DType::F32, x.device())?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&deltas, 1)?))
    }

    pub(super) fn forward(&self, x: &Tensor, engine: Engine) -> Result<Tensor> {
        let y = match (&self.weight, engine) {
            (LinearWeight::DenseT(w), Engine::Portable) => portable::matmul_t(x, w)?,
            (LinearWeight::DenseT(w), Engine::Fused) => {
                match kernels::matmul_tensor(x, w, WeightLayout::KByN)? {
                    Some(y) => y,
                    None => x.matmul(w)?,
                }
            }
            (LinearWeight::Quantized(parts), _) => {
                let outs = parts
                    .iter()
                    .map(|p| match engine {
                        Engine::Fused => kernels::quantized_matmul(p, x),
                        Engine::Portable => portable::quantized_matmul(p, x),
                    })
                    .collect::<Result<Vec<_>>>()?;
                // One part: cat returns it as is.
                Tensor::cat(&outs, 1)?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(match self.lora_delta(x)? {
            Some(d) => (y.to_dtype(DType::F32)? + d)?.to_dtype(y.dtype())?,
            None => y,
        })
    }

    /// This projection with its weights on `device` (refused for
    /// block-quantized weights, whose kernels run on the CPU only).
    pub(super) fn move_to(&mut self, device: &Device) -> Result<()> {
        match &mut self.weight {
            LinearWeight::DenseT(w) => *w = w.to_device(device)?,
            LinearWeight::Quantized(_) => return Err(quantized_on(device)),
        }
        if let Some(b) = &mut self.bias {
            *b = b.to_device(device)?;
        }
        Ok(())
    }

    /// `W` as `[in, out]` in f32 (dequantized when quantized).
    pub(super) fn weight_t(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::DenseT(w) => Ok(w.to_dtype(DType::F32)?),
            LinearWeight::Quantized(parts) => {
                let dense = parts
                    .iter()
                    .map(|p| p.dequantize(&Device::Cpu))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                transposed(&Tensor::cat(&dense, 0)?)
            }
        }
    }
}

/// `w` (`[rows, cols]`) as a contiguous `[cols, rows]`: f32 CPU tensors in
/// [`kernels::transpose`]'s tiles, others by candle's strided copy.
fn transposed(w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(
        match kernels::with_f32_slice(w, |s| kernels::transpose(s, rows, cols))? {
            Some(t) => Tensor::from_vec(t, (cols, rows), w.device())?,
            None => w.t()?.contiguous()?,
        },
    )
}

/// The error for block-quantized weights bound for another device.
fn quantized_on(device: &Device) -> Error {
    Error::BadInput(format!(
        "--dtype quantized runs on the CPU only (its GEMMs are CPU kernels), not on {:?}; use \
         --dtype f32, f16 or bf16 there",
        device.location()
    ))
}

/// Where [`Block::load`] gets its weights: dense tensors by HF name, and the
/// projections block-quantized when a quantized source has them.
pub(super) struct Loader<'a, 'w, 'q> {
    pub(super) weights: &'a mut WeightSource<'w>,
    pub(super) quantized: Option<&'a mut QuantSource<'q>>,
    pub(super) dtype: DType,
}

impl Loader<'_, '_, '_> {
    pub(super) fn dense(&mut self, name: &str) -> Result<Tensor> {
        let t = (self.weights)(name)?
            .ok_or_else(|| Error::BadInput(format!("the model has no weight named `{name}`")))?;
        Ok(t.to_dtype(self.dtype)?)
    }

    /// `name` block-quantized, when the quantized source has it.
    pub(super) fn quantized_table(&mut self, name: &str) -> Result<Option<QTensor>> {
        match self.quantized.as_mut() {
            Some(quantized) => quantized(name),
            None => Ok(None),
        }
    }

    /// The projection made of the weights `names` (fused in order) and `bias`.
    pub(super) fn linear(&mut self, names: &[String], bias: Option<Tensor>) -> Result<Linear> {
        if let Some(quantized) = self.quantized.as_mut() {
            let mut parts = Vec::with_capacity(names.len());
            for name in names {
                match quantized(name)? {
                    Some(q) if is_block_quantized(&q) => parts.push(with_kernel(name, q)?),
                    _ => break,
                }
            }
            if parts.len() == names.len() {
                let parts_named = names
                    .iter()
                    .zip(&parts)
                    .map(|(n, p)| (module_of(n), p.shape().dims()[0]))
                    .collect();
                return Ok(Linear {
                    weight: LinearWeight::Quantized(parts),
                    bias,
                    parts: parts_named,
                    lora: None,
                });
            }
        }
        let parts = names
            .iter()
            .map(|n| self.dense(n))
            .collect::<Result<Vec<_>>>()?;
        Linear::new(names, parts, bias)
    }
}

/// Whether `q` is stored in blocks (F32/F16/BF16 tensors are read dense).
pub(super) fn is_block_quantized(q: &QTensor) -> bool {
    !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// `q` for the quantized path: an error naming the weight when no kernel
/// multiplies its block type.
pub(super) fn with_kernel(name: &str, q: QTensor) -> Result<Arc<QTensor>> {
    if !kernels::has_quantized_matmul(q.dtype()) {
        return Err(Error::BadInput(format!(
            "weight `{name}` is stored as {:?}, which --dtype quantized has no kernel for \
             (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, Q8_K); use --dtype f32",
            q.dtype()
        )));
    }
    Ok(Arc::new(q))
}

/// A `[vocab, d_model]` table: the token embedding, or the unembedding.
#[derive(Debug, Clone)]
pub(super) enum Table {
    Dense(Tensor),
    /// Block-quantized rows (`--dtype quantized`): [`kernels::quantized_matmul`]
    /// for the unembedding, rows dequantized when looked up for the embedding.
    Quantized(Arc<QTensor>),
}

impl Table {
    pub(super) fn new(loader: &mut Loader, name: &str) -> Result<Table> {
        Ok(match loader.quantized_table(name)? {
            Some(q) if is_block_quantized(&q) => Table::Quantized(with_kernel(name, q)?),
            _ => Table::Dense(loader.dense(name)?),
        })
    }

    pub(super) fn dims(&self) -> &[usize] {
        match self {
            Table::Dense(t) => t.dims(),
            Table::Quantized(q) => q.shape().dims(),
        }
    }

    /// The table on `device` (refused when block-quantized, as [`Linear::move_to`]).
    pub(super) fn to_device(&self, device: &Device) -> Result<Table> {
        match self {
            Table::Dense(t) => Ok(Table::Dense(t.to_device(device)?)),
            Table::Quantized(_) => Err(quantized_on(device)),
        }
    }

    /// Rows `ids` as `[n, d_model]`.
    pub(super) fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Table::Dense(t) => Ok(t.index_select(&Tensor::new(ids, device)?, 0)?),
            Table::Quantized(q) => {
                let (vocab, d) = q.shape().dims2()?;
                let dtype = q.dtype();
                let row = d / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                let mut bytes = Vec::with_capacity(ids.len() * row);
                for &id in ids {
                    let i = id as usize;
                    if i >= vocab {
                        return Err(Error::BadInput(format!(
                            "token id {id} is outside the vocabulary ({vocab} tokens)"
                        )));
                    }
                    bytes.extend_from_slice(&data[i * row..(i + 1) * row]);
                }
                let rows = qtensor_from_ggml(dtype, &bytes, vec![ids.len(), d], device)?;
                Ok(rows.dequantize(device)?)
            }
        }
    }

    /// The whole table, dense f32.
    pub(super) fn dense(&self) -> Result<Tensor> {
        match self {
            Table::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            Table::Quantized(q) => Ok(q.dequantize(&Device::Cpu)?),
        }
    }
}
