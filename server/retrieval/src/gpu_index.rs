//! GPU search for the vector store (feature `faiss-gpu`): a GPU clone of the CPU FAISS index.
//!
//! The CPU index stays the source of truth (it is what upserts and deletes change and what is
//! persisted); [`GpuSearch`] holds FAISS `StandardGpuResources` and a clone made with
//! `faiss_index_cpu_to_gpu` (an `IDMap` keeps its ids on the host and moves the wrapped index to
//! the GPU). Invariants:
//! - The clone is tagged with the store's write counter when made; a search that sees a newer
//!   counter re-clones first, so a GPU search never misses a write the CPU index has.
//! - FAISS GPU indexes are not thread-safe: clone and searches run under one mutex.
//! - Index types without a GPU implementation (HNSW) and `k` above FAISS's GPU k-selection limit
//!   fall back to the CPU search (the first fallback of a store is logged once).
//!
//! Compiled only with `faiss-gpu` (a FAISS build with GPU support needs the full CUDA toolkit), so
//! CI does not build it. Not yet exercised on a GPU: the parity check (`scripts/gpu-parity.py`)
//! runs a `--features cuda` build, whose store searches on the CPU.

use std::ffi::CStr;
use std::ptr;

use parking_lot::Mutex;

use super::RetrievalError;

type Result<T> = std::result::Result<T, RetrievalError>;

/// FAISS's GPU k-selection handles at most this many neighbours per query.
const GPU_MAX_K: usize = 2048;

struct Inner {
    resources: *mut faiss_sys::FaissStandardGpuResources,
    /// The GPU clone (null until the first search) and the write counter it reflects.
    index: *mut faiss_sys::FaissGpuIndex,
    synced_writes: u64,
    /// The index type has no GPU implementation: always search on the CPU.
    unsupported: bool,
}

// SAFETY: the FAISS objects are only touched under the `GpuSearch` mutex, from one thread at a time.
unsafe impl Send for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: both pointers were created by FAISS and are freed once, here (null = never made).
        unsafe {
            if !self.index.is_null() {
                faiss_sys::faiss_Index_free(self.index);
            }
            faiss_sys::faiss_StandardGpuResources_free(self.resources);
        }
    }
}

fn last_error(what: &str, code: i32) -> RetrievalError {
    // SAFETY: FAISS returns a NUL-terminated thread-local message (or null).
    let msg = unsafe {
        let p = faiss_sys::faiss_get_last_error();
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    RetrievalError::Index(format!("{what} (FAISS code {code}): {msg}"))
}

/// GPU resources and the GPU clone of one store's index.
pub(crate) struct GpuSearch {
    device: i32,
    inner: Mutex<Inner>,
}

impl GpuSearch {
    /// FAISS GPU resources on CUDA device `ordinal`.
    pub(crate) fn new(ordinal: usize) -> Result<Self> {
        let mut resources = ptr::null_mut();
        // SAFETY: FAISS writes a new object to `resources` on success.
        let code = unsafe { faiss_sys::faiss_StandardGpuResources_new(&mut resources) };
        if code != 0 {
            return Err(last_error("creating FAISS GPU resources", code));
        }
        let device =
            i32::try_from(ordinal).map_err(|_| RetrievalError::invalid("device", format!("{ordinal} exceeds i32")))?;
        Ok(Self {
            device,
            inner: Mutex::new(Inner {
                resources,
                index: ptr::null_mut(),
                synced_writes: 0,
                unsupported: false,
            }),
        })
    }

    /// Searches the GPU clone of `cpu` (which has seen `writes` writes), re-cloning when stale.
    /// `None` = not on the GPU (index type or `k` unsupported): the caller searches the CPU index.
    pub(crate) fn search(
        &self,
        cpu: &faiss::index::IndexImpl,
        writes: u64,
        query: &[f32],
        k: usize,
    ) -> Result<Option<(Vec<f32>, Vec<i64>)>> {
        if k > GPU_MAX_K {
            return Ok(None);
        }
        let mut g = self.inner.lock();
        if g.unsupported {
            return Ok(None);
        }
        if g.index.is_null() || g.synced_writes != writes {
            if !g.index.is_null() {
                // SAFETY: the old clone is ours and no search is running (we hold the mutex).
                unsafe { faiss_sys::faiss_Index_free(g.index) };
                g.index = ptr::null_mut();
            }
            let mut out = ptr::null_mut();
            // SAFETY: `cpu` is a valid index, read-only for the duration (the caller holds the
            // store's read lock); FAISS writes the new GPU index to `out` on success.
            let code =
                unsafe { faiss_sys::faiss_index_cpu_to_gpu(g.resources, self.device, cpu.inner_ptr(), &mut out) };
            if code != 0 {
                tracing::info!(
                    error = %last_error("cloning the index to the GPU", code),
                    "vector search stays on the CPU for this index type"
                );
                g.unsupported = true;
                return Ok(None);
            }
            g.index = out;
            g.synced_writes = writes;
        }
        let mut scores = vec![0f32; k];
        let mut labels = vec![-1i64; k];
        // SAFETY: `g.index` is a valid GPU index used by this thread only (mutex held); `query`
        // holds one vector of the index dimension (checked by the caller), the outputs k entries.
        let code = unsafe {
            faiss_sys::faiss_Index_search(
                g.index,
                1,
                query.as_ptr(),
                k as faiss_sys::idx_t,
                scores.as_mut_ptr(),
                labels.as_mut_ptr(),
            )
        };
        if code != 0 {
            return Err(last_error("GPU search failed", code));
        }
        Ok(Some((scores, labels)))
    }
}
