//! Small f32 CPU kernels the forward pass spends its time in, written so the
//! compiler vectorises them, and compiled for AVX-512 / AVX2 with a runtime check
//! (release builds target baseline x86-64, which has neither).

use std::marker::PhantomData;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Runs `$generic(args)` compiled for the best vector unit this CPU has.
macro_rules! dispatch {
    ($generic:ident, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*)) => {
        /// # Safety
        /// Callable only where the CPU has AVX-512F (the dispatch below checks).
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512($($arg: $ty),*) {
            $generic($($arg),*)
        }

        /// # Safety
        /// Callable only where the CPU has AVX2 and FMA (the dispatch below checks).
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) {
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // Safety: the CPU supports the features the function is compiled for.
                return unsafe { $avx512($($arg),*) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return unsafe { $avx2($($arg),*) };
            }
        }
        return $generic($($arg),*)
    };
}

/// Numerically stable softmax of one row, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    dispatch!(softmax_generic, softmax_avx512, softmax_avx2, (row: &mut [f32]));
}

const LANES: usize = 16;

/// Written with lane arrays so the compiler vectorises max, exp and sum.
#[inline(always)]
fn softmax_generic(row: &mut [f32]) {
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lane_max.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lane_max)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut lane_sum = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, x) in lane_sum.iter_mut().zip(c.iter_mut()) {
            *x = exp_poly(*x - max);
            *s += *x;
        }
    }
    let mut sum: f32 = lane_sum.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_poly(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// e^x for x ≤ 0 (relative error ~1e-7): e^x = 2^n · e^a with n = round(x·log2 e)
/// and a = x − n·ln 2 (Cody–Waite split, so the reduction is exact), |a| ≤ ln2 / 2,
/// and a degree-7 Taylor polynomial for e^a.
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    // Below -87 the result leaves f32's normal range; clamp (it is ~0 next to the max).
    let x = x.max(-87.0);
    // Round to nearest by the magic-number trick (vectorises; no libm call).
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4; // few mantissa bits, so n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let a = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + a * (1.0
            + a * (0.5
                + a * (1.0 / 6.0
                    + a * (1.0 / 24.0
                        + a * (1.0 / 120.0 + a * (1.0 / 720.0 + a * (1.0 / 5040.0)))))));
    // n as an integer from the shifted float's bits (MAGIC's ulp is 1), not
    // `n as i32`: that saturating cast does not vectorise.
    let n_int = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    p * scale
}

/// A fused gated activation over `[T, 2 * d_mlp]` rows, returning `[T, d_mlp]`.
pub type GatedKernel = fn(&[f32], usize) -> Vec<f32>;

/// SwiGLU: `silu(gate) * up` for fused `[T, 2 * d_mlp]` rows (gate first), as `[T, d_mlp]`.
pub fn swiglu(gate_up: &[f32], d_mlp: usize) -> Vec<f32> {
    gated(gate_up, d_mlp, swiglu_row)
}

/// GeGLU with the tanh GELU (`gelu_pytorch_tanh`, Gemma): `gelu(gate) * up`,
/// laid out as [`swiglu`]. Uses `0.5·(1 + tanh(y)) = sigmoid(2y)`, so the
/// GELU is `g · sigmoid(2·√(2/π)·(g + 0.044715·g³))`, one [`exp_poly`] per
/// element instead of libm's scalar `tanhf` (12% of a Gemma 3 prefill).
pub fn geglu_tanh(gate_up: &[f32], d_mlp: usize) -> Vec<f32> {
    gated(gate_up, d_mlp, geglu_tanh_row)
}

fn gated(gate_up: &[f32], d_mlp: usize, row_fn: fn(&mut [f32], &[f32])) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len() / 2];
    out.par_chunks_mut(d_mlp)
        .zip(gate_up.par_chunks(2 * d_mlp))
        .for_each(|(out, row)| row_fn(out, row));
    out
}

fn swiglu_row(out: &mut [f32], row: &[f32]) {
    dispatch!(swiglu_row_generic, swiglu_avx512, swiglu_avx2, (out: &mut [f32], row: &[f32]));
}

fn geglu_tanh_row(out: &mut [f32], row: &[f32]) {
    dispatch!(geglu_tanh_row_generic, geglu_tanh_avx512, geglu_tanh_avx2, (out: &mut [f32], row: &[f32]));
}

#[inline(always)]
fn swiglu_row_generic(out: &mut [f32], row: &[f32]) {
    gated_row(out, row, |g| g);
}

#[inline(always)]
fn geglu_tanh_row_generic(out: &mut [f32], row: &[f32]) {
    // 2·√(2/π)
    const K: f32 = 2.0 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
    gated_row(out, row, |g| K * (g + 0.044_715 * g * g * g));
}

/// `out = gate · sigmoid(z(gate)) · up` over one row.
#[inline(always)]
fn gated_row(out: &mut [f32], row: &[f32], z: impl Fn(f32) -> f32) {
    let (gate, up) = row.split_at(out.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        // sigmoid(z) = 1 / (1 + e^-z); e^-z is computed as e^-|z| to stay in exp_poly's range.
        let z = z(g);
        let e = exp_poly(-z.abs());
        let sigmoid = if z >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        };
        *o = g * sigmoid * u;
    }
}

/// `x W` for row-major `x: [m, k]` and `w` holding `W: [k, n]` in `layout`, f32 on the CPU.
///
/// The output columns are split into independent single-threaded GEMMs run in
/// parallel, which keeps both cores busy better than one GEMM's internal
/// threading at the row counts of a prompt. The split depends only on `n` and
/// the thread count, so results are bit-for-bit reproducible run to run.
///
/// Panics if `x.len() != m * k` or `w.len() != k * n` (callers check shapes
/// first; the check keeps the raw-pointer GEMMs below in bounds).
pub(crate) fn matmul(
    x: &[f32],
    w: &[f32],
    layout: WeightLayout,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "matmul: x is not [m, k]");
    assert_eq!(w.len(), k * n, "matmul: w is not [k, n]");
    let w = match layout {
        WeightLayout::KByN => Operand::rows(w, n),
        WeightLayout::NByK => Operand::transposed(w, k),
    };
    let mut out = vec![0f32; m * n];
    let dst = OutPtr::new(&mut out);
    let parts = (2 * rayon::current_num_threads())
        .min(n.div_ceil(64))
        .max(1);
    let cols = n.div_ceil(parts);
    let part = |i: usize| {
        let c0 = i * cols;
        let nc = cols.min(n - c0);
        // Safety: part i writes only columns [c0, c0 + nc) of `out`; reads stay in x and w.
        unsafe {
            gemm_into(
                (m, nc, k),
                dst.at(c0),
                n,
                Operand::rows(x, k),
                w.skip_columns(c0),
                1.0,
            )
        }
    };
    (0..parts).into_par_iter().for_each(part);
    out
}

/// A strided f32 matrix operand for [`gemm_into`], borrowed from the buffer
/// it reads: element (r, c) is `buf[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    buf: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// Row-major with `row_stride` elements between rows, from the start of `buf`.
    pub fn rows(buf: &'a [f32], row_stride: usize) -> Operand<'a> {
        Operand {
            buf,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `row_stride` elements between
    /// rows, from the start of `buf`.
    pub fn transposed(buf: &'a [f32], row_stride: usize) -> Operand<'a> {
        Operand {
            buf,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    /// The same matrix without its first `c` columns (panics past the buffer).
    fn skip_columns(self, c: usize) -> Operand<'a> {
        Operand {
            buf: &self.buf[c * self.col_stride..],
            ..self
        }
    }

    /// Whether a `rows × cols` block lies inside the buffer.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.buf.len()
    }
}

/// `dst = scale · lhs · rhs` for `(m, n, k)` shapes, single-threaded; `dst`
/// has `dst_row_stride` elements between rows (1 between columns).
///
/// # Safety
/// Every element addressed through the pointers and strides must be inside
/// its buffer, and no other thread may touch the `dst` block meanwhile.
pub(crate) unsafe fn gemm_into(
    shape: (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
) {
    gemm_strided(shape, dst, (dst_row_stride, 1), lhs, rhs, scale, false)
}

/// [`gemm_into`] with `dst` strided as `(row stride, column stride)`; with
/// `accumulate`, `dst += scale · lhs · rhs`.
///
/// # Safety
/// As [`gemm_into`].
pub(crate) unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_row_stride, dst_col_stride): (usize, usize),
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    accumulate: bool,
) {
    // The operands' reads are checked here (two multiplications per GEMM, so
    // in release builds too); the `dst` block is the caller's contract.
    assert!(lhs.holds(m, k), "gemm: lhs [{m}, {k}] runs past its buffer");
    assert!(rhs.holds(k, n), "gemm: rhs [{k}, {n}] runs past its buffer");
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_col_stride as isize,
        dst_row_stride as isize,
        accumulate,
        lhs.buf.as_ptr(),
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.buf.as_ptr(),
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// An output buffer shared by tasks that write disjoint parts of it, for as
/// long as the buffer is borrowed.
pub(crate) struct OutPtr<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'a mut [f32]>,
}
// Safety: users guarantee tasks write disjoint elements.
unsafe impl Send for OutPtr<'_> {}
unsafe impl Sync for OutPtr<'_> {}

impl<'a> OutPtr<'a> {
    pub(crate) fn new(buf: &'a mut [f32]) -> OutPtr<'a> {
        OutPtr {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// Pointer `offset` elements in (a method, so closures capture the whole `Sync` wrapper).
    ///
    /// # Safety
    /// No two tasks may write the same element through the pointers they get,
    /// and writes through the pointer must stay inside the buffer.
    pub(crate) unsafe fn at(&self, offset: usize) -> *mut f32 {
        assert!(
            offset <= self.len,
            "OutPtr::at({offset}) past a {}-element buffer",
            self.len
        );
        self.ptr.add(offset)
    }
}

/// How a weight tensor holds the `[k, n]` right-hand side of `x W`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// Stored as `[k, n]` (e.g. a pre-transposed projection).
    KByN,
    /// Stored as `[n, k]` and read as its transpose without a copy (e.g. the unembedding).
    NByK,
}

/// `x W` through [`matmul`] for f32 CPU tensors `x: [m, k]`; `None` for other
/// dtypes or devices, so the caller can fall back to candle's matmul.
pub(crate) fn matmul_tensor(
    x: &Tensor,
    w: &Tensor,
    layout: WeightLayout,
) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (rows, cols) = w.dims2()?;
    let (w_k, n) = match layout {
        WeightLayout::KByN => (rows, cols),
        WeightLayout::NByK => (cols, rows),
    };
    if w_k != k {
        return Err(candle_core::Error::Msg(format!(
            "matmul: x is [{m}, {k}] but the weight is [{rows}, {cols}] ({layout:?})"
        ))
        .into());
    }
    let out = with_f32_slice(w, |w| with_f32_slice(x, |x| matmul(x, w, layout, m, k, n)))?
        .transpose()?
        .flatten();
    out.map(|y| Ok(Tensor::from_vec(y, (m, n), x.device())?))
        .transpose()
}

/// Calls `f` with the contiguous f32 data of a CPU tensor, or returns `None`
/// (other dtype or device) so the caller can fall back to candle's ops.
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu @ CpuStorage::F32(_)) = &*storage else {
        return Ok(None);
    };
    let data = cpu.as_slice::<f32>()?;
    Ok(layout.contiguous_offsets().map(|(a, b)| f(&data[a..b])))
}

/// `src` (`[rows, cols]`, row-major) transposed to `[cols, rows]`, in tiles
/// over the thread pool. Written for loading: candle's strided copy walks the
/// source one element at a time on one thread (a cache miss per element), a
/// fifth of a small model's load (perf, SmolLM2-135M).
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 64;
    let mut dst = vec![0f32; src.len()];
    if src.is_empty() {
        return dst;
    }
    // Each task owns TILE whole output rows (TILE input columns).
    dst.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(block, out)| {
            let c0 = block * TILE;
            let width = out.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                for c in 0..width {
                    let column = &mut out[c * rows..][..rows];
                    for r in r0..(r0 + TILE).min(rows) {
                        column[r] = src[r * cols + c0 + c];
                    }
                }
            }
        });
    dst
}

/// Keeps freed buffers in the heap instead of returning them to the OS,
/// unless the environment says `AFPROBE_KEEP_FREED_MEMORY=0`.
///
/// A forward pass allocates and frees many multi-megabyte activations; with
/// glibc's defaults each one is a fresh `mmap`, and the page faults that zero it
/// cost ~10% of a long prefill (~25% from Python, measured). Freed buffers, up
/// to 1 GiB at the top of the heap, stay with the process (they count in its
/// RSS: opt out where memory is tighter than time). Call once; a no-op off glibc.
pub fn keep_freed_memory() {
    if std::env::var("AFPROBE_KEEP_FREED_MEMORY").as_deref() == Ok("0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only changes allocator thresholds, under glibc's arena lock
    // (safe with other threads running, as in a Python process).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Below this many tokens [`quantized_matmul`] takes candle's per-pair dot
/// products: decoding a tile of weight rows pays off only over several tokens.
const QGEMM_MIN_TOKENS: usize = 4;

/// Whether [`quantized_matmul`] multiplies weights of block type `dtype`.
pub fn has_quantized_matmul(dtype: candle_core::quantized::GgmlDType) -> bool {
    use candle_core::quantized::GgmlDType as G;
    matches!(
        dtype,
        G::Q4_0
            | G::Q4_1
            | G::Q5_0
            | G::Q5_1
            | G::Q8_0
            | G::Q2K
            | G::Q3K
            | G::Q4K
            | G::Q5K
            | G::Q6K
            | G::Q8K
    )
}

/// `x Wᵀ` for f32 `x: [m, k]` and a block-quantized `W: [n, k]`, as `[m, n]`,
/// straight on the stored blocks: for a prompt of [`QGEMM_MIN_TOKENS`] or more,
/// our tiled GEMM ([`super::qgemm`]) where it has the block type; otherwise
/// candle's `k_quants::matmul` (the activations quantized per block to the
/// weight type's dot-product type, as llama.cpp does). Not `QMatMul`: on x86
/// it repacks Q4_K/Q6_K/Q8_0 weights into expanded tiles on first use and keeps
/// both copies, which took a 669 MB Q4_K_M file to 2.49 GB of RSS; this path
/// stays at the file's size.
pub fn quantized_matmul(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    use candle_core::quantized::k_quants::*;
    use candle_core::quantized::GgmlDType as G;
    let (n, k) = w.shape().dims2()?;
    let (m, kx) = x.dims2()?;
    if kx != k {
        return Err(Error::BadInput(format!(
            "quantized matmul: input width {kx} for a weight of {n} x {k}"
        )));
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let data = w.data()?;
    let mut dst = vec![0f32; m * n];
    let product = with_f32_slice(&x, |lhs| -> candle_core::Result<()> {
        if m >= QGEMM_MIN_TOKENS && super::qgemm::supports(w.dtype()) {
            return super::qgemm::matmul(w.dtype(), &data, (m, n, k), lhs, &mut dst)
                .map_err(candle_core::Error::Msg);
        }
        macro_rules! blocks {
            ($block:ty) => {{
                // Safety: the bytes are the QTensor's own storage, blocks of this
                // type (plain integers and f16s, any bit pattern valid); `align_to`
                // checks the alignment and the length, and a misfit is refused.
                let (head, blocks, tail) = unsafe { data.align_to::<$block>() };
                if !head.is_empty() || !tail.is_empty() {
                    return Err(candle_core::Error::Msg(format!(
                        "quantized weight storage of {} bytes is not whole aligned {} blocks",
                        data.len(),
                        stringify!($block)
                    )));
                }
                matmul::<$block>((m, k, n), lhs, blocks, &mut dst)
            }};
        }
        match w.dtype() {
            G::Q4_0 => blocks!(BlockQ4_0),
            G::Q4_1 => blocks!(BlockQ4_1),
            G::Q5_0 => blocks!(BlockQ5_0),
            G::Q5_1 => blocks!(BlockQ5_1),
            G::Q8_0 => blocks!(BlockQ8_0),
            G::Q2K => blocks!(BlockQ2K),
            G::Q3K => blocks!(BlockQ3K),
            G::Q4K => blocks!(BlockQ4K),
            G::Q5K => blocks!(BlockQ5K),
            G::Q6K => blocks!(BlockQ6K),
            G::Q8K => blocks!(BlockQ8K),
            other => candle_core::bail!("no quantized matmul for {other:?}"),
        }
    })?;
    match product {
        Some(result) => result?,
        None => {
            return Err(Error::BadInput(
                "quantized matmul needs f32 input on the CPU".into(),
            ))
        }
    }
    Ok(Tensor::from_vec(dst, (m, n), x.device())?)
}

/// Runs `load` (reading a model) with every buffer of 1 MiB or more mapped on
/// its own, so that the temporary copies made while reading tensors go back to
/// the OS when freed instead of staying in the heap that [`keep_freed_memory`]
/// keeps (the default model's f32 peak RSS: 685 MB before, 603 MB after);
/// then sets [`keep_freed_memory`]'s threshold again and trims the heap.
pub fn while_loading<T>(load: impl FnOnce() -> T) -> T {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only changes allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let out = load();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: as above; malloc_trim only returns unused heap pages.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::malloc_trim(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_equals_candles_strided_copy() -> Result<()> {
        for (rows, cols) in [(1, 1), (3, 130), (129, 67), (200, 64), (64, 1)] {
            let data: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 7.0).collect();
            let t = Tensor::from_vec(data.clone(), (rows, cols), &candle_core::Device::Cpu)?;
            let want = t.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(transpose(&data, rows, cols), want, "{rows}x{cols}");
        }
        Ok(())
    }

    #[test]
    fn exp_poly_is_accurate() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_poly(x) as f64, (x as f64).exp());
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
    }

    #[test]
    fn softmax_matches_the_definition() {
        let mut row: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 23) as f32 * 0.7 - 5.0)
            .collect();
        let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let total: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let want: Vec<f64> = row
            .iter()
            .map(|&x| (x as f64 - max).exp() / total)
            .collect();
        softmax_in_place(&mut row);
        for (g, w) in row.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-7);
        }
    }

    #[test]
    fn swiglu_matches_the_definition() {
        let d = 37;
        let row: Vec<f32> = (0..2 * d).map(|i| (i as f32 - 30.0) * 0.9).collect();
        let out = swiglu(&row, d);
        for i in 0..d {
            let (g, u) = (row[i] as f64, row[d + i] as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (out[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{i}"
            );
        }
    }

    #[test]
    fn geglu_tanh_matches_the_definition() {
        let d = 37;
        let row: Vec<f32> = (0..2 * d).map(|i| (i as f32 - 30.0) * 0.3).collect();
        let out = geglu_tanh(&row, d);
        for i in 0..d {
            let (g, u) = (row[i] as f64, row[d + i] as f64);
            // transformers' gelu_pytorch_tanh.
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g.powi(3));
            let want = 0.5 * g * (1.0 + inner.tanh()) * u;
            assert!(
                (out[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{i}: {} vs {want}",
                out[i]
            );
        }
    }

    #[test]
    fn split_matmul_matches_a_naive_product() {
        let (m, k, n) = (7, 33, 300);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 13) % 7) as f32 * 0.5 - 1.5)
            .collect();
        let got = matmul(&x, &w, WeightLayout::KByN, m, k, n);
        // The same product with w given as its transpose [n, k].
        let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
        assert_eq!(got, matmul(&x, &wt, WeightLayout::NByK, m, k, n));
        for r in 0..m {
            for c in 0..n {
                let want: f32 = (0..k).map(|j| x[r * k + j] * w[j * n + c]).sum();
                assert!((got[r * n + c] - want).abs() < 1e-3);
            }
        }
    }
}
