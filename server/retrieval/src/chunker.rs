//! From a document to chunks: text extraction (plain text, Markdown, HTML),
//! sentence-boundary chunking under a token budget with overlap, and content
//! hashing (SHA-256) for skip-if-unchanged re-ingest.
//!
//! Invariants:
//! - Chunks break only at sentence boundaries (Unicode UAX #29), except a single
//!   sentence longer than the budget, which is split at word boundaries.
//! - Every chunk fits `max_tokens` (counted by the caller's tokenizer, special
//!   tokens excluded); consecutive chunks share trailing sentences worth at most
//!   `overlap_tokens`, and every chunk adds at least one new sentence.
//! - The hash covers the format and the raw content, so any edit re-ingests.
//!
//! Tested by unit tests with the real MiniLM tokenizer (budget, overlap,
//! coverage, HTML stripping of scripts and styles).

use scraper::{Html, Node};
use sha2::{Digest, Sha256};
use unicode_segmentation::UnicodeSegmentation;

use super::RetrievalError;

type Result<T> = std::result::Result<T, RetrievalError>;

/// Input formats the chunker understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocFormat {
    Text,
    Markdown,
    Html,
}

impl DocFormat {
    /// From a file name's extension (`txt`, `text`, `md`, `markdown`, `htm`, `html`).
    pub fn from_path(path: &std::path::Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "text" => Some(Self::Text),
            "md" | "markdown" => Some(Self::Markdown),
            "html" | "htm" => Some(Self::Html),
            _ => None,
        }
    }

    /// From an API string ("text", "markdown", "html", or the extensions above).
    pub fn parse(s: &str, field: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "txt" | "plain" => Ok(Self::Text),
            "markdown" | "md" => Ok(Self::Markdown),
            "html" | "htm" => Ok(Self::Html),
            other => Err(RetrievalError::invalid(
                field,
                format!("unknown format {other:?} (expected text, markdown or html)"),
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Markdown => "markdown",
            Self::Html => "html",
        }
    }
}

/// SHA-256 (hex) of the format and raw content.
pub(crate) fn content_hash(format: DocFormat, raw: &str) -> String {
    let mut h = Sha256::new();
    h.update(format.as_str().as_bytes());
    h.update([0u8]);
    h.update(raw.as_bytes());
    hex::encode(h.finalize())
}

/// Plain text of a document: paragraphs separated by blank lines, the lines of
/// one paragraph joined with spaces (hard-wrapped text must not end sentences).
pub(crate) fn extract_text(format: DocFormat, raw: &str) -> String {
    let text = match format {
        DocFormat::Text => raw.to_string(),
        DocFormat::Markdown => strip_markdown(raw),
        DocFormat::Html => html_text(raw),
    };
    paragraphs(&text).join("\n\n")
}

fn paragraphs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(line);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Markdown to text, line by line: headings become their own paragraphs,
/// fences and HTML comments go, links keep their text.
fn strip_markdown(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") || t.starts_with("<!--") {
            // Code blocks stand apart from the prose around them.
            out.push('\n');
            continue;
        }
        if let Some(h) = t.strip_prefix('#') {
            // A heading is a paragraph of its own: it must not glue onto the next line.
            out.push('\n');
            out.push_str(h.trim_start_matches('#').trim());
            out.push_str("\n\n");
            continue;
        }
        let t = t
            .strip_prefix("- ")
            .or_else(|| t.strip_prefix("* "))
            .or_else(|| t.strip_prefix("> "))
            .unwrap_or(t);
        out.push_str(&strip_links(t).replace("**", "").replace('`', ""));
        out.push('\n');
    }
    out
}

/// `[text](url)` -> `text`.
fn strip_links(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Visible text of an HTML document; block elements end paragraphs.
fn html_text(raw: &str) -> String {
    const SKIP: [&str; 5] = ["script", "style", "noscript", "template", "head"];
    const BLOCK: [&str; 16] = [
        "p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section", "article",
    ];
    let doc = Html::parse_document(raw);
    let mut out = String::new();
    let mut stack = vec![doc.tree.root()];
    // Depth-first in document order; a block element adds a paragraph break.
    while let Some(node) = stack.pop() {
        match node.value() {
            Node::Text(t) => out.push_str(t),
            Node::Element(e) => {
                let name = e.name();
                if SKIP.contains(&name) {
                    continue;
                }
                if BLOCK.contains(&name) {
                    out.push_str("\n\n");
                }
            }
            _ => {}
        }
        let children: Vec<_> = node.children().collect();
        stack.extend(children.into_iter().rev());
    }
    // Keep the title: it names the page.
    let title = doc
        .select(&scraper::Selector::parse("title").expect("valid selector"))
        .next()
        .map(|t| t.text().collect::<String>());
    match title {
        Some(t) if !t.trim().is_empty() => format!("{}\n\n{out}", t.trim()),
        _ => out,
    }
}

/// Splits `text` into chunks of at most `max_tokens` tokens with up to
/// `overlap_tokens` tokens of trailing sentences repeated in the next chunk.
/// `count` returns the token count of a piece of text.
pub(crate) fn chunk_text(
    text: &str,
    max_tokens: usize,
    overlap_tokens: usize,
    count: impl Fn(&str) -> Result<usize>,
) -> Result<Vec<String>> {
    if max_tokens == 0 {
        return Err(RetrievalError::invalid("index.chunk_tokens", "must be > 0"));
    }
    let mut sentences: Vec<(String, usize)> = Vec::new();
    for s in text.split_sentence_bounds() {
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        let n = count(s)?;
        if n <= max_tokens {
            sentences.push((s.to_string(), n));
        } else {
            split_long(s, max_tokens, &count, &mut sentences)?;
        }
    }
    let mut chunks = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_tokens = 0;
    let mut i = 0;
    while i < sentences.len() {
        let n = sentences[i].1;
        if cur_tokens + n <= max_tokens || cur.is_empty() {
            cur.push(i);
            cur_tokens += n;
            i += 1;
            continue;
        }
        chunks.push(join(&sentences, &cur));
        // Carry trailing sentences into the next chunk while they fit the
        // overlap and leave room for the sentence that did not fit.
        let mut keep = Vec::new();
        let mut kept = 0;
        for &j in cur.iter().rev() {
            let m = sentences[j].1;
            if kept + m > overlap_tokens || kept + m + n > max_tokens {
                break;
            }
            kept += m;
            keep.push(j);
        }
        keep.reverse();
        cur = keep;
        cur_tokens = kept;
    }
    if !cur.is_empty() {
        chunks.push(join(&sentences, &cur));
    }
    Ok(chunks)
}

fn join(sentences: &[(String, usize)], idx: &[usize]) -> String {
    idx.iter()
        .map(|&i| sentences[i].0.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A sentence over budget: greedy word groups that fit.
fn split_long(
    s: &str,
    max_tokens: usize,
    count: &impl Fn(&str) -> Result<usize>,
    out: &mut Vec<(String, usize)>,
) -> Result<()> {
    let mut cur = String::new();
    let mut cur_n = 0;
    for w in s.split_whitespace() {
        let n = count(w)?;
        if cur_n + n > max_tokens && !cur.is_empty() {
            out.push((std::mem::take(&mut cur), cur_n));
            cur_n = 0;
        }
        if n > max_tokens {
            // One "word" longer than a chunk (e.g. a base64 blob): cut by characters.
            let chars: Vec<char> = w.chars().collect();
            for piece in chars.chunks(max_tokens.max(1)) {
                let p: String = piece.iter().collect();
                let pn = count(&p)?.min(max_tokens);
                out.push((p, pn));
            }
            continue;
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
        cur_n += n;
    }
    if !cur.is_empty() {
        out.push((cur, cur_n));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_models::test_support::embedder;

    fn count(s: &str) -> Result<usize> {
        Ok(embedder().count_tokens(s)?)
    }

    #[test]
    fn chunks_fit_budget_overlap_and_cover_the_text() {
        let text: String = (0..40)
            .map(|i| format!("Sentence number {i} talks about topic {} in some detail. ", i % 7))
            .collect();
        let chunks = chunk_text(&text, 40, 12, count).unwrap();
        assert!(chunks.len() > 3);
        for c in &chunks {
            assert!(count(c).unwrap() <= 40, "{c}");
        }
        for i in 0..40 {
            let needle = format!("Sentence number {i} ");
            assert!(chunks.iter().any(|c| c.contains(&needle)), "sentence {i} lost");
        }
        // Overlap: each chunk after the first starts with the previous chunk's last sentence.
        for w in chunks.windows(2) {
            let last = w[0].rsplit(". ").next().unwrap();
            assert!(
                w[1].starts_with(last.trim_end_matches('.')),
                "no overlap between {:?} and {:?}",
                w[0],
                w[1]
            );
        }
        // No overlap requested: no sentence appears twice.
        let plain = chunk_text(&text, 40, 0, count).unwrap();
        assert_eq!(
            plain
                .iter()
                .map(|c| c.matches("Sentence number").count())
                .sum::<usize>(),
            40
        );
    }

    #[test]
    fn over_long_sentence_is_split_at_words() {
        let long = "alpha beta gamma delta ".repeat(50);
        let chunks = chunk_text(&long, 30, 5, count).unwrap();
        assert!(chunks.len() >= 6);
        assert!(chunks.iter().all(|c| count(c).unwrap() <= 30));
        assert!(chunk_text("", 30, 5, count).unwrap().is_empty());
    }

    #[test]
    fn html_loses_tags_scripts_and_styles() {
        let html = "<html><head><title>Ocean tides</title><style>p{color:red}</style></head><body>\
                    <script>var secret = 1;</script><h1>Tides</h1><p>The Moon pulls the <b>oceans</b>.</p>\
                    <p>Two high tides a day.</p></body></html>";
        let t = extract_text(DocFormat::Html, html);
        assert!(t.starts_with("Ocean tides"), "{t}");
        assert!(t.contains("The Moon pulls the oceans."), "{t}");
        assert!(t.contains("\n\nTwo high tides a day."), "{t}");
        assert!(!t.contains("secret") && !t.contains("color") && !t.contains('<'), "{t}");
    }

    #[test]
    fn markdown_and_text_paragraphs() {
        let md = "# Title\nSome [linked text](http://x.y) and **bold**\nwrapped line.\n\n```\ncode\n```\n- item one";
        let t = extract_text(DocFormat::Markdown, md);
        assert_eq!(
            t,
            "Title\n\nSome linked text and bold wrapped line.\n\ncode\n\nitem one"
        );
        assert_eq!(extract_text(DocFormat::Text, "a\nb\n\n\nc"), "a b\n\nc");
        assert_ne!(
            content_hash(DocFormat::Text, "x"),
            content_hash(DocFormat::Markdown, "x")
        );
        assert_eq!(content_hash(DocFormat::Text, "x"), content_hash(DocFormat::Text, "x"));
        assert!(matches!(DocFormat::parse("pdf", "documents[0].format"),
            Err(RetrievalError::InvalidArgument { field, .. }) if field == "documents[0].format"));
        assert_eq!(
            DocFormat::from_path(std::path::Path::new("a/b.HTML")),
            Some(DocFormat::Html)
        );
    }
}
