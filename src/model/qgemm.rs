//! Quantized GEMM for prefill: `x Wᵀ` for f32 activations `x: [m, k]` and a
//! GGUF block-quantized weight `W: [n, k]`, read from the blocks as stored.
//!
//! Why our own: candle's CPU quantized matmul computes one block dot product
//! per (row, token) pair, decoding the weight block again for every token, and
//! has no SIMD dot product for Q4_1, Q5_0 and Q5_1 (the study's Qwen2.5-Coder
//! file is mostly Q5_0). Prefill multiplies hundreds of tokens by each weight,
//! so here a task decodes a group of weight rows once into 8-bit integers and
//! scales (a few KiB, in cache; the weights in memory stay as the file stores
//! them), quantizes the activations once per call to 8-bit blocks the way
//! llama.cpp does for the weight type (`quantize_row_q8_0` for the 32-weight
//! types, `quantize_row_q8_K` for the k-quants), and multiplies each decoded
//! tile against every token with integer dot products. The kernel is chosen
//! at run time, as the f32 kernels are: AVX-512 VNNI ([`vnni`]: `vpdpbusd`,
//! 8 rows by 16 tokens per call), else AVX2 (`maddubs`/`madd`, 2 rows by 4
//! tokens), else portable Rust; each load and scale serves several products.
//!
//! Why decoded per call and not repacked at load (llama.cpp's interleaved
//! tiles): decoding is a word-at-a-time pass that costs 1–2% of a prefill
//! (`perf`), and the weights stay in the file's bytes, where a decoded copy
//! would take 1.4× (Q8_0) to 2.4× (Q4_K) the file's memory.
//!
//! Every block type decodes to one form (llama.cpp's `dequantize_row_*`,
//! ggml-quants.c): per block of 32 or 256 weights a scale `d`; per group of 32
//! integers `q` (`u8`, or `i8` bits for the signed types), an integer scale
//! for each half of 16 (Q6_K's sub-blocks are 16 wide; 1 for the 32-weight
//! types) and a bias `c`, so that `w = d·s_h·q + c`. With the activation block
//! `x = dx·xq` and `sx = dx·Σ_group xq`:
//! `Σ w·x = Σ_blocks d·dx·Σ_halves s_h·Σ q·xq + Σ_groups c·sx`, the integer
//! sums exact over a whole block (llama.cpp's `ggml_vec_dot_q4_K_q8_K` and kin).

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::kernels::OutPtr;

/// Weights per decoded group (one integer scale per half of 16, one bias).
const QK: usize = 32;
/// Weights per k-quant block, and per activation block for the k-quants.
const QK_K: usize = 256;
/// Weight rows decoded together and multiplied against the same activations.
const ROWS: usize = 2;
/// Tokens multiplied against each weight load by the SIMD kernel.
const TOKENS: usize = 4;
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
    /// Weights per block (32, or 256 for the k-quants): also the activations' block.
    weights: usize,
    /// Whether the decoded integers are signed (`i8`); otherwise `u8` with the
    /// offset folded into the bias.
    signed: bool,
    /// Whether the bias is zero for every block (no `c·sx` term).
    unbiased: bool,
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
                decode,
            })
        };
        match dtype {
            GgmlDType::Q4_0 => f(18, QK, false, false, decode_q4_0),
            GgmlDType::Q4_1 => f(20, QK, false, false, decode_q4_1),
            GgmlDType::Q5_0 => f(22, QK, false, false, decode_q5_0),
            GgmlDType::Q5_1 => f(24, QK, false, false, decode_q5_1),
            GgmlDType::Q8_0 => f(34, QK, true, true, decode_q8_0),
            GgmlDType::Q4K => f(144, QK_K, false, false, decode_q4k),
            GgmlDType::Q5K => f(176, QK_K, false, false, decode_q5k),
            GgmlDType::Q6K => f(210, QK_K, true, true, decode_q6k),
            _ => None,
        }
    }

    /// Groups of 32 per block.
    fn groups(&self) -> usize {
        self.weights / QK
    }
}

/// One block decoded: `w[i] = d·s[i / 16]·q[i] + bias[i / 32]` for `i` in the
/// block (32 or 256 weights).
struct Decoded<'a> {
    q: &'a mut [u8],
    d: &'a mut f32,
    /// Two per group of 32: the first half's integer scale, then the second's.
    s: &'a mut [i16],
    bias: &'a mut [f32],
}

impl Decoded<'_> {
    /// Sets group `g` (32 weights): the integer scales of its halves and its bias.
    fn group(&mut self, g: usize, lo: i16, hi: i16, bias: f32) {
        self.s[2 * g] = lo;
        self.s[2 * g + 1] = hi;
        self.bias[g] = bias;
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Eight bytes as one little-endian word: the decoders work eight weights at a
/// time (decoding runs once per call for every weight, so it must be cheap
/// next to the multiply).
fn word(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("eight bytes"))
}

fn put(q: &mut [u8], at: usize, w: u64) {
    q[at..at + 8].copy_from_slice(&w.to_le_bytes());
}

const LOW_NIBBLES: u64 = 0x0F0F_0F0F_0F0F_0F0F;
const LOW_BITS: u64 = 0x0101_0101_0101_0101;

/// For each byte value: its bit `i` moved to bit 4 of byte `i` of a word (Q5 fifth bits).
const FIFTH_BITS: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 8 {
            table[b] |= (((b >> i) & 1) as u64) << (8 * i + 4);
            i += 1;
        }
        b += 1;
    }
    table
};

/// The 32 weights of a Q4/Q5 block of 32: weight `j < 16` the low nibble of
/// byte `j` of `qs`, `j + 16` its high nibble; `qh` (Q5) bit `j` the fifth bit.
fn nibbles(qs: &[u8], q: &mut [u8], qh: Option<&[u8]>) {
    for half in 0..2 {
        let w = word(&qs[8 * half..]);
        let (low, high) = (w & LOW_NIBBLES, (w >> 4) & LOW_NIBBLES);
        let fifth = |byte: usize| qh.map_or(0, |qh| FIFTH_BITS[qh[byte] as usize]);
        put(q, 8 * half, low | fifth(half));
        put(q, 16 + 8 * half, high | fifth(2 + half));
    }
}

/// The 32-weight types: `w = d·q + bias`.
fn block32(out: &mut Decoded, d: f32, bias: f32) {
    *out.d = d;
    out.group(0, 1, 1, bias);
}

fn decode_q4_0(b: &[u8], out: &mut Decoded) {
    let d = half_at(b, 0);
    nibbles(&b[2..18], out.q, None);
    block32(out, d, -8.0 * d);
}

fn decode_q4_1(b: &[u8], out: &mut Decoded) {
    nibbles(&b[4..20], out.q, None);
    block32(out, half_at(b, 0), half_at(b, 2));
}

fn decode_q5_0(b: &[u8], out: &mut Decoded) {
    let d = half_at(b, 0);
    nibbles(&b[6..22], out.q, Some(&b[2..6]));
    block32(out, d, -16.0 * d);
}

fn decode_q5_1(b: &[u8], out: &mut Decoded) {
    nibbles(&b[8..24], out.q, Some(&b[4..8]));
    block32(out, half_at(b, 0), half_at(b, 2));
}

fn decode_q8_0(b: &[u8], out: &mut Decoded) {
    out.q.copy_from_slice(&b[2..34]);
    block32(out, half_at(b, 0), 0.0);
}

/// Scale and min of sub-block `j` of a Q4_K/Q5_K block's 12 packed bytes
/// (6 bits each; ggml-quants.c `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K and Q5_K: 8 sub-blocks of 32, sub-block `2c` the low nibbles of
/// bytes `32c..32c+32`, `2c+1` their high nibbles; Q5_K adds bit `2c` or
/// `2c+1` of `qh[l]` as the fifth bit of weight `l`.
fn decode_k4(b: &[u8], qs: &[u8], qh: Option<&[u8]>, out: &mut Decoded) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    *out.d = d;
    let scales = &b[4..16];
    for sub in 0..8 {
        for at in (0..32).step_by(8) {
            let w = word(&qs[32 * (sub / 2) + at..]) >> (4 * (sub % 2));
            let fifth = qh.map_or(0, |qh| ((word(&qh[at..]) >> sub) & LOW_BITS) << 4);
            put(out.q, 32 * sub + at, (w & LOW_NIBBLES) | fifth);
        }
        let (sc, m) = scale_min_k4(sub, scales);
        out.group(sub, sc.into(), sc.into(), -dmin * m as f32);
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
    *out.d = half_at(b, 208);
    for h in 0..2 {
        for s in 0..4 {
            let group = 4 * h + s;
            for l in 0..32 {
                let low = ql[64 * h + l + 32 * (s % 2)];
                let low = if s < 2 { low & 0x0F } else { low >> 4 };
                let top = (qh[32 * h + l] >> (2 * s)) & 3;
                out.q[32 * group + l] = ((low | (top << 4)) as i8 - 32) as u8;
            }
            let scale = |i: usize| sc[8 * h + 2 * s + i] as i8 as i16;
            out.group(group, scale(0), scale(1), 0.0);
        }
    }
}

/// `v` rounded half to even, for `|v| < 2²²`: ggml-quants.c's `nearest_int`
/// (adding 1.5·2²³ leaves the integer in the mantissa), inline where
/// `f32::round_ties_even` is a libm call without SSE4.1.
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Activations quantized to 8-bit blocks: `x ≈ d·q` per block (32 or 256
/// weights), and `sum = d·Σq` per group of 32 (the bias's factor).
struct QuantizedRows {
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<f32>,
}

/// The activations in blocks of `block` (32 or 256) as llama.cpp quantizes
/// them for that weight type on x86 (ggml-cpu/arch/x86/quants.c):
/// - 32, `quantize_row_q8_0`: `q = nearest(x·127/max|x|)`, `d = max|x|/127`
///   stored as f16 (the products then match llama.cpp's own);
/// - 256, `quantize_row_q8_K`: `iscale = -127/x*` for the `x*` of largest
///   magnitude, `q = min(127, nearest(iscale·x))`, `d = 1/iscale` in f32.
///
/// Blocks are independent, so they are quantized in parallel.
fn quantize_rows(x: &[f32], block: usize) -> QuantizedRows {
    let mut out = QuantizedRows {
        q: vec![0; x.len()],
        d: vec![0.0; x.len() / block],
        sum: vec![0.0; x.len() / QK],
    };
    x.par_chunks_exact(block)
        .zip(out.q.par_chunks_exact_mut(block))
        .zip(out.d.par_iter_mut())
        .zip(out.sum.par_chunks_exact_mut(block / QK))
        .with_min_len(64)
        .for_each(|(((xs, qs), d), sums)| {
            // The first value of the largest magnitude (its sign matters for
            // the k-quants), found in two passes that vectorize.
            let largest = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            if largest == 0.0 {
                return;
            }
            let extreme = xs
                .iter()
                .copied()
                .find(|v| v.abs() == largest)
                .unwrap_or(largest);
            let scale = if block == QK {
                127.0 / extreme.abs()
            } else {
                -127.0 / extreme
            };
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = nearest_int(scale * v).min(127) as i8;
            }
            *d = if block == QK {
                f16::from_f32(extreme.abs() / 127.0).to_f32()
            } else {
                1.0 / scale
            };
            for (sum, qs) in sums.iter_mut().zip(qs.chunks_exact(QK)) {
                *sum = *d * qs.iter().map(|&q| q as i32).sum::<i32>() as f32;
            }
        });
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
    if m == 0 || n == 0 || k == 0 {
        // An empty sum: the kernels below divide by these.
        out.fill(0.0);
        return Ok(());
    }
    multiply(Path::detect(&format), format, blocks, (m, n, k), x, out);
    Ok(())
}

/// [`matmul`] on a given path, on buffers [`matmul`] checked.
fn multiply(
    path: Path,
    format: Format,
    blocks: &[u8],
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    out: &mut [f32],
) {
    let row_bytes = k / format.weights * format.bytes;
    let xq = quantize_rows(x, format.weights);
    debug_assert_eq!(xq.q.len(), m * k);
    // Each task writes its own columns (weight rows) of `out`, every token's.
    let out = OutPtr::new(out);
    let tiles = (0..n.div_ceil(TASK_ROWS)).into_par_iter().map(|task| {
        let first = task * TASK_ROWS;
        let rows = TASK_ROWS.min(n - first);
        let weights = &blocks[first * row_bytes..(first + rows) * row_bytes];
        (first, weights, rows)
    });
    let kernel = match path {
        #[cfg(target_arch = "x86_64")]
        Path::Vnni {
            signed,
            unit,
            scaled,
        } => {
            let tokens = vnni::TokenBlocks::of(&xq, k, signed);
            tiles.for_each(|(first, weights, rows)| {
                let tile = Tile::decode(format, weights, rows, k, vnni::ROWS);
                // Safety: VNNI was detected; this tile alone writes columns
                // `first..first + rows` of the `[m, n]` output.
                unsafe { vnni::multiply(&tile, &tokens, (signed, unit, scaled), out.at(first), n) };
            });
            return;
        }
        Path::RowGroups(kernel) => kernel,
    };
    tiles.for_each(|(first, weights, rows)| {
        let tile = Tile::decode(format, weights, rows, k, ROWS);
        tile.multiply(&xq, &kernel, &out, (first, n));
    });
}

/// A task's weight rows decoded, padded with zero rows to a multiple of the
/// kernel's rows ([`ROWS`], [`vnni::ROWS`]).
struct Tile {
    rows: usize,
    k: usize,
    q: Vec<u8>,
    /// Per row and block.
    d: Vec<f32>,
    /// Per row and half of 16.
    s: Vec<i16>,
    /// The bias per group of 32 as `[groups, TASK_ROWS]` (zero past `rows`),
    /// so that one token's bias terms for all the tile's rows are a few SIMD
    /// multiply-adds per group; empty for the types without a bias.
    bias_by_group: Vec<f32>,
}

impl Tile {
    fn decode(format: Format, weights: &[u8], rows: usize, k: usize, pad_to: usize) -> Tile {
        let padded = rows.div_ceil(pad_to) * pad_to;
        let groups = k / QK;
        let mut tile = Tile {
            rows,
            k,
            q: vec![0; padded * k],
            d: vec![0.0; padded * k / format.weights],
            s: vec![0; padded * groups * 2],
            bias_by_group: Vec::new(),
        };
        let mut bias = vec![0.0; padded * groups];
        let per_block = format.groups();
        let targets = tile
            .q
            .chunks_exact_mut(format.weights)
            .zip(&mut tile.d)
            .zip(tile.s.chunks_exact_mut(2 * per_block))
            .zip(bias.chunks_exact_mut(per_block));
        for (block, (((q, d), s), bias)) in weights.chunks_exact(format.bytes).zip(targets) {
            (format.decode)(block, &mut Decoded { q, d, s, bias });
        }
        if !format.unbiased {
            tile.bias_by_group = vec![0.0; groups * TASK_ROWS];
            for (r, row) in bias.chunks_exact(groups).take(rows).enumerate() {
                for (g, &c) in row.iter().enumerate() {
                    tile.bias_by_group[g * TASK_ROWS + r] = c;
                }
            }
        }
        tile
    }

    /// Rows `r0..r0 + ROWS`.
    fn row_group(&self, r0: usize) -> RowGroup<'_> {
        let k = self.k;
        let blocks = self.d.len() * k / self.q.len();
        RowGroup {
            q: &self.q[r0 * k..(r0 + ROWS) * k],
            d: &self.d[r0 * blocks..(r0 + ROWS) * blocks],
            s: &self.s[r0 * k / 16..(r0 + ROWS) * k / 16],
            k,
        }
    }

    /// Writes the output of the tile's row `r` (weight row `first + r`) for
    /// token `t` at `out[t·n + first + r]`, columns no other tile writes.
    fn multiply(
        &self,
        xq: &QuantizedRows,
        kernel: &Kernel,
        out: &OutPtr,
        (first_row, n): (usize, usize),
    ) {
        let k = self.k;
        let m = xq.q.len() / k;
        let (blocks, groups) = (xq.d.len() / m, k / QK);
        for first in (0..m).step_by(TOKEN_BLOCK) {
            let tokens = first..m.min(first + TOKEN_BLOCK);
            for r0 in (0..self.rows).step_by(ROWS) {
                let rows = self.row_group(r0);
                let token = |t: usize| Token {
                    q: &xq.q[t * k..(t + 1) * k],
                    d: &xq.d[t * blocks..(t + 1) * blocks],
                };
                let write = |t: usize, dots: [f32; ROWS]| {
                    for (i, dot) in dots.iter().enumerate().take(self.rows - r0) {
                        // Safety: this tile alone writes columns `first_row..first_row + rows`.
                        unsafe { *out.at(t * n + first_row + r0 + i) = *dot };
                    }
                };
                let mut t = tokens.start;
                while t + TOKENS <= tokens.end {
                    let xs: [Token; TOKENS] = std::array::from_fn(|i| token(t + i));
                    let dots: [[f32; ROWS]; TOKENS] =
                        kernel.dots(&rows, std::array::from_fn(|i| &xs[i]));
                    for (i, dots) in dots.into_iter().enumerate() {
                        write(t + i, dots);
                    }
                    t += TOKENS;
                }
                for t in t..tokens.end {
                    let [dots] = kernel.dots(&rows, [&token(t)]);
                    write(t, dots);
                }
            }
            if !self.bias_by_group.is_empty() {
                for first in tokens.clone().step_by(TOKENS) {
                    let count = TOKENS.min(tokens.end - first);
                    let sums = &xq.sum[first * groups..(first + count) * groups];
                    let bias = kernel.bias_terms(&self.bias_by_group, sums);
                    for (t, bias) in (first..first + count).zip(bias) {
                        for (r, c) in bias.iter().enumerate().take(self.rows) {
                            // Safety: as above.
                            unsafe { *out.at(t * n + first_row + r) += c };
                        }
                    }
                }
            }
        }
    }
}

/// [`ROWS`] decoded weight rows.
struct RowGroup<'a> {
    q: &'a [u8],
    /// Per row and block.
    d: &'a [f32],
    /// Per row and half of 16.
    s: &'a [i16],
    k: usize,
}

impl RowGroup<'_> {
    fn blocks(&self) -> usize {
        self.d.len() / ROWS
    }
}

/// One token's quantized activations.
struct Token<'a> {
    q: &'a [i8],
    /// Per block.
    d: &'a [f32],
}

/// How [`multiply`] runs a call: the VNNI kernel over whole tiles, or a
/// kernel over [`ROWS`] rows at a time. Chosen once per call.
enum Path {
    /// AVX-512 VNNI ([`vnni`]), sixteen tokens to a register.
    #[cfg(target_arch = "x86_64")]
    Vnni {
        signed: bool,
        /// Weights per integer scale: 16 (Q6_K), 32 (Q4_K, Q5_K), or the
        /// 32-weight types' block.
        unit: usize,
        /// Whether the units have integer scales (the k-quants).
        scaled: bool,
    },
    RowGroups(Kernel),
}

impl Path {
    /// The fastest path this CPU runs for `format`.
    fn detect(format: &Format) -> Path {
        Path::available(format).remove(0)
    }

    /// Every path this CPU runs for `format`, fastest first (the tests check each).
    fn available(format: &Format) -> Vec<Path> {
        let mut paths = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if vnni::detected() {
            let k_quant = format.weights == QK_K;
            paths.push(Path::Vnni {
                signed: format.signed,
                unit: if format.signed && k_quant { 16 } else { QK },
                scaled: k_quant,
            });
        }
        paths.push(Path::RowGroups(Kernel::detect(format)));
        #[cfg(target_arch = "x86_64")]
        if let Path::RowGroups(Kernel::Avx2 { .. }) = paths[paths.len() - 1] {
            paths.push(Path::RowGroups(Kernel::Portable {
                signed: format.signed,
            }));
        }
        paths
    }

    /// The path's name, for test messages.
    #[cfg(test)]
    fn name(&self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Vnni { .. } => "AVX-512 VNNI",
            #[cfg(target_arch = "x86_64")]
            Path::RowGroups(Kernel::Avx2 { .. }) => "AVX2",
            Path::RowGroups(Kernel::Portable { .. }) => "portable",
        }
    }
}

/// The dot-product kernel over [`ROWS`] decoded rows for one decoded form.
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2 {
        signed: bool,
        k_quant: bool,
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
            let k_quant = format.weights == QK_K;
            return Kernel::Avx2 { signed, k_quant };
        }
        Kernel::Portable { signed }
    }

    /// `Σ_blocks d·dx·Σ_halves s_h·Σ q·xq` for each of the [`ROWS`] rows and
    /// each of the `T` tokens (the AVX2 kernel reuses each weight load `T` times).
    fn dots<const T: usize>(&self, rows: &RowGroup, xs: [&Token; T]) -> [[f32; ROWS]; T] {
        match *self {
            #[cfg(target_arch = "x86_64")]
            // Safety: AVX2 and FMA were detected; `RowGroup` and `Token` are
            // sliced to the extents `avx2::dots` reads (`Tile::row_group`, `Tile::multiply`).
            Kernel::Avx2 { signed, k_quant } => unsafe {
                match (signed, k_quant) {
                    (false, false) => avx2::dots::<false, false, T>(rows, xs),
                    (false, true) => avx2::dots::<false, true, T>(rows, xs),
                    (true, false) => avx2::dots::<true, false, T>(rows, xs),
                    (true, true) => avx2::dots::<true, true, T>(rows, xs),
                }
            },
            Kernel::Portable { signed } => xs.map(|x| dots_portable(rows, x, signed)),
        }
    }

    /// [`bias_terms_portable`], with AVX2 where the dot products have it.
    fn bias_terms(&self, bias: &[f32], sums: &[f32]) -> [[f32; TASK_ROWS]; TOKENS] {
        match self {
            #[cfg(target_arch = "x86_64")]
            // Safety: AVX2 and FMA were detected.
            Kernel::Avx2 { .. } => unsafe { avx2::bias_terms(bias, sums) },
            Kernel::Portable { .. } => bias_terms_portable(bias, sums),
        }
    }
}

/// `Σ_g c[g, r]·sx_t[g]` for every row `r` of a tile's `bias: [groups, TASK_ROWS]`
/// and each token `t` of up to [`TOKENS`] whose per-group sums `sums` holds
/// one after another, summed over the groups in order.
fn bias_terms_portable(bias: &[f32], sums: &[f32]) -> [[f32; TASK_ROWS]; TOKENS] {
    let groups = bias.len() / TASK_ROWS;
    let mut acc = [[0f32; TASK_ROWS]; TOKENS];
    for (g, c) in bias.chunks_exact(TASK_ROWS).enumerate() {
        for (acc, sum) in acc.iter_mut().zip(sums.chunks_exact(groups)) {
            for (a, c) in acc.iter_mut().zip(c) {
                *a += c * sum[g];
            }
        }
    }
    acc
}

fn dots_portable(rows: &RowGroup, x: &Token, signed: bool) -> [f32; ROWS] {
    let k = rows.k;
    let blocks = rows.blocks();
    let block = k / blocks;
    std::array::from_fn(|r| {
        let q = &rows.q[r * k..(r + 1) * k];
        let s = &rows.s[r * k / 16..(r + 1) * k / 16];
        let mut total = 0f32;
        for b in 0..blocks {
            let integer: i32 = (b * block / 16..(b + 1) * block / 16)
                .map(|h| {
                    let dot: i32 = (16 * h..16 * h + 16)
                        .map(|i| {
                            let w = if signed {
                                q[i] as i8 as i32
                            } else {
                                q[i] as i32
                            };
                            w * x.q[i] as i32
                        })
                        .sum();
                    s[h] as i32 * dot
                })
                .sum();
            total += rows.d[r * blocks + b] * x.d[b] * integer as f32;
        }
        total
    })
}

/// The AVX-512 VNNI kernel. Sixteen tokens' activations are interleaved
/// four bytes at a time, once per call, so that one 64-byte load holds four
/// activations of each token; four bytes of one weight row, broadcast, then
/// meet them in one `vpdpbusd`, which adds each token's four products into
/// that token's i32 lane. The weight rows stay as [`Tile`] decodes them (no
/// relayout per call), and sixteen tokens' sums sit in one register: a block's
/// float scale and a group's bias term are one multiply-add for all of them.
/// `vpdpbusd` multiplies unsigned bytes by signed ones: the unsigned weight
/// types' `q` by the activations, or for the signed types (Q8_0, Q6_K) the
/// activations shifted by 128 by the weights, less `128·Σq` per unit.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{QuantizedRows, Tile, QK, TASK_ROWS};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Weight rows per kernel call (each with one accumulator of 16 tokens).
    pub(super) const ROWS: usize = 8;
    /// Tokens per interleaved block: one register's sixteen i32 lanes.
    const TOKENS: usize = 16;

    pub(super) fn detected() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    }

    /// The activations in blocks of [`TOKENS`] tokens (the last padded with
    /// zeros), each block `[k/4, 16, 4]` bytes: bytes `4j..4j+4` of its token
    /// `t` at `64j + 4t` (`q + 128` for signed weights), with its scales
    /// `[blocks, 16]` and its bias sums `[groups, 16]`.
    pub(super) struct TokenBlocks {
        m: usize,
        q: Vec<u8>,
        d: Vec<f32>,
        sum: Vec<f32>,
    }

    impl TokenBlocks {
        pub(super) fn of(xq: &QuantizedRows, k: usize, shifted: bool) -> TokenBlocks {
            let m = xq.q.len() / k;
            let count = m.div_ceil(TOKENS);
            let (blocks, groups) = (xq.d.len() / m, k / QK);
            let mut out = TokenBlocks {
                m,
                q: vec![0; count * TOKENS * k],
                d: vec![0.0; count * TOKENS * blocks],
                sum: vec![0.0; count * TOKENS * groups],
            };
            let offset: u32 = if shifted { 0x8080_8080 } else { 0 };
            out.q
                .par_chunks_exact_mut(TOKENS * k)
                .zip(out.d.par_chunks_exact_mut(TOKENS * blocks))
                .zip(out.sum.par_chunks_exact_mut(TOKENS * groups))
                .enumerate()
                .for_each(|(c, ((q, d), sum))| {
                    for t in 0..TOKENS.min(m - c * TOKENS) {
                        let token = c * TOKENS + t;
                        let x = &xq.q[token * k..(token + 1) * k];
                        for (j, four) in x.chunks_exact(4).enumerate() {
                            let four = [four[0], four[1], four[2], four[3]].map(|b| b as u8);
                            let word = u32::from_le_bytes(four) ^ offset;
                            q[64 * j + 4 * t..64 * j + 4 * t + 4]
                                .copy_from_slice(&word.to_le_bytes());
                        }
                        for b in 0..blocks {
                            d[TOKENS * b + t] = xq.d[token * blocks + b];
                        }
                        for g in 0..groups {
                            sum[TOKENS * g + t] = xq.sum[token * groups + g];
                        }
                    }
                });
            out
        }
    }

    /// `out[t·n + r] = Σ_blocks d·dx·Σ_units s·Σ q·xq (+ Σ_groups c·sx)` for
    /// every token `t` and each of the tile's rows `r` (`out` points at the
    /// tile's first column); `unit` is the weights per integer scale (`scaled`:
    /// the k-quants' sub-blocks; otherwise a 32-weight block), and `signed`
    /// says the weights are (and `tokens` shifted).
    ///
    /// # Safety
    /// The CPU has the features [`detected`] checks; the tile's rows are
    /// padded to [`ROWS`]; `out` is valid for `m·n` floats, and no other
    /// thread writes the tile's columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn multiply(
        tile: &Tile,
        tokens: &TokenBlocks,
        (signed, unit, scaled): (bool, usize, bool),
        out: *mut f32,
        n: usize,
    ) {
        let k = tile.k;
        let padded = tile.q.len() / k;
        let units = k / unit;
        // `-128·Σ_unit q` per row and unit, for the shifted activations.
        let correction: Vec<i32> = if signed {
            tile.q
                .chunks_exact(unit)
                .map(|q| -128 * q.iter().map(|&q| q as i8 as i32).sum::<i32>())
                .collect()
        } else {
            Vec::new()
        };
        let rows = Rows {
            k,
            unit,
            units,
            blocks: tile.d.len() / padded,
            correction: &correction,
            tile,
        };
        for c in 0..tokens.m.div_ceil(TOKENS) {
            let first = c * TOKENS;
            let live = TOKENS.min(tokens.m - first);
            let block = Block {
                q: &tokens.q[c * TOKENS * k..],
                d: &tokens.d[c * TOKENS * rows.blocks..],
                sum: &tokens.sum[c * TOKENS * (k / QK)..],
            };
            for r0 in (0..tile.rows).step_by(ROWS) {
                let acc = match (signed, scaled, tile.bias_by_group.is_empty()) {
                    (false, false, false) => rows.dots::<false, false, true>(r0, &block),
                    (false, false, true) => rows.dots::<false, false, false>(r0, &block),
                    (false, true, false) => rows.dots::<false, true, true>(r0, &block),
                    (false, true, true) => rows.dots::<false, true, false>(r0, &block),
                    (true, false, _) => rows.dots::<true, false, false>(r0, &block),
                    (true, true, _) => rows.dots::<true, true, false>(r0, &block),
                };
                let rows = ((1u32 << (tile.rows - r0).min(ROWS)) - 1) as __mmask8;
                for half in 0..2 {
                    for (j, column) in by_token(&acc, half).into_iter().enumerate() {
                        let t = TOKENS / 2 * half + j;
                        if t < live {
                            _mm256_mask_storeu_ps(out.add((first + t) * n + r0), rows, column);
                        }
                    }
                }
            }
        }
    }

    /// Tokens `8h..8h + 8` of the eight rows' accumulators, by token: element
    /// `r` of the result's `j` is row `r`'s sum for token `8h + j` (the
    /// classic 8×8 transpose: unpack, shuffle, swap 128-bit lanes), so that a
    /// token's eight outputs, adjacent in `out`, are one store.
    ///
    /// Loops, not `array::from_fn`: a closure does not inherit the target
    /// features, and its intrinsics would be left as calls.
    #[target_feature(enable = "avx512f")]
    unsafe fn by_token(acc: &[__m512; ROWS], h: usize) -> [__m256; ROWS] {
        let mut r = [_mm256_setzero_ps(); ROWS];
        for (r, acc) in r.iter_mut().zip(acc) {
            let wide = _mm512_castps_pd(*acc);
            *r = _mm256_castpd_ps(if h == 0 {
                _mm512_castpd512_pd256(wide)
            } else {
                _mm512_extractf64x4_pd::<1>(wide)
            });
        }
        // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved (low, high pairs).
        let mut t = [_mm256_setzero_ps(); ROWS];
        for i in 0..ROWS / 2 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4q + 2p + s]: rows 4q..4q+4 of tokens 2p+s and 2p+s+4.
        let mut u = [_mm256_setzero_ps(); ROWS];
        for q in 0..2 {
            for p in 0..2 {
                let (a, b) = (t[4 * q + p], t[4 * q + p + 2]);
                u[4 * q + 2 * p] = _mm256_shuffle_ps::<0x44>(a, b);
                u[4 * q + 2 * p + 1] = _mm256_shuffle_ps::<0xEE>(a, b);
            }
        }
        let mut by_token = [_mm256_setzero_ps(); ROWS];
        for j in 0..4 {
            by_token[j] = _mm256_permute2f128_ps::<0x20>(u[j], u[j + 4]);
            by_token[j + 4] = _mm256_permute2f128_ps::<0x31>(u[j], u[j + 4]);
        }
        by_token
    }

    /// A tile's decoded rows, seen by the kernel.
    struct Rows<'a> {
        k: usize,
        unit: usize,
        units: usize,
        blocks: usize,
        correction: &'a [i32],
        tile: &'a Tile,
    }

    /// One interleaved block of [`TOKENS`] tokens.
    struct Block<'a> {
        q: &'a [u8],
        d: &'a [f32],
        sum: &'a [f32],
    }

    impl Rows<'_> {
        /// Rows `r0..r0 + ROWS` by the block's sixteen tokens, one register per row.
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn dots<const SIGNED: bool, const SCALED: bool, const BIASED: bool>(
            &self,
            r0: usize,
            x: &Block,
        ) -> [__m512; ROWS] {
            let (k, tile) = (self.k, self.tile);
            let units_per_block = self.units / self.blocks;
            let steps = self.unit / 4;
            let q = tile.q.as_ptr().add(r0 * k);
            let xq = x.q.as_ptr();
            let mut acc = [_mm512_setzero_ps(); ROWS];
            for b in 0..self.blocks {
                let mut block = [_mm512_setzero_si512(); ROWS];
                for u in b * units_per_block..(b + 1) * units_per_block {
                    let mut sum = [_mm512_setzero_si512(); ROWS];
                    if SIGNED {
                        for (r, sum) in sum.iter_mut().enumerate() {
                            let c = *self.correction.get_unchecked((r0 + r) * self.units + u);
                            *sum = _mm512_set1_epi32(c);
                        }
                    }
                    for j in u * steps..(u + 1) * steps {
                        let xv = _mm512_loadu_si512(xq.add(64 * j) as *const _);
                        for (r, sum) in sum.iter_mut().enumerate() {
                            let w = (q.add(r * k + 4 * j) as *const i32).read_unaligned();
                            let w = _mm512_set1_epi32(w);
                            *sum = if SIGNED {
                                _mm512_dpbusd_epi32(*sum, xv, w)
                            } else {
                                _mm512_dpbusd_epi32(*sum, w, xv)
                            };
                        }
                    }
                    if SCALED {
                        for (r, (block, sum)) in block.iter_mut().zip(sum).enumerate() {
                            let s = *tile.s.get_unchecked((r0 + r) * k / 16 + u * self.unit / 16);
                            let s = _mm512_set1_epi32(s.into());
                            *block = _mm512_add_epi32(*block, _mm512_mullo_epi32(sum, s));
                        }
                    } else {
                        block = sum;
                    }
                }
                let dx = _mm512_loadu_ps(x.d.as_ptr().add(TOKENS * b));
                for (r, (acc, block)) in acc.iter_mut().zip(block).enumerate() {
                    let d = _mm512_mul_ps(
                        dx,
                        _mm512_set1_ps(*tile.d.get_unchecked((r0 + r) * self.blocks + b)),
                    );
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(block), d, *acc);
                }
            }
            // The bias terms summed apart and added last, as llama.cpp does
            // (`ggml_vec_dot_q4_1_q8_1`, `_q4_K_q8_K`): they nearly cancel the
            // dot products (Q4_1's min is about -8d), so the order of the sums
            // decides the rounding, which the next layer's 8-bit activations
            // then amplify (0.030 vs 0.054 rel. L2 to llama.cpp's logits on SmolLM2).
            if BIASED {
                // Each row's sum runs over the groups in order; a group's
                // sums are loaded once for the eight rows.
                let mut bias = [_mm512_setzero_ps(); ROWS];
                for g in 0..self.k / QK {
                    let sx = _mm512_loadu_ps(x.sum.as_ptr().add(TOKENS * g));
                    let c = tile.bias_by_group.as_ptr().add(g * TASK_ROWS + r0);
                    for (r, bias) in bias.iter_mut().enumerate() {
                        *bias = _mm512_fmadd_ps(_mm512_set1_ps(*c.add(r)), sx, *bias);
                    }
                }
                for (acc, bias) in acc.iter_mut().zip(bias) {
                    *acc = _mm512_add_ps(*acc, bias);
                }
            }
            acc
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{RowGroup, Token, QK, ROWS, TASK_ROWS, TOKENS};
    use std::arch::x86_64::*;

    /// [`super::Kernel::dots`] with AVX2: per group of 32, `maddubs` of the
    /// unsigned weights (or `|w|`, with `w`'s sign moved onto `x`, for the
    /// signed types) by the activations into sixteen i16 pair sums, `madd` by
    /// the halves' integer scales (lanes 0–7 the first half of 16, 8–15 the
    /// second; ones for the 32-weight types) into eight i32 lanes, summed over
    /// the block's groups (8 for the k-quants) and converted once per block.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `rows.q` holds `ROWS·k` bytes, `rows.s`
    /// `ROWS·k/16` scales, `rows.d` `ROWS·blocks` floats, `x.q` `k` bytes and
    /// `x.d` `blocks` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots<const SIGNED: bool, const K_QUANT: bool, const T: usize>(
        rows: &RowGroup,
        xs: [&Token; T],
    ) -> [[f32; ROWS]; T] {
        let k = rows.k;
        let blocks = rows.blocks();
        let per_block = k / blocks / QK;
        debug_assert!(rows.q.len() >= ROWS * k && rows.s.len() >= ROWS * k / 16);
        debug_assert!(xs.iter().all(|x| x.q.len() >= k && x.d.len() >= blocks));
        let ones = _mm256_set1_epi16(1);
        // Each 128-bit lane takes its half's scale from a broadcast pair.
        let halves = _mm256_setr_epi8(
            0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, //
            2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
        );
        let mut acc = [[_mm256_setzero_ps(); ROWS]; T];
        for b in 0..blocks {
            let mut sums = [[_mm256_setzero_si256(); ROWS]; T];
            for g in b * per_block..(b + 1) * per_block {
                // Loops, not closures: a closure does not inherit the target
                // features, and its intrinsics were left as calls.
                let mut xv = [_mm256_setzero_si256(); T];
                for (xv, x) in xv.iter_mut().zip(xs) {
                    *xv = _mm256_loadu_si256(x.q.as_ptr().add(QK * g) as *const __m256i);
                }
                for r in 0..ROWS {
                    let w =
                        _mm256_loadu_si256(rows.q.as_ptr().add(r * k + QK * g) as *const __m256i);
                    let scale = if K_QUANT {
                        let pair = (rows.s.as_ptr().add(r * k / 16 + 2 * g) as *const i32)
                            .read_unaligned();
                        _mm256_shuffle_epi8(_mm256_set1_epi32(pair), halves)
                    } else {
                        ones
                    };
                    let magnitude = if SIGNED { _mm256_sign_epi8(w, w) } else { w };
                    for (sums, xv) in sums.iter_mut().zip(xv) {
                        let pairs = if SIGNED {
                            _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, w))
                        } else {
                            _mm256_maddubs_epi16(w, xv)
                        };
                        sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(pairs, scale));
                    }
                }
            }
            for ((acc, sums), x) in acc.iter_mut().zip(sums).zip(xs) {
                let dx = *x.d.get_unchecked(b);
                for (r, (acc, sum)) in acc.iter_mut().zip(sums).enumerate() {
                    let d = _mm256_set1_ps(*rows.d.get_unchecked(r * blocks + b) * dx);
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, *acc);
                }
            }
        }
        let mut out = [[0f32; ROWS]; T];
        for (out, acc) in out.iter_mut().zip(acc) {
            for (out, acc) in out.iter_mut().zip(acc) {
                *out = hsum(acc);
            }
        }
        out
    }

    /// [`super::bias_terms_portable`] with the sixteen rows in two registers
    /// per token and the tokens' sums independent.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bias_terms(bias: &[f32], sums: &[f32]) -> [[f32; TASK_ROWS]; TOKENS] {
        const HALVES: usize = TASK_ROWS / 8;
        let groups = bias.len() / TASK_ROWS;
        let tokens = sums.len() / groups;
        assert!(tokens <= TOKENS && bias.len() == groups * TASK_ROWS);
        let mut acc = [[_mm256_setzero_ps(); HALVES]; TOKENS];
        for g in 0..groups {
            let c: [__m256; HALVES] = [
                _mm256_loadu_ps(bias.as_ptr().add(g * TASK_ROWS)),
                _mm256_loadu_ps(bias.as_ptr().add(g * TASK_ROWS + 8)),
            ];
            for (t, acc) in acc.iter_mut().enumerate().take(tokens) {
                let s = _mm256_set1_ps(*sums.get_unchecked(t * groups + g));
                for (acc, c) in acc.iter_mut().zip(c) {
                    *acc = _mm256_fmadd_ps(c, s, *acc);
                }
            }
        }
        let mut out = [[0f32; TASK_ROWS]; TOKENS];
        for (out, acc) in out.iter_mut().zip(acc) {
            for (half, acc) in acc.into_iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * half), acc);
            }
        }
        out
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

    /// The activations as llama.cpp rounds them on x86 for a weight type with
    /// blocks of `block`, written out from its definitions, in f64:
    /// `quantize_row_q8_0` (`id = 127/max|x|`, `round_nearest(x·id)·f16(max|x|/127)`)
    /// or `quantize_row_q8_K` (`iscale = -127/x*`, `min(127, nearest_int(iscale·x))/iscale`).
    fn rounded_activations(x: &[f32], block: usize) -> Vec<f64> {
        x.chunks(block)
            .flat_map(|xs| {
                let mut extreme = 0f32;
                for &v in xs {
                    if v.abs() > extreme.abs() {
                        extreme = v;
                    }
                }
                xs.iter().map(move |&v| {
                    if extreme == 0.0 {
                        0.0
                    } else if block == QK {
                        let id = 127.0 / extreme.abs();
                        let d = f16::from_f32(extreme.abs() / 127.0).to_f32();
                        (v * id).round_ties_even() as f64 * d as f64
                    } else {
                        let iscale = -127.0 / extreme;
                        let q = (iscale * v).round_ties_even().min(127.0);
                        q as f64 * (1.0 / iscale) as f64
                    }
                })
            })
            .collect()
    }

    fn check(dtype: GgmlDType, m: usize, n: usize, k: usize) {
        let (q, w) = quantized(dtype, n, k);
        let x = random(m * k, 11);
        let bytes = q.data().unwrap();
        let format = Format::of(dtype).unwrap();
        let xr = rounded_activations(&x, format.weights);
        // `matmul` (the fastest kernel), then every kernel this CPU has.
        let mut out = vec![0f32; m * n];
        matmul(dtype, &bytes, (m, n, k), &x, &mut out).unwrap();
        let mut outs = vec![("matmul".to_string(), out)];
        for path in Path::available(&format) {
            let mut out = vec![0f32; m * n];
            let name = path.name().to_string();
            multiply(path, format, &bytes, (m, n, k), &x, &mut out);
            outs.push((name, out));
        }
        for (kernel, out) in outs {
            for t in 0..m {
                for r in 0..n {
                    let expect: f64 = (0..k).map(|i| w[r * k + i] as f64 * xr[t * k + i]).sum();
                    let scale: f64 = (0..k)
                        .map(|i| (w[r * k + i] as f64 * xr[t * k + i]).abs())
                        .sum();
                    let got = out[t * n + r] as f64;
                    assert!(
                        (got - expect).abs() <= 2e-6 * scale.max(1e-6),
                        "{dtype:?} {kernel} [{m},{k}]x[{n},{k}] token {t} row {r}: {got} vs {expect}"
                    );
                }
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
            let tile = Tile::decode(format, &bytes, ROWS, k, ROWS);
            let xq = quantize_rows(&random(k, 3), format.weights);
            let rows = tile.row_group(0);
            let x = Token { q: &xq.q, d: &xq.d };
            let [simd] = Kernel::detect(&format).dots(&rows, [&x]);
            let [portable] = Kernel::Portable {
                signed: format.signed,
            }
            .dots(&rows, [&x]);
            for (a, b) in simd.iter().zip(portable) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn the_portable_and_simd_bias_terms_agree() {
        let format = Format::of(GgmlDType::Q4_1).unwrap();
        let groups = 9;
        let bias = random(groups * TASK_ROWS, 5);
        for tokens in 1..=TOKENS {
            let sums = random(tokens * groups, 6);
            let simd = Kernel::detect(&format).bias_terms(&bias, &sums);
            let portable = bias_terms_portable(&bias, &sums);
            for (t, (a, b)) in simd.iter().zip(&portable).enumerate().take(tokens) {
                for (r, (a, b)) in a.iter().zip(b).enumerate() {
                    let expect: f32 = (0..groups)
                        .map(|g| bias[g * TASK_ROWS + r] * sums[t * groups + g])
                        .sum();
                    assert!(
                        (a - b).abs() <= 1e-5 && (b - expect).abs() <= 1e-5,
                        "{t} {r}: {a} {b} {expect}"
                    );
                }
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
        // Empty shapes are an empty product, not a division by zero.
        let mut out = vec![1f32; 2];
        matmul(GgmlDType::Q4_0, &[], (2, 1, 0), &[], &mut out).unwrap();
        assert_eq!(out, [0.0, 0.0]);
        matmul(GgmlDType::Q4_0, &bytes, (0, 2, 64), &[], &mut []).unwrap();
    }
}
