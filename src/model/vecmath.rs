//! Element-wise math over slices that the compiler vectorises: `exp` and `erf` as polynomials
//! (no calls into libm, which run one value at a time), and the exact (erf) GELU with its
//! derivative. On x86-64 the loops are compiled a second time for AVX2 + FMA and chosen at run
//! time, since release builds target the baseline CPU.
//!
//! Accuracy: `exp` within 2 ulp on [-87, 88]; `exp64` within 2 ulp on [-708, 709]; `erf`
//! within 2e-7 absolute (Eigen's rational approximation); GELU within 3e-7 of the libm version.

/// Runs `$body` (a loop over slices) compiled for AVX2 + FMA when the CPU has them.
macro_rules! dispatch {
    ($vis:vis $name:ident ( $($arg:ident : $ty:ty),* ) $(-> $ret:ty)? $body:block) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `fast` is compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// As [`dispatch!`], with an AVX-512 variant first, for loops of f64 arithmetic that gain from
/// 8 lanes (the per-element formulas, and so the results, are the same in every variant).
macro_rules! dispatch_wide {
    ($vis:vis $name:ident ( $($arg:ident : $ty:ty),* ) $(-> $ret:ty)? $body:block) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn widest($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `widest` is compiled for.
                    return unsafe { widest($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `fast` is compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use dispatch_wide;

/// `e^x` for one value, branch-free so that loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // x = n·ln2 + r, |r| ≤ ln2/2.
    // Round to nearest by the 1.5·2^23 trick (one add and one subtract, which vectorise;
    // `f32::round` does not).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = n.mul_add(-0.693_145_75, x);
    let r = n.mul_add(-1.428_606_8e-6, r);
    // e^r by its Taylor polynomial (degree 6).
    let mut p: f32 = 1.0 / 720.0;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // Scale by 2^n through the exponent bits: n + 127 + 2^23 holds n + 127 (0..=254) in its
    // low mantissa bits, which the shift moves into the exponent (a float-to-int cast would
    // not vectorise).
    let bits = (n + 8_388_735.0).to_bits() << 23;
    p * f32::from_bits(bits)
}

/// `e^x` in f64 for one value, branch-free so that loops over it vectorise (the same scheme as
/// [`exp`], with a degree-12 polynomial). Inputs are clamped to [-708, 709].
#[inline(always)]
pub fn exp64(x: f64) -> f64 {
    let x = x.clamp(-708.0, 709.0);
    // 1.5·2^52: adding and subtracting it rounds to the nearest integer.
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    let n = (x * std::f64::consts::LOG2_E + MAGIC) - MAGIC;
    // ln 2 split in two (fdlibm's constants), |r| ≤ ln2/2.
    let r = n.mul_add(-6.931_471_803_691_238e-1, x);
    let r = n.mul_add(-1.908_214_929_270_587_7e-10, r);
    // Taylor polynomial of degree 12: the remainder is below 2e-16 for |r| ≤ ln2/2.
    const INV_FACT: [f64; 13] = [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
    ];
    let mut p = INV_FACT[12];
    for &c in INV_FACT[..12].iter().rev() {
        p = p.mul_add(r, c);
    }
    // 2^n through the exponent bits: n + 1023 + 2^52 holds n + 1023 (1..=2046) in its low
    // mantissa bits, which the shift moves into the exponent.
    let bits = (n + 4_503_599_627_371_519.0).to_bits() << 52;
    p * f64::from_bits(bits)
}

dispatch_wide!(pub sum_exp_minus(xs: &mut [f64], m: f64) -> f64 {
    // Σ e^(x - m) over `xs`, which it overwrites with the terms. The exponentials vectorise;
    // the sum runs in four fixed lanes, so the result does not depend on the CPU.
    for x in xs.iter_mut() {
        *x = exp64(*x - m);
    }
    let mut acc = [0f64; 4];
    let chunks = xs.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..4 {
            acc[i] += c[i];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for &x in rest {
        s += x;
    }
    s
});

/// The numerator of [`erf`]'s rational approximation, a polynomial in `x²` (highest power
/// first), times `x`.
const ERF_P: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_600_1e-3,
    -1.609_603_3e-2,
];
/// Its denominator, a polynomial in `x²` (highest power first).
const ERF_Q: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_6e-4,
    -1.682_827e-3,
    -7.373_329_3e-3,
    -1.426_473_9e-2,
];

/// `erf(x)`: Eigen's rational approximation on [-4, 4] (±1 outside, in f32).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2.mul_add(ERF_P[0], ERF_P[1]);
    for c in &ERF_P[2..] {
        p = x2.mul_add(p, *c);
    }
    p *= x;
    let mut q = x2.mul_add(ERF_Q[0], ERF_Q[1]);
    for c in &ERF_Q[2..] {
        q = x2.mul_add(q, *c);
    }
    p / q
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

dispatch!(pub exp_in_place(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp(*x);
    }
});

/// GELU (erf form) of `x` into `out` (as long as `x`).
pub fn gelu(x: &[f32], out: &mut [f32]) {
    assert_eq!(
        x.len(),
        out.len(),
        "gelu: {} inputs, {} outputs",
        x.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: AVX-512F is present; the lengths are equal.
        return unsafe { avx512::gelu(x.as_ptr(), out.as_mut_ptr(), x.len()) };
    }
    gelu_generic(x, out)
}

/// GELU (erf form) of `xs`, in place.
pub fn gelu_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: AVX-512F is present; reading and writing the same slice element by element.
        return unsafe { avx512::gelu(xs.as_ptr(), xs.as_mut_ptr(), xs.len()) };
    }
    gelu_in_place_generic(xs)
}

dispatch!(gelu_generic(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
    }
});

// The AVX2 loop, for callers among code that runs no 512-bit instructions (the int8 GEMM's
// epilogue, a row of 16 outputs at a time): there short bursts of AVX-512 arithmetic made GELU
// 2.3 times slower in the int8 profile than this loop.
dispatch!(pub(crate) gelu_in_place_generic(xs: &mut [f32]) {
    gelu_slice(xs)
});

/// [`gelu`] in place, for loops inside other vectorised functions (inlined into them).
#[inline(always)]
pub(crate) fn gelu_slice(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = 0.5 * *x * (1.0 + erf(*x * FRAC_1_SQRT_2));
    }
}

dispatch!(pub gelu_grad(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((g, &x), &d) in dx.iter_mut().zip(x).zip(dy) {
        let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * x * x);
        *g = d * (cdf + x * pdf);
    }
});

/// Lanes of the max and sum reductions (8 = one AVX register), so that they vectorise while
/// their order stays fixed.
const LANES: usize = 8;

/// Softmax of one row of attention scores in place: each score times `scale`, the positions
/// whose `keep` is 0 (padding) left out (probability exactly 0; a row with none kept becomes
/// zeros). The sum runs in 8 fixed lanes, so the values are the same on every CPU.
pub fn softmax_masked(row: &mut [f32], keep: &[f32], scale: f32) {
    assert!(
        keep.len() >= row.len(),
        "softmax: {} keep flags for {} scores",
        keep.len(),
        row.len()
    );
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: AVX-512F is present; `keep` is at least as long as `row`.
        return unsafe { avx512::softmax_masked(row, keep, scale) };
    }
    softmax_masked_generic(row, keep, scale)
}

dispatch!(softmax_masked_generic(row: &mut [f32], keep: &[f32], scale: f32) {
    // Scores scaled, padding (keep = 0) pushed to -1e30 so that it never wins the max.
    for (s, &k) in row.iter_mut().zip(keep) {
        *s = if k > 0.0 { *s * scale } else { -1e30 };
    }
    let mut m = [f32::MIN; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            m[k] = if c[k] > m[k] { c[k] } else { m[k] };
        }
    }
    let mut max = f32::MIN;
    for &v in m.iter().chain(chunks.remainder()) {
        max = if v > max { v } else { max };
    }
    // Numerators, exactly 0 on padding, and their sum.
    let mut sum = [0f32; LANES];
    let n = row.len() / LANES * LANES;
    for (c, k8) in row[..n].chunks_exact_mut(LANES).zip(keep.chunks_exact(LANES)) {
        for k in 0..LANES {
            let e = exp(c[k] - max) * k8[k];
            c[k] = e;
            sum[k] += e;
        }
    }
    let mut total = 0f32;
    for (v, &k) in row[n..].iter_mut().zip(&keep[n..]) {
        *v = exp(*v - max) * k;
        total += *v;
    }
    for s in sum {
        total += s;
    }
    let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
    for v in row.iter_mut() {
        *v *= inv;
    }
});

/// [`gelu`] on 8 lanes, for AVX2 code elsewhere (the int8 GEMM's epilogue): the same
/// operations in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{ERF_P, ERF_Q, FRAC_1_SQRT_2};
    use std::arch::x86_64::*;

    /// `0.5 · x · (1 + erf(x / √2))` on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn gelu(x: __m256) -> __m256 {
        let t = _mm256_mul_ps(x, _mm256_set1_ps(FRAC_1_SQRT_2));
        _mm256_mul_ps(
            _mm256_mul_ps(_mm256_set1_ps(0.5), x),
            _mm256_add_ps(_mm256_set1_ps(1.0), erf(t)),
        )
    }

    /// [`super::erf`] on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn erf(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-4.0)), _mm256_set1_ps(4.0));
        let x2 = _mm256_mul_ps(x, x);
        let mut p = _mm256_fmadd_ps(x2, _mm256_set1_ps(ERF_P[0]), _mm256_set1_ps(ERF_P[1]));
        for &c in &ERF_P[2..] {
            p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(c));
        }
        p = _mm256_mul_ps(p, x);
        let mut q = _mm256_fmadd_ps(x2, _mm256_set1_ps(ERF_Q[0]), _mm256_set1_ps(ERF_Q[1]));
        for &c in &ERF_Q[2..] {
            q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(c));
        }
        _mm256_div_ps(p, q)
    }
}

/// Hand-written AVX-512 forms of [`gelu`] and [`softmax_masked`]: the same operations on each
/// value in the same order (so the same bits as the loops above), 16 lanes at a time. The
/// compiler's own vectorisation of those loops ran at half this speed.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx512f")
    }

    /// [`super::exp`] on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
            _mm512_set1_ps(88.3),
        );
        let magic = _mm512_set1_ps(12_582_912.0);
        let xl = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
        let n = _mm512_sub_ps(_mm512_add_ps(xl, magic), magic);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_145_75), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let biased = _mm512_castps_si512(_mm512_add_ps(n, _mm512_set1_ps(8_388_735.0)));
        _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased)))
    }

    /// [`super::erf`] on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn erf(x: __m512) -> __m512 {
        use super::{ERF_P, ERF_Q};
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-4.0)), _mm512_set1_ps(4.0));
        let x2 = _mm512_mul_ps(x, x);
        let mut p = _mm512_fmadd_ps(x2, _mm512_set1_ps(ERF_P[0]), _mm512_set1_ps(ERF_P[1]));
        for &c in &ERF_P[2..] {
            p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(c));
        }
        p = _mm512_mul_ps(p, x);
        let mut q = _mm512_fmadd_ps(x2, _mm512_set1_ps(ERF_Q[0]), _mm512_set1_ps(ERF_Q[1]));
        for &c in &ERF_Q[2..] {
            q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(c));
        }
        _mm512_div_ps(p, q)
    }

    /// `out[i] = gelu(x[i])` for `i < n` (`x` and `out` may be the same buffer).
    ///
    /// # Safety
    /// AVX-512F present; `x` readable and `out` writable for `n` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu(x: *const f32, out: *mut f32, n: usize) {
        let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
        let s = _mm512_set1_ps(super::FRAC_1_SQRT_2);
        for i in (0..n).step_by(16) {
            let m: __mmask16 = if n - i >= 16 {
                0xffff
            } else {
                (1 << (n - i)) - 1
            };
            // SAFETY: lanes masked to the `n` values.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, x.add(i));
                let y = _mm512_mul_ps(
                    _mm512_mul_ps(half, v),
                    _mm512_add_ps(one, erf(_mm512_mul_ps(v, s))),
                );
                _mm512_mask_storeu_ps(out.add(i), m, y);
            }
        }
    }

    /// [`super::softmax_masked`].
    ///
    /// # Safety
    /// AVX-512F present; `keep.len() >= row.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_masked(row: &mut [f32], keep: &[f32], scale: f32) {
        let n = row.len();
        let (rp, kp) = (row.as_mut_ptr(), keep.as_ptr());
        let mask = |i: usize| -> __mmask16 {
            if n - i >= 16 {
                0xffff
            } else {
                (1 << (n - i)) - 1
            }
        };
        let (zero, neg) = (_mm512_setzero_ps(), _mm512_set1_ps(-1e30));
        let sc = _mm512_set1_ps(scale);
        // SAFETY: every access is masked to the row's `n` values (`keep` has as many).
        unsafe {
            // Scores scaled, padding at -1e30, and the maximum.
            let mut mx = _mm512_set1_ps(f32::MIN);
            for i in (0..n).step_by(16) {
                let m = mask(i);
                let on = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(
                    m,
                    _mm512_maskz_loadu_ps(m, kp.add(i)),
                    zero,
                );
                let s = _mm512_mask_mul_ps(neg, on, _mm512_maskz_loadu_ps(m, rp.add(i)), sc);
                _mm512_mask_storeu_ps(rp.add(i), m, s);
                mx = _mm512_mask_max_ps(mx, m, mx, s);
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            // Numerators; whole chunks of 8 summed in 8 lanes in order, the rest one by one
            // (as the loop above does).
            let whole = n / 8 * 8;
            let mut acc = _mm256_setzero_ps();
            for i in (0..n).step_by(16) {
                let m = mask(i);
                let k = _mm512_maskz_loadu_ps(m, kp.add(i));
                let e = _mm512_mul_ps(
                    exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, rp.add(i)), max)),
                    k,
                );
                _mm512_mask_storeu_ps(rp.add(i), m, e);
                if i + 8 <= whole {
                    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
                }
                if i + 16 <= whole {
                    let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e));
                    acc = _mm256_add_ps(acc, _mm256_castpd_ps(hi));
                }
            }
            let mut total = 0f32;
            for &v in &row[whole..] {
                total += v;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            for s in lanes {
                total += s;
            }
            let inv = _mm512_set1_ps(if total > 0.0 { 1.0 / total } else { 0.0 });
            let rp = row.as_mut_ptr();
            for i in (0..n).step_by(16) {
                let m = mask(i);
                _mm512_mask_storeu_ps(
                    rp.add(i),
                    m,
                    _mm512_mul_ps(_mm512_maskz_loadu_ps(m, rp.add(i)), inv),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let xs: Vec<f32> = (-8700..8800).map(|i| i as f32 * 0.01).collect();
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            worst = worst.max(((y as f64 - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        let mut e = [-1000.0f32, 0.0];
        exp_in_place(&mut e);
        assert!(e[0] < 1e-37 && e[1] == 1.0);
    }

    #[test]
    fn exp64_is_accurate() {
        let mut worst = 0f64;
        for i in -70_800..70_900 {
            let x = i as f64 * 0.01 + 0.003;
            let (y, want) = (exp64(x), x.exp());
            worst = worst.max(((y - want) / want).abs());
        }
        assert!(worst < 5e-16, "relative error {worst}");
        assert_eq!(exp64(0.0), 1.0);
        assert!(exp64(f64::NEG_INFINITY) < 1e-307);
        let mut xs: Vec<f64> = (0..11).map(|i| -(i as f64)).collect();
        let want: f64 = xs.iter().map(|x| (x - 1.0).exp()).sum();
        assert!((sum_exp_minus(&mut xs, 1.0) - want).abs() < 1e-15);
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        let xs: Vec<f32> = (-1000..1000).map(|i| i as f32 * 0.01).collect();
        let mut y = vec![0f32; xs.len()];
        gelu(&xs, &mut y);
        let dy = vec![1f32; xs.len()];
        let mut g = vec![0f32; xs.len()];
        gelu_grad(&xs, &dy, &mut g);
        for ((&x, &y), &g) in xs.iter().zip(&y).zip(&g) {
            let x64 = x as f64;
            let cdf = 0.5 * (1.0 + libm::erf(x64 / 2f64.sqrt()));
            assert!((y as f64 - x64 * cdf).abs() < 1e-6, "gelu({x}) = {y}");
            let pdf = (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!(
                (g as f64 - (cdf + x64 * pdf)).abs() < 1e-6,
                "gelu'({x}) = {g}"
            );
        }
    }

    #[test]
    fn the_avx512_forms_give_the_generic_loops_bits() {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            let mut r = crate::rng::Rng::new(7);
            let xs: Vec<f32> = (0..4099)
                .map(|i| match i % 7 {
                    0 => (r.normal() * 30.0) as f32,
                    1 => [0.0, -0.0, 1e-30, -1e-30, 4.5, -4.5, 200.0][i / 7 % 7],
                    _ => r.normal() as f32 * 3.0,
                })
                .collect();
            let (mut a, mut b) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
            for n in [0, 1, 15, 16, 17, 33, 4099] {
                gelu(&xs[..n], &mut a[..n]);
                gelu_generic(&xs[..n], &mut b[..n]);
                assert_eq!(a[..n], b[..n], "gelu over {n} values");
                let mut c = xs[..n].to_vec();
                gelu_in_place(&mut c);
                assert_eq!(c, b[..n], "gelu_in_place over {n} values");
            }
            for len in [1, 7, 8, 9, 16, 23, 24, 31, 45, 128, 200] {
                for pad in [0, 1, 5, len] {
                    let keep: Vec<f32> = (0..len)
                        .map(|i| if i + pad < len { 1.0 } else { 0.0 })
                        .collect();
                    let row: Vec<f32> = xs[..len].iter().map(|x| x * 2.0).collect();
                    let (mut a, mut b) = (row.clone(), row);
                    // SAFETY: AVX-512F is present; `keep` is as long as the row.
                    unsafe { avx512::softmax_masked(&mut a, &keep, 0.17) };
                    softmax_masked_generic(&mut b, &keep, 0.17);
                    assert_eq!(
                        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "softmax over {len} scores, {pad} padded"
                    );
                }
            }
        }
    }
}
