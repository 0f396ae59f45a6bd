//! Times wick's conv2d forward and backward passes on every ResNet-18 convolution shape at
//! batch 16 × 64×64 (NHWC), median of repeated runs: `cargo run --release --example conv_layers`.
//! With `PACK=1` it times the direct kernel's weight packing instead.
use std::time::Instant;
use wick::model::conv::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward, ConvSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median(mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    wick::alloc::keep_freed_memory();
    if std::env::var_os("PACK").is_some() {
        return pack_times();
    }
    // (name, side in, cin, cout, k, stride, pad, count in the network)
    let layers = [
        ("stem 7x7/2", 64, 3, 64, 7, 2, 3, 1),
        ("l1 3x3", 16, 64, 64, 3, 1, 1, 4),
        ("l2 3x3/2", 16, 64, 128, 3, 2, 1, 1),
        ("l2 3x3", 8, 128, 128, 3, 1, 1, 3),
        ("l2 ds 1x1/2", 16, 64, 128, 1, 2, 0, 1),
        ("l3 3x3/2", 8, 128, 256, 3, 2, 1, 1),
        ("l3 3x3", 4, 256, 256, 3, 1, 1, 3),
        ("l3 ds 1x1/2", 8, 128, 256, 1, 2, 0, 1),
        ("l4 3x3/2", 4, 256, 512, 3, 2, 1, 1),
        ("l4 3x3", 2, 512, 512, 3, 1, 1, 3),
        ("l4 ds 1x1/2", 4, 256, 512, 1, 2, 0, 1),
    ];
    let n = 16;
    let (mut tf, mut tb) = (0.0, 0.0);
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9}",
        "layer", "fwd ms", "GFLOP/s", "dx ms", "dw ms"
    );
    for (name, side, cin, cout, k, stride, pad, count) in layers {
        let spec = ConvSpec {
            stride,
            padding: pad,
            ..Default::default()
        };
        let xs = [n, side, side, cin];
        let ws = [cout, cin, k, k];
        let x: Vec<f32> = (0..xs.iter().product::<usize>())
            .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let w: Vec<f32> = (0..ws.iter().product::<usize>())
            .map(|i| ((i * 104729) % 991) as f32 / 991.0 - 0.5)
            .collect();
        let (y, ys) = conv2d_forward(&x, &xs, &w, &ws, spec).unwrap();
        let f = median(|| {
            std::hint::black_box(conv2d_forward(&x, &xs, &w, &ws, spec).unwrap());
        });
        let dx = median(|| {
            std::hint::black_box(conv2d_backward_input(&y, &xs, &w, &ws, spec).unwrap());
        });
        let dw = median(|| {
            std::hint::black_box(conv2d_backward_weight(&x, &xs, &y, &ws, spec).unwrap());
        });
        let flops = 2.0 * (ys[0] * ys[1] * ys[2]) as f64 * (cin * k * k * cout) as f64;
        println!(
            "{name:<12} {f:>9.3} {:>9.1} {dx:>9.3} {dw:>9.3}  x{count}",
            flops / f / 1e6
        );
        tf += f * count as f64;
        tb += (dx + dw) * count as f64;
    }
    println!("total forward {tf:.2} ms, backward {tb:.2} ms");
}

fn pack_times() {
    use wick::model::conv_direct::PackedWeight;
    for (cout, cin) in [(512usize, 512usize), (256, 256), (64, 64)] {
        let w: Vec<f32> = (0..cout * cin * 9).map(|i| i as f32).collect();
        let a = median(|| {
            std::hint::black_box(PackedWeight::new(&w, [cout, cin, 3, 3]));
        });
        let b = median(|| {
            std::hint::black_box(PackedWeight::for_input_grad(&w, [cout, cin, 3, 3]));
        });
        let c = median(|| {
            std::hint::black_box(w.clone());
        });
        println!("pack {cout}x{cin}x3x3: {a:.3} ms, input-grad {b:.3} ms, clone {c:.3} ms");
    }
}
