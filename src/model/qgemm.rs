//! Quantized GEMM for prefill: `x Wᵀ` for f32 activations `x: [m, k]` and a
//! GGUF block-quantized weight `W: [n, k]`, read from the blocks as stored.
//!
//! Why our own: candle's CPU quantized matmul computes one block dot product
//! per (row, token) pair, decoding the weight block again for every token, and
//! has no SIMD dot product for Q4_1, Q5_0 and Q5_1 (the study's Qwen2.5-Coder
//! file is mostly Q5_0). Prefill multiplies hundreds of tokens by each weight,
//! so here a task decodes a group of weight rows once into 8-bit integers and
//! per-32 scales (a few KiB, in cache; the weights in memory stay as the file
//! stores them), quantizes the activations once per call to 8-bit blocks of 32
//! (llama.cpp's `quantize_row_q8_0`), and multiplies each
//! decoded tile against every token with AVX2 integer dot products.
//!
//! Every block type decodes to one form per 32 weights: integers `q` (`u8`,
//! or `i8` bits for the signed types), a scale for each half of 16
//! (Q6_K's sub-blocks are 16 wide; the other types repeat one scale) and a
//! bias `c`, so that `w = d·q + c` (llama.cpp's `dequantize_row_*`, ggml-quants.c).
//! With the activation block `x = dx·xq` and `sx = dx·Σxq`:
//! `Σ w·x = dx·Σ_halves d_h·Σ q·xq + c·sx`, the integer sums exact.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::kernels::OutPtr;

/// Weights per block of the activations and per decoded scale group.
const QK: usize = 32;
/// Weight rows decoded together and multiplied against the same activations.
const ROWS: usize = 4;
/// Weight rows per parallel task (a multiple of [`ROWS`]).
const TASK_ROWS: usize = 16;
/// Tokens per pass over a task's decoded rows, so their activations stay in cache.
const TOKEN_BLOCK: usize = 64;

/// Whether [`matmul`] multiplies weights of block type `dtype`.
pub fn supports(dtype: GgmlDType) -> bool {
    Format::of(dtype).is_some()
}

/// How one block type is stored and decoded.
#[derive(Clone, Copy)]
struct Format {
    /// Bytes per block.
    bytes: usize,
    /// Weights per block (32, or 256 for the k-quants).
    weights: usize,
    /// Whether the decoded integers are signed (`i8`); otherwise `u8` with the
    /// offset folded into the bias.
    signed: bool,
    /// Whether the bias is zero for every block (no `c·sx` term).
    unbiased: bool,
    /// Whether the halves of 16 have scales of their own (Q6_K).
    split_scales: bool,
    decode: fn(&[u8], &mut Decoded),
}

impl Format {
    fn of(dtype: GgmlDType) -> Option<Format> {
        let f = |bytes, weights, signed, unbiased, decode| {
            Some(Format {
                bytes,
                weights,
                signed,
                unbiased,
                split_scales: dtype == GgmlDType::Q6K,
                decode,
            })
        };
        match dtype {
            GgmlDType::Q4_0 => f(18, 32, false, false, decode_q4_0),
            GgmlDType::Q4_1 => f(20, 32, false, false, decode_q4_1),
            GgmlDType::Q5_0 => f(22, 32, false, false, decode_q5_0),
            GgmlDType::Q5_1 => f(24, 32, false, false, decode_q5_1),
            GgmlDType::Q8_0 => f(34, 32, true, true, decode_q8_0),
            GgmlDType::Q4K => f(144, 256, false, false, decode_q4k),
            GgmlDType::Q5K => f(176, 256, false, false, decode_q5k),
            GgmlDType::Q6K => f(210, 256, true, true, decode_q6k),
            _ => None,
        }
    }
}

/// One block's weights decoded: `w[i] = scale[i / 16]·q[i] + bias[i / 32]`
/// for `i` in the block (32 or 256 weights).
struct Decoded<'a> {
    q: &'a mut [u8],
    /// Two per 32 weights: the first half's scale, then the second's.
    scale: &'a mut [f32],
    bias: &'a mut [f32],
}

impl Decoded<'_> {
    /// Sets group `g` (32 weights): scales of its two halves and its bias.
    fn group(&mut self, g: usize, lo: f32, hi: f32, bias: f32) {
        self.scale[2 * g] = lo;
        self.scale[2 * g + 1] = hi;
        self.bias[g] = bias;
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn nibbles(qs: &[u8], q: &mut [u8], high: impl Fn(usize) -> u8) {
    for (j, &byte) in qs.iter().enumerate().take(16) {
        q[j] = (byte & 0x0F) | high(j);
        q[j + 16] = (byte >> 4) | high(j + 16);
    }
}

fn decode_q4_0(b: &[u8], out: &mut Decoded) {
    let d = half_at(b, 0);
    nibbles(&b[2..18], out.q, |_| 0);
    out.group(0, d, d, -8.0 * d);
}

fn decode_q4_1(b: &[u8], out: &mut Decoded) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    nibbles(&b[4..20], out.q, |_| 0);
    out.group(0, d, d, m);
}

/// The fifth bit of weight `j` of a Q5 block from its 32-bit `qh`.
fn fifth_bit(qh: &[u8]) -> impl Fn(usize) -> u8 {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    move |j| (((qh >> j) & 1) as u8) << 4
}

fn decode_q5_0(b: &[u8], out: &mut Decoded) {
    let d = half_at(b, 0);
    nibbles(&b[6..22], out.q, fifth_bit(&b[2..6]));
    out.group(0, d, d, -16.0 * d);
}

fn decode_q5_1(b: &[u8], out: &mut Decoded) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    nibbles(&b[8..24], out.q, fifth_bit(&b[4..8]));
    out.group(0, d, d, m);
}

fn decode_q8_0(b: &[u8], out: &mut Decoded) {
    let d = half_at(b, 0);
    out.q.copy_from_slice(&b[2..34]);
    out.group(0, d, d, 0.0);
}

/// Scale and min of sub-block `j` of a Q4_K/Q5_K block's 12 packed bytes
/// (6 bits each; ggml-quants.c `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// Q4_K and Q5_K: 8 sub-blocks of 32, sub-block `2c` the low nibbles of
/// bytes `32c..32c+32`, `2c+1` their high nibbles; Q5_K adds bit `2c` or
/// `2c+1` of `qh[l]` as the fifth bit of weight `l`.
fn decode_k4(b: &[u8], qs: &[u8], qh: Option<&[u8]>, out: &mut Decoded) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    for sub in 0..8 {
        let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let q = &mut out.q[32 * sub..32 * sub + 32];
        for (l, (q, &byte)) in q.iter_mut().zip(bytes).enumerate() {
            let low = if sub % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            let fifth = qh.map_or(0, |qh| ((qh[l] >> sub) & 1) << 4);
            *q = low | fifth;
        }
        let (sc, m) = scale_min_k4(sub, scales);
        out.group(sub, d * sc, d * sc, -dmin * m);
    }
}

fn decode_q4k(b: &[u8], out: &mut Decoded) {
    decode_k4(b, &b[16..144], None, out);
}

fn decode_q5k(b: &[u8], out: &mut Decoded) {
    decode_k4(b, &b[48..176], Some(&b[16..48]), out);
}

/// Q6_K: two halves of 128; in half `h`, weight `32s + l` takes its low four
/// bits from `ql[64h + l (+32 for s odd)]` (high nibble for `s ≥ 2`), its top
/// two from `qh[32h + l]` bits `2s..2s+2`, minus 32; scale `sc[8h + 2s + l/16]`.
fn decode_q6k(b: &[u8], out: &mut Decoded) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for h in 0..2 {
        for s in 0..4 {
            let group = 4 * h + s;
            for l in 0..32 {
                let low = ql[64 * h + l + 32 * (s % 2)];
                let low = if s < 2 { low & 0x0F } else { low >> 4 };
                let top = (qh[32 * h + l] >> (2 * s)) & 3;
                out.q[32 * group + l] = ((low | (top << 4)) as i8 - 32) as u8;
            }
            let scale = |i: usize| d * sc[8 * h + 2 * s + i] as i8 as f32;
            out.group(group, scale(0), scale(1), 0.0);
        }
    }
}

/// Activations quantized to 8-bit blocks of 32: `x ≈ d·q`, `sum = d·Σq`.
struct QuantizedRows {
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<f32>,
}

/// llama.cpp's `quantize_row_q8_0`: `d = max|x|/127`, `q = round(x·(1/d))`,
/// `d` then rounded to f16.
fn quantize_rows(x: &[f32]) -> QuantizedRows {
    let groups = x.len() / QK;
    let mut out = QuantizedRows {
        q: vec![0; x.len()],
        d: vec![0.0; groups],
        sum: vec![0.0; groups],
    };
    for (g, (xs, qs)) in x
        .chunks_exact(QK)
        .zip(out.q.chunks_exact_mut(QK))
        .enumerate()
    {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(xs) {
            *q = (v * inv).round() as i8;
            sum += *q as i32;
        }
        // Stored as f16, as llama.cpp stores it, so the products match its own.
        let d = f16::from_f32(d).to_f32();
        out.d[g] = d;
        out.sum[g] = d * sum as f32;
    }
    out
}

/// `out = x Wᵀ` as `[m, n]` row-major, for `x: [m, k]` and `W: [n, k]` stored
/// as `dtype` blocks in `blocks` (row-major, `k / weights-per-block` blocks per row).
///
/// # Errors
/// An unsupported `dtype` ([`supports`]), `k` not a whole number of blocks,
/// or buffers whose lengths do not match `m`, `n`, `k`.
pub fn matmul(
    dtype: GgmlDType,
    blocks: &[u8],
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    out: &mut [f32],
) -> Result<(), String> {
    let format = Format::of(dtype).ok_or_else(|| format!("no quantized GEMM for {dtype:?}"))?;
    if k % format.weights != 0 {
        return Err(format!(
            "{dtype:?} weight rows of {k} are not whole blocks of {}",
            format.weights
        ));
    }
    let row_bytes = k / format.weights * format.bytes;
    if blocks.len() != n * row_bytes || x.len() != m * k || out.len() != m * n {
        return Err(format!(
            "quantized GEMM of [{m}, {k}] by [{n}, {k}] {dtype:?}: buffers of {} bytes, {} and {} floats",
            blocks.len(),
            x.len(),
            out.len()
        ));
    }
    let xq = quantize_rows(x);
    let kernel = Kernel::detect(&format);
    // Each task writes its own columns (weight rows) of `out`, every token's.
    let out = OutPtr::new(out);
    (0..n.div_ceil(TASK_ROWS)).into_par_iter().for_each(|task| {
        let first = task * TASK_ROWS;
        let rows = TASK_ROWS.min(n - first);
        let weights = &blocks[first * row_bytes..(first + rows) * row_bytes];
        let tile = Tile::decode(format, weights, rows, k);
        tile.multiply(&xq, k, &kernel, &out, (first, n));
    });
    Ok(())
}

/// A task's weight rows decoded, padded with zero rows to a multiple of [`ROWS`].
struct Tile {
    rows: usize,
    q: Vec<u8>,
    scale: Vec<f32>,
    /// The bias per group of 32 as `[groups, TASK_ROWS]` (zero past `rows`),
    /// so that one token's bias terms for all the tile's rows are a few SIMD
    /// multiply-adds per group; empty for the types without a bias.
    bias_by_group: Vec<f32>,
}

impl Tile {
    fn decode(format: Format, weights: &[u8], rows: usize, k: usize) -> Tile {
        let padded = rows.div_ceil(ROWS) * ROWS;
        let groups = k / QK;
        let mut q = vec![0; padded * k];
        let mut scale = vec![0.0; padded * groups * 2];
        let mut bias = vec![0.0; padded * groups];
        let per_block = format.weights / QK;
        let blocks = weights.chunks_exact(format.bytes);
        let targets = q
            .chunks_exact_mut(format.weights)
            .zip(scale.chunks_exact_mut(2 * per_block))
            .zip(bias.chunks_exact_mut(per_block));
        for (block, ((q, scale), bias)) in blocks.zip(targets) {
            (format.decode)(block, &mut Decoded { q, scale, bias });
        }
        let mut bias_by_group = Vec::new();
        if !format.unbiased {
            bias_by_group = vec![0.0; groups * TASK_ROWS];
            for (r, row) in bias.chunks_exact(groups).take(rows).enumerate() {
                for (g, &c) in row.iter().enumerate() {
                    bias_by_group[g * TASK_ROWS + r] = c;
                }
            }
        }
        Tile {
            rows,
            q,
            scale,
            bias_by_group,
        }
    }

    /// Writes the output of the tile's row `r` (weight row `first + r`) for
    /// token `t` at `out[t·n + first + r]`, columns no other tile writes.
    fn multiply(
        &self,
        xq: &QuantizedRows,
        k: usize,
        kernel: &Kernel,
        out: &OutPtr,
        (first_row, n): (usize, usize),
    ) {
        let m = xq.d.len() / (k / QK);
        let groups = k / QK;
        for first in (0..m).step_by(TOKEN_BLOCK) {
            let tokens = first..m.min(first + TOKEN_BLOCK);
            for r0 in (0..self.rows).step_by(ROWS) {
                let rows = RowGroup {
                    q: &self.q[r0 * k..(r0 + ROWS) * k],
                    scale: &self.scale[r0 * groups * 2..(r0 + ROWS) * groups * 2],
                    k,
                };
                for t in tokens.clone() {
                    let x = Token {
                        q: &xq.q[t * k..(t + 1) * k],
                        d: &xq.d[t * groups..(t + 1) * groups],
                    };
                    let dots = kernel.dots(&rows, &x);
                    for (i, dot) in dots.iter().enumerate().take(self.rows - r0) {
                        // Safety: this tile alone writes columns `first_row..first_row + rows`.
                        unsafe { *out.at(t * n + first_row + r0 + i) = *dot };
                    }
                }
            }
            if !self.bias_by_group.is_empty() {
                for t in tokens {
                    let bias = self.bias_terms(&xq.sum[t * groups..(t + 1) * groups]);
                    for (r, c) in bias.iter().enumerate().take(self.rows) {
                        // Safety: as above.
                        unsafe { *out.at(t * n + first_row + r) += c };
                    }
                }
            }
        }
    }

    /// `Σ_g c[r, g]·sx[g]` for every row `r` of the tile, summed over the
    /// groups in order (a fixed-width loop over rows the compiler vectorizes).
    fn bias_terms(&self, sum: &[f32]) -> [f32; TASK_ROWS] {
        let mut acc = [0f32; TASK_ROWS];
        for (c, &s) in self.bias_by_group.chunks_exact(TASK_ROWS).zip(sum) {
            for (a, c) in acc.iter_mut().zip(c) {
                *a += c * s;
            }
        }
        acc
    }
}

/// [`ROWS`] decoded weight rows.
struct RowGroup<'a> {
    q: &'a [u8],
    scale: &'a [f32],
    k: usize,
}

/// One token's quantized activations.
struct Token<'a> {
    q: &'a [i8],
    d: &'a [f32],
}

/// The dot-product kernel for one decoded form, chosen once per call.
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2 {
        signed: bool,
        split: bool,
    },
    Portable {
        signed: bool,
    },
}

impl Kernel {
    fn detect(format: &Format) -> Kernel {
        let signed = format.signed;
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let split = format.split_scales;
            return Kernel::Avx2 { signed, split };
        }
        Kernel::Portable { signed }
    }

    /// `Σ_groups dx·Σ_halves d_h·Σ q·xq` for each of the [`ROWS`] rows.
    fn dots(&self, rows: &RowGroup, x: &Token) -> [f32; ROWS] {
        match *self {
            #[cfg(target_arch = "x86_64")]
            // Safety: AVX2 and FMA were detected; `RowGroup` and `Token` are
            // sliced to the extents `avx2::dots` reads (`Tile::multiply`).
            Kernel::Avx2 { signed, split } => unsafe {
                match (signed, split) {
                    (false, false) => avx2::dots::<false, false>(rows, x),
                    (false, true) => avx2::dots::<false, true>(rows, x),
                    (true, false) => avx2::dots::<true, false>(rows, x),
                    (true, true) => avx2::dots::<true, true>(rows, x),
                }
            },
            Kernel::Portable { signed } => dots_portable(rows, x, signed),
        }
    }
}

fn dots_portable(rows: &RowGroup, x: &Token, signed: bool) -> [f32; ROWS] {
    let k = rows.k;
    let groups = k / QK;
    std::array::from_fn(|r| {
        let q = &rows.q[r * k..(r + 1) * k];
        let scale = &rows.scale[r * groups * 2..(r + 1) * groups * 2];
        let mut total = 0f32;
        for g in 0..groups {
            let half = |h: usize| -> i32 {
                (QK * g + 16 * h..QK * g + 16 * h + 16)
                    .map(|i| {
                        let w = if signed {
                            q[i] as i8 as i32
                        } else {
                            q[i] as i32
                        };
                        w * x.q[i] as i32
                    })
                    .sum()
            };
            let lo = half(0) as f32 * scale[2 * g];
            let hi = half(1) as f32 * scale[2 * g + 1];
            total += x.d[g] * (lo + hi);
        }
        total
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{RowGroup, Token, QK, ROWS};
    use std::arch::x86_64::*;

    /// [`super::Kernel::dots`] with AVX2: per group of 32, `maddubs` of the
    /// unsigned weights (or `|w|`, with `w`'s sign moved onto `x`, for the
    /// signed types) by the activations, pairs summed to eight i32 lanes
    /// (lanes 0–3 the first half of 16, 4–7 the second), converted and scaled.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `rows.q` holds `ROWS·k` bytes, `rows.scale`
    /// `ROWS·k/16` floats, `x.q` `k` bytes and `x.d` `k/32` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots<const SIGNED: bool, const SPLIT: bool>(
        rows: &RowGroup,
        x: &Token,
    ) -> [f32; ROWS] {
        let k = rows.k;
        let groups = k / QK;
        debug_assert!(rows.q.len() >= ROWS * k && rows.scale.len() >= ROWS * groups * 2);
        debug_assert!(x.q.len() >= k && x.d.len() >= groups);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); ROWS];
        for g in 0..groups {
            let xv = _mm256_loadu_si256(x.q.as_ptr().add(QK * g) as *const __m256i);
            let dx = _mm256_set1_ps(*x.d.get_unchecked(g));
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = _mm256_loadu_si256(rows.q.as_ptr().add(r * k + QK * g) as *const __m256i);
                let pairs = if SIGNED {
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w))
                } else {
                    _mm256_maddubs_epi16(w, xv)
                };
                let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                let at = rows.scale.as_ptr().add((r * groups + g) * 2);
                // One scale broadcast, or (Q6_K) the halves' two in lanes 0–3 and 4–7.
                let scale = if SPLIT {
                    _mm256_insertf128_ps(
                        _mm256_castps128_ps256(_mm_set1_ps(*at)),
                        _mm_set1_ps(*at.add(1)),
                        1,
                    )
                } else {
                    _mm256_set1_ps(*at)
                };
                *acc = _mm256_fmadd_ps(_mm256_mul_ps(sums, dx), scale, *acc);
            }
        }
        acc.map(|v| hsum(v))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    const TYPES: [GgmlDType; 8] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The weights quantized by candle (llama.cpp's quantizers) and dequantized by candle.
    fn quantized(dtype: GgmlDType, n: usize, k: usize) -> (QTensor, Vec<f32>) {
        let w = Tensor::from_vec(random(n * k, 7), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let back = q.dequantize(&Device::Cpu).unwrap();
        (q, back.flatten_all().unwrap().to_vec1().unwrap())
    }

    /// The activations as llama.cpp's `quantize_row_q8_0` rounds them, written
    /// out from its definition (`d = max|x|/127`, `id = 1/d`, `roundf(x·id)·f16(d)`), in f64.
    fn rounded_activations(x: &[f32]) -> Vec<f64> {
        x.chunks(QK)
            .flat_map(|xs| {
                let d = xs.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let stored = f16::from_f32(d).to_f32() as f64;
                xs.iter().map(move |&v| (v * id).round() as f64 * stored)
            })
            .collect()
    }

    fn check(dtype: GgmlDType, m: usize, n: usize, k: usize) {
        let (q, w) = quantized(dtype, n, k);
        let x = random(m * k, 11);
        let mut out = vec![0f32; m * n];
        let bytes = q.data().unwrap();
        matmul(dtype, &bytes, (m, n, k), &x, &mut out).unwrap();
        let xr = rounded_activations(&x);
        for t in 0..m {
            for r in 0..n {
                let expect: f64 = (0..k).map(|i| w[r * k + i] as f64 * xr[t * k + i]).sum();
                let scale: f64 = (0..k)
                    .map(|i| (w[r * k + i] as f64 * xr[t * k + i]).abs())
                    .sum();
                let got = out[t * n + r] as f64;
                assert!(
                    (got - expect).abs() <= 2e-6 * scale.max(1e-6),
                    "{dtype:?} [{m},{k}]x[{n},{k}] token {t} row {r}: {got} vs {expect}"
                );
            }
        }
    }

    #[test]
    fn every_block_type_equals_dequantize_then_multiply_on_odd_shapes() {
        for dtype in TYPES {
            check(dtype, 5, 7, 256);
            check(dtype, 67, 21, 512);
            if Format::of(dtype).unwrap().weights == QK {
                check(dtype, 3, 5, 9 * QK);
                check(dtype, 5, 7, 576);
                check(dtype, 70, 33, 1536);
            }
        }
    }

    #[test]
    fn the_portable_and_simd_kernels_agree() {
        for dtype in TYPES {
            let format = Format::of(dtype).unwrap();
            let k = if format.weights == QK { 9 * QK } else { 256 };
            let (q, _) = quantized(dtype, ROWS, k);
            let bytes = q.data().unwrap();
            let tile = Tile::decode(format, &bytes, ROWS, k);
            let xq = quantize_rows(&random(k, 3));
            let rows = RowGroup {
                q: &tile.q,
                scale: &tile.scale,
                k,
            };
            let x = Token {
                q: &xq.q,
                d: &xq.d,
            };
            let simd = Kernel::detect(&format).dots(&rows, &x);
            let portable = Kernel::Portable {
                signed: format.signed,
            }
            .dots(&rows, &x);
            for (a, b) in simd.iter().zip(portable) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let (q, _) = quantized(GgmlDType::Q4_0, 2, 64);
        let bytes = q.data().unwrap();
        let mut out = vec![0f32; 2];
        let err = matmul(GgmlDType::Q4_0, &bytes, (1, 2, 96), &[0.0; 96], &mut out).unwrap_err();
        assert!(err.contains("buffers"), "{err}");
        let err = matmul(GgmlDType::Q4K, &bytes, (1, 2, 64), &[0.0; 64], &mut out).unwrap_err();
        assert!(err.contains("whole blocks"), "{err}");
        assert!(!supports(GgmlDType::F16));
    }
}
