//! The vector store: a FAISS index (built from the `index.factory` string,
//! wrapped in an `IDMap`, inner product on L2-normalised vectors = cosine)
//! whose ids map to chunk metadata (document, source, tags, tenant, text,
//! document hash), persisted atomically and reloaded at start.
//!
//! Invariants:
//! - One `RwLock` guards the FAISS index and the metadata together: a search
//!   sees a document either wholly before or wholly after an upsert/delete.
//! - One process writes a directory: a persisted store holds an exclusive
//!   advisory lock on `<dir>/LOCK` (pid and command inside) for its whole life;
//!   a second opener fails at once naming the holder and the fix.
//! - A save copies the index and metadata under a short read lock, then writes
//!   and fsyncs the copy holding no lock: searches and writes go on meanwhile.
//! - Every search filters on the tenant (always) and on the optional source,
//!   tags and document; it over-fetches `overfetch * k` and doubles until `k`
//!   hits pass the filter or the index is exhausted, so filters never return
//!   another tenant's chunk and never return fewer hits than exist.
//! - Ids are never reused. Index types that cannot remove vectors (HNSW) keep
//!   them as tombstones: their metadata is gone, so search skips them.
//! - Persistence is generational: `index-N.faiss` + `meta-N.json` are written
//!   to temp files, fsynced and renamed, then `CURRENT` (holding N) is replaced
//!   the same way and the directory fsynced. A crash before `CURRENT` moves
//!   leaves generation N-1 loadable; stale generations are removed afterwards.
//!
//! Tested here: save/reload round trip, a failed save leaving the previous
//! generation loadable, writes and searches during a save, the directory lock,
//! tenant isolation over random filters, delete and replace, concurrent
//! upserts and searches, Flat/IVF/HNSW factories.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use faiss::index::TryClone;
use faiss::selector::IdSelector;
use faiss::{Idx, Index, MetricType};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::RetrievalError;
use crate::config::IndexConfig;

type Result<T> = std::result::Result<T, RetrievalError>;

const FORMAT_VERSION: u32 = 1;

fn faiss_err(what: &str, e: impl std::fmt::Display) -> RetrievalError {
    RetrievalError::Index(format!("{what}: {e}"))
}

/// Metadata of one stored chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// `"{document_id}#{n}"`, unique within a tenant.
    pub chunk_id: String,
    pub document_id: String,
    pub source: String,
    pub tags: Vec<String>,
    pub tenant: String,
    pub text: String,
    /// SHA-256 (hex) of the document content the chunk came from.
    pub doc_hash: String,
}

/// What a search may return. `tenant` is always enforced ("" is a tenant too).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: String,
    /// Exact source match when set.
    pub source: Option<String>,
    /// Every listed tag must be on the chunk.
    pub tags: Vec<String>,
    /// Only this document when set.
    pub document_id: Option<String>,
}

impl Filter {
    pub fn tenant(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            ..Default::default()
        }
    }

    pub(crate) fn matches(&self, c: &ChunkMeta) -> bool {
        c.tenant == self.tenant
            && self.source.as_ref().is_none_or(|s| *s == c.source)
            && self.document_id.as_ref().is_none_or(|d| *d == c.document_id)
            && self.tags.iter().all(|t| c.tags.contains(t))
    }
}

/// One search result.
#[derive(Debug, Clone)]
pub struct Hit {
    pub id: u64,
    /// Inner product of unit vectors = cosine similarity.
    pub score: f32,
    pub chunk: ChunkMeta,
}

/// A document's chunks to store.
#[derive(Debug, Clone)]
pub struct NewDocument {
    pub tenant: String,
    pub document_id: String,
    pub source: String,
    pub tags: Vec<String>,
    pub doc_hash: String,
    /// `(text, unit vector)` per chunk, in document order.
    pub chunks: Vec<(String, Vec<f32>)>,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Added,
    /// The document existed with different content: its chunks were replaced.
    Replaced,
    /// Same content hash: nothing was touched.
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub documents: usize,
    pub chunks: usize,
    /// Vectors inside FAISS (chunks + tombstones).
    pub vectors: u64,
    pub tombstones: u64,
    pub dimension: usize,
    pub factory: String,
    /// Persisted generation currently on disk (0 = never saved).
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DocEntry {
    tenant: String,
    document_id: String,
    hash: String,
    ids: Vec<u64>,
}

/// The persisted metadata file.
#[derive(Serialize, Deserialize)]
struct MetaFile {
    version: u32,
    factory: String,
    dimension: usize,
    next_id: u64,
    tombstones: u64,
    chunks: Vec<(u64, ChunkMeta)>,
    documents: Vec<DocEntry>,
}

struct State {
    index: faiss::index::IndexImpl,
    chunks: HashMap<u64, ChunkMeta>,
    /// Ordered by (tenant, document id): a tenant's documents are one range.
    docs: BTreeMap<(String, String), DocEntry>,
    next_id: u64,
    tombstones: u64,
    /// Writes (upserts that change something, deletes) since start: tells a GPU copy it is stale.
    #[cfg_attr(not(feature = "faiss-gpu"), allow(dead_code))]
    writes: u64,
}

/// The exclusive advisory lock on `<dir>/LOCK` of the one process that writes
/// an index directory, held as long as this value lives (the OS drops it if
/// the process dies, so a stale LOCK file never blocks anyone).
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock (creating the directory) and writes our pid and command
    /// into the file, or fails at once naming the holder and the fix.
    pub(crate) fn acquire(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| RetrievalError::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join("LOCK");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| RetrievalError::io(format!("opening {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                return Err(RetrievalError::Unavailable(locked_message(dir, &holder)));
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(RetrievalError::io(format!("locking {}", path.display()), e))
            }
        }
        let command: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
        let me = format!("{}\n{}\n", std::process::id(), command.join(" "));
        file.set_len(0)
            .and_then(|_| file.write_all(me.as_bytes()))
            .map_err(|e| RetrievalError::io(format!("writing {}", path.display()), e))?;
        Ok(Self { _file: file })
    }
}

/// What a second opener is told; `holder` is the LOCK file: pid, then command line.
fn locked_message(dir: &Path, holder: &str) -> String {
    let mut lines = holder.lines().map(str::trim);
    let pid = lines.next().filter(|l| !l.is_empty()).unwrap_or("unknown");
    let command = lines.next().filter(|l| !l.is_empty()).unwrap_or("unknown command");
    format!(
        "process {pid} ({command}) holds the index directory {}: ingest through that server with \
         `genai-factory ingest --server http://HOST:PORT ...` (its gRPC address) or stop it",
        dir.display()
    )
}

/// A test's look at the store while a save writes its files.
#[cfg(test)]
type SaveHook = Box<dyn Fn(&VectorStore) + Send>;

/// The thread-safe vector store.
pub struct VectorStore {
    cfg: IndexConfig,
    dim: usize,
    /// Directory persisted to; `None` = memory only.
    dir: Option<PathBuf>,
    state: RwLock<State>,
    /// One save at a time (a save holds no lock on `state` while it writes).
    saving: Mutex<()>,
    /// Persisted generation currently on disk (0 = never saved).
    generation: AtomicU64,
    /// Held for the store's life when it writes a directory.
    _lock: Option<DirLock>,
    /// GPU copy for search (feature `faiss-gpu`, set by [`VectorStore::use_gpu`]).
    #[cfg(feature = "faiss-gpu")]
    gpu: Option<super::gpu_index::GpuSearch>,
    #[cfg(test)]
    fail_save_after_index: std::sync::atomic::AtomicBool,
    /// Runs while a save writes its files (after the snapshot).
    #[cfg(test)]
    while_writing: Mutex<Option<SaveHook>>,
}

impl VectorStore {
    /// A store persisted under `cfg.dir`, the one writer of that directory
    /// (see [`DirLock`]): loads the current generation if one exists, else
    /// starts empty.
    pub fn open(cfg: &IndexConfig, dim: usize) -> Result<Self> {
        Self::open_locked(cfg, dim, DirLock::acquire(&cfg.dir)?)
    }

    /// [`VectorStore::open`] with the directory's lock already taken.
    pub(crate) fn open_locked(cfg: &IndexConfig, dim: usize, lock: DirLock) -> Result<Self> {
        Self::load(cfg, dim, Some(lock))
    }

    fn load(cfg: &IndexConfig, dim: usize, lock: Option<DirLock>) -> Result<Self> {
        let dir = cfg.dir.clone();
        let current = read_current(&dir)?;
        let state = match current {
            Some(g) => load_generation(&dir, g, cfg, dim)?,
            None => new_state(cfg, dim)?,
        };
        Self::build(cfg, dim, Some(dir), state, current.unwrap_or(0), lock)
    }

    /// Reads a directory another store holds (tests inspect what is on disk).
    #[cfg(test)]
    fn open_unlocked(cfg: &IndexConfig, dim: usize) -> Result<Self> {
        Self::load(cfg, dim, None)
    }

    /// A store that is never persisted (benchmarks, tests).
    pub fn in_memory(cfg: &IndexConfig, dim: usize) -> Result<Self> {
        Self::build(cfg, dim, None, new_state(cfg, dim)?, 0, None)
    }

    fn build(
        cfg: &IndexConfig,
        dim: usize,
        dir: Option<PathBuf>,
        state: State,
        generation: u64,
        lock: Option<DirLock>,
    ) -> Result<Self> {
        let store = Self {
            cfg: cfg.clone(),
            dim,
            dir,
            state: RwLock::new(state),
            saving: Mutex::new(()),
            generation: AtomicU64::new(generation),
            _lock: lock,
            #[cfg(feature = "faiss-gpu")]
            gpu: None,
            #[cfg(test)]
            fail_save_after_index: Default::default(),
            #[cfg(test)]
            while_writing: Mutex::new(None),
        };
        store.apply_search_params()?;
        Ok(store)
    }

    /// nprobe / efSearch live in the index object, not in the file: set them
    /// from the config after every build or load.
    fn apply_search_params(&self) -> Result<()> {
        let f = self.cfg.factory.to_ascii_uppercase();
        let st = self.state.read();
        let ps = faiss::index::autotune::ParameterSpace::new().map_err(|e| faiss_err("parameter space", e))?;
        if f.contains("IVF") {
            ps.set_index_parameter(&st.index, "nprobe", self.cfg.nprobe as f64)
                .map_err(|e| faiss_err("setting nprobe", e))?;
        }
        if f.contains("HNSW") {
            ps.set_index_parameter(&st.index, "efSearch", self.cfg.ef_search as f64)
                .map_err(|e| faiss_err("setting efSearch", e))?;
        }
        Ok(())
    }

    /// Searches through a GPU copy of the index on CUDA device `ordinal` from now on (the CPU
    /// index stays the one written and persisted).
    #[cfg(feature = "faiss-gpu")]
    pub(crate) fn use_gpu(&mut self, ordinal: usize) -> Result<()> {
        self.gpu = Some(super::gpu_index::GpuSearch::new(ordinal)?);
        Ok(())
    }

    /// One FAISS search of `k` neighbours: on the GPU copy when there is one that supports the
    /// index type, else on the CPU index.
    fn search_index(&self, st: &State, query: &[f32], k: usize) -> Result<(Vec<f32>, Vec<i64>)> {
        #[cfg(feature = "faiss-gpu")]
        if let Some(gpu) = &self.gpu {
            if let Some(found) = gpu.search(&st.index, st.writes, query, k)? {
                return Ok(found);
            }
        }
        concurrent_search(&st.index, query, k)
    }

    /// Content hash of a stored document, if any.
    pub(crate) fn doc_hash(&self, tenant: &str, document_id: &str) -> Option<String> {
        self.state
            .read()
            .docs
            .get(&(tenant.to_string(), document_id.to_string()))
            .map(|d| d.hash.clone())
    }

    /// Adds a document, replaces it when its hash changed, or leaves it alone.
    pub fn upsert(&self, doc: NewDocument) -> Result<Upsert> {
        for (i, (_, v)) in doc.chunks.iter().enumerate() {
            if v.len() != self.dim {
                return Err(RetrievalError::invalid(
                    format!("chunks[{i}].vector"),
                    format!("dimension {} != index dimension {}", v.len(), self.dim),
                ));
            }
        }
        let key = (doc.tenant.clone(), doc.document_id.clone());
        let mut st = self.state.write();
        let outcome = match st.docs.get(&key) {
            Some(d) if d.hash == doc.doc_hash => return Ok(Upsert::Unchanged),
            Some(_) => Upsert::Replaced,
            None => Upsert::Added,
        };
        st.writes += 1;
        let flat: Vec<f32> = doc.chunks.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        if !st.index.is_trained() && !flat.is_empty() {
            st.index.train(&flat).map_err(|e| {
                RetrievalError::invalid(
                    "index.factory",
                    format!(
                        "{:?} needs training and {} vectors were not enough ({e}); ingest more at once or use Flat",
                        self.cfg.factory,
                        doc.chunks.len()
                    ),
                )
            })?;
        }
        let first = st.next_id;
        let ids: Vec<u64> = (first..first + doc.chunks.len() as u64).collect();
        if !flat.is_empty() {
            let idx: Vec<Idx> = ids.iter().map(|&i| Idx::new(i)).collect();
            st.index
                .add_with_ids(&flat, &idx)
                .map_err(|e| faiss_err("adding vectors", e))?;
        }
        // Only after FAISS accepted the new vectors: drop the old version.
        if let Some(old) = st.docs.remove(&key) {
            remove_ids(&mut st, &old.ids)?;
        }
        st.next_id = first + ids.len() as u64;
        for (n, ((text, _), &id)) in doc.chunks.into_iter().zip(&ids).enumerate() {
            st.chunks.insert(
                id,
                ChunkMeta {
                    chunk_id: format!("{}#{n}", doc.document_id),
                    document_id: doc.document_id.clone(),
                    source: doc.source.clone(),
                    tags: doc.tags.clone(),
                    tenant: doc.tenant.clone(),
                    text,
                    doc_hash: doc.doc_hash.clone(),
                },
            );
        }
        st.docs.insert(
            key,
            DocEntry {
                tenant: doc.tenant,
                document_id: doc.document_id,
                hash: doc.doc_hash,
                ids,
            },
        );
        Ok(outcome)
    }

    /// Removes a document's vectors and metadata; returns how many chunks went.
    pub(crate) fn delete(&self, tenant: &str, document_id: &str) -> Result<usize> {
        let mut st = self.state.write();
        let Some(old) = st.docs.remove(&(tenant.to_string(), document_id.to_string())) else {
            return Err(RetrievalError::NotFound(format!(
                "document {document_id:?} (tenant {tenant:?})"
            )));
        };
        st.writes += 1;
        remove_ids(&mut st, &old.ids)?;
        Ok(old.ids.len())
    }

    /// The `k` best chunks for a unit query vector that pass `filter`.
    pub fn search(&self, query: &[f32], k: usize, filter: &Filter) -> Result<Vec<Hit>> {
        if query.len() != self.dim {
            return Err(RetrievalError::invalid(
                "query",
                format!("vector dimension {} != index dimension {}", query.len(), self.dim),
            ));
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        let st = self.state.read();
        let total = st.index.ntotal() as usize;
        if total == 0 {
            return Ok(Vec::new());
        }
        let mut fetch = (k * self.cfg.overfetch).min(total);
        loop {
            let (scores, labels) = self.search_index(&st, query, fetch)?;
            let hits: Vec<Hit> = labels
                .iter()
                .zip(&scores)
                .filter(|(&l, _)| l >= 0)
                .filter_map(|(&l, &s)| {
                    let c = st.chunks.get(&(l as u64))?;
                    filter.matches(c).then(|| Hit {
                        id: l as u64,
                        score: s,
                        chunk: c.clone(),
                    })
                })
                .take(k)
                .collect();
            if hits.len() == k || fetch >= total {
                return Ok(hits);
            }
            fetch = (fetch * 2).min(total);
        }
    }

    /// Chunks of a stored document, in order (for tests and inspection).
    pub fn document_chunks(&self, tenant: &str, document_id: &str) -> Vec<ChunkMeta> {
        let st = self.state.read();
        st.docs
            .get(&(tenant.to_string(), document_id.to_string()))
            .map(|d| d.ids.iter().filter_map(|i| st.chunks.get(i).cloned()).collect())
            .unwrap_or_default()
    }

    /// Whether `tenant` has at least one document (O(log documents)).
    pub fn has_documents(&self, tenant: &str) -> bool {
        let st = self.state.read();
        st.docs
            .range((tenant.to_owned(), String::new())..)
            .next()
            .is_some_and(|((t, _), _)| t == tenant)
    }

    pub fn stats(&self) -> Stats {
        let generation = self.generation.load(Ordering::Acquire);
        let st = self.state.read();
        Stats {
            documents: st.docs.len(),
            chunks: st.chunks.len(),
            vectors: st.index.ntotal(),
            tombstones: st.tombstones,
            dimension: self.dim,
            factory: self.cfg.factory.clone(),
            generation,
        }
    }

    /// Persists a new generation atomically (no-op for in-memory stores): a copy
    /// of the index and metadata taken under a short read lock, written out
    /// while searches and writes go on.
    pub(crate) fn save(&self) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let _one = self.saving.lock();
        // Past any generation a crashed save may have left behind.
        let next = newest_generation_on_disk(dir)?.max(self.generation.load(Ordering::Acquire)) + 1;
        let (index, meta) = {
            let st = self.state.read();
            let index = st.index.try_clone().map_err(|e| faiss_err("copying the index", e))?;
            let meta = MetaFile {
                version: FORMAT_VERSION,
                factory: self.cfg.factory.clone(),
                dimension: self.dim,
                next_id: st.next_id,
                tombstones: st.tombstones,
                chunks: st.chunks.iter().map(|(k, v)| (*k, v.clone())).collect(),
                documents: st.docs.values().cloned().collect(),
            };
            (index, meta)
        };
        #[cfg(test)]
        if let Some(hook) = self.while_writing.lock().as_ref() {
            hook(self);
        }
        let index_path = dir.join(format!("index-{next}.faiss"));
        let tmp = tmp_path(&index_path);
        let tmp_str = tmp
            .to_str()
            .ok_or_else(|| RetrievalError::invalid("index.dir", "path is not valid UTF-8"))?;
        faiss::write_index(&index, tmp_str).map_err(|e| faiss_err("writing the index", e))?;
        drop(index);
        fsync_file(&tmp)?;
        rename(&tmp, &index_path)?;
        #[cfg(test)]
        if self.fail_save_after_index.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RetrievalError::Index(
                "injected failure after writing the index file".into(),
            ));
        }
        let json = serde_json::to_vec(&meta).map_err(|e| RetrievalError::Index(format!("encoding metadata: {e}")))?;
        drop(meta);
        write_atomic(&dir.join(format!("meta-{next}.json")), &json)?;
        write_atomic(&dir.join("CURRENT"), format!("{next}\n").as_bytes())?;
        self.generation.store(next, Ordering::Release);
        remove_stale_generations(dir, next);
        Ok(())
    }
}

fn new_state(cfg: &IndexConfig, dim: usize) -> Result<State> {
    let description = format!("IDMap,{}", cfg.factory.trim());
    let index = faiss::index_factory(dim as u32, &description, MetricType::InnerProduct)
        .map_err(|e| RetrievalError::invalid("index.factory", format!("{:?}: {e}", cfg.factory)))?;
    // Saves snapshot the index by copying it: refuse a type FAISS cannot copy now, not at the first save.
    index.try_clone().map_err(|e| {
        RetrievalError::invalid(
            "index.factory",
            format!(
                "{:?} cannot be copied for saving ({e}); use Flat, IVF or HNSW",
                cfg.factory
            ),
        )
    })?;
    Ok(State {
        index,
        chunks: HashMap::new(),
        docs: BTreeMap::new(),
        next_id: 0,
        tombstones: 0,
        writes: 0,
    })
}

/// Removes ids from FAISS, or keeps them as tombstones where the index type
/// cannot remove (HNSW); their metadata goes either way.
fn remove_ids(st: &mut State, ids: &[u64]) -> Result<()> {
    for id in ids {
        st.chunks.remove(id);
    }
    if ids.is_empty() {
        return Ok(());
    }
    let idx: Vec<Idx> = ids.iter().map(|&i| Idx::new(i)).collect();
    let sel = IdSelector::batch(&idx).map_err(|e| faiss_err("id selector", e))?;
    match st.index.remove_ids(&sel) {
        Ok(_) => {}
        Err(_) => st.tombstones += ids.len() as u64,
    }
    Ok(())
}

/// FAISS CPU searches are read-only and thread-safe, but the crate's
/// `Index::search` takes `&mut self` for `IndexImpl`; call the C API with a
/// shared reference so searches run concurrently under the read lock.
fn concurrent_search(index: &faiss::index::IndexImpl, query: &[f32], k: usize) -> Result<(Vec<f32>, Vec<i64>)> {
    let mut scores = vec![0f32; k];
    let mut labels = vec![-1i64; k];
    // SAFETY: `index` is a valid FAISS index for the lifetime of the borrow (we
    // hold the state's read lock, so no writer mutates it); `query` holds one
    // vector of the index dimension (checked by the caller) and the output
    // buffers hold exactly k entries each.
    let code = unsafe {
        faiss_sys::faiss_Index_search(
            index.inner_ptr(),
            1,
            query.as_ptr(),
            k as faiss_sys::idx_t,
            scores.as_mut_ptr(),
            labels.as_mut_ptr(),
        )
    };
    if code != 0 {
        return Err(RetrievalError::Index(format!("search failed (FAISS code {code})")));
    }
    Ok((scores, labels))
}

fn read_current(dir: &Path) -> Result<Option<u64>> {
    let p = dir.join("CURRENT");
    match fs::read_to_string(&p) {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| RetrievalError::Index(format!("{}: not a generation number: {s:?}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RetrievalError::io(format!("reading {}", p.display()), e)),
    }
}

fn load_generation(dir: &Path, generation: u64, cfg: &IndexConfig, dim: usize) -> Result<State> {
    let meta_path = dir.join(format!("meta-{generation}.json"));
    let bytes = fs::read(&meta_path).map_err(|e| RetrievalError::io(format!("reading {}", meta_path.display()), e))?;
    let meta: MetaFile =
        serde_json::from_slice(&bytes).map_err(|e| RetrievalError::Index(format!("{}: {e}", meta_path.display())))?;
    if meta.version != FORMAT_VERSION {
        return Err(RetrievalError::Index(format!(
            "{}: format version {} (expected {FORMAT_VERSION})",
            meta_path.display(),
            meta.version
        )));
    }
    if meta.dimension != dim {
        return Err(RetrievalError::Index(format!(
            "index at {} holds {}-d vectors but the embedding model makes {dim}-d ones: re-ingest into a new index.dir",
            dir.display(),
            meta.dimension
        )));
    }
    if meta.factory.trim() != cfg.factory.trim() {
        return Err(RetrievalError::invalid(
            "index.factory",
            format!(
                "index at {} was built as {:?}, config says {:?}: re-ingest into a new index.dir or change it back",
                dir.display(),
                meta.factory,
                cfg.factory
            ),
        ));
    }
    let index_path = dir.join(format!("index-{generation}.faiss"));
    let path_str = index_path
        .to_str()
        .ok_or_else(|| RetrievalError::invalid("index.dir", "path is not valid UTF-8"))?;
    let index = faiss::read_index(path_str).map_err(|e| faiss_err(path_str, e))?;
    let expected = meta.chunks.len() as u64 + meta.tombstones;
    if index.ntotal() != expected {
        return Err(RetrievalError::Index(format!(
            "{path_str} holds {} vectors, metadata expects {expected}",
            index.ntotal()
        )));
    }
    Ok(State {
        index,
        chunks: meta.chunks.into_iter().collect(),
        docs: meta
            .documents
            .into_iter()
            .map(|d| ((d.tenant.clone(), d.document_id.clone()), d))
            .collect(),
        next_id: meta.next_id,
        tombstones: meta.tombstones,
        writes: 0,
    })
}

fn generation_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("index-").or_else(|| name.strip_prefix("meta-"))?;
    rest.split('.').next()?.parse().ok()
}

fn newest_generation_on_disk(dir: &Path) -> Result<u64> {
    let rd = fs::read_dir(dir).map_err(|e| RetrievalError::io(format!("listing {}", dir.display()), e))?;
    Ok(rd
        .filter_map(|e| e.ok())
        .filter_map(|e| generation_of(&e.file_name().to_string_lossy()))
        .max()
        .unwrap_or(0))
}

/// Best effort: a leftover file costs disk space, not correctness.
fn remove_stale_generations(dir: &Path, keep: u64) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.filter_map(|e| e.ok()) {
            if generation_of(&e.file_name().to_string_lossy()).is_some_and(|g| g != keep) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn tmp_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn fsync_file(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| RetrievalError::io(format!("fsync {}", p.display()), e))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| RetrievalError::io(format!("fsync {}", dir.display()), e))
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to)
        .map_err(|e| RetrievalError::io(format!("renaming {} to {}", from.display(), to.display()), e))?;
    fsync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// temp file, write, fsync, rename over `path`, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).map_err(|e| RetrievalError::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| RetrievalError::io(format!("writing {}", tmp.display()), e))?;
    drop(f);
    rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const D: usize = 16;

    fn cfg(dir: &Path, factory: &str) -> IndexConfig {
        IndexConfig {
            dir: dir.to_path_buf(),
            factory: factory.into(),
            ..Default::default()
        }
    }

    fn unit(rng: &mut impl Rng) -> Vec<f32> {
        let mut v: Vec<f32> = (0..D).map(|_| rng.random_range(-1.0..1.0)).collect();
        genai_models::embedder::normalize(&mut v);
        v
    }

    fn doc(tenant: &str, id: &str, hash: &str, vecs: Vec<Vec<f32>>, tags: &[&str]) -> NewDocument {
        NewDocument {
            tenant: tenant.into(),
            document_id: id.into(),
            source: format!("{id}.txt"),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            doc_hash: hash.into(),
            chunks: vecs
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("{id} chunk {i}"), v))
                .collect(),
        }
    }

    fn fill(store: &VectorStore, rng: &mut impl Rng, docs: usize) {
        for d in 0..docs {
            let vecs = (0..3).map(|_| unit(rng)).collect();
            store.upsert(doc("t", &format!("d{d}"), "h", vecs, &[])).unwrap();
        }
    }

    #[test]
    fn exact_vector_is_top_hit_and_reload_returns_same_results() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let c = cfg(tmp.path(), "Flat");
        let store = VectorStore::open(&c, D).unwrap();
        fill(&store, &mut rng, 20);
        let q = store.document_chunks("t", "d7");
        assert_eq!(q.len(), 3);
        let probe = unit(&mut rng);
        let before = store.search(&probe, 5, &Filter::tenant("t")).unwrap();
        store.save().unwrap();
        assert_eq!(store.stats().chunks, 60);
        drop(store);
        let again = VectorStore::open(&c, D).unwrap();
        let after = again.search(&probe, 5, &Filter::tenant("t")).unwrap();
        assert_eq!(before.len(), 5);
        let ids = |h: &[Hit]| h.iter().map(|h| (h.id, h.chunk.chunk_id.clone())).collect::<Vec<_>>();
        assert_eq!(ids(&before), ids(&after));
        assert_eq!(again.stats().generation, 1);
        // Ids keep growing after a reload (never reuse one) and an exact
        // vector comes back first with cosine 1.
        let v = unit(&mut rng);
        again.upsert(doc("t", "new", "h", vec![v.clone()], &[])).unwrap();
        let top = &again.search(&v, 1, &Filter::tenant("t")).unwrap()[0];
        assert_eq!((top.id, top.chunk.chunk_id.as_str()), (60, "new#0"));
        assert!((top.score - 1.0).abs() < 1e-5);
        assert_eq!(again.stats().chunks, 61);
    }

    #[test]
    fn failed_save_leaves_previous_generation_loadable() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let c = cfg(tmp.path(), "Flat");
        let store = VectorStore::open(&c, D).unwrap();
        fill(&store, &mut rng, 5);
        store.save().unwrap();
        fill(&store, &mut rng, 12); // d0..d11: 7 new documents
        store
            .fail_save_after_index
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(store.save().is_err());
        // What a crash mid-write leaves too: a torn temp metadata file.
        fs::write(tmp.path().join("meta-2.json.tmp"), b"{\"version\": 1, \"fact").unwrap();
        let reloaded = VectorStore::open_unlocked(&c, D).unwrap();
        assert_eq!(reloaded.stats().documents, 5);
        assert_eq!(reloaded.stats().vectors, 15);
        // The next good save moves past the torn generation and loads fine.
        store
            .fail_save_after_index
            .store(false, std::sync::atomic::Ordering::SeqCst);
        store.save().unwrap();
        let latest = VectorStore::open_unlocked(&c, D).unwrap();
        assert_eq!(latest.stats().documents, 12);
        assert!(latest.stats().generation > 2);
        let left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 4, "only LOCK, CURRENT + one generation remain: {left:?}");
    }

    #[test]
    fn writes_and_searches_go_on_while_a_save_writes_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let c = cfg(tmp.path(), "Flat");
        let store = VectorStore::open(&c, D).unwrap();
        fill(&store, &mut rng, 200);
        let late = unit(&mut rng);
        let during = late.clone();
        *store.while_writing.lock() = Some(Box::new(move |s: &VectorStore| {
            // On this thread, so a lock the save held would deadlock or fail here.
            assert!(
                s.state.try_write().is_some(),
                "the save holds the state lock while writing"
            );
            s.upsert(doc("t", "late", "h", vec![during.clone()], &[])).unwrap();
            let top = &s.search(&during, 1, &Filter::tenant("t")).unwrap()[0];
            assert_eq!(top.chunk.document_id, "late");
            assert_eq!(s.stats().documents, 201);
        }));
        store.save().unwrap();
        assert_eq!(store.stats().generation, 1);
        // The generation on disk is the snapshot taken before the write.
        let saved = VectorStore::open_unlocked(&c, D).unwrap();
        assert_eq!(saved.stats().documents, 200);
        assert!(saved.document_chunks("t", "late").is_empty());
        *store.while_writing.lock() = None;
        store.save().unwrap();
        drop(store);
        let again = VectorStore::open(&c, D).unwrap();
        assert_eq!(again.stats().documents, 201);
        assert_eq!(
            again.search(&late, 1, &Filter::tenant("t")).unwrap()[0]
                .chunk
                .document_id,
            "late"
        );
    }

    #[test]
    fn one_writer_per_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(&tmp.path().join("index"), "Flat");
        let first = VectorStore::open(&c, D).unwrap();
        let lock = fs::read_to_string(tmp.path().join("index/LOCK")).unwrap();
        assert!(lock.starts_with(&format!("{}\n", std::process::id())), "{lock:?}");
        let e = match VectorStore::open(&c, D) {
            Err(e) => e,
            Ok(_) => panic!("a second writer opened the directory"),
        };
        let msg = e.to_string();
        assert!(matches!(e, RetrievalError::Unavailable(_)), "{e}");
        for want in [
            format!("process {}", std::process::id()),
            c.dir.display().to_string(),
            "genai-factory ingest --server http://".into(),
            "or stop it".into(),
        ] {
            assert!(msg.contains(&want), "{want:?} missing from {msg:?}");
        }
        drop(first);
        let second = VectorStore::open(&c, D).unwrap();
        assert_eq!(second.stats().documents, 0);
    }

    #[test]
    fn tenants_and_filters_never_leak() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let store = VectorStore::in_memory(&cfg(Path::new("unused"), "Flat"), D).unwrap();
        let tenants = ["a", "b", "c", ""];
        let tags = ["x", "y", "z"];
        for d in 0..120 {
            let t = tenants[d % tenants.len()];
            let tg = [tags[d % 3], tags[(d / 3) % 3]];
            store
                .upsert(doc(
                    t,
                    &format!("doc{d}"),
                    "h",
                    vec![unit(&mut rng), unit(&mut rng)],
                    &tg,
                ))
                .unwrap();
        }
        for _ in 0..300 {
            let f = Filter {
                tenant: tenants[rng.random_range(0..4)].into(),
                tags: if rng.random_bool(0.5) {
                    vec![tags[rng.random_range(0..3)].into()]
                } else {
                    vec![]
                },
                source: rng
                    .random_bool(0.2)
                    .then(|| format!("doc{}.txt", rng.random_range(0..120))),
                document_id: None,
            };
            let k = rng.random_range(1..40);
            let hits = store.search(&unit(&mut rng), k, &f).unwrap();
            let all_matching = store.state.read().chunks.values().filter(|c| f.matches(c)).count();
            assert_eq!(hits.len(), k.min(all_matching), "over-fetch must find every match");
            assert!(hits.iter().all(|h| f.matches(&h.chunk)), "leak with {f:?}");
            assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        }
    }

    #[test]
    fn reingest_skips_unchanged_replaces_changed_and_delete_removes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let store = VectorStore::in_memory(&cfg(Path::new("unused"), "Flat"), D).unwrap();
        let v = unit(&mut rng);
        assert_eq!(
            store.upsert(doc("t", "a", "h1", vec![v.clone()], &[])).unwrap(),
            Upsert::Added
        );
        assert_eq!(
            store.upsert(doc("t", "a", "h1", vec![unit(&mut rng)], &[])).unwrap(),
            Upsert::Unchanged
        );
        assert_eq!(
            store.search(&v, 1, &Filter::tenant("t")).unwrap()[0].chunk.document_id,
            "a"
        );
        let w = unit(&mut rng);
        assert_eq!(
            store
                .upsert(doc("t", "a", "h2", vec![w.clone(), unit(&mut rng)], &[]))
                .unwrap(),
            Upsert::Replaced
        );
        let s = store.stats();
        assert_eq!((s.documents, s.chunks, s.vectors), (1, 2, 2));
        // Per tenant, exactly: neither a prefix ("") nor an extension ("tt") of the name counts.
        assert!(store.has_documents("t"));
        assert!(!store.has_documents("") && !store.has_documents("tt") && !store.has_documents("s"));
        assert!((store.search(&w, 1, &Filter::tenant("t")).unwrap()[0].score - 1.0).abs() < 1e-5);
        assert_eq!(store.delete("t", "a").unwrap(), 2);
        assert!(!store.has_documents("t"));
        assert!(store.search(&w, 5, &Filter::tenant("t")).unwrap().is_empty());
        assert_eq!(store.stats().vectors, 0);
        assert!(matches!(store.delete("t", "a"), Err(RetrievalError::NotFound(_))));
        assert!(matches!(
            store.search(&[0.0; 3], 1, &Filter::default()),
            Err(RetrievalError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn ivf_and_hnsw_factories_work_and_hnsw_deletes_by_tombstone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for factory in ["IVF4,Flat", "HNSW16"] {
            let store = VectorStore::in_memory(&cfg(Path::new("unused"), factory), D).unwrap();
            let vecs: Vec<Vec<f32>> = (0..200).map(|_| unit(&mut rng)).collect();
            store.upsert(doc("t", "big", "h", vecs.clone(), &[])).unwrap();
            let hit = &store.search(&vecs[17], 1, &Filter::tenant("t")).unwrap()[0];
            assert_eq!(hit.chunk.chunk_id, "big#17", "{factory}");
            store.delete("t", "big").unwrap();
            assert!(
                store.search(&vecs[17], 3, &Filter::tenant("t")).unwrap().is_empty(),
                "{factory}"
            );
        }
        let bad = VectorStore::in_memory(&cfg(Path::new("unused"), "NoSuchIndex"), D);
        assert!(matches!(bad, Err(RetrievalError::InvalidArgument { field, .. }) if field == "index.factory"));
    }

    #[test]
    fn concurrent_upserts_and_searches_stay_consistent() {
        let store = std::sync::Arc::new(VectorStore::in_memory(&cfg(Path::new("unused"), "Flat"), D).unwrap());
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let s = store.clone();
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(10 + w);
                    for d in 0..100 {
                        // Each document's 4 chunks share one vector: a reader
                        // that sees a document must see all 4 of its chunks.
                        let v = unit(&mut rng);
                        let id = format!("w{w}d{}", d % 30);
                        s.upsert(doc("t", &id, &format!("{d}"), vec![v; 4], &[])).unwrap();
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let s = store.clone();
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(20 + r);
                    for _ in 0..200 {
                        let hits = s.search(&unit(&mut rng), 4, &Filter::tenant("t")).unwrap();
                        if let Some(top) = hits.first() {
                            let same = hits
                                .iter()
                                .filter(|h| h.chunk.document_id == top.chunk.document_id)
                                .count();
                            assert_eq!(same, hits.len().min(4), "torn document {}", top.chunk.document_id);
                        }
                    }
                })
            })
            .collect();
        for t in writers.into_iter().chain(readers) {
            t.join().unwrap();
        }
        let s = store.stats();
        assert_eq!((s.documents, s.chunks, s.vectors), (60, 240, 240));
    }
}
