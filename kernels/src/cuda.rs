//! CUDA launch wrappers (feature `cuda`): loads the kernels `build.rs` compiled and exposes one
//! typed, checked launch function per kernel over `cudarc` `CudaSlice`s.
//!
//! Module choice: an sm_8x device loads the sm_80 cubin, an sm_9x device the sm_90 cubin, a newer
//! device JIT-compiles the sm_90 PTX (which needs a driver at least as new as the toolkit that
//! built it). Older devices are refused with [`KernelError::Unsupported`].
//!
//! Safety invariant: a kernel trusts the indices it reads from device memory (block tables, slots,
//! positions). Those therefore only enter through types built from host data that is validated on
//! the way in ([`AttentionMetadata`], [`SlotMapping`], [`Positions`]); every length that can be
//! checked on the host is checked before the launch, so a safe call cannot read or write outside
//! its buffers. All launches go to the stream of [`CudaKernels`]; buffers must be allocated on it.
//!
//! Tested by `tests/gpu.rs` against the CPU references in [`crate::cpu`] (skipped without a GPU).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::cpu::rotary::{Rope, RopeLayout};
use crate::error::{check_len, invalid, ShapeError};

/// One compiled `.cu` file (see build.rs).
struct KernelModule {
    name: &'static str,
    cubin_sm80: &'static [u8],
    cubin_sm90: &'static [u8],
    ptx_sm90: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

/// Keys per split-K partition of the decode kernel (and the context length above which
/// [`DecodeVariant::Auto`] splits).
pub const PARTITION_SIZE: usize = 512;
const THREADS: u32 = 128;
const ELEMENTWISE_THREADS: u32 = 256;

/// Storage types the kernels are instantiated for; `NAME` is the suffix of the kernel symbols.
pub trait CudaDtype: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + 'static {
    const NAME: &'static str;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl CudaDtype for f32 {
    const NAME: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl CudaDtype for half::f16 {
    const NAME: &'static str = "f16";
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl CudaDtype for half::bf16 {
    const NAME: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// Why a launch did not happen or failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("unsupported device: {0}")]
    Unsupported(String),
}

/// Which decode kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeVariant {
    /// Split-K when the longest context exceeds [`PARTITION_SIZE`], single pass otherwise.
    Auto,
    /// One block per (sequence, head).
    SinglePass,
    /// Partitions of `partition_size` keys (a positive multiple of 32) plus the reduction kernel.
    SplitK { partition_size: usize },
}

/// Per-step sequence metadata for the attention kernels, validated on the host and uploaded once
/// (shared by all layers of a step).
pub struct AttentionMetadata {
    block_tables: CudaSlice<u32>,
    context_lens: CudaSlice<u32>,
    cu_seqlens_q: CudaSlice<u32>,
    num_seqs: usize,
    max_blocks_per_seq: usize,
    max_context_len: usize,
    max_query_len: usize,
    total_query_tokens: usize,
    num_blocks: usize,
    block_size: usize,
}

impl AttentionMetadata {
    pub fn num_seqs(&self) -> usize {
        self.num_seqs
    }
    pub fn total_query_tokens(&self) -> usize {
        self.total_query_tokens
    }
}

/// Slot of every new token (`-1` = padding), validated against the number of cache slots.
pub struct SlotMapping {
    slots: CudaSlice<i64>,
    num_slots: usize,
}

/// Token positions for rotary embedding, validated against the cos/sin table length.
pub struct Positions {
    positions: CudaSlice<u32>,
    max_position: usize,
}

/// One layer's paged caches: each `[num_blocks, block_size, num_kv_heads, head_dim]`.
pub struct PagedCache<'a, T> {
    pub key_cache: &'a CudaSlice<T>,
    pub value_cache: &'a CudaSlice<T>,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The loaded kernel modules of one device, and the stream every launch goes to.
pub struct CudaKernels {
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

fn to_i32(what: &'static str, v: usize) -> Result<i32, ShapeError> {
    i32::try_from(v).map_err(|_| invalid(what, format!("{v} exceeds i32")))
}

fn to_u32(what: &'static str, v: usize) -> Result<u32, ShapeError> {
    u32::try_from(v).map_err(|_| invalid(what, format!("{v} exceeds u32")))
}

fn check_grid_yz(what: &'static str, v: usize) -> Result<u32, ShapeError> {
    if v == 0 || v > 65535 {
        return Err(invalid(
            what,
            format!("{v} is outside 1..=65535 (a grid y/z dimension)"),
        ));
    }
    Ok(v as u32)
}

impl CudaKernels {
    /// Loads every kernel module on `stream`'s device.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, KernelError> {
        let ctx = stream.context();
        let (major, minor) = ctx.compute_capability()?;
        let mut modules = HashMap::new();
        for m in MODULES {
            let image = match major {
                8 => Ptx::from_binary(m.cubin_sm80.to_vec()),
                9 => Ptx::from_binary(m.cubin_sm90.to_vec()),
                10.. => Ptx::from_src(m.ptx_sm90),
                _ => {
                    return Err(KernelError::Unsupported(format!(
                        "compute capability {major}.{minor} < 8.0"
                    )))
                }
            };
            modules.insert(m.name, ctx.load_module(image)?);
        }
        Ok(Self {
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// Device 0 with its default stream.
    pub fn on_device(ordinal: usize) -> Result<Self, KernelError> {
        Self::new(CudaContext::new(ordinal)?.default_stream())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn function(&self, module: &'static str, name: String) -> Result<CudaFunction, KernelError> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(&name) {
            return Ok(f.clone());
        }
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| KernelError::Unsupported(format!("module {module} missing")))?;
        let f = m.load_function(&name)?;
        cache.insert(name, f.clone());
        Ok(f)
    }

    /// Validates and uploads the block tables and lengths of a step. `query_lens[s]` is the number
    /// of new tokens of sequence `s` (1 for decode); they sit at the end of its `context_lens[s]`.
    pub fn attention_metadata<B: AsRef<[u32]>>(
        &self,
        block_tables: &[B],
        context_lens: &[usize],
        query_lens: &[usize],
        num_blocks: usize,
        block_size: usize,
    ) -> Result<AttentionMetadata, KernelError> {
        let num_seqs = context_lens.len();
        check_grid_yz("context_lens (number of sequences)", num_seqs)?;
        check_len("block_tables", num_seqs, block_tables.len())?;
        check_len("query_lens", num_seqs, query_lens.len())?;
        if block_size == 0 {
            return Err(invalid("block_size", "must be > 0").into());
        }
        let max_blocks_per_seq = block_tables.iter().map(|t| t.as_ref().len()).max().unwrap_or(0).max(1);
        let mut tables = vec![0u32; num_seqs * max_blocks_per_seq];
        let mut cu = Vec::with_capacity(num_seqs + 1);
        cu.push(0u32);
        let mut total = 0usize;
        for s in 0..num_seqs {
            let (ctx, ql, table) = (context_lens[s], query_lens[s], block_tables[s].as_ref());
            if ql == 0 || ql > ctx {
                return Err(invalid(
                    "query_lens",
                    format!("sequence {s}: {ql} new tokens for a context of {ctx}"),
                )
                .into());
            }
            if ctx.div_ceil(block_size) > table.len() {
                return Err(invalid(
                    "block_tables",
                    format!("sequence {s}: {} blocks for {ctx} tokens", table.len()),
                )
                .into());
            }
            if let Some(b) = table.iter().find(|&&b| b as usize >= num_blocks) {
                return Err(invalid("block_tables", format!("sequence {s}: block {b} >= {num_blocks}")).into());
            }
            tables[s * max_blocks_per_seq..s * max_blocks_per_seq + table.len()].copy_from_slice(table);
            total += ql;
            cu.push(to_u32("query_lens", total)?);
        }
        let lens = context_lens
            .iter()
            .map(|&c| to_i32("context_lens", c).map(|c| c as u32))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AttentionMetadata {
            block_tables: self.stream.clone_htod(&tables)?,
            context_lens: self.stream.clone_htod(&lens)?,
            cu_seqlens_q: self.stream.clone_htod(&cu)?,
            num_seqs,
            max_blocks_per_seq,
            max_context_len: context_lens.iter().copied().max().unwrap_or(0),
            max_query_len: query_lens.iter().copied().max().unwrap_or(0),
            total_query_tokens: total,
            num_blocks,
            block_size,
        })
    }

    /// Validates (`slot < num_slots` or negative) and uploads a slot mapping.
    pub fn slot_mapping(&self, slots: &[i64], num_slots: usize) -> Result<SlotMapping, KernelError> {
        if let Some((t, s)) = slots
            .iter()
            .enumerate()
            .find(|(_, &s)| s >= 0 && s as u64 >= num_slots as u64)
        {
            return Err(invalid("slot_mapping", format!("slot {s} of token {t} >= {num_slots} slots")).into());
        }
        if slots.is_empty() {
            return Err(invalid("slot_mapping", "no tokens").into());
        }
        Ok(SlotMapping {
            slots: self.stream.clone_htod(slots)?,
            num_slots,
        })
    }

    /// Validates (`< max_position`) and uploads rotary positions.
    pub fn positions(&self, positions: &[u32], max_position: usize) -> Result<Positions, KernelError> {
        if let Some(p) = positions.iter().find(|&&p| p as usize >= max_position) {
            return Err(invalid(
                "positions",
                format!("position {p} >= cos/sin table length {max_position}"),
            )
            .into());
        }
        if positions.is_empty() {
            return Err(invalid("positions", "no tokens").into());
        }
        Ok(Positions {
            positions: self.stream.clone_htod(positions)?,
            max_position,
        })
    }

    /// Scatters `key`/`value` (`[tokens, row_len]`) into the caches at the mapped slots.
    pub fn reshape_and_cache<T: CudaDtype>(
        &self,
        key: &CudaSlice<T>,
        value: &CudaSlice<T>,
        key_cache: &mut CudaSlice<T>,
        value_cache: &mut CudaSlice<T>,
        slots: &SlotMapping,
        row_len: usize,
    ) -> Result<(), KernelError> {
        let tokens = slots.slots.len();
        check_len("key", tokens * row_len, key.len())?;
        check_len("value", tokens * row_len, value.len())?;
        check_len("key_cache", slots.num_slots * row_len, key_cache.len())?;
        check_len("value_cache", slots.num_slots * row_len, value_cache.len())?;
        let f = self.function("cache", format!("reshape_and_cache_{}", T::NAME))?;
        let row = to_i32("row_len", row_len)?;
        let cfg = LaunchConfig {
            grid_dim: (to_u32("tokens", tokens)?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(key)
            .arg(value)
            .arg(key_cache)
            .arg(value_cache)
            .arg(&slots.slots)
            .arg(&row);
        // SAFETY: argument types match the kernel; lengths checked above, slots validated on upload.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `out = rms_norm(x) * weight` over rows of `weight.len()`.
    pub fn rms_norm<T: CudaDtype>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        eps: f32,
    ) -> Result<(), KernelError> {
        let rows = rows_of("x", x.len(), weight.len())?;
        check_len("out", x.len(), out.len())?;
        let f = self.function("norm", format!("rms_norm_{}", T::NAME))?;
        let hidden = to_i32("weight", weight.len())?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(out).arg(x).arg(weight).arg(&eps).arg(&hidden);
        // SAFETY: types match; every row lies inside x/out (checked above).
        unsafe { b.launch(row_cfg(rows)?) }?;
        Ok(())
    }

    /// `residual += x; x = rms_norm(residual) * weight`, in place.
    pub fn fused_add_rms_norm<T: CudaDtype>(
        &self,
        x: &mut CudaSlice<T>,
        residual: &mut CudaSlice<T>,
        weight: &CudaSlice<T>,
        eps: f32,
    ) -> Result<(), KernelError> {
        let rows = rows_of("x", x.len(), weight.len())?;
        check_len("residual", x.len(), residual.len())?;
        let f = self.function("norm", format!("fused_add_rms_norm_{}", T::NAME))?;
        let hidden = to_i32("weight", weight.len())?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(residual).arg(weight).arg(&eps).arg(&hidden);
        // SAFETY: as rms_norm.
        unsafe { b.launch(row_cfg(rows)?) }?;
        Ok(())
    }

    /// `out[t] = silu(x[t, ..d]) * x[t, d..]`, `x` `[tokens, 2d]`.
    pub fn silu_and_mul<T: CudaDtype>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaSlice<T>,
        d: usize,
    ) -> Result<(), KernelError> {
        let rows = rows_of("x", x.len(), 2 * d)?;
        check_len("out", rows * d, out.len())?;
        let f = self.function("activation", format!("silu_and_mul_{}", T::NAME))?;
        let d = to_i32("d", d)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(out).arg(x).arg(&d);
        // SAFETY: types match; lengths checked.
        unsafe { b.launch(row_cfg(rows)?) }?;
        Ok(())
    }

    /// Rotates `query`/`key` in place; `cos_sin_cache` is f32 `[max_position, rot_dim]`.
    pub fn rotary_embedding<T: CudaDtype>(
        &self,
        rope: &Rope,
        positions: &Positions,
        query: &mut CudaSlice<T>,
        key: &mut CudaSlice<T>,
        cos_sin_cache: &CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let tokens = positions.positions.len();
        if rope.rot_dim == 0 || !rope.rot_dim.is_multiple_of(2) || rope.rot_dim > rope.head_dim {
            return Err(invalid("rot_dim", format!("{} must be even, > 0 and <= head_dim", rope.rot_dim)).into());
        }
        check_len("query", tokens * rope.num_heads * rope.head_dim, query.len())?;
        check_len("key", tokens * rope.num_kv_heads * rope.head_dim, key.len())?;
        check_len(
            "cos_sin_cache",
            positions.max_position * rope.rot_dim,
            cos_sin_cache.len(),
        )?;
        let f = self.function("rotary", format!("rotary_embedding_{}", T::NAME))?;
        let args = [rope.rot_dim, rope.head_dim, rope.num_heads, rope.num_kv_heads]
            .map(|v| to_i32("rope", v))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let neox = i32::from(rope.layout == RopeLayout::Neox);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&positions.positions).arg(query).arg(key).arg(cos_sin_cache);
        for a in &args {
            b.arg(a);
        }
        b.arg(&neox);
        // SAFETY: types match; positions validated against the table, lengths checked.
        unsafe { b.launch(row_cfg(tokens)?) }?;
        Ok(())
    }

    /// Masked mean pooling (+ L2 normalisation) of `hidden` `[batch, seq_len, hidden_size]`.
    pub fn mean_pool<T: CudaDtype>(
        &self,
        out: &mut CudaSlice<f32>,
        hidden: &CudaSlice<T>,
        mask: &CudaSlice<u32>,
        seq_len: usize,
        hidden_size: usize,
        normalize: bool,
    ) -> Result<(), KernelError> {
        let batch = rows_of("mask", mask.len(), seq_len)?;
        check_len("hidden", batch * seq_len * hidden_size, hidden.len())?;
        check_len("out", batch * hidden_size, out.len())?;
        let f = self.function("pooling", format!("mean_pool_{}", T::NAME))?;
        let (sl, hs, norm) = (
            to_i32("seq_len", seq_len)?,
            to_i32("hidden_size", hidden_size)?,
            i32::from(normalize),
        );
        let mut b = self.stream.launch_builder(&f);
        b.arg(out).arg(hidden).arg(mask).arg(&sl).arg(&hs).arg(&norm);
        // SAFETY: types match; lengths checked.
        unsafe { b.launch(row_cfg(batch)?) }?;
        Ok(())
    }

    fn check_attention<T: CudaDtype>(
        &self,
        out: &CudaSlice<T>,
        q: &CudaSlice<T>,
        cache: &PagedCache<'_, T>,
        meta: &AttentionMetadata,
        num_heads: usize,
        tokens: usize,
    ) -> Result<(), KernelError> {
        if cache.head_dim != 64 && cache.head_dim != 128 {
            return Err(invalid("head_dim", format!("{} (kernels exist for 64 and 128)", cache.head_dim)).into());
        }
        if cache.num_kv_heads == 0 || !num_heads.is_multiple_of(cache.num_kv_heads) {
            return Err(invalid(
                "num_heads",
                format!("{num_heads} is not a multiple of {} KV heads", cache.num_kv_heads),
            )
            .into());
        }
        let cache_len = meta.num_blocks * meta.block_size * cache.num_kv_heads * cache.head_dim;
        check_len("key_cache", cache_len, cache.key_cache.len())?;
        check_len("value_cache", cache_len, cache.value_cache.len())?;
        check_len("q", tokens * num_heads * cache.head_dim, q.len())?;
        check_len("out", q.len(), out.len())?;
        Ok(())
    }

    /// Decode attention: `q`/`out` `[num_seqs, num_heads, head_dim]`, one query per sequence
    /// (metadata built with all `query_lens == 1`).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_decode<T: CudaDtype>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaSlice<T>,
        cache: &PagedCache<'_, T>,
        meta: &AttentionMetadata,
        num_heads: usize,
        scale: f32,
        variant: DecodeVariant,
    ) -> Result<(), KernelError> {
        if meta.max_query_len != 1 {
            return Err(invalid("meta", "decode metadata needs one query token per sequence").into());
        }
        self.check_attention(out, q, cache, meta, num_heads, meta.num_seqs)?;
        let partition_size = match variant {
            DecodeVariant::Auto if meta.max_context_len > PARTITION_SIZE => Some(PARTITION_SIZE),
            DecodeVariant::Auto | DecodeVariant::SinglePass => None,
            DecodeVariant::SplitK { partition_size } => {
                if partition_size == 0 || partition_size % 32 != 0 {
                    return Err(invalid(
                        "partition_size",
                        format!("{partition_size} is not a positive multiple of 32"),
                    )
                    .into());
                }
                Some(partition_size)
            }
        };
        let hd = cache.head_dim;
        let grid_x = to_u32("num_heads", num_heads)?;
        let grid_y = check_grid_yz("num_seqs", meta.num_seqs)?;
        let (nkv, mbs, bs) = (
            to_i32("num_kv_heads", cache.num_kv_heads)?,
            to_i32("max_blocks_per_seq", meta.max_blocks_per_seq)?,
            to_i32("block_size", meta.block_size)?,
        );
        let block = (THREADS, 1, 1);
        match partition_size {
            None => {
                let f = self.function("paged_attention", format!("paged_attention_v1_{}_hd{hd}", T::NAME))?;
                let mut b = self.stream.launch_builder(&f);
                b.arg(out).arg(q).arg(cache.key_cache).arg(cache.value_cache);
                b.arg(&meta.block_tables)
                    .arg(&meta.context_lens)
                    .arg(&nkv)
                    .arg(&scale)
                    .arg(&mbs)
                    .arg(&bs);
                let cfg = LaunchConfig {
                    grid_dim: (grid_x, grid_y, 1),
                    block_dim: block,
                    shared_mem_bytes: 0,
                };
                // SAFETY: types match; shapes checked; block tables validated in attention_metadata.
                unsafe { b.launch(cfg) }?;
            }
            Some(part) => {
                let max_parts = meta.max_context_len.div_ceil(part).max(1);
                let grid_z = check_grid_yz("partitions", max_parts)?;
                let rows = meta.num_seqs * num_heads * max_parts;
                // SAFETY: uninitialised scratch; the reduce kernel reads only partitions the
                // partition kernel wrote (those below ceil(context_len / partition_size)).
                let (mut tmp, mut ml, mut es) = unsafe {
                    (
                        self.stream.alloc::<f32>(rows * hd)?,
                        self.stream.alloc::<f32>(rows)?,
                        self.stream.alloc::<f32>(rows)?,
                    )
                };
                let (part_i, max_parts_i, hd_i) = (to_i32("partition_size", part)?, max_parts as i32, hd as i32);
                let f = self.function("paged_attention", format!("paged_attention_v2_{}_hd{hd}", T::NAME))?;
                let mut b = self.stream.launch_builder(&f);
                b.arg(&mut tmp)
                    .arg(&mut ml)
                    .arg(&mut es)
                    .arg(q)
                    .arg(cache.key_cache)
                    .arg(cache.value_cache);
                b.arg(&meta.block_tables)
                    .arg(&meta.context_lens)
                    .arg(&nkv)
                    .arg(&scale)
                    .arg(&mbs)
                    .arg(&bs)
                    .arg(&part_i);
                let cfg = LaunchConfig {
                    grid_dim: (grid_x, grid_y, grid_z),
                    block_dim: block,
                    shared_mem_bytes: 0,
                };
                // SAFETY: as v1; scratch sized for the whole grid.
                unsafe { b.launch(cfg) }?;
                let f = self.function("paged_attention", format!("paged_attention_reduce_{}", T::NAME))?;
                let mut b = self.stream.launch_builder(&f);
                b.arg(out)
                    .arg(&tmp)
                    .arg(&ml)
                    .arg(&es)
                    .arg(&meta.context_lens)
                    .arg(&hd_i)
                    .arg(&part_i)
                    .arg(&max_parts_i);
                let cfg = LaunchConfig {
                    grid_dim: (grid_x, grid_y, 1),
                    block_dim: block,
                    shared_mem_bytes: 0,
                };
                // SAFETY: reads the scratch written above on the same stream.
                unsafe { b.launch(cfg) }?;
            }
        }
        Ok(())
    }

    /// Varlen causal prefill attention: `q`/`out` `[total_query_tokens, num_heads, head_dim]`, the
    /// queries of each sequence being the last `query_lens[s]` positions of its context. This
    /// chunk's K/V must already be in the cache (run [`Self::reshape_and_cache`] first).
    pub fn paged_attention_prefill<T: CudaDtype>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaSlice<T>,
        cache: &PagedCache<'_, T>,
        meta: &AttentionMetadata,
        num_heads: usize,
        scale: f32,
    ) -> Result<(), KernelError> {
        self.check_attention(out, q, cache, meta, num_heads, meta.total_query_tokens)?;
        // Query rows per block: must match PREFILL_WARPS * PrefillRows<T> in prefill_attention.cu.
        let bm = if std::mem::size_of::<T>() == 4 { 16 } else { 32 };
        let hd = cache.head_dim;
        let f = self.function(
            "prefill_attention",
            format!("paged_attention_prefill_{}_hd{hd}", T::NAME),
        )?;
        let (nkv, mbs, bs) = (
            to_i32("num_kv_heads", cache.num_kv_heads)?,
            to_i32("max_blocks_per_seq", meta.max_blocks_per_seq)?,
            to_i32("block_size", meta.block_size)?,
        );
        let mut b = self.stream.launch_builder(&f);
        b.arg(out).arg(q).arg(cache.key_cache).arg(cache.value_cache);
        b.arg(&meta.block_tables)
            .arg(&meta.context_lens)
            .arg(&meta.cu_seqlens_q)
            .arg(&nkv)
            .arg(&scale)
            .arg(&mbs)
            .arg(&bs);
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32("max_query_len", meta.max_query_len.div_ceil(bm))?,
                check_grid_yz("num_heads", num_heads)?,
                check_grid_yz("num_seqs", meta.num_seqs)?,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: types match; shapes checked; tables validated in attention_metadata.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

fn rows_of(what: &'static str, len: usize, row: usize) -> Result<usize, ShapeError> {
    if row == 0 || !len.is_multiple_of(row) || len == 0 {
        return Err(invalid(
            what,
            format!("length {len} is not a positive multiple of {row}"),
        ));
    }
    Ok(len / row)
}

fn row_cfg(rows: usize) -> Result<LaunchConfig, ShapeError> {
    Ok(LaunchConfig {
        grid_dim: (to_u32("rows", rows)?, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}
