//! Criterion benchmark of `genai_kernels::cpu::qmatmul` on the SmolLM2-135M
//! shapes (Q4_1 layers, the Q8_0 output layer) at decode batch sizes.
//!
//! `qmatmul/smollm2_step` runs every matmul of one SmolLM2 forward step
//! (30 layers × q,k,v,o,gate,up,down + the output layer, 134M weights, 98 MB
//! packed, distinct matrices so they stream from memory as in real decoding):
//! its time per iteration bounds the matmul share of a decode step.
//!
//! Throughput is reported as "elements" = floating-point operations
//! (2 · rows · cols · batch per call), so criterion's `Gelem/s` reads as GFLOP/s.
//! Threads: `QMATMUL_THREADS` (default 2, the deployment's core count).
//! Run: `cargo bench -p genai-benches --bench qmatmul` (on a quiet machine).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use genai_kernels::cpu::qmatmul::{qmatmul, QMatrix, QType};

/// Deterministic pseudo-random bytes (xorshift), so runs are comparable.
fn bytes(n: usize, mut state: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

/// Random blocks with sane f16 scales (raw random bytes would give NaN/Inf scales).
fn matrix(qtype: QType, rows: usize, cols: usize) -> QMatrix {
    let ts = qtype.type_size();
    let mut data = bytes(rows * cols / 32 * ts, 0x9e37_79b9_7f4a_7c15);
    for block in data.chunks_exact_mut(ts) {
        let scales = if qtype == QType::Q4_1 { 2 } else { 1 };
        for s in 0..scales {
            // f16 0x2000..0x23ff ≈ 0.008..0.0156
            block[2 * s + 1] = 0x20 | (block[2 * s + 1] & 0x03);
        }
    }
    QMatrix::new(qtype, rows, cols, &data).expect("valid matrix")
}

fn bench(c: &mut Criterion) {
    let threads: usize = std::env::var("QMATMUL_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let shapes: [(&str, QType, usize, usize); 6] = [
        ("q_o_576x576", QType::Q4_1, 576, 576),
        ("kv_192x576", QType::Q4_1, 192, 576),
        ("gate_up_1536x576", QType::Q4_1, 1536, 576),
        ("down_576x1536", QType::Q4_1, 576, 1536),
        ("output_49152x576", QType::Q8_0, 49152, 576),
        ("q8_1536x576", QType::Q8_0, 1536, 576),
    ];
    for (name, qtype, rows, cols) in shapes {
        let w = matrix(qtype, rows, cols);
        let mut group = c.benchmark_group(format!("qmatmul/{name}/{qtype:?}/t{threads}"));
        for batch in [1usize, 16, 64] {
            let x: Vec<f32> = bytes(batch * cols, 7)
                .iter()
                .map(|&b| (b as f32 - 127.5) / 64.0)
                .collect();
            let mut out = vec![0f32; batch * rows];
            group.throughput(Throughput::Elements((2 * rows * cols * batch) as u64));
            group.bench_with_input(
                BenchmarkId::from_parameter(format!("b{batch}")),
                &batch,
                |bch, &batch| {
                    bch.iter(|| qmatmul(&w, &x, batch, &mut out, threads).expect("qmatmul"));
                },
            );
        }
        group.finish();
    }
}

fn bench_step(c: &mut Criterion) {
    let threads: usize = std::env::var("QMATMUL_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let (h, f, kv) = (576, 1536, 192);
    let layer_shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)];
    let mut mats: Vec<QMatrix> = Vec::new();
    for _ in 0..30 {
        mats.extend(layer_shapes.iter().map(|&(r, k)| matrix(QType::Q4_1, r, k)));
    }
    mats.push(matrix(QType::Q8_0, 49152, h));
    let flops_per_token: usize = mats.iter().map(|m| 2 * m.rows() * m.cols()).sum();
    let mut group = c.benchmark_group(format!("qmatmul/smollm2_step/t{threads}"));
    for batch in [1usize, 16, 64] {
        let x: Vec<f32> = bytes(batch * f, 3).iter().map(|&b| (b as f32 - 127.5) / 64.0).collect();
        let mut out = vec![0f32; batch * 49152];
        group.throughput(Throughput::Elements((flops_per_token * batch) as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("b{batch}")),
            &batch,
            |bch, &batch| {
                bch.iter(|| {
                    for m in &mats {
                        let (xs, os) = (&x[..batch * m.cols()], &mut out[..batch * m.rows()]);
                        qmatmul(m, xs, batch, os, threads).expect("qmatmul");
                    }
                });
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1))
        .sample_size(20);
    targets = bench, bench_step
}
criterion_main!(benches);
