//! `genai-factory ingest PATH...`: walks files and directories (txt, md, html),
//! ingests them straight into the configured index (no server needed) with a
//! progress bar, then saves the index atomically once.
//!
//! Invariants: a file's document id and source are its canonical path, so
//! re-running the command skips unchanged files and replaces edited ones; the
//! index on disk changes only at the final save.
//!
//! Tested by a unit test that ingests `tests/data/corpus` twice into a
//! temporary index (second run: everything unchanged) and searches it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use super::chunker::DocFormat;
use super::knowledge::{DocumentInput, IngestResult, IngestStatus, KnowledgeService};
use crate::config::Config;

/// Arguments of the `ingest` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Files or directories (searched recursively for .txt, .md, .html).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Tenant the documents belong to (searches only see their own tenant's).
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Tag added to every document (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Index directory (overrides `index.dir`).
    #[arg(long)]
    pub index_dir: Option<PathBuf>,
    /// No progress bar (logs and CI).
    #[arg(long)]
    pub quiet: bool,
}

/// Files per ingest call: the embedder batches across their chunks.
const FILES_PER_CALL: usize = 16;

/// Runs the command; prints a summary line.
pub async fn run(args: IngestArgs, mut config: Config) -> anyhow::Result<()> {
    if let Some(d) = &args.index_dir {
        config.index.dir = d.clone();
    }
    let files = collect_files(&args.paths)?;
    if files.is_empty() {
        bail!("no .txt, .md or .html files under the given paths");
    }
    let svc = KnowledgeService::load(&config, false)?;
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(files.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} files {msg}")
            .context("progress bar template")?,
    );
    let mut results: Vec<IngestResult> = Vec::with_capacity(files.len());
    for group in files.chunks(FILES_PER_CALL) {
        let mut docs = Vec::with_capacity(group.len());
        for (path, format) in group {
            let content = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            if content.trim().is_empty() {
                bar.println(format!("skipping empty file {}", path.display()));
                bar.inc(1);
                continue;
            }
            let id = path.display().to_string();
            docs.push(DocumentInput {
                id: id.clone(),
                tenant: args.tenant.clone(),
                source: id,
                tags: args.tags.clone(),
                format: *format,
                content,
            });
        }
        let n = docs.len() as u64;
        results.extend(svc.ingest(docs).await?);
        bar.inc(n);
        bar.set_message(format!("{} chunks", results.iter().map(|r| r.chunks).sum::<usize>()));
    }
    bar.finish_and_clear();
    svc.save().await.context("saving the index")?;
    let count = |s: IngestStatus| results.iter().filter(|r| r.status == s).count();
    let stats = svc.stats();
    println!(
        "ingested {} files: {} added, {} updated, {} unchanged; index {} now holds {} documents, {} chunks",
        results.len(),
        count(IngestStatus::Added),
        count(IngestStatus::Updated),
        count(IngestStatus::Unchanged),
        config.index.dir.display(),
        stats.documents,
        stats.chunks
    );
    Ok(())
}

/// Files to ingest with their format, sorted, each once (canonical paths).
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, DocFormat)>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{} does not exist", p.display()))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            let Some(f) = DocFormat::from_path(p) else {
                bail!("{}: unsupported file type (expected .txt, .md or .html)", p.display());
            };
            out.push((canonical(p)?, f));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, DocFormat)>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        // Hidden files and directories (.git, editor swap files) are not documents.
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let ft = entry.file_type()?;
        if ft.is_dir() {
            walk(&path, out)?;
        } else if let Some(f) = DocFormat::from_path(&path) {
            out.push((canonical(&path)?, f));
        }
    }
    Ok(())
}

fn canonical(p: &Path) -> anyhow::Result<PathBuf> {
    p.canonicalize().with_context(|| format!("resolving {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrieval::index::{Filter, VectorStore};
    use crate::retrieval::test_support::repo_path;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ingests_a_directory_then_skips_it_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let docs = tmp.path().join("docs");
        std::fs::create_dir_all(docs.join("nested")).unwrap();
        for f in ["tides.md", "volcanoes.html"] {
            std::fs::copy(repo_path("tests/data/corpus").join(f), docs.join("nested").join(f)).unwrap();
        }
        std::fs::write(
            docs.join("notes.txt"),
            "Basalt is a dark volcanic rock.\nIt cools quickly.",
        )
        .unwrap();
        std::fs::write(docs.join("image.png"), [0u8, 1, 2]).unwrap();
        std::fs::write(docs.join(".hidden.txt"), "secret").unwrap();
        let files = collect_files(std::slice::from_ref(&docs)).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        assert!(collect_files(&[docs.join("image.png")]).is_err());

        let mut config = Config::default();
        config.models.dir = repo_path("models");
        let args = IngestArgs {
            paths: vec![docs.clone()],
            tenant: "docs".into(),
            tags: vec!["manual".into()],
            index_dir: Some(tmp.path().join("index")),
            quiet: true,
        };
        run(args.clone(), config.clone()).await.unwrap();
        let store = VectorStore::open(
            &crate::config::IndexConfig {
                dir: tmp.path().join("index"),
                ..Default::default()
            },
            384,
        )
        .unwrap();
        let s = store.stats();
        assert_eq!(s.documents, 3);
        let generation = s.generation;
        let tides = store.document_chunks(
            "docs",
            &docs
                .join("nested/tides.md")
                .canonicalize()
                .unwrap()
                .display()
                .to_string(),
        );
        assert!(
            !tides.is_empty() && tides[0].text.starts_with("Ocean tides"),
            "{tides:?}"
        );
        assert_eq!(tides[0].tags, vec!["manual".to_string()]);
        assert!(store
            .search(&vec![0.05; 384], 10, &Filter::tenant("other"))
            .unwrap()
            .is_empty());
        // Second run: nothing changed, nothing re-embedded (a save still happens).
        run(args, config).await.unwrap();
        let again = VectorStore::open(
            &crate::config::IndexConfig {
                dir: tmp.path().join("index"),
                ..Default::default()
            },
            384,
        )
        .unwrap();
        assert_eq!(again.stats().chunks, s.chunks);
        assert!(again.stats().generation > generation);
    }
}
