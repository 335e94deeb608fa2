//! `genai-factory ingest PATH...`: walks files and directories (txt, md, html,
//! pdf) and ingests them with a progress bar, either straight into the
//! configured index (saved atomically once at the end) or, with `--server URL`,
//! through a running server: the documents are streamed to its gRPC
//! `genai.v1.Knowledge/IngestStream`, because the server holds the index
//! directory's lock. Without `--server`, an index held by a server fails the
//! command at once with the holder and the fix. PDF text comes from
//! `pdf-extract` (text layer only: scanned pages without one yield nothing and
//! are skipped as empty).
//!
//! Invariants: a file's document id and source are its canonical path, so
//! re-running the command skips unchanged files and replaces edited ones; the
//! index on disk changes only at the final save (or, through a server, as the
//! server saves). A file that cannot be read or parsed is reported by name and
//! skipped; the others are still ingested, and the command then fails listing
//! the skipped files.
//!
//! Tested by unit tests that ingest `tests/data/corpus` twice into a temporary
//! index (second run: everything unchanged) and search it, that ingest a PDF
//! written by lopdf next to a corrupt one, and that ingest through an
//! in-process gRPC server holding the index while a direct ingest is refused.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use genai_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use pb::knowledge_client::KnowledgeClient;
use tokio_stream::wrappers::ReceiverStream;

use genai_retrieval::chunker::DocFormat;
use genai_retrieval::knowledge::{DocumentInput, IngestResult, IngestStatus, KnowledgeService};

use crate::cli::IngestArgs;
use crate::config::Config;

/// Files per ingest call: the embedder batches across their chunks.
const FILES_PER_CALL: usize = 16;
/// Documents read ahead of the gRPC stream.
const STREAM_AHEAD: usize = 4;

/// Runs the command; prints a summary line.
pub async fn run(args: IngestArgs, mut config: Config) -> anyhow::Result<()> {
    if let Some(d) = &args.index_dir {
        config.index.dir = d.clone();
    }
    let files = collect_files(&args.paths)?;
    if files.is_empty() {
        bail!("no .txt, .md, .html or .pdf files under the given paths");
    }
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(files.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} files {msg}")
            .context("progress bar template")?,
    );
    let mut failed: Vec<String> = Vec::new();
    let summary = match &args.server {
        Some(url) => ingest_remote(url, &args, files, &bar, &mut failed).await?,
        None => ingest_local(&args, &config, &files, &bar, &mut failed).await?,
    };
    println!("{summary}");
    if !failed.is_empty() {
        bail!(
            "{} file(s) could not be ingested:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

/// Opens the index itself (it must not be held by a server) and saves it once at the end.
async fn ingest_local(
    args: &IngestArgs,
    config: &Config,
    files: &[(PathBuf, FileKind)],
    bar: &ProgressBar,
    failed: &mut Vec<String>,
) -> anyhow::Result<String> {
    let svc = KnowledgeService::load(&config.models, &config.embedding, &config.index, false)?;
    let mut results: Vec<IngestResult> = Vec::with_capacity(files.len());
    for group in files.chunks(FILES_PER_CALL) {
        let mut docs = Vec::with_capacity(group.len());
        for (path, kind) in group {
            match document(path, *kind, args) {
                Ok(Some(doc)) => docs.push(doc),
                outcome => skip(path, outcome.err(), bar, failed),
            }
        }
        let n = docs.len() as u64;
        results.extend(svc.ingest(docs).await?);
        bar.inc(n);
        bar.set_message(format!("{} chunks", results.iter().map(|r| r.chunks).sum::<usize>()));
    }
    bar.finish_and_clear();
    svc.save().await.context("saving the index")?;
    let stats = svc.stats();
    Ok(summary(
        results.iter().map(|r| r.status),
        &format!("index {}", config.index.dir.display()),
        Some((stats.documents, stats.chunks)),
    ))
}

/// Streams the documents to the server at `url` (`Knowledge/IngestStream`), one message per
/// document, reading files while earlier ones are sent.
async fn ingest_remote(
    url: &str,
    args: &IngestArgs,
    files: Vec<(PathBuf, FileKind)>,
    bar: &ProgressBar,
    failed: &mut Vec<String>,
) -> anyhow::Result<String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("--server {url:?} is not a gRPC address like http://127.0.0.1:50051"))?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the server at {url}"))?;
    let mut client = KnowledgeClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_AHEAD);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let authorization: Option<tonic::metadata::AsciiMetadataValue> = args
        .api_key
        .as_ref()
        .map(|k| format!("Bearer {k}").parse())
        .transpose()
        .context("--api-key cannot be sent as an authorization header")?;
    if let Some(v) = &authorization {
        request.metadata_mut().insert("authorization", v.clone());
    }
    if !args.tenant.is_empty() {
        let tenant = args
            .tenant
            .parse()
            .with_context(|| format!("--tenant {:?} cannot be sent as an x-tenant-id header", args.tenant))?;
        request.metadata_mut().insert("x-tenant-id", tenant);
    }
    let producer = tokio::spawn(stream_documents(files, args.clone(), bar.clone(), tx));
    let response = client.ingest_stream(request).await;
    let (sent, skipped) = producer.await.context("reading the files")?;
    failed.extend(skipped);
    bar.finish_and_clear();
    let results = match response {
        Ok(r) => r.into_inner().results,
        // Every file was skipped: the server refuses an empty stream, and there is nothing to report.
        Err(s) if sent == 0 && s.code() == tonic::Code::InvalidArgument => Vec::new(),
        Err(s) => bail!(
            "the server at {url} failed the ingest ({:?}): {}",
            s.code(),
            s.message()
        ),
    };
    let mut stats_request = tonic::Request::new(pb::StatsRequest {});
    if let Some(v) = authorization {
        stats_request.metadata_mut().insert("authorization", v);
    }
    let totals = match client.stats(stats_request).await {
        Ok(s) => Some((s.get_ref().documents as usize, s.get_ref().chunks as usize)),
        // Server-wide counts need the `metrics` scope, which an ingest key need not have.
        Err(s) if s.code() == tonic::Code::PermissionDenied => None,
        Err(s) => bail!("asking the server at {url} for its stats: {}", s.message()),
    };
    let statuses = results.iter().map(|r| match pb::IngestStatus::try_from(r.status) {
        Ok(pb::IngestStatus::Updated) => IngestStatus::Updated,
        Ok(pb::IngestStatus::Unchanged) => IngestStatus::Unchanged,
        _ => IngestStatus::Added,
    });
    Ok(summary(statuses, &format!("the server at {url}"), totals))
}

/// Reads the files (off the async workers) into stream messages; returns how many were sent and
/// the files that could not be read. Stops early when the call has ended (its error is reported).
async fn stream_documents(
    files: Vec<(PathBuf, FileKind)>,
    args: IngestArgs,
    bar: ProgressBar,
    tx: tokio::sync::mpsc::Sender<pb::IngestStreamRequest>,
) -> (usize, Vec<String>) {
    let (mut sent, mut failed) = (0, Vec::new());
    for (path, kind) in files {
        let read = {
            let (path, args) = (path.clone(), args.clone());
            tokio::task::spawn_blocking(move || document(&path, kind, &args))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("reading task: {e}")))
        };
        let doc = match read {
            Ok(Some(doc)) => doc,
            outcome => {
                skip(&path, outcome.err(), &bar, &mut failed);
                continue;
            }
        };
        let format = match doc.format {
            DocFormat::Text => pb::DocumentFormat::Text,
            DocFormat::Markdown => pb::DocumentFormat::Markdown,
            DocFormat::Html => pb::DocumentFormat::Html,
        };
        let msg = pb::IngestStreamRequest {
            document: Some(pb::Document {
                id: doc.id,
                tenant: doc.tenant,
                source: doc.source,
                tags: doc.tags,
                format: format as i32,
                content: doc.content,
            }),
        };
        if tx.send(msg).await.is_err() {
            break;
        }
        sent += 1;
        bar.inc(1);
        bar.set_message(format!("{sent} sent"));
    }
    (sent, failed)
}

/// A file as a document to ingest; `Ok(None)` for a file without text.
fn document(path: &Path, kind: FileKind, args: &IngestArgs) -> anyhow::Result<Option<DocumentInput>> {
    let (content, format) = read_document(path, kind)?;
    if content.trim().is_empty() {
        return Ok(None);
    }
    let id = path.display().to_string();
    Ok(Some(DocumentInput {
        id: id.clone(),
        tenant: args.tenant.clone(),
        source: id,
        tags: args.tags.clone(),
        format,
        content,
    }))
}

/// Reports a file that yields no document: empty (`error` None) or unreadable (kept in `failed`).
fn skip(path: &Path, error: Option<anyhow::Error>, bar: &ProgressBar, failed: &mut Vec<String>) {
    match error {
        None => bar.println(format!("skipping empty file {}", path.display())),
        Some(e) => {
            bar.println(format!("skipping {}: {e:#}", path.display()));
            failed.push(format!("{}: {e:#}", path.display()));
        }
    }
    bar.inc(1);
}

/// The summary line: what happened to each file, and what `target` holds now.
/// `totals` (documents, chunks) of `target`; None when the server would not tell this key.
fn summary(statuses: impl Iterator<Item = IngestStatus>, target: &str, totals: Option<(usize, usize)>) -> String {
    let statuses: Vec<IngestStatus> = statuses.collect();
    let count = |want: IngestStatus| statuses.iter().filter(|s| **s == want).count();
    let held = match totals {
        Some((documents, chunks)) => format!("{target} now holds {documents} documents, {chunks} chunks"),
        None => format!("{target}'s totals need a key with the metrics scope"),
    };
    format!(
        "ingested {} files: {} added, {} updated, {} unchanged; {held}",
        statuses.len(),
        count(IngestStatus::Added),
        count(IngestStatus::Updated),
        count(IngestStatus::Unchanged),
    )
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
            server: None,
            api_key: None,
            quiet: true,
        };
        run(args.clone(), config.clone()).await.unwrap();
        let store = open_index(&tmp.path().join("index"));
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
        drop(store); // one writer per index directory
        run(args, config).await.unwrap();
        let again = open_index(&tmp.path().join("index"));
        assert_eq!(again.stats().chunks, s.chunks);
        assert!(again.stats().generation > generation);
    }

    /// A one-page PDF with `lines` in Helvetica, written with lopdf.
    /// The index an ingest wrote (MiniLM vectors), opened for inspection.
    fn open_index(dir: &Path) -> VectorStore {
        let cfg = crate::config::IndexConfig {
            dir: dir.to_path_buf(),
            ..Default::default()
        };
        VectorStore::open(&cfg, 384).unwrap()
    }

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
            server: None,
            api_key: None,
            quiet: true,
        };
        let err = run(args, config).await.unwrap_err().to_string();
        assert!(err.contains("1 file(s)") && err.contains("broken.pdf"), "{err}");
        assert!(!err.contains("geology.pdf"), "{err}");

        // The good files were ingested and saved; the PDF's text is searchable.
        let store = open_index(&tmp.path().join("index"));
        assert_eq!(store.stats().documents, 2);
        let q = genai_models::test_support::embedder()
            .embed(&["how do hexagonal basalt columns form?"], 8192)
            .unwrap();
        let hits = store.search(&q[0], 1, &Filter::tenant("docs")).unwrap();
        let pdf_id = docs.join("geology.pdf").canonicalize().unwrap().display().to_string();
        assert_eq!(hits[0].chunk.document_id, pdf_id, "{hits:?}");
        assert!(hits[0].chunk.text.contains("hexagonal pillars"), "{hits:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ingests_through_a_running_server_which_holds_the_index() {
        let tmp = tempfile::tempdir().unwrap();
        let index = crate::config::IndexConfig {
            dir: tmp.path().join("index"),
            ..Default::default()
        };
        let svc = std::sync::Arc::new(genai_retrieval::test_support::service(index.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(crate::pipeline::context::open_layer())
                .add_service(crate::api::knowledge::grpc_service(svc.clone(), 16 << 20))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let docs = tmp.path().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::copy(repo_path("tests/data/corpus/tides.md"), docs.join("tides.md")).unwrap();
        std::fs::write(docs.join("notes.txt"), "Basalt is a dark volcanic rock.").unwrap();
        std::fs::write(docs.join("empty.txt"), "  \n").unwrap();
        std::fs::write(docs.join("broken.pdf"), b"%PDF-1.4\nnot a pdf\n%%EOF").unwrap();
        let mut config = Config::default();
        config.models.dir = repo_path("models");
        let mut args = IngestArgs {
            paths: vec![docs.clone()],
            tenant: "acme".into(),
            tags: vec!["manual".into()],
            index_dir: None,
            server: None,
            api_key: None,
            quiet: true,
        };

        // Straight into the held index: refused at once, naming the holder and the fix.
        let local = IngestArgs {
            index_dir: Some(index.dir.clone()),
            ..args.clone()
        };
        let started = std::time::Instant::now();
        let err = format!("{:#}", run(local, config.clone()).await.unwrap_err());
        assert!(
            err.contains(&format!("process {}", std::process::id())) && err.contains("--server http://"),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "not at once");
        assert_eq!(svc.stats().documents, 0);

        args.server = Some(url.clone());
        let err = run(args.clone(), config.clone()).await.unwrap_err().to_string();
        assert!(err.contains("1 file(s)") && err.contains("broken.pdf"), "{err}");
        let s = svc.stats();
        assert_eq!(s.documents, 2);
        let generation = s.generation;
        let query = genai_retrieval::knowledge::SearchQuery {
            query: "what causes the tides?".into(),
            top_k: 1,
            filter: Filter::tenant("acme"),
            min_score: -1.0,
        };
        let hit = &svc.search(&query).await.unwrap()[0];
        let id = docs.join("tides.md").canonicalize().unwrap().display().to_string();
        assert_eq!(
            (hit.chunk.document_id.as_str(), hit.chunk.source.as_str()),
            (id.as_str(), id.as_str())
        );
        assert_eq!(hit.chunk.tags, vec!["manual".to_string()]);
        assert!(!hit.chunk.text.contains('#'), "sent as markdown: {:?}", hit.chunk.text);

        // Again: unchanged, nothing saved; a bad address fails clearly.
        std::fs::remove_file(docs.join("broken.pdf")).unwrap();
        run(args.clone(), config.clone()).await.unwrap();
        assert_eq!(svc.stats().generation, generation);
        args.server = Some("not a url".into());
        let err = run(args, config).await.unwrap_err().to_string();
        assert!(err.contains("--server"), "{err}");
        server.abort();
    }
}
