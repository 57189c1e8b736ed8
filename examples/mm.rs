use candle_core::{Device, Tensor};
use std::time::Instant;
struct P(*mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}
impl P {
    fn at(&self, o: usize) -> *mut f32 {
        unsafe { self.0.add(o) }
    }
}
fn split_mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, parts: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    let p = P(c.as_mut_ptr());
    let cols = n.div_ceil(parts);
    use rayon::prelude::*;
    (0..parts).into_par_iter().for_each(|i| {
        let c0 = i * cols;
        let nc = cols.min(n - c0);
        unsafe {
            gemm::gemm(
                m,
                nc,
                k,
                p.at(c0),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr().add(c0),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    c
}
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (256usize, 576usize, 3072usize),
        (256, 1536, 576),
        (256, 576, 960),
        (256, 576, 576),
        (1024, 576, 3072),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        let reps = 20;
        let _ = a.matmul(&b)?;
        let t = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b)?;
        }
        let s1 = t.elapsed().as_secs_f64() / reps as f64;
        let av = a.flatten_all()?.to_vec1::<f32>()?;
        let bv = b.flatten_all()?.to_vec1::<f32>()?;
        let _ = split_mm(&av, &bv, m, k, n, 2);
        let mut res = vec![];
        for parts in [2, 4, 8] {
            let t = Instant::now();
            for _ in 0..reps {
                let _ = split_mm(&av, &bv, m, k, n, parts);
            }
            res.push(2.0 * (m * k * n) as f64 / (t.elapsed().as_secs_f64() / reps as f64) / 1e9);
        }
        println!(
            "{m}x{k}x{n}: candle {:.1} GFLOP/s, split2/4/8 {:.1} {:.1} {:.1}",
            2.0 * (m * k * n) as f64 / s1 / 1e9,
            res[0],
            res[1],
            res[2]
        );
    }
    Ok(())
}
