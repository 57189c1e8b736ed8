//! The portable engine (`--engine portable`): the pieces of the forward pass
//! that the fused engine runs as hand-written CPU kernels — attention, the
//! gated MLP, the projections and the unembedding — in candle tensor ops only,
//! so they run on any candle device and dtype and candle can differentiate
//! them (with dense weights: candle's quantized matmul has no backward). Everything else (the layer order, norms, hooks, rope tables, the
//! weights) is the decoder's own (`decoder.rs`): one forward pass, two ways to
//! run its heavy parts. Both engines keep the contract written in
//! docs/hooks-and-api.md ("Engines"), and tests/engines.rs holds them to it.

use candle_core::backend::BackendStorage;
use candle_core::quantized::QMatMul;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, MetalStorage, Shape, Storage, Tensor, D,
};

use super::attention::TreeMask;
use super::decoder::Layout;
use super::kv_cache::LayerKv;
use crate::error::{Error, Result};

/// Which implementation runs the heavy parts of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Engine {
    /// Hand-written CPU kernels: fused attention over token trees, the f32 and
    /// quantized GEMMs (the default, and the fast path on the CPU).
    #[default]
    Fused,
    /// candle tensor ops only: any device, any dtype, differentiable.
    Portable,
}

impl Engine {
    /// The name `--engine` takes.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Fused => "fused",
            Engine::Portable => "portable",
        }
    }
}

/// Where a model runs (`--device cpu|cuda[:N]|metal[:N]`): the CPU, or a GPU
/// through candle's CUDA or Metal backend (cargo features `cuda`, `metal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<DeviceSpec, String> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((kind, n)) => (
                kind,
                n.parse::<usize>().map_err(|_| {
                    format!("`{s}`: the part after `:` is a device number, as in cuda:1")
                })?,
            ),
            None => (s, 0),
        };
        match kind {
            "cpu" if ordinal == 0 => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(ordinal)),
            "metal" => Ok(DeviceSpec::Metal(ordinal)),
            _ => Err(format!(
                "unknown device `{s}`; choose cpu, cuda, cuda:N, metal or metal:N"
            )),
        }
    }
}

impl From<&Device> for DeviceSpec {
    /// The `--device` a candle device is.
    fn from(device: &Device) -> DeviceSpec {
        match device.location() {
            candle_core::DeviceLocation::Cpu => DeviceSpec::Cpu,
            candle_core::DeviceLocation::Cuda { gpu_id } => DeviceSpec::Cuda(gpu_id),
            candle_core::DeviceLocation::Metal { gpu_id } => DeviceSpec::Metal(gpu_id),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The candle device; a clear error when this build lacks its backend.
    pub fn device(self) -> Result<Device> {
        let missing = |feature: &str, how: &str| {
            Error::BadInput(format!(
                "--device {self}: this afprobe was built without the `{feature}` feature; {how}"
            ))
        };
        Ok(match self {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(_) if !cfg!(feature = "cuda") => {
                return Err(missing(
                    "cuda",
                    "build it with `cargo build --release --features cuda` (scripts/cuda/build.sh \
                     takes the CUDA toolkit from pip)",
                ))
            }
            DeviceSpec::Metal(_) if !cfg!(feature = "metal") => {
                return Err(missing(
                    "metal",
                    "build it on macOS with `cargo build --release --features metal`",
                ))
            }
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                unreachable_device(
                    self,
                    e,
                    "it needs an NVIDIA GPU and its driver (>= 580 for the CUDA 13 build); \
                     `nvidia-smi` lists what this machine has",
                )
            })?,
            DeviceSpec::Metal(n) => Device::new_metal(n)
                .map_err(|e| unreachable_device(self, e, "it needs an Apple GPU"))?,
        })
    }

    /// The engine to run here: `asked`, or by default fused on the CPU and
    /// portable elsewhere; the fused engine is refused off the CPU.
    pub fn engine(self, asked: Option<Engine>) -> Result<Engine> {
        match (self, asked) {
            (DeviceSpec::Cpu, e) => Ok(e.unwrap_or_default()),
            (_, None | Some(Engine::Portable)) => Ok(Engine::Portable),
            (_, Some(Engine::Fused)) => Err(Error::BadInput(format!(
                "--engine fused runs on the CPU only (its kernels are CPU code); --device {self} \
                 runs --engine portable"
            ))),
        }
    }
}

/// The error for a device the backend could not open: its first line (candle
/// appends a backtrace) and what the device needs.
fn unreachable_device(device: DeviceSpec, e: candle_core::Error, needs: &str) -> Error {
    let e = e.to_string();
    let first = e.lines().next().unwrap_or_default();
    Error::BadInput(format!(
        "--device {device} cannot be opened ({first}): {needs}"
    ))
}

/// `--device` and `--engine`: where a model runs and what runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::Args)]
pub struct Placement {
    /// Where the model runs: cpu, cuda, cuda:N (an NVIDIA GPU; a build with `--features cuda`,
    /// see scripts/cuda/build.sh) or metal (Apple GPUs; `--features metal`). Off the CPU the
    /// portable engine runs, with --dtype f32, f16 or bf16.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceSpec,
    /// What runs the forward pass: fused (hand-written CPU kernels, the fast path on the CPU) or
    /// portable (candle tensor ops only: any device, differentiable; slower on the CPU). Default:
    /// fused on the CPU, portable elsewhere. Both compute the same activations at every hook
    /// (docs/hooks-and-api.md, "Engines").
    #[arg(long, value_enum)]
    pub engine: Option<Engine>,
}

impl Placement {
    /// The engine that runs here (see [`DeviceSpec::engine`]).
    pub fn resolved_engine(self) -> Result<Engine> {
        self.device.engine(self.engine)
    }
}

/// `x W` for a weight stored transposed (`[in, out]`).
pub(super) fn matmul_t(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    frozen_matmul(&x.to_dtype(w_t.dtype())?, w_t)
}

/// `x w` (`x` `[m, k]`, `w` `[k, n]`, any strides candle's matmul takes) for
/// a weight that is never trained. candle's matmul backward forms the
/// gradient of both operands, so a constant weight costs a second GEMM as
/// large as the forward one, thrown away; this op's backward forms only
/// `x`'s (3 steps of the `meaning` recipe: 22.7 s before, 16.9 s after, same
/// losses). Each device runs candle's own matmul of its backend.
pub(super) fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(FrozenMatmul(w.clone()))?)
}

/// The op of [`frozen_matmul`]; holds the weight.
struct FrozenMatmul(Tensor);

impl FrozenMatmul {
    /// `(batch, m, n, k)` and the output shape of `x` (`layout`) times the weight.
    fn dims(
        &self,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<((usize, usize, usize, usize), Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (k2, n) = self.0.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: x is [{m}, {k}] but the weight is [{k2}, {n}]");
        }
        Ok(((1, m, n, k), Shape::from((m, n))))
    }
}

/// Runs the backend's matmul of `x` with the weight's storage of the same backend.
macro_rules! frozen_fwd {
    ($name:ident, $storage:ty, $variant:ident) => {
        fn $name(
            &self,
            x: &$storage,
            layout: &candle_core::Layout,
        ) -> candle_core::Result<($storage, Shape)> {
            let (dims, shape) = self.dims(layout)?;
            let (w, w_layout) = self.0.storage_and_layout();
            match &*w {
                Storage::$variant(w) => Ok((x.matmul(w, dims, layout, w_layout)?, shape)),
                _ => candle_core::bail!("frozen-matmul: the weight is on another device"),
            }
        }
    };
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    frozen_fwd!(cpu_fwd, CpuStorage, Cpu);
    frozen_fwd!(cuda_fwd, CudaStorage, Cuda);
    frozen_fwd!(metal_fwd, MetalStorage, Metal);

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.0.t()?)?))
    }
}

/// `x Wᵀ` for a block-quantized weight `[out, in]` (candle's quantized matmul).
pub(super) fn quantized_matmul(
    w: &std::sync::Arc<candle_core::quantized::QTensor>,
    x: &Tensor,
) -> Result<Tensor> {
    let m = QMatMul::from_arc(w.clone())?;
    Ok(x.to_dtype(DType::F32)?.apply(&m)?)
}

/// The additive attention mask `[t, keys]` (0 where a query sees a key, −∞
/// elsewhere): causal over the cache, or a token tree's ancestry, and the
/// sliding window over positions — what the fused kernel computes in place.
fn mask(
    t: usize,
    keys: usize,
    past: usize,
    window: Option<usize>,
    tree: Option<&TreeMask>,
) -> Vec<f32> {
    let mut m = vec![f32::NEG_INFINITY; t * keys];
    for i in 0..t {
        let position = tree.map_or(past + i, |tm| tm.query_position(i));
        let lowest = window.map_or(0, |w| (position + 1).saturating_sub(w));
        let row = &mut m[i * keys..][..keys];
        for (j, cell) in row.iter_mut().enumerate() {
            let seen = match tree {
                None => j >= lowest && j <= past + i,
                Some(tm) if j < tm.start => j >= lowest,
                Some(tm) => {
                    let node = j - tm.start;
                    tm.sees(i, node) && tm.positions[node] >= lowest
                }
            };
            if seen {
                *cell = 0.0;
            }
        }
    }
    m
}

/// What [`attention`] needs of a layer besides its weights.
pub(super) struct AttentionShape {
    pub n_kv_heads: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

/// One layer's attention on roped `q` (`[t, n_heads, d_head]`), with this
/// call's `k`, `v` (`[t, n_kv_heads, d_head]`) appended to the layer's cache.
/// Returns `z` (`[t, n_heads, d_head]`, before `o_proj`) and the pattern
/// (`[t, n_heads, keys]`, after the softmax), in f32 as the fused kernel.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv: &mut LayerKv,
    s: &AttentionShape,
    at: &Layout,
) -> Result<(Tensor, Tensor)> {
    let (t, nh, hd) = q.dims3()?;
    let nkv = s.n_kv_heads;
    let (k_all, v_all) = match kv.tensors.take() {
        Some((pk, pv)) => (Tensor::cat(&[&pk, k], 0)?, Tensor::cat(&[&pv, v], 0)?),
        None => (k.clone(), v.clone()),
    };
    kv.tensors = Some((k_all.clone(), v_all.clone()));
    let keys = k_all.dim(0)?;
    let past = keys - t;
    let rep = nh / nkv;
    // [heads, len, d_head], the kv heads repeated as HF's repeat_kv.
    let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
        let len = x.dim(0)?;
        let x = x.transpose(0, 1)?;
        Ok(x.unsqueeze(1)?
            .expand((n, rep, len, hd))?
            .reshape((n * rep, len, hd))?
            .contiguous()?)
    };
    let q = q.transpose(0, 1)?.contiguous()?;
    let (k_all, v_all) = (heads(&k_all, nkv)?, heads(&v_all, nkv)?);
    let mut scores = (q.matmul(&k_all.t()?)? * f64::from(s.scale))?;
    if let Some(cap) = s.softcap {
        scores = ((scores / f64::from(cap))?.tanh()? * f64::from(cap))?;
    }
    let m = mask(t, keys, past, s.window, at.tree.as_ref());
    let m = Tensor::from_vec(m, (1, t, keys), q.device())?;
    // The composed softmax: candle's fused `softmax_last_dim` has no backward.
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(&m)?, D::Minus1)?;
    let z = probs.matmul(&v_all)?.transpose(0, 1)?.contiguous()?;
    let pattern = probs.transpose(0, 1)?.contiguous()?;
    Ok((z, pattern))
}
