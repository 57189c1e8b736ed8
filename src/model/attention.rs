//! Causal grouped-query attention on the CPU, fused and query-chunked.
//!
//! Work is split into (head, query chunk) tasks run in parallel; each task
//! computes its scores with one GEMM against exactly the keys it may see, a
//! masked softmax in place, and one GEMM with the values, writing straight into
//! the `[T, heads * head_dim]` output. Memory stays at one `chunk x keys`
//! buffer per thread, never `[heads, T, T]`, and the exponentials (billions of
//! them for a long prompt) use a vectorised polynomial, not libm.

use std::cell::RefCell;

use rayon::prelude::*;

/// Query rows per task: a 128 x keys score block stays in L2 for typical lengths.
const QUERY_CHUNK: usize = 128;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// New tokens (queries).
    pub t: usize,
    /// Tokens already in the cache before this call.
    pub past: usize,
}

/// Row-major `[rows, stride]` buffer holding heads side by side.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    /// Column where head 0 starts.
    pub offset: usize,
}

struct OutPtr(*mut f32);
// Safety: each task writes a disjoint [chunk rows x head columns] block.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Pointer `offset` elements in (a method, so closures capture the whole `Sync` wrapper).
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// softmax(q kᵀ / √d + causal mask) v for every query head, as `[T, n_heads * head_dim]`.
///
/// `q` holds `T` rows; `k` and `v` hold `past + T` rows (the cache including the
/// new tokens). Query `i` sees keys `0..=past + i`. Query head `h` reads kv head
/// `h / (n_heads / n_kv_heads)`, as HF's `repeat_kv` does.
pub fn causal_attention(q: Strided, k: Strided, v: Strided, d: AttnDims) -> Vec<f32> {
    let AttnDims {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        t,
        past,
    } = d;
    let rep = n_heads / n_kv_heads;
    let out_stride = n_heads * hd;
    let mut out = vec![0f32; t * out_stride];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let scale = 1.0 / (hd as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..n_heads)
        .flat_map(|h| (0..t).step_by(QUERY_CHUNK).map(move |s| (h, s)))
        .collect();
    let run = |&(h, start): &(usize, usize)| {
        let len = QUERY_CHUNK.min(t - start);
        let n_keys = past + start + len;
        let g = h / rep;
        SCORES.with(|cell| {
            let mut scores = cell.borrow_mut();
            scores.resize(len * n_keys, 0.0);
            // Safety: all pointers stay inside their buffers: q rows start..start+len,
            // k/v rows 0..n_keys, head columns [offset + head*hd, +hd).
            unsafe {
                gemm::gemm(
                    len,
                    n_keys,
                    hd,
                    scores.as_mut_ptr(),
                    1,
                    n_keys as isize,
                    false,
                    q.data.as_ptr().add(start * q.stride + q.offset + h * hd),
                    1,
                    q.stride as isize,
                    k.data.as_ptr().add(k.offset + g * hd),
                    k.stride as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_exact_mut(n_keys).enumerate() {
                let visible = past + start + i + 1;
                softmax_in_place(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            unsafe {
                gemm::gemm(
                    len,
                    hd,
                    n_keys,
                    out_ptr.at(start * out_stride + h * hd),
                    1,
                    out_stride as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    n_keys as isize,
                    v.data.as_ptr().add(v.offset + g * hd),
                    1,
                    v.stride as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    };
    if tasks.len() == 1 {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
    out
}

/// Numerically stable softmax of one row, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // Safety: the CPU supports the features the function is compiled for.
            return unsafe { softmax_avx512(row) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return unsafe { softmax_avx2(row) };
        }
    }
    softmax_generic(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(row: &mut [f32]) {
    softmax_generic(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32]) {
    softmax_generic(row)
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
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let a = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + a * (1.0
            + a * (0.5
                + a * (1.0 / 6.0
                    + a * (1.0 / 24.0
                        + a * (1.0 / 120.0 + a * (1.0 / 720.0 + a * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Naive attention, one query at a time, for comparison.
    fn naive(q: &[f32], k: &[f32], v: &[f32], d: AttnDims) -> Vec<f32> {
        let (nh, nkv, hd) = (d.n_heads, d.n_kv_heads, d.head_dim);
        let mut out = vec![0f32; d.t * nh * hd];
        for i in 0..d.t {
            for h in 0..nh {
                let g = h / (nh / nkv);
                let qi = &q[i * nh * hd + h * hd..][..hd];
                let keys = d.past + i + 1;
                let s: Vec<f64> = (0..keys)
                    .map(|j| {
                        let kj = &k[j * nkv * hd + g * hd..][..hd];
                        qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..hd {
                    out[i * nh * hd + h * hd + c] = (0..keys)
                        .map(|j| (s[j] - m).exp() / z * v[j * nkv * hd + g * hd + c] as f64)
                        .sum::<f64>() as f32;
                }
            }
        }
        out
    }

    #[test]
    fn fused_attention_equals_naive_attention() {
        for (t, past) in [(1, 0), (5, 0), (300, 0), (3, 200), (130, 7)] {
            let d = AttnDims {
                n_heads: 6,
                n_kv_heads: 2,
                head_dim: 8,
                t,
                past,
            };
            let gen = |n: usize, seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0)
                    .collect()
            };
            let q = gen(t * 48, 1);
            let k = gen((past + t) * 16, 2);
            let v = gen((past + t) * 16, 3);
            fn s(data: &[f32], stride: usize) -> Strided<'_> {
                Strided {
                    data,
                    stride,
                    offset: 0,
                }
            }
            let got = causal_attention(s(&q, 48), s(&k, 16), s(&v, 16), d);
            let want = naive(&q, &k, &v, d);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "t={t} past={past}: max error {err}");
        }
    }
}
