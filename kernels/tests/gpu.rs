//! GPU tests (feature `cuda`): every kernel against its CPU reference in `genai_kernels::cpu`.
//!
//! Each check draws fresh random inputs, rounds them to the storage type before computing the
//! reference (so only the kernel's arithmetic is measured), poisons outputs with NaN before the
//! launch (an unwritten element fails), fills unused KV cache slots with NaN (an out-of-range read
//! fails) and bounds the relative error ‖gpu − ref‖ / ‖ref‖ per type. Without a CUDA device every
//! test prints `SKIP` and passes, so the binary can run anywhere libcuda is installed, unless
//! `GENAI_REQUIRE_GPU=1` (set by `scripts/gpu-check.sh run`): then every test fails, so a GPU run
//! cannot pass without having run a kernel. See `scripts/gpu-check.sh` for building the binary on a
//! CPU machine. `decode_bandwidth` is a benchmark, not a test (`#[ignore]`d; the script runs it).
#![cfg(feature = "cuda")]

use std::io::Write as _;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaSlice};
use genai_kernels::cpu;
use genai_kernels::cpu::attention::PagedKv;
use genai_kernels::cpu::rotary::{Rope, RopeLayout};
use genai_kernels::cuda::{CudaDtype, CudaKernels, DecodeVariant, PagedCache};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The kernels on device 0, or None (the caller skips) without a device; under
/// `GENAI_REQUIRE_GPU=1` a missing device or driver fails the test instead.
fn kernels() -> Option<CudaKernels> {
    let why = match CudaContext::device_count() {
        Ok(n) if n > 0 => return Some(CudaKernels::on_device(0).expect("loading the kernel modules")),
        Ok(_) => "no CUDA device".to_owned(),
        Err(e) => format!("CUDA driver unavailable ({e})"),
    };
    assert!(
        std::env::var("GENAI_REQUIRE_GPU").as_deref() != Ok("1"),
        "{why}, and GENAI_REQUIRE_GPU=1 requires a GPU: run on a host with an NVIDIA GPU and its driver (libcuda.so.1)"
    );
    // The real stderr: libtest captures println! of passing tests, which would hide the skip.
    let _ = writeln!(std::io::stderr(), "SKIP: {why} (GENAI_REQUIRE_GPU=1 fails instead)");
    None
}

/// Relative error bound of one kernel output in storage type T (inputs already rounded to T).
fn tol<T: CudaDtype>() -> f64 {
    match T::NAME {
        // f32: the attention kernels use the fast __expf (a few ulp), hence above pure rounding.
        "f32" => 5e-5,
        "f16" => 2e-3,
        _ => 1.2e-2,
    }
}

fn rng() -> StdRng {
    StdRng::from_os_rng()
}

/// Random values rounded through T, so the CPU reference sees exactly what the GPU sees.
fn random<T: CudaDtype>(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-amp..amp)).to_f32())
        .collect()
}

fn up<T: CudaDtype>(k: &CudaKernels, v: &[f32]) -> CudaSlice<T> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    k.stream().clone_htod(&host).unwrap()
}

fn nan<T: CudaDtype>(k: &CudaKernels, n: usize) -> CudaSlice<T> {
    up::<T>(k, &vec![f32::NAN; n])
}

fn down<T: CudaDtype>(k: &CudaKernels, s: &CudaSlice<T>) -> Vec<f32> {
    k.stream().clone_dtoh(s).unwrap().into_iter().map(T::to_f32).collect()
}

#[track_caller]
fn assert_close<T: CudaDtype>(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what} [{}]: element {i} is {} (unwritten or read out of range)",
            T::NAME,
            got[i]
        );
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += (f64::from(*g) - f64::from(*w)).powi(2);
        den += f64::from(*w).powi(2);
    }
    let rel = (num / den.max(1e-30)).sqrt();
    assert!(
        rel <= tol::<T>(),
        "{what} [{}]: relative error {rel:.2e} > {:.1e}",
        T::NAME,
        tol::<T>()
    );
}

macro_rules! for_each_dtype {
    ($f:ident($($a:expr),*)) => {{
        $f::<f32>($($a),*);
        $f::<half::f16>($($a),*);
        $f::<half::bf16>($($a),*);
    }};
}

fn check_rms_norm<T: CudaDtype>(k: &CudaKernels) {
    let mut r = rng();
    for (rows, hidden) in [(1, 64), (7, 576), (3, 4097)] {
        let (x, w) = (
            random::<T>(&mut r, rows * hidden, 2.0),
            random::<T>(&mut r, hidden, 1.0),
        );
        let mut want = vec![0.0; x.len()];
        cpu::rmsnorm::rms_norm(&mut want, &x, &w, 1e-5).unwrap();
        let mut out = nan::<T>(k, x.len());
        k.rms_norm(&mut out, &up::<T>(k, &x), &up::<T>(k, &w), 1e-5).unwrap();
        assert_close::<T>("rms_norm", &down(k, &out), &want);

        let res = random::<T>(&mut r, rows * hidden, 2.0);
        let (mut xw, mut rw) = (x.clone(), res.clone());
        cpu::rmsnorm::fused_add_rms_norm(&mut xw, &mut rw, &w, 1e-5).unwrap();
        let (mut xg, mut rg) = (up::<T>(k, &x), up::<T>(k, &res));
        k.fused_add_rms_norm(&mut xg, &mut rg, &up::<T>(k, &w), 1e-5).unwrap();
        assert_close::<T>("fused_add_rms_norm residual", &down(k, &rg), &rw);
        assert_close::<T>("fused_add_rms_norm out", &down(k, &xg), &xw);
    }
}

#[test]
fn rms_norm() {
    if let Some(k) = kernels() {
        for_each_dtype!(check_rms_norm(&k));
    }
}

fn check_silu<T: CudaDtype>(k: &CudaKernels) {
    let mut r = rng();
    for (rows, d) in [(1, 1), (5, 1536), (9, 1001)] {
        let x = random::<T>(&mut r, rows * 2 * d, 6.0);
        let mut want = vec![0.0; rows * d];
        cpu::activation::silu_and_mul(&mut want, &x, d).unwrap();
        let mut out = nan::<T>(k, rows * d);
        k.silu_and_mul(&mut out, &up::<T>(k, &x), d).unwrap();
        assert_close::<T>("silu_and_mul", &down(k, &out), &want);
    }
}

#[test]
fn silu_and_mul() {
    if let Some(k) = kernels() {
        for_each_dtype!(check_silu(&k));
    }
}

fn check_rotary<T: CudaDtype>(k: &CudaKernels) {
    let mut r = rng();
    let max_pos = 4096;
    for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
        for (head_dim, rot_dim, nh, nkv, tokens) in [(64, 64, 9, 3, 5), (128, 128, 8, 8, 3), (128, 64, 4, 2, 17)] {
            let rope = Rope {
                head_dim,
                rot_dim,
                num_heads: nh,
                num_kv_heads: nkv,
                layout,
            };
            let positions: Vec<u32> = (0..tokens).map(|_| r.random_range(0..max_pos as u32)).collect();
            let table = cpu::rotary::rope_cos_sin_cache(max_pos, rot_dim, 100000.0);
            let (q, kk) = (
                random::<T>(&mut r, tokens * nh * head_dim, 1.0),
                random::<T>(&mut r, tokens * nkv * head_dim, 1.0),
            );
            let (mut qw, mut kw) = (q.clone(), kk.clone());
            cpu::rotary::rotary_embedding(&rope, &positions, &mut qw, &mut kw, &table).unwrap();
            let (mut qg, mut kg) = (up::<T>(k, &q), up::<T>(k, &kk));
            let pos = k.positions(&positions, max_pos).unwrap();
            k.rotary_embedding(&rope, &pos, &mut qg, &mut kg, &k.stream().clone_htod(&table).unwrap())
                .unwrap();
            assert_close::<T>("rotary q", &down(k, &qg), &qw);
            assert_close::<T>("rotary k", &down(k, &kg), &kw);
        }
    }
}

#[test]
fn rotary_embedding() {
    if let Some(k) = kernels() {
        for_each_dtype!(check_rotary(&k));
    }
}

fn check_pool<T: CudaDtype>(k: &CudaKernels) {
    let mut r = rng();
    for (batch, seq, hidden) in [(1, 1, 384), (4, 128, 384), (3, 7, 1000)] {
        let h = random::<T>(&mut r, batch * seq * hidden, 1.0);
        let mut mask = vec![0u32; batch * seq];
        for b in 0..batch {
            let real = r.random_range(1..=seq);
            mask[b * seq..b * seq + real].fill(1);
        }
        for normalize in [false, true] {
            let mut want = vec![0.0; batch * hidden];
            cpu::pooling::mean_pool(&mut want, &h, &mask, seq, hidden, normalize).unwrap();
            let mut out = k.stream().clone_htod(&vec![f32::NAN; batch * hidden]).unwrap();
            let m = k.stream().clone_htod(&mask).unwrap();
            k.mean_pool(&mut out, &up::<T>(k, &h), &m, seq, hidden, normalize)
                .unwrap();
            // The output is f32: only the summation order differs from the reference.
            assert_close::<f32>("mean_pool", &k.stream().clone_dtoh(&out).unwrap(), &want);
        }
    }
}

#[test]
fn mean_pool() {
    if let Some(k) = kernels() {
        for_each_dtype!(check_pool(&k));
    }
}

/// A random paged layout: shuffled block ids, unused slots NaN, the given context lengths.
struct Layout {
    tables: Vec<Vec<u32>>,
    num_blocks: usize,
    key_cache: Vec<f32>,
    value_cache: Vec<f32>,
}

fn layout<T: CudaDtype>(r: &mut StdRng, ctx: &[usize], block_size: usize, row: usize) -> Layout {
    let needed: usize = ctx.iter().map(|c| c.div_ceil(block_size)).sum();
    let num_blocks = needed + 3; // spare blocks stay NaN
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(r);
    let mut next = ids.into_iter();
    let tables: Vec<Vec<u32>> = ctx
        .iter()
        .map(|c| next.by_ref().take(c.div_ceil(block_size)).collect())
        .collect();
    let (mut key_cache, mut value_cache) = (
        vec![f32::NAN; num_blocks * block_size * row],
        vec![f32::NAN; num_blocks * block_size * row],
    );
    for (t, &c) in tables.iter().zip(ctx) {
        for p in 0..c {
            let slot = t[p / block_size] as usize * block_size + p % block_size;
            key_cache[slot * row..(slot + 1) * row].copy_from_slice(&random::<T>(r, row, 1.0));
            value_cache[slot * row..(slot + 1) * row].copy_from_slice(&random::<T>(r, row, 1.0));
        }
    }
    Layout {
        tables,
        num_blocks,
        key_cache,
        value_cache,
    }
}

fn check_decode<T: CudaDtype>(k: &CudaKernels) {
    let mut r = rng();
    for (hd, nh, nkv, bs, ctx) in [
        (64, 9, 3, 16, vec![1, 17, 100, 33]),
        (128, 8, 2, 16, vec![1000, 5, 513]),
        (128, 4, 4, 32, vec![2049]),
        (64, 6, 1, 8, vec![64, 7, 1, 1500, 31]),
    ] {
        let row = nkv * hd;
        let l = layout::<T>(&mut r, &ctx, bs, row);
        let q = random::<T>(&mut r, ctx.len() * nh * hd, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let kv = PagedKv {
            key_cache: &l.key_cache,
            value_cache: &l.value_cache,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
            window: None,
        };
        let mut want = vec![0.0; q.len()];
        cpu::attention::paged_attention_decode(&mut want, &q, nh, &kv, scale, &l.tables, &ctx, 1).unwrap();
        let meta = k
            .attention_metadata(&l.tables, &ctx, &vec![1; ctx.len()], l.num_blocks, bs)
            .unwrap();
        let (kc, vc) = (up::<T>(k, &l.key_cache), up::<T>(k, &l.value_cache));
        let cache = PagedCache {
            key_cache: &kc,
            value_cache: &vc,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let qg = up::<T>(k, &q);
        for variant in [
            DecodeVariant::SinglePass,
            DecodeVariant::SplitK { partition_size: 64 },
            DecodeVariant::Auto,
        ] {
            let mut out = nan::<T>(k, q.len());
            k.paged_attention_decode(&mut out, &qg, &cache, &meta, nh, scale, variant)
                .unwrap();
            assert_close::<T>(
                &format!("decode {variant:?} hd {hd} ctx {ctx:?}"),
                &down(k, &out),
                &want,
            );
        }
    }
}

#[test]
fn paged_attention_decode() {
    if let Some(k) = kernels() {
        for_each_dtype!(check_decode(&k));
    }
}

fn check_prefill<T: CudaDtype>(k: &CudaKernels) {
    let mut r = rng();
    // (head_dim, heads, kv heads, block size, [(context_len, query_len)]): whole prompts, chunked
    // prefill / prefix hits (query_len < context_len), odd lengths, partial last blocks.
    for (hd, nh, nkv, bs, seqs) in [
        (64, 9, 3, 16, vec![(1, 1), (37, 37), (100, 20), (16, 16)]),
        (128, 8, 2, 16, vec![(300, 300), (77, 1), (129, 65)]),
        (128, 4, 4, 32, vec![(33, 33)]),
    ] {
        let ctx: Vec<usize> = seqs.iter().map(|s| s.0).collect();
        let qlens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
        let row = nkv * hd;
        let l = layout::<T>(&mut r, &ctx, bs, row);
        let total: usize = qlens.iter().sum();
        let q = random::<T>(&mut r, total * nh * hd, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let kv = PagedKv {
            key_cache: &l.key_cache,
            value_cache: &l.value_cache,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
            window: None,
        };
        let mut cu = vec![0];
        for ql in &qlens {
            cu.push(cu.last().unwrap() + ql);
        }
        let mut want = vec![0.0; q.len()];
        cpu::attention::paged_attention_prefill(&mut want, &q, nh, &kv, scale, &l.tables, &ctx, &cu, 1).unwrap();
        let meta = k.attention_metadata(&l.tables, &ctx, &qlens, l.num_blocks, bs).unwrap();
        let (kc, vc) = (up::<T>(k, &l.key_cache), up::<T>(k, &l.value_cache));
        let cache = PagedCache {
            key_cache: &kc,
            value_cache: &vc,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let mut out = nan::<T>(k, q.len());
        k.paged_attention_prefill(&mut out, &up::<T>(k, &q), &cache, &meta, nh, scale)
            .unwrap();
        assert_close::<T>(&format!("prefill hd {hd} seqs {seqs:?}"), &down(k, &out), &want);
    }
}

#[test]
fn paged_attention_prefill() {
    if let Some(k) = kernels() {
        for_each_dtype!(check_prefill(&k));
    }
}

fn check_reshape<T: CudaDtype>(k: &CudaKernels) {
    let mut r = rng();
    for (tokens, row, num_slots) in [(1, 64, 16), (13, 3 * 64, 64), (7, 5, 40)] {
        let (key, value) = (
            random::<T>(&mut r, tokens * row, 1.0),
            random::<T>(&mut r, tokens * row, 1.0),
        );
        let mut slots: Vec<i64> = (0..num_slots as i64).collect();
        slots.shuffle(&mut r);
        slots.truncate(tokens);
        slots[tokens / 2] = -1; // padding token
        let (mut kw, mut vw) = (vec![f32::NAN; num_slots * row], vec![f32::NAN; num_slots * row]);
        cpu::cache::reshape_and_cache_ref(&key, &value, &mut kw, &mut vw, &slots, row).unwrap();
        let (mut kc, mut vc) = (nan::<T>(k, num_slots * row), nan::<T>(k, num_slots * row));
        let sm = k.slot_mapping(&slots, num_slots).unwrap();
        k.reshape_and_cache(&up::<T>(k, &key), &up::<T>(k, &value), &mut kc, &mut vc, &sm, row)
            .unwrap();
        // A copy is exact, and untouched slots must stay NaN: compare bit patterns.
        for (name, got, want) in [("key_cache", down(k, &kc), kw), ("value_cache", down(k, &vc), vw)] {
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g == w || (g.is_nan() && w.is_nan()),
                    "reshape_and_cache {name} [{}] elem {i}: {g} vs {w}",
                    T::NAME
                );
            }
        }
    }
}

#[test]
fn reshape_and_cache() {
    if let Some(k) = kernels() {
        for_each_dtype!(check_reshape(&k));
    }
}

/// Benchmark: decode attention's achieved bandwidth (unique K/V bytes over kernel time) next to a
/// device-to-device copy of the same size (bytes read + written). Median of 20 timed runs after
/// warm-up; inputs are random, never zeros. Printed, and written as JSON to the file named by
/// `GENAI_BANDWIDTH_REPORT` when set. Its only assertions are sanity bounds on the timing itself.
#[test]
#[ignore = "benchmark: `scripts/gpu-check.sh run` runs it (--ignored) and keeps the report"]
fn decode_bandwidth() {
    let Some(k) = kernels() else { return };
    type T = half::f16;
    let (seqs, nh, nkv, hd, ctx_len, bs) = (64usize, 32usize, 8usize, 128usize, 2048usize, 16usize);
    let blocks_per_seq = ctx_len / bs;
    let num_blocks = seqs * blocks_per_seq;
    let row = nkv * hd;
    let mut r = rng();
    let cache_host: Vec<T> = (0..num_blocks * bs * row)
        .map(|_| T::from_f32(r.random_range(-1.0..1.0)))
        .collect();
    let kc = k.stream().clone_htod(&cache_host).unwrap();
    let vc = k.stream().clone_htod(&cache_host).unwrap();
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut r);
    let tables: Vec<Vec<u32>> = ids.chunks(blocks_per_seq).map(<[u32]>::to_vec).collect();
    let meta = k
        .attention_metadata(&tables, &vec![ctx_len; seqs], &vec![1; seqs], num_blocks, bs)
        .unwrap();
    let q = up::<T>(&k, &random::<T>(&mut r, seqs * nh * hd, 1.0));
    let mut out = nan::<T>(&k, seqs * nh * hd);
    let cache = PagedCache {
        key_cache: &kc,
        value_cache: &vc,
        num_kv_heads: nkv,
        head_dim: hd,
    };
    let ctx = k.stream().context().clone();
    let time = |f: &mut dyn FnMut()| -> f64 {
        for _ in 0..3 {
            f();
        }
        let mut ms: Vec<f64> = (0..20)
            .map(|_| {
                // new_event(None) would disable timing.
                let ev = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
                let (a, b) = (ev(), ev());
                a.record(k.stream()).unwrap();
                f();
                b.record(k.stream()).unwrap();
                b.synchronize().unwrap();
                f64::from(a.elapsed_ms(&b).unwrap())
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms[ms.len() / 2]
    };
    let kv_bytes = 2.0 * (seqs * ctx_len * row * 2) as f64;
    let mut dst = kc.clone();
    let copy_ms = time(&mut || k.stream().memcpy_dtod(&kc, &mut dst).unwrap());
    let copy_gbs = 2.0 * kc.num_bytes() as f64 / copy_ms / 1e6;
    println!("memcpy dtod: {copy_ms:.3} ms, {copy_gbs:.0} GB/s (read + write)");
    let mut rows = vec![format!(
        r#"{{"what": "memcpy_dtod", "ms": {copy_ms}, "gb_per_s": {copy_gbs}}}"#
    )];
    assert!(copy_gbs.is_finite() && copy_gbs > 0.0, "copy timing is {copy_ms} ms");
    for variant in [DecodeVariant::SinglePass, DecodeVariant::SplitK { partition_size: 512 }] {
        let ms = time(&mut || {
            k.paged_attention_decode(&mut out, &q, &cache, &meta, nh, 0.088, variant)
                .unwrap()
        });
        let gbs = kv_bytes / ms / 1e6;
        println!("decode {variant:?}: {ms:.3} ms, {gbs:.0} GB/s of K/V");
        rows.push(format!(
            r#"{{"what": "decode {variant:?}", "ms": {ms}, "gb_per_s": {gbs}}}"#
        ));
        // The K/V (512 MiB) is far larger than L2, so reading it cannot beat the copy by 2x; a
        // faster figure means the kernel skipped work or the events did not time it.
        assert!(
            gbs.is_finite() && gbs > 0.0 && gbs < 2.0 * copy_gbs,
            "decode {variant:?}: {gbs} GB/s against a {copy_gbs} GB/s copy ({ms} ms)"
        );
    }
    if let Some(path) = std::env::var_os("GENAI_BANDWIDTH_REPORT") {
        let report = format!("[\n  {}\n]\n", rows.join(",\n  "));
        std::fs::write(&path, report).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
