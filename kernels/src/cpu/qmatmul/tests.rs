//! Tests of the quantized matmul: formats against candle, every kernel
//! against the reference within the documented bound, SIMD against scalar
//! tightly, threading invariance, argument validation, real SmolLM2 tensors.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const QTYPES: [QType; 3] = [QType::Q4_0, QType::Q4_1, QType::Q8_0];

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
        .into_iter()
        .filter(|i| i.is_available())
        .collect()
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// Random but realistic raw blocks: small scales of both signs, all quant values.
fn random_blocks(qtype: QType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut data = Vec::with_capacity(rows * cols / qtype.block_size() * qtype.type_size());
    for _ in 0..rows * cols / qtype.block_size() {
        match qtype {
            QType::Q4_0 => {
                data.extend(f16_bytes(rng.random_range(-0.02..0.02)));
                data.extend((0..16).map(|_| rng.random::<u8>()));
            }
            QType::Q4_1 => {
                data.extend(f16_bytes(rng.random_range(0.0..0.02)));
                data.extend(f16_bytes(rng.random_range(-0.16..0.02)));
                data.extend((0..16).map(|_| rng.random::<u8>()));
            }
            QType::Q8_0 => {
                data.extend(f16_bytes(rng.random_range(-0.002..0.002)));
                data.extend((0..32).map(|_| rng.random::<u8>()));
            }
            QType::F32 => data.extend(rng.random_range(-0.2f32..0.2).to_le_bytes()),
        }
    }
    data
}

/// Activations with a spread of magnitudes and a few outliers, like hidden states.
fn random_x(batch: usize, cols: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..batch * cols)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if rng.random_range(0..64) == 0 {
                v * 20.0
            } else {
                v * v * v * 3.0
            }
        })
        .collect()
}

fn dequantized(w: &QMatrix) -> Vec<f32> {
    let mut all = vec![0f32; w.rows() * w.cols()];
    for (r, row) in all.chunks_exact_mut(w.cols()).enumerate() {
        w.dequantize_row(r, row).unwrap();
    }
    all
}

/// Scale and offset magnitudes of raw block `i`, bounding the per-term sizes the kernels accumulate.
fn block_magnitude(qtype: QType, raw: &[u8], i: usize) -> f32 {
    let b = &raw[i * qtype.type_size()..];
    let h = |o: usize| f16::from_le_bytes([b[o], b[o + 1]]).to_f32().abs();
    match qtype {
        QType::Q4_0 => 16.0 * h(0),
        QType::Q4_1 => 15.0 * h(0) + h(2),
        QType::Q8_0 => 128.0 * h(0),
        QType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]).abs(),
    }
}

/// f32 rounding allowance relative to the summed magnitudes of the accumulated terms.
const ROUNDING: f32 = 4e-6;

/// Per output: (the activation-quantization bound Σ amax/254 · Σ|w|, the summed
/// magnitudes of the terms the kernels accumulate, for the f32 rounding allowance).
fn error_terms(
    qtype: QType,
    raw: &[u8],
    wd: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
) -> Vec<(f32, f32)> {
    let bs = qtype.block_size().max(QK);
    let mut tol = vec![(0f32, 0f32); batch * rows];
    for b in 0..batch {
        for r in 0..rows {
            let (mut quant, mut terms) = (0f64, 0f64);
            for j in 0..cols / bs {
                let xs = &x[b * cols + j * bs..][..bs];
                let ws = &wd[r * cols + j * bs..][..bs];
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let wl1: f32 = ws.iter().map(|v| v.abs()).sum();
                let xl1: f32 = xs.iter().map(|v| v.abs()).sum();
                if qtype != QType::F32 {
                    quant += f64::from(amax) / 254.0 * f64::from(wl1);
                    terms += f64::from(block_magnitude(qtype, raw, r * cols / bs + j) * xl1);
                }
                terms += ws.iter().zip(xs).map(|(a, v)| f64::from((a * v).abs())).sum::<f64>();
            }
            tol[b * rows + r] = (quant as f32, terms as f32);
        }
    }
    tol
}

struct Case {
    qtype: QType,
    rows: usize,
    cols: usize,
    raw: Vec<u8>,
    w: QMatrix,
    wd: Vec<f32>,
}

impl Case {
    fn new(qtype: QType, rows: usize, cols: usize, seed: u64) -> Self {
        let raw = random_blocks(qtype, rows, cols, &mut StdRng::seed_from_u64(seed));
        let w = QMatrix::new(qtype, rows, cols, &raw).unwrap();
        let wd = dequantized(&w);
        Self {
            qtype,
            rows,
            cols,
            raw,
            w,
            wd,
        }
    }

    fn reference(&self, x: &[f32], batch: usize) -> Vec<f32> {
        let mut out = vec![0f32; batch * self.rows];
        qmatmul_reference(&self.w, x, batch, &mut out).unwrap();
        out
    }

    fn run(&self, isa: Isa, x: &[f32], batch: usize, threads: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; batch * self.rows];
        qmatmul_with_isa(isa, &self.w, x, batch, &mut out, threads).unwrap();
        out
    }

    /// Asserts `got` is within the bound of the reference; returns the worst error / bound.
    fn check(&self, what: &str, x: &[f32], batch: usize, got: &[f32], want: &[f32]) -> f32 {
        let terms = error_terms(self.qtype, &self.raw, &self.wd, self.rows, self.cols, x, batch);
        let mut worst = 0f32;
        for (i, ((g, w), (quant, sum))) in got.iter().zip(want).zip(&terms).enumerate() {
            let t = &(quant * 1.001 + sum * ROUNDING + 1e-30);
            let err = (g - w).abs();
            assert!(
                err <= *t,
                "{what}: out[{i}] = {g}, reference {w}, |err| {err} > bound {t}"
            );
            worst = worst.max(err / t);
        }
        worst
    }
}

#[test]
fn dequantization_is_bit_identical_to_candle() {
    for (qtype, dtype) in [
        (QType::Q4_0, GgmlDType::Q4_0),
        (QType::Q4_1, GgmlDType::Q4_1),
        (QType::Q8_0, GgmlDType::Q8_0),
    ] {
        // 37 rows: two full groups and a partial one.
        let (rows, cols) = (37, 96);
        let case = Case::new(qtype, rows, cols, 7);
        let candle = qtensor_from_ggml(dtype, &case.raw, vec![rows, cols], &Device::Cpu).unwrap();
        let want: Vec<f32> = candle
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(case.wd.len(), want.len());
        for (i, (a, b)) in case.wd.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{qtype:?} element {i}: {a} vs candle {b}");
        }
    }
    let case = Case::new(QType::F32, 3, 5, 7);
    let want: Vec<f32> = case
        .raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(case.wd, want);
}

#[test]
fn every_kernel_is_within_the_activation_quantization_bound() {
    let shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (40, 64), (8, 32)];
    for (s, &(rows, cols)) in shapes.iter().enumerate() {
        for qtype in QTYPES {
            let case = Case::new(qtype, rows, cols, 100 + s as u64);
            for (k, batch) in [1usize, 2, 7, 16, 64].into_iter().enumerate() {
                let x = random_x(batch, cols, &mut StdRng::seed_from_u64(1000 + k as u64));
                let want = case.reference(&x, batch);
                for isa in isas() {
                    let got = case.run(isa, &x, batch, 2);
                    let worst = case.check(
                        &format!("{qtype:?} {rows}x{cols} b{batch} {isa:?}"),
                        &x,
                        batch,
                        &got,
                        &want,
                    );
                    // Random data must actually exercise the bound, not sit at zero error.
                    assert!(worst > 0.0 && worst < 1.0);
                }
            }
        }
    }
}

#[test]
fn output_layer_shape_49152x576() {
    for qtype in [QType::Q8_0, QType::Q4_1] {
        let case = Case::new(qtype, 49152, 576, 5);
        for batch in [1, 2] {
            let x = random_x(batch, 576, &mut StdRng::seed_from_u64(batch as u64));
            let want = case.reference(&x, batch);
            let got = case.run(Isa::detect(), &x, batch, 2);
            case.check(&format!("{qtype:?} 49152x576 b{batch}"), &x, batch, &got, &want);
        }
    }
}

#[test]
fn simd_kernels_match_the_scalar_kernel_to_f32_rounding() {
    for qtype in QTYPES {
        // 53 rows: a partial last group (and a partial last half group for AVX2).
        let case = Case::new(qtype, 53, 160, 11);
        for batch in [1, 3, 9, 17] {
            let x = random_x(batch, 160, &mut StdRng::seed_from_u64(batch as u64 + 50));
            let scalar = case.run(Isa::Scalar, &x, batch, 1);
            let terms = error_terms(qtype, &case.raw, &case.wd, 53, 160, &x, batch);
            for isa in isas() {
                let got = case.run(isa, &x, batch, 1);
                for i in 0..got.len() {
                    // Same integer dot products and scales: only f32 rounding (FMA or not) may differ,
                    // far below the quantization bound (terms[i].0).
                    assert!(
                        (got[i] - scalar[i]).abs() <= terms[i].1 * ROUNDING,
                        "{qtype:?} {isa:?} b{batch} out[{i}]: {} vs scalar {}",
                        got[i],
                        scalar[i]
                    );
                }
            }
        }
    }
}

#[test]
fn f32_weights_match_the_reference() {
    let case = Case::new(QType::F32, 45, 70, 3);
    for batch in [1, 5] {
        let x = random_x(batch, 70, &mut StdRng::seed_from_u64(9));
        let want = case.reference(&x, batch);
        for isa in isas() {
            case.check(&format!("F32 {isa:?}"), &x, batch, &case.run(isa, &x, batch, 2), &want);
        }
    }
}

#[test]
fn results_are_bit_identical_for_any_thread_count() {
    for qtype in [QType::Q4_1, QType::Q8_0] {
        let case = Case::new(qtype, 1536, 576, 21);
        let x = random_x(7, 576, &mut StdRng::seed_from_u64(22));
        for isa in isas().into_iter().filter(|&i| i != Isa::Scalar) {
            let one = case.run(isa, &x, 7, 1);
            for threads in [2, 3, 8] {
                let many = case.run(isa, &x, 7, threads);
                assert!(
                    one.iter().zip(&many).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{qtype:?} {isa:?} t{threads}"
                );
            }
        }
    }
}

#[test]
fn concurrent_callers_get_correct_results() {
    let case = Case::new(QType::Q4_1, 576, 1536, 31);
    let x = random_x(16, 1536, &mut StdRng::seed_from_u64(32));
    let want = case.run(Isa::detect(), &x, 16, 1);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..20 {
                    let got = case.run(Isa::detect(), &x, 16, 2);
                    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            });
        }
    });
}

#[test]
fn writes_exactly_the_output_slice() {
    let case = Case::new(QType::Q4_1, 37, 64, 41);
    let x = random_x(3, 64, &mut StdRng::seed_from_u64(42));
    for isa in isas() {
        let mut buf = vec![f32::NAN; 3 * 37 + 16];
        buf[3 * 37..].fill(-7.0);
        qmatmul_with_isa(isa, &case.w, &x, 3, &mut buf[..3 * 37], 2).unwrap();
        assert!(
            buf[..3 * 37].iter().all(|v| v.is_finite()),
            "{isa:?} left an output unwritten"
        );
        assert!(
            buf[3 * 37..].iter().all(|&v| v == -7.0),
            "{isa:?} wrote past the output"
        );
    }
}

#[test]
fn zero_batch_is_a_no_op() {
    let case = Case::new(QType::Q8_0, 16, 32, 1);
    qmatmul(&case.w, &[], 0, &mut [], 2).unwrap();
}

#[test]
fn bad_arguments_are_typed_errors_naming_the_field() {
    let raw = random_blocks(QType::Q4_1, 4, 64, &mut StdRng::seed_from_u64(1));
    let zero = |field| QMatmulError::Zero { field };
    assert_eq!(QMatrix::new(QType::Q4_1, 0, 64, &raw).err(), Some(zero("rows")));
    assert_eq!(QMatrix::new(QType::Q4_1, 4, 0, &raw).err(), Some(zero("cols")));
    assert_eq!(
        QMatrix::new(QType::Q4_1, 4, 48, &raw).err(),
        Some(QMatmulError::ColsNotBlockMultiple {
            qtype: QType::Q4_1,
            cols: 48,
            block: 32
        })
    );
    let short = QMatrix::new(QType::Q4_1, 4, 64, &raw[..raw.len() - 1]).err();
    assert_eq!(
        short,
        Some(QMatmulError::Length {
            field: "data",
            expected: 160,
            got: 159,
            unit: "bytes"
        })
    );
    assert_eq!(
        QMatrix::new(QType::Q8_0, usize::MAX / 2, 64, &raw).err(),
        Some(QMatmulError::Overflow { field: "data" })
    );

    let w = QMatrix::new(QType::Q4_1, 4, 64, &raw).unwrap();
    assert_eq!((w.qtype(), w.rows(), w.cols()), (QType::Q4_1, 4, 64));
    let x = vec![0.5f32; 128];
    let err = |f: &dyn Fn(&mut [f32]) -> Result<(), QMatmulError>| f(&mut [0f32; 8]).err();
    assert_eq!(err(&|o| qmatmul(&w, &x, 2, o, 0)), Some(zero("threads")));
    assert!(matches!(
        err(&|o| qmatmul(&w, &x[1..], 2, o, 1)),
        Some(QMatmulError::Length { field: "x", .. })
    ));
    assert!(matches!(
        err(&|o| qmatmul(&w, &x, 2, &mut o[1..], 1)),
        Some(QMatmulError::Length { field: "out", .. })
    ));
    assert!(matches!(
        err(&|o| qmatmul(&w, &x, 3, o, 1)),
        Some(QMatmulError::Length { field: "x", .. })
    ));
    assert!(matches!(
        err(&|o| qmatmul_reference(&w, &x, 2, &mut o[..7])),
        Some(QMatmulError::Length { field: "out", .. })
    ));
    assert_eq!(err(&|o| qmatmul(&w, &x, 2, o, 1)), None);
    let mut row = vec![0f32; 64];
    assert_eq!(
        w.dequantize_row(4, &mut row),
        Err(QMatmulError::RowOutOfRange { row: 4, rows: 4 })
    );
    assert!(matches!(
        w.dequantize_row(0, &mut row[..63]),
        Err(QMatmulError::Length { field: "out", .. })
    ));
    for isa in [Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| !i.is_available()) {
        assert_eq!(
            err(&|o| qmatmul_with_isa(isa, &w, &x, 2, o, 1)),
            Some(QMatmulError::IsaUnavailable { isa })
        );
    }
}

#[test]
fn packed_storage_is_no_larger_than_needed() {
    for (qtype, per_block) in [(QType::Q4_0, 18), (QType::Q4_1, 20), (QType::Q8_0, 34)] {
        let case = Case::new(qtype, 576, 1536, 2);
        assert_eq!(case.w.storage_bytes(), 576 * 48 * per_block, "{qtype:?}");
    }
}

/// The real SmolLM2 tensors: attention Q (Q4_1) and the tied embedding /
/// output matrix (Q8_0), with real embedding rows as activations.
#[test]
fn real_smollm2_tensors() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let Ok(mut file) = std::fs::File::open(path) else {
        eprintln!("skipped: {path} not present (run scripts/fetch-models.sh)");
        return;
    };
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let load = |name: &str, file: &mut std::fs::File| {
        let t = content.tensor(file, name, &Device::Cpu).unwrap();
        let (rows, cols) = t.shape().dims2().unwrap();
        let qtype = match t.dtype() {
            GgmlDType::Q4_1 => QType::Q4_1,
            GgmlDType::Q8_0 => QType::Q8_0,
            other => panic!("unexpected dtype {other:?} for {name}"),
        };
        let raw = t.data().unwrap().into_owned();
        let wd: Vec<f32> = t
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w = QMatrix::new(qtype, rows, cols, &raw).unwrap();
        (
            Case {
                qtype,
                rows,
                cols,
                raw,
                wd: dequantized(&w),
                w,
            },
            wd,
        )
    };
    let (emb, emb_candle) = load("token_embd.weight", &mut file);
    assert_eq!((emb.qtype, emb.rows, emb.cols), (QType::Q8_0, 49152, 576));
    assert!(emb.wd.iter().zip(&emb_candle).all(|(a, b)| a.to_bits() == b.to_bits()));
    let (q, q_candle) = load("blk.0.attn_q.weight", &mut file);
    assert_eq!((q.qtype, q.rows, q.cols), (QType::Q4_1, 576, 576));
    assert!(q.wd.iter().zip(&q_candle).all(|(a, b)| a.to_bits() == b.to_bits()));

    // Embedding rows are exact on the Q8 grid; their projections are not, like real hidden states.
    let tokens = [1usize, 504, 2114, 30, 49151];
    let emb_rows: Vec<f32> = tokens.iter().flat_map(|&t| emb.wd[t * 576..][..576].to_vec()).collect();
    let x = q.reference(&emb_rows, tokens.len());
    for case in [&q, &emb] {
        let want = case.reference(&x, tokens.len());
        let got = case.run(Isa::detect(), &x, tokens.len(), 2);
        let worst = case.check(&format!("real {:?}", case.qtype), &x, tokens.len(), &got, &want);
        let (num, den) = got.iter().zip(&want).fold((0f64, 0f64), |(n, d), (g, w)| {
            (n + f64::from(g - w).powi(2), d + f64::from(*w).powi(2))
        });
        eprintln!(
            "real {:?}: worst err/bound {worst:.3}, relative L2 error {:.2e}",
            case.qtype,
            (num / den).sqrt()
        );
        assert!((num / den).sqrt() < 0.02);
    }
}

#[test]
fn matrices_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<QMatrix>();
    shareable::<QMatmulError>();
}
