//! `genai-factory ingest PATH...`: walks files and directories (txt, md, html,
//! pdf), ingests them straight into the configured index (no server needed)
//! with a progress bar, then saves the index atomically once. PDF text comes
//! from `pdf-extract` (text layer only: scanned pages without one yield
//! nothing and are skipped as empty).
//!
//! Invariants: a file's document id and source are its canonical path, so
//! re-running the command skips unchanged files and replaces edited ones; the
//! index on disk changes only at the final save. A file that cannot be read
//! or parsed is reported by name and skipped; the others are still ingested
//! and saved, and the command then fails listing the skipped files.
//!
//! Tested by unit tests that ingest `tests/data/corpus` twice into a temporary
//! index (second run: everything unchanged) and search it, and that ingest a
//! PDF written by lopdf next to a corrupt one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use genai_retrieval::chunker::DocFormat;
use genai_retrieval::knowledge::{DocumentInput, IngestResult, IngestStatus, KnowledgeService};

use crate::cli::IngestArgs;
use crate::config::Config;

/// Files per ingest call: the embedder batches across their chunks.
const FILES_PER_CALL: usize = 16;

/// Runs the command; prints a summary line.
pub async fn run(args: IngestArgs, mut config: Config) -> anyhow::Result<()> {
    if let Some(d) = &args.index_dir {
        config.index.dir = d.clone();
    }
    let files = collect_files(&args.paths)?;
    if files.is_empty() {
        bail!("no .txt, .md, .html or .pdf files under the given paths");
    }
    let svc = KnowledgeService::load(&config.models, &config.embedding, &config.index, false)?;
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
    let mut failed: Vec<String> = Vec::new();
    for group in files.chunks(FILES_PER_CALL) {
        let mut docs = Vec::with_capacity(group.len());
        for (path, kind) in group {
            let (content, format) = match read_document(path, *kind) {
                Ok(read) => read,
                Err(e) => {
                    bar.println(format!("skipping {}: {e:#}", path.display()));
                    failed.push(format!("{}: {e:#}", path.display()));
                    bar.inc(1);
                    continue;
                }
            };
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
                format,
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
    if !failed.is_empty() {
        bail!(
            "{} file(s) could not be ingested:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

/// How a file's text is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Read as UTF-8 and chunked in this format.
    Doc(DocFormat),
    /// Text layer extracted from a PDF, chunked as plain text.
    Pdf,
}

impl FileKind {
    /// From a file name's extension (`DocFormat`'s, plus `pdf`).
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("pdf") => Some(Self::Pdf),
            _ => DocFormat::from_path(path).map(Self::Doc),
        }
    }
}

/// A file's text and the format to chunk it as; the error names what failed.
pub fn read_document(path: &Path, kind: FileKind) -> anyhow::Result<(String, DocFormat)> {
    match kind {
        FileKind::Doc(format) => Ok((std::fs::read_to_string(path).context("reading")?, format)),
        FileKind::Pdf => {
            let bytes = std::fs::read(path).context("reading")?;
            Ok((pdf_text(&bytes)?, DocFormat::Text))
        }
    }
}

/// The text layer of a PDF. pdf-extract panics on some malformed inputs
/// (unwraps inside its font and content-stream parsing): caught here and
/// reported as an error, so one bad file never stops an ingest.
pub fn pdf_text(bytes: &[u8]) -> anyhow::Result<String> {
    match std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(bytes)) {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => bail!("not a readable PDF: {e}"),
        Err(_) => bail!("not a readable PDF: the PDF parser failed on this file"),
    }
}

/// Files to ingest with their format, sorted, each once (canonical paths).
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, FileKind)>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{} does not exist", p.display()))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            let Some(f) = FileKind::from_path(p) else {
                bail!(
                    "{}: unsupported file type (expected .txt, .md, .html or .pdf)",
                    p.display()
                );
            };
            out.push((canonical(p)?, f));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, FileKind)>) -> anyhow::Result<()> {
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
        } else if let Some(f) = FileKind::from_path(&path) {
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
    use genai_models::test_support::repo_path;
    use genai_retrieval::index::{Filter, VectorStore};

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

    /// A one-page PDF with `lines` in Helvetica, written with lopdf.
    fn write_pdf(path: &Path, lines: &[&str]) {
        use lopdf::content::{Content, Operation};
        use lopdf::{dictionary, Document, Object, Stream};
        let mut doc = Document::with_version("1.5");
        let pages_id = doc.new_object_id();
        let font_id = doc.add_object(dictionary! {
            "Type" => "Font",
            "Subtype" => "Type1",
            "BaseFont" => "Helvetica",
            "Encoding" => "WinAnsiEncoding",
        });
        let resources_id = doc.add_object(dictionary! { "Font" => dictionary! { "F1" => font_id } });
        let mut ops = vec![
            Operation::new("BT", vec![]),
            Operation::new("Tf", vec!["F1".into(), 12.into()]),
            Operation::new("TL", vec![16.into()]),
            Operation::new("Td", vec![72.into(), 720.into()]),
        ];
        for l in lines {
            ops.push(Operation::new("Tj", vec![Object::string_literal(*l)]));
            ops.push(Operation::new("T*", vec![]));
        }
        ops.push(Operation::new("ET", vec![]));
        let content = Content { operations: ops }.encode().unwrap();
        let content_id = doc.add_object(Stream::new(dictionary! {}, content));
        let page_id = doc.add_object(dictionary! {
            "Type" => "Page",
            "Parent" => pages_id,
            "Contents" => content_id,
        });
        doc.objects.insert(
            pages_id,
            Object::Dictionary(dictionary! {
                "Type" => "Pages",
                "Kids" => vec![page_id.into()],
                "Count" => 1,
                "Resources" => resources_id,
                "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
            }),
        );
        let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
        doc.trailer.set("Root", catalog_id);
        doc.save(path).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ingests_pdf_text_and_reports_a_corrupt_pdf_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let docs = tmp.path().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        write_pdf(
            &docs.join("geology.pdf"),
            &[
                "Basalt columns form when a thick lava flow cools slowly",
                "and contracts, cracking into hexagonal pillars.",
            ],
        );
        std::fs::write(docs.join("broken.pdf"), b"%PDF-1.4\nthis is not really a pdf\n%%EOF").unwrap();
        std::fs::write(docs.join("tides.txt"), "Tides follow the moon.").unwrap();
        let text = pdf_text(&std::fs::read(docs.join("geology.pdf")).unwrap()).unwrap();
        assert!(text.contains("Basalt columns form"), "{text:?}");
        let err = pdf_text(&std::fs::read(docs.join("broken.pdf")).unwrap()).unwrap_err();
        assert!(err.to_string().contains("not a readable PDF"), "{err}");

        let files = collect_files(std::slice::from_ref(&docs)).unwrap();
        assert_eq!(files.iter().filter(|f| f.1 == FileKind::Pdf).count(), 2, "{files:?}");
        let mut config = Config::default();
        config.models.dir = repo_path("models");
        let args = IngestArgs {
            paths: vec![docs.clone()],
            tenant: "docs".into(),
            tags: vec![],
            index_dir: Some(tmp.path().join("index")),
            quiet: true,
        };
        let err = run(args, config).await.unwrap_err().to_string();
        assert!(err.contains("1 file(s)") && err.contains("broken.pdf"), "{err}");
        assert!(!err.contains("geology.pdf"), "{err}");

        // The good files were ingested and saved; the PDF's text is searchable.
        let store = VectorStore::open(
            &crate::config::IndexConfig {
                dir: tmp.path().join("index"),
                ..Default::default()
            },
            384,
        )
        .unwrap();
        assert_eq!(store.stats().documents, 2);
        let q = genai_models::test_support::embedder()
            .embed(&["how do hexagonal basalt columns form?"], 8192)
            .unwrap();
        let hits = store.search(&q[0], 1, &Filter::tenant("docs")).unwrap();
        let pdf_id = docs.join("geology.pdf").canonicalize().unwrap().display().to_string();
        assert_eq!(hits[0].chunk.document_id, pdf_id, "{hits:?}");
        assert!(hits[0].chunk.text.contains("hexagonal pillars"), "{hits:?}");
    }
}
