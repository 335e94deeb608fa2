//! The request log: one JSON line per finished request, and one per feedback,
//! in rotating files under `ops.request_log.dir` (schema in `ops/README.md`;
//! the drift monitor and the trainer read it).
//!
//! Threading: [`RequestLog::log`] and [`RequestLog::append_feedback`] only
//! `try_send` onto a bounded channel (`queue_capacity`); a full or closed
//! queue drops the line and counts it in `genai_request_log_dropped_total` —
//! a request path never waits for the disk. One writer thread owns the files:
//! it hashes/serialises, appends to `requests.jsonl` through a buffer flushed
//! after each burst, and rotates by renaming the active file to
//! `requests-<UTC yyyymmddThhmmss.mmmZ>-<seq>.jsonl` when the next line would
//! pass `max_file_bytes` or the file is older than `max_file_age_secs`; then
//! it deletes the oldest rotated files so at most `max_files` remain, the
//! active one included. A single line larger than `max_file_bytes` gets a file
//! of its own. [`RequestLog::close`] (also on drop) drains the queue, flushes
//! and joins the thread. Write errors are logged and counted in
//! `genai_request_log_errors_total`; the writer keeps going.
//!
//! Privacy invariant: in `text_mode = "hash"` only SHA-256 hex digests of
//! prompt, answer and feedback comment are written; in `"none"` neither text
//! nor digest; raw text only in `"raw"`.
//!
//! Tests: lines parse as JSON and carry the id; size rotation keeps at most
//! `max_files` and the newest lines; age rotation; hash mode never writes the
//! raw text; raw/none modes; close flushes; feedback validation names the field.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{RequestLogConfig, TextMode};
use crate::ops::{metrics, request_id};

/// The active file's name; rotated files are `requests-*.jsonl` beside it.
pub const ACTIVE_FILE: &str = "requests.jsonl";
/// Feedback ratings: 1 (worst) to 5 (best); thumbs down/up map to 1/5.
pub const RATING_RANGE: std::ops::RangeInclusive<i32> = 1..=5;
/// Longest feedback comment accepted, in characters.
pub const MAX_COMMENT_CHARS: usize = 4096;

/// What the API layer knows about one finished request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestRecord {
    pub request_id: String,
    pub tenant: String,
    pub model: String,
    /// Assistant route: "chat" | "rag" | "agent" | "completion" | "embedding" …
    pub route: String,
    /// "grpc" | "http".
    pub api: String,
    /// gRPC code name or HTTP status ("OK", "200", "RESOURCE_EXHAUSTED" …).
    pub status: String,
    /// "stop" | "length" | "content_filter" | "cancelled"; None when no generation finished.
    pub finish_reason: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    /// `stage:verdict:reason` codes of the safety verdicts on the input or output
    /// (`input_pii:redact:email`, `output_pii:block:private_key`), each once; never the value.
    pub safety_flags: Vec<String>,
    /// The prompt as the model saw it (rendered chat), hashed or dropped per `text_mode`.
    pub prompt: String,
    pub answer: String,
}

/// Why feedback was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FeedbackError {
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },
    /// The writer queue is full or closed; the caller may retry.
    #[error("request log unavailable (queue full or closed)")]
    Unavailable,
}

enum Msg {
    Request(Box<RequestRecord>, SystemTime),
    Feedback {
        request_id: String,
        rating: i32,
        comment: String,
        ts: SystemTime,
    },
    /// Only tests wait for the writer (`RequestLog::flush`).
    #[cfg_attr(not(test), allow(dead_code))]
    Flush(SyncSender<()>),
    Shutdown,
}

/// Handle to the writer thread; share it behind an `Arc`.
pub struct RequestLog {
    tx: SyncSender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl RequestLog {
    /// Creates the directory and starts the writer thread. `enabled` is the caller's to check.
    pub fn start(cfg: &RequestLogConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| anyhow::anyhow!("ops.request_log.dir: cannot create {}: {e}", cfg.dir.display()))?;
        let (tx, rx) = mpsc::sync_channel(cfg.queue_capacity.max(1));
        let writer = Writer {
            dir: cfg.dir.clone(),
            max_bytes: cfg.max_file_bytes.max(1),
            max_age: (cfg.max_file_age_secs > 0).then(|| Duration::from_secs(cfg.max_file_age_secs)),
            max_files: cfg.max_files.max(1),
            text_mode: cfg.text_mode,
            file: None,
            size: 0,
            opened: Instant::now(),
            seq: 0,
            stopping: false,
        };
        let thread = std::thread::Builder::new()
            .name("request-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            tx,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues one request line; false if it was dropped (queue full or log closed). Never blocks.
    pub fn log(&self, record: RequestRecord) -> bool {
        self.send(Msg::Request(Box::new(record), SystemTime::now()))
    }

    /// Queues a feedback line for `request_id`. Never blocks.
    pub fn append_feedback(&self, request_id: &str, rating: i32, comment: &str) -> Result<(), FeedbackError> {
        if !request_id::is_valid(request_id.as_bytes()) {
            return Err(FeedbackError::Invalid {
                field: "request_id",
                message: format!("must be 1 to {} characters of [A-Za-z0-9._:-]", request_id::MAX_LEN),
            });
        }
        if !RATING_RANGE.contains(&rating) {
            return Err(FeedbackError::Invalid {
                field: "rating",
                message: format!(
                    "must be between {} and {} (got {rating})",
                    RATING_RANGE.start(),
                    RATING_RANGE.end()
                ),
            });
        }
        if comment.chars().count() > MAX_COMMENT_CHARS {
            return Err(FeedbackError::Invalid {
                field: "comment",
                message: format!("longer than {MAX_COMMENT_CHARS} characters"),
            });
        }
        let msg = Msg::Feedback {
            request_id: request_id.to_owned(),
            rating,
            comment: comment.to_owned(),
            ts: SystemTime::now(),
        };
        if self.send(msg) {
            Ok(())
        } else {
            Err(FeedbackError::Unavailable)
        }
    }

    /// Blocks until every line queued before it is written to the OS (not fsynced). False if closed.
    #[cfg(test)]
    pub fn flush(&self) -> bool {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        self.tx.send(Msg::Flush(ack_tx)).is_ok() && ack_rx.recv().is_ok()
    }

    /// Writes out everything queued, closes the file and stops the thread. Idempotent; blocks.
    pub fn close(&self) {
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(t) = thread {
            // FIFO: the writer handles everything queued before this, then exits.
            let _ = self.tx.send(Msg::Shutdown);
            let _ = t.join();
        }
    }

    fn send(&self, msg: Msg) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                ::metrics::counter!(metrics::REQUEST_LOG_DROPPED).increment(1);
                false
            }
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.close();
    }
}

#[derive(Serialize)]
struct RequestLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts: String,
    request_id: &'a str,
    tenant: &'a str,
    model: &'a str,
    route: &'a str,
    api: &'a str,
    status: &'a str,
    finish_reason: Option<&'a str>,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
    ttft_ms: Option<f64>,
    e2e_ms: f64,
    safety_flags: &'a [String],
    text_mode: TextMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer_sha256: Option<String>,
}

#[derive(Serialize)]
struct FeedbackLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts: String,
    request_id: &'a str,
    rating: i32,
    text_mode: TextMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment_sha256: Option<String>,
}

/// (raw, digest) as the text mode allows.
fn text_fields(mode: TextMode, text: &str) -> (Option<&str>, Option<String>) {
    match mode {
        TextMode::Raw => (Some(text), None),
        TextMode::Hash => (None, Some(format!("{:x}", Sha256::digest(text.as_bytes())))),
        TextMode::None => (None, None),
    }
}

fn rfc3339(ts: SystemTime) -> String {
    humantime::format_rfc3339_millis(ts).to_string()
}

struct Writer {
    dir: PathBuf,
    max_bytes: u64,
    max_age: Option<Duration>,
    max_files: usize,
    text_mode: TextMode,
    file: Option<BufWriter<File>>,
    size: u64,
    opened: Instant,
    seq: u64,
    stopping: bool,
}

/// How often an idle writer checks the active file's age.
const IDLE_TICK: Duration = Duration::from_millis(500);

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            match rx.recv_timeout(IDLE_TICK) {
                Ok(msg) => {
                    let mut acks = Vec::new();
                    self.handle(msg, &mut acks);
                    // Drain the burst before one flush.
                    while let Ok(msg) = rx.try_recv() {
                        self.handle(msg, &mut acks);
                    }
                    self.flush();
                    for ack in acks {
                        let _ = ack.send(());
                    }
                    if self.stopping {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.too_old() {
                        self.rotate();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.flush();
    }

    fn handle(&mut self, msg: Msg, acks: &mut Vec<SyncSender<()>>) {
        let (line, kind) = match msg {
            Msg::Request(r, ts) => {
                let (prompt, prompt_sha256) = text_fields(self.text_mode, &r.prompt);
                let (answer, answer_sha256) = text_fields(self.text_mode, &r.answer);
                let line = RequestLine {
                    kind: "request",
                    ts: rfc3339(ts),
                    request_id: &r.request_id,
                    tenant: &r.tenant,
                    model: &r.model,
                    route: &r.route,
                    api: &r.api,
                    status: &r.status,
                    finish_reason: r.finish_reason.as_deref(),
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.completion_tokens,
                    cached_tokens: r.cached_tokens,
                    ttft_ms: r.ttft_ms.filter(|v| v.is_finite()),
                    e2e_ms: if r.e2e_ms.is_finite() { r.e2e_ms } else { 0.0 },
                    safety_flags: &r.safety_flags,
                    text_mode: self.text_mode,
                    prompt,
                    prompt_sha256,
                    answer,
                    answer_sha256,
                };
                (serde_json::to_string(&line), "request")
            }
            Msg::Feedback {
                request_id,
                rating,
                comment,
                ts,
            } => {
                let (comment, comment_sha256) = text_fields(self.text_mode, &comment);
                let line = FeedbackLine {
                    kind: "feedback",
                    ts: rfc3339(ts),
                    request_id: &request_id,
                    rating,
                    text_mode: self.text_mode,
                    comment,
                    comment_sha256,
                };
                (serde_json::to_string(&line), "feedback")
            }
            Msg::Flush(ack) => {
                acks.push(ack);
                return;
            }
            Msg::Shutdown => {
                self.stopping = true;
                return;
            }
        };
        match line {
            Ok(line) => self.write_line(&line, kind),
            Err(e) => self.error("serialising a line", &e),
        }
    }

    fn too_old(&self) -> bool {
        self.file.is_some() && self.size > 0 && self.max_age.is_some_and(|a| self.opened.elapsed() >= a)
    }

    fn write_line(&mut self, line: &str, kind: &'static str) {
        let len = line.len() as u64 + 1;
        if self.too_old() || (self.size > 0 && self.size + len > self.max_bytes) {
            self.rotate();
        }
        if self.file.is_none() {
            if let Err(e) = self.open() {
                return self.error("opening the active file", &e);
            }
        }
        let Some(f) = self.file.as_mut() else { return };
        match f.write_all(line.as_bytes()).and_then(|()| f.write_all(b"\n")) {
            Ok(()) => {
                self.size += len;
                ::metrics::counter!(metrics::REQUEST_LOG_LINES, "type" => kind).increment(1);
            }
            Err(e) => {
                // Drop the handle: the next line reopens (the disk may have come back).
                self.file = None;
                self.error("writing a line", &e);
            }
        }
    }

    fn open(&mut self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(ACTIVE_FILE))?;
        self.size = f.metadata()?.len();
        self.opened = Instant::now();
        self.file = Some(BufWriter::new(f));
        Ok(())
    }

    fn flush(&mut self) {
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.flush() {
                self.file = None;
                self.error("flushing", &e);
            }
        }
    }

    /// Renames the active file aside and deletes the oldest rotated files beyond `max_files`.
    fn rotate(&mut self) {
        self.flush();
        self.file = None;
        self.size = 0;
        let active = self.dir.join(ACTIVE_FILE);
        if active.exists() {
            let stamp = rfc3339(SystemTime::now()).replace(['-', ':'], "");
            self.seq += 1;
            let rotated = self.dir.join(format!("requests-{stamp}-{:06}.jsonl", self.seq));
            if let Err(e) = std::fs::rename(&active, &rotated) {
                return self.error("rotating", &e);
            }
        }
        match rotated_files(&self.dir) {
            Ok(files) => {
                let excess = (files.len() + 1).saturating_sub(self.max_files);
                for old in files.iter().take(excess) {
                    if let Err(e) = std::fs::remove_file(old) {
                        self.error("deleting an old file", &e);
                    }
                }
            }
            Err(e) => self.error("listing the directory", &e),
        }
    }

    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        ::metrics::counter!(metrics::REQUEST_LOG_ERRORS).increment(1);
        tracing::warn!(target: "genai::request_log", dir = %self.dir.display(), error = %e, "request log: {what} failed");
    }
}

/// Rotated files, oldest first (their names sort by time).
pub fn rotated_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("requests-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, mode: TextMode) -> RequestLogConfig {
        RequestLogConfig {
            enabled: true,
            dir: dir.to_path_buf(),
            max_file_bytes: 1 << 20,
            max_file_age_secs: 0,
            max_files: 3,
            text_mode: mode,
            queue_capacity: 1024,
        }
    }

    fn record(i: usize) -> RequestRecord {
        RequestRecord {
            request_id: format!("req-{i}"),
            tenant: "acme".into(),
            model: "smollm2-135m-instruct".into(),
            route: "chat".into(),
            api: "http".into(),
            status: "200".into(),
            finish_reason: Some("stop".into()),
            prompt_tokens: 12,
            completion_tokens: 7,
            cached_tokens: 4,
            ttft_ms: Some(15.5),
            e2e_ms: 120.25,
            safety_flags: vec!["pii".into()],
            prompt: format!("my secret phone is 555-0199 #{i}"),
            answer: "I will not repeat it".into(),
        }
    }

    fn read_lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    fn sha256_hex(s: &str) -> String {
        format!("{:x}", Sha256::digest(s.as_bytes()))
    }

    #[test]
    fn lines_are_json_with_the_id_and_hash_mode_never_writes_text() {
        let dir = tempfile::tempdir().unwrap();
        let log = RequestLog::start(&cfg(dir.path(), TextMode::Hash)).unwrap();
        for i in 0..3 {
            assert!(log.log(record(i)));
        }
        log.append_feedback("req-1", 5, "great, call me at 555-0199").unwrap();
        assert!(log.flush());
        let raw = std::fs::read_to_string(dir.path().join(ACTIVE_FILE)).unwrap();
        assert!(
            !raw.contains("555-0199") && !raw.contains("repeat"),
            "raw text leaked: {raw}"
        );
        let lines = read_lines(&dir.path().join(ACTIVE_FILE));
        assert_eq!(lines.len(), 4);
        let first = &lines[0];
        assert_eq!(first["type"], "request");
        assert_eq!(first["request_id"], "req-0");
        assert_eq!(first["tenant"], "acme");
        assert_eq!(first["finish_reason"], "stop");
        assert_eq!(
            (first["prompt_tokens"].as_u64(), first["cached_tokens"].as_u64()),
            (Some(12), Some(4))
        );
        assert_eq!(first["ttft_ms"], 15.5);
        assert_eq!(first["safety_flags"][0], "pii");
        assert_eq!(first["text_mode"], "hash");
        assert_eq!(first["prompt_sha256"], sha256_hex(&record(0).prompt));
        assert_eq!(first["answer_sha256"], sha256_hex("I will not repeat it"));
        assert!(first.get("prompt").is_none() && first.get("answer").is_none());
        assert!(
            humantime::parse_rfc3339(first["ts"].as_str().unwrap()).is_ok(),
            "{}",
            first["ts"]
        );
        let fb = &lines[3];
        assert_eq!(
            (fb["type"].as_str(), fb["request_id"].as_str(), fb["rating"].as_i64()),
            (Some("feedback"), Some("req-1"), Some(5))
        );
        assert_eq!(fb["comment_sha256"], sha256_hex("great, call me at 555-0199"));
    }

    #[test]
    fn raw_and_none_modes() {
        let dir = tempfile::tempdir().unwrap();
        let log = RequestLog::start(&cfg(dir.path(), TextMode::Raw)).unwrap();
        log.log(record(0));
        log.close();
        let l = &read_lines(&dir.path().join(ACTIVE_FILE))[0];
        assert_eq!(l["prompt"], record(0).prompt);
        assert!(l.get("prompt_sha256").is_none());

        let dir = tempfile::tempdir().unwrap();
        let log = RequestLog::start(&cfg(dir.path(), TextMode::None)).unwrap();
        log.log(record(0));
        log.append_feedback("req-0", 1, "bad").unwrap();
        log.close();
        for l in read_lines(&dir.path().join(ACTIVE_FILE)) {
            for k in [
                "prompt",
                "prompt_sha256",
                "answer",
                "answer_sha256",
                "comment",
                "comment_sha256",
            ] {
                assert!(l.get(k).is_none(), "{k} present in none mode: {l}");
            }
        }
    }

    #[test]
    fn size_rotation_keeps_at_most_max_files_and_the_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), TextMode::Hash);
        c.max_file_bytes = 2000; // a line is ~500 bytes: 3 or 4 lines per file
        let log = RequestLog::start(&c).unwrap();
        for i in 0..40 {
            assert!(log.log(record(i)));
        }
        log.close();
        let rotated = rotated_files(dir.path()).unwrap();
        assert_eq!(rotated.len(), 2, "{rotated:?}"); // + the active one = max_files
        let mut ids = Vec::new();
        for f in rotated.iter().chain([&dir.path().join(ACTIVE_FILE)]) {
            assert!(std::fs::metadata(f).unwrap().len() <= 2000, "{} too big", f.display());
            ids.extend(
                read_lines(f)
                    .into_iter()
                    .map(|l| l["request_id"].as_str().unwrap().to_owned()),
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        // The kept files hold the newest lines, in order, ending with the last one.
        let n = ids.len();
        assert!((6..40).contains(&n), "{n} lines kept");
        let expected: Vec<String> = (40 - n..40).map(|i| format!("req-{i}")).collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn age_rotation_and_reopening_an_existing_active_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), TextMode::Hash);
        c.max_file_age_secs = 1;
        let log = RequestLog::start(&c).unwrap();
        log.log(record(0));
        assert!(log.flush());
        std::thread::sleep(Duration::from_millis(1700)); // idle tick rotates the aged file
        log.log(record(1));
        log.close();
        let rotated = rotated_files(dir.path()).unwrap();
        assert_eq!(rotated.len(), 1);
        assert_eq!(read_lines(&rotated[0])[0]["request_id"], "req-0");
        assert_eq!(read_lines(&dir.path().join(ACTIVE_FILE))[0]["request_id"], "req-1");

        // A restart appends to the active file rather than truncating it.
        let log = RequestLog::start(&cfg(dir.path(), TextMode::Hash)).unwrap();
        log.log(record(2));
        drop(log);
        let ids: Vec<_> = read_lines(&dir.path().join(ACTIVE_FILE))
            .iter()
            .map(|l| l["request_id"].clone())
            .collect();
        assert_eq!(ids, ["req-1", "req-2"]);
    }

    #[test]
    fn feedback_validation_names_the_field_and_closed_log_drops() {
        let dir = tempfile::tempdir().unwrap();
        let log = RequestLog::start(&cfg(dir.path(), TextMode::Hash)).unwrap();
        let field = |r: Result<(), FeedbackError>| match r {
            Err(FeedbackError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(log.append_feedback("", 3, "")), "request_id");
        assert_eq!(field(log.append_feedback("bad id", 3, "")), "request_id");
        assert_eq!(field(log.append_feedback("r1", 0, "")), "rating");
        assert_eq!(field(log.append_feedback("r1", 6, "")), "rating");
        assert_eq!(
            field(log.append_feedback("r1", 3, &"x".repeat(MAX_COMMENT_CHARS + 1))),
            "comment"
        );
        log.close();
        log.close(); // idempotent
        assert!(!log.log(record(0)));
        assert_eq!(log.append_feedback("r1", 3, ""), Err(FeedbackError::Unavailable));
        assert!(!log.flush());
    }
}
