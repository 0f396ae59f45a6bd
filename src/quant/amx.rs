//! The int8 GEMM on Intel AMX (Advanced Matrix Extensions, Sapphire Rapids and later).
//!
//! One `tdpbssd` multiplies a 16×64 tile of signed activations by a 64×16 tile of signed
//! weights and adds the 16×16 i32 products into an accumulator tile: 16,384 multiply-adds in
//! one instruction, exact like the VNNI kernel (signed × signed bytes, i32 sums). The block
//! kernel keeps four accumulators, a 32×32 output block (two row tiles × two weight panels),
//! and walks `k` 64 values at a time: two activation loads, two weight loads and four
//! `tdpbssd` per step.
//!
//! Layouts. Weights are packed once in panels of 16 output channels, each panel
//! `[kq/4][16][4]` i8 (`kq` = `k` rounded up to 64, zero-padded): a 64-value step of `k` is
//! one contiguous 1 KiB tile, rows of 64 bytes. The panel count is rounded up to even with a
//! zero panel, so blocks always take two. Activations arrive as the GEMM's i16 rows
//! (`QRows`); each task narrows its 32 rows to i8 once into a zero-padded scratch block and
//! reuses it for every panel.
//!
//! The OS must grant the process the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)` on
//! Linux); [`available`] asks once and says no when the CPU or the kernel cannot. Tile
//! registers are configured (`ldtilecfg`) at the start of each task and released at its
//! end, since the configuration is per thread.

/// Rows of a block (two tiles of 16).
pub const BM: usize = 32;
/// `k` values per step (one tile row of bytes).
pub const KSTEP: usize = 64;

/// `k` rounded up to the tile step.
pub fn kq(k: usize) -> usize {
    k.next_multiple_of(KSTEP).max(KSTEP)
}

/// Panels of 16 channels for `n` outputs, rounded up to even.
pub fn panels(n: usize, nr: usize) -> usize {
    n.div_ceil(nr).next_multiple_of(2)
}

/// Packs int8 weights `b` (`[n, k]`, row-major) into `[panel][kq/4][nr][4]`.
pub fn pack(b: &[i8], n: usize, k: usize, nr: usize) -> Vec<i8> {
    let kq = kq(k);
    let mut data = vec![0i8; panels(n, nr) * kq * nr];
    for (p, panel) in data.chunks_exact_mut(kq * nr).enumerate() {
        for j in 0..nr.min(n.saturating_sub(p * nr)) {
            let row = &b[(p * nr + j) * k..][..k];
            for (kk, &v) in row.iter().enumerate() {
                panel[(kk / 4) * nr * 4 + j * 4 + kk % 4] = v;
            }
        }
    }
    data
}

/// The weights `[n, k]` back from [`pack`]'s layout.
pub fn unpack(data: &[i8], n: usize, k: usize, nr: usize) -> Vec<i8> {
    let kq = kq(k);
    let mut b = vec![0i8; n * k];
    for (j, row) in b.chunks_exact_mut(k.max(1)).enumerate().take(n) {
        let panel = &data[(j / nr) * kq * nr..];
        for (kk, v) in row.iter_mut().enumerate().take(k) {
            *v = panel[(kk / 4) * nr * 4 + (j % nr) * 4 + kk % 4];
        }
    }
    b
}

/// Whether this CPU and OS run AMX int8 (asked once per process).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(imp::request)
}

/// Narrows rows `i0..i0+BM` of the i16 activations `a` (row stride `lda`, `k` values each)
/// into `dst` (`[BM][kq]` i8), zero beyond row `m` and beyond `k`. Values are within the i8
/// range (quantized activations, or i8 inputs widened).
pub fn narrow_rows(a: &[i16], lda: usize, m: usize, k: usize, i0: usize, dst: &mut [i8]) {
    let kq = kq(k);
    for (r, row) in dst.chunks_exact_mut(kq).enumerate().take(BM) {
        if i0 + r < m {
            let src = &a[(i0 + r) * lda..][..k];
            for (d, &s) in row.iter_mut().zip(src) {
                *d = s as i8;
            }
            row[k..].fill(0);
        } else {
            row.fill(0);
        }
    }
}

/// Runs `f` with the tile registers configured for [`block`] on this thread.
pub fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
    assert!(available(), "AMX kernel used on a CPU or OS without AMX");
    // SAFETY: AMX is available and permitted (checked above); the configuration only
    // describes the tiles `block` uses.
    unsafe { imp::configure() };
    let r = f();
    // SAFETY: as above; releasing returns the tiles to their initial state.
    unsafe { imp::release() };
    r
}

/// `c[q][r][j] = Σ_k a[r][k] · panel_q[j][k]` for the 32×32 block of the two panels `b0`,
/// `b1` (each `kq·16` bytes) and the 32 rows of `a` (`[BM][kq]`). Must run inside
/// [`with_tiles`].
pub fn block(a: &[i8], b0: &[i8], b1: &[i8], kq: usize, c: &mut [[[i32; 16]; BM]; 2]) {
    assert!(
        kq.is_multiple_of(KSTEP) && kq > 0,
        "amx: k {kq} not a tile multiple"
    );
    assert!(a.len() >= BM * kq, "amx: activation block out of range");
    assert!(
        b0.len() >= kq * 16 && b1.len() >= kq * 16,
        "amx: panel out of range"
    );
    // SAFETY: bounds checked above; tiles configured by `with_tiles` (asserted there).
    unsafe { imp::block(a.as_ptr(), kq, b0.as_ptr(), b1.as_ptr(), c) }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::{BM, KSTEP};
    use std::arch::asm;

    /// Tile configuration: palette 1, tiles 0–7 of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    };

    pub fn request() -> bool {
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, int8) = (leaf.edx & (1 << 24) != 0, leaf.edx & (1 << 25) != 0);
        if !(tile && int8) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call; it only changes which state the kernel saves for us.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    pub unsafe fn configure() {
        unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack)) };
    }

    pub unsafe fn release() {
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    pub unsafe fn block(
        a: *const i8,
        kq: usize,
        b0: *const i8,
        b1: *const i8,
        c: &mut [[[i32; 16]; BM]; 2],
    ) {
        let row = 64usize;
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            let a1 = a.add(16 * kq);
            for s in 0..kq / KSTEP {
                asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {row}*1]",
                    "tileloadd tmm7, [{b1} + {row}*1]",
                    "tdpbssd tmm0, tmm4, tmm6",
                    "tdpbssd tmm1, tmm4, tmm7",
                    "tdpbssd tmm2, tmm5, tmm6",
                    "tdpbssd tmm3, tmm5, tmm7",
                    a0 = in(reg) a.add(s * KSTEP),
                    a1 = in(reg) a1.add(s * KSTEP),
                    b0 = in(reg) b0.add(s * KSTEP * 16),
                    b1 = in(reg) b1.add(s * KSTEP * 16),
                    lda = in(reg) kq,
                    row = in(reg) row,
                    options(nostack, readonly)
                );
            }
            let [c0, c1] = c;
            asm!(
                "tilestored [{c00} + {row}*1], tmm0",
                "tilestored [{c01} + {row}*1], tmm1",
                "tilestored [{c10} + {row}*1], tmm2",
                "tilestored [{c11} + {row}*1], tmm3",
                c00 = in(reg) c0.as_mut_ptr(),
                c01 = in(reg) c1.as_mut_ptr(),
                c10 = in(reg) c0.as_mut_ptr().add(16),
                c11 = in(reg) c1.as_mut_ptr().add(16),
                row = in(reg) row,
                options(nostack)
            );
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::BM;

    pub fn request() -> bool {
        false
    }

    pub unsafe fn configure() {}

    pub unsafe fn release() {}

    pub unsafe fn block(
        _: *const i8,
        _: usize,
        _: *const i8,
        _: *const i8,
        _: &mut [[[i32; 16]; BM]; 2],
    ) {
        unreachable!("AMX is only used where `available()` said yes")
    }
}
