//! wick's packed-weight linear kernel against a BLAS library's `sgemm_`, call by call in one
//! process, on MiniLM's batch-32 shapes: the only comparison this machine's drifting speed
//! does not swamp. Each pair runs the kernel with its steps in assembly, then with the
//! compiler's loop (`packed_linear::set_assembly(false)`), then the library's `sgemm_`
//! (`y = x·Wᵀ`, no bias), and reports medians and the median of the per-pair ratios.
//!
//!     cargo run --release --example gemm_vs_blas -- LIBRARY [PAIRS]
//!
//! LIBRARY is any shared library that exports the Fortran `sgemm_`: OpenBLAS's
//! `libopenblas.so`, or PyTorch's `torch/lib/libtorch_cpu.so`, which links MKL in (it needs its
//! own directory on `LD_LIBRARY_PATH`; run it with `OMP_WAIT_POLICY=passive` so that MKL's
//! threads do not spin while wick's run). Both sides use 2 threads.

use std::ffi::CString;
use std::time::Instant;

use wick::model::packed_linear::{set_assembly, PackedLinear};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fortran `sgemm_(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type Sgemm = unsafe extern "C" fn(
    *const u8,
    *const u8,
    *const i32,
    *const i32,
    *const i32,
    *const f32,
    *const f32,
    *const i32,
    *const f32,
    *const i32,
    *const f32,
    *mut f32,
    *const i32,
);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    wick::alloc::keep_freed_memory();
    let mut args = std::env::args().skip(1);
    let lib = args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: gemm_vs_blas LIBRARY [PAIRS] (a library exporting sgemm_)")
    })?;
    let pairs: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(30);
    if PackedLinear::new(&[0.0], 1, 1, None).is_none() {
        anyhow::bail!("this CPU has no AVX-512F: the packed kernel does not run here");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global()?;
    let path = CString::new(lib.clone())?;
    // SAFETY: dlopen/dlsym with valid C strings; the symbol is the standard Fortran BLAS
    // `sgemm_`, whose signature `Sgemm` spells out.
    let sgemm: Sgemm = unsafe {
        let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        anyhow::ensure!(
            !h.is_null(),
            "{lib}: cannot load it (is its directory on LD_LIBRARY_PATH?)"
        );
        let name = CString::new("sgemm_")?;
        let f = libc::dlsym(h, name.as_ptr());
        anyhow::ensure!(!f.is_null(), "{lib}: exports no sgemm_");
        std::mem::transmute::<*mut libc::c_void, Sgemm>(f)
    };
    let mut r = wick::rng::Rng::new(1);
    for (m, n, k) in [
        (4096, 1152, 384),
        (4096, 384, 384),
        (4096, 1536, 384),
        (4096, 384, 1536),
    ] {
        let x: Vec<f32> = (0..m * k).map(|_| r.normal() as f32).collect();
        let w: Vec<f32> = (0..n * k).map(|_| r.normal() as f32).collect();
        let p = PackedLinear::new(&w, n, k, None).expect("AVX-512F checked above");
        let mut y = vec![0f32; m * n];
        let (mi, ni, ki) = (m as i32, n as i32, k as i32);
        // Column-major: yᵀ (n × m) = W (n × k, stored as k × n: transposed) · xᵀ (k × m).
        let blas = |y: &mut [f32]| {
            // SAFETY: the operands hold n×k, m×k and m×n values, as the dimensions say.
            unsafe {
                sgemm(
                    b"T".as_ptr(),
                    b"N".as_ptr(),
                    &ni,
                    &mi,
                    &ki,
                    &1.0,
                    w.as_ptr(),
                    &ki,
                    x.as_ptr(),
                    &ki,
                    &0.0,
                    y.as_mut_ptr(),
                    &ni,
                )
            }
        };
        let time = |f: &mut dyn FnMut()| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        };
        let (mut asm, mut plain, mut lib_t) = (vec![], vec![], vec![]);
        let (mut asm_lib, mut plain_lib, mut asm_plain) = (vec![], vec![], vec![]);
        let mut same_bits = true;
        let mut diff = 0f32;
        for _ in 0..pairs {
            let mut out = (Vec::new(), Vec::new());
            let a = time(&mut || out.0 = std::hint::black_box(p.forward(&x, m)));
            set_assembly(false);
            let c = time(&mut || out.1 = std::hint::black_box(p.forward(&x, m)));
            set_assembly(true);
            let b = time(&mut || blas(&mut y));
            same_bits &= out.0 == out.1;
            diff = out
                .0
                .iter()
                .zip(&y)
                .fold(diff, |d, (o, y)| d.max((o - y).abs()));
            asm.push(a);
            plain.push(c);
            lib_t.push(b);
            asm_lib.push(b / a);
            plain_lib.push(b / c);
            asm_plain.push(c / a);
        }
        let gf = 2.0 * (m * n * k) as f64 / 1e9;
        println!(
            "{m}x{n}x{k}: GFLOP/s (median) assembly {:.0}, compiled loop {:.0}, BLAS {:.0} | per pair: assembly / BLAS {:.2}, compiled / BLAS {:.2}, assembly / compiled {:.2} | same bits {same_bits}, max |wick - BLAS| {diff:.1e}",
            gf / median(&mut asm),
            gf / median(&mut plain),
            gf / median(&mut lib_t),
            median(&mut asm_lib),
            median(&mut plain_lib),
            median(&mut asm_plain),
        );
    }
    Ok(())
}
