//! Test support: a real HTTP/1.1 server on 127.0.0.1:0 whose answers are scripted per request,
//! to inject the faults a remote backend meets: error statuses (with or without Retry-After),
//! a slow first byte, a connection reset or close mid-stream, malformed SSE, a stall.
//!
//! Written on raw TCP rather than a framework so that a reset is a real RST (SO_LINGER 0) and a
//! malformed stream is exactly the bytes written. Each connection serves one request
//! (`connection: close`, streamed bodies delimited by the close). Every request is logged with
//! its arrival time on tokio's clock (paused in the tests, so delays are exact), its path, body
//! and authorization, and whether the client went away before the script ended.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// One step of a scripted answer.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Abort the connection with a TCP reset.
    Reset,
}

/// A scripted answer: steps run in order, then the connection closes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reply(pub Vec<Step>);

pub(crate) const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";

pub(crate) fn event(v: Value) -> Step {
    Step::Write(format!("data: {v}\n\n").into_bytes())
}

/// A chat chunk carrying `text` (the OpenAI shape).
fn chat_piece(text: &str) -> Step {
    event(
        json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}),
    )
}

impl Reply {
    /// An error status with an OpenAI error body.
    pub(crate) fn status(code: u16, retry_after: Option<&str>) -> Self {
        let body = json!({"error": {"message": format!("scripted {code}"), "type": "server_error"}}).to_string();
        let ra = retry_after.map(|v| format!("retry-after: {v}\r\n")).unwrap_or_default();
        let head = format!(
            "HTTP/1.1 {code} Scripted\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{ra}connection: close\r\n\r\n",
            body.len()
        );
        Reply(vec![Step::Write([head.into_bytes(), body.into_bytes()].concat())])
    }

    /// A whole chat stream: a role chunk, one chunk per piece, the finish, the usage, `[DONE]`.
    pub(crate) fn chat(pieces: &[&str]) -> Self {
        Self::chat_prefix(pieces).then(Self::chat_end(pieces.len()))
    }

    /// The head and the pieces only (the caller decides how it ends).
    pub(crate) fn chat_prefix(pieces: &[&str]) -> Self {
        let mut steps = vec![
            Step::Write(SSE_HEAD.to_vec()),
            event(
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
            ),
        ];
        steps.extend(pieces.iter().map(|p| chat_piece(p)));
        Reply(steps)
    }

    fn chat_end(completion: usize) -> Self {
        Reply(vec![
            event(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
            event(
                json!({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": completion, "total_tokens": 11 + completion}}),
            ),
            Step::Write(b"data: [DONE]\n\n".to_vec()),
        ])
    }

    /// A whole `/v1/completions` stream (`choices[0].text`), without usage.
    pub(crate) fn text(pieces: &[&str]) -> Self {
        let mut steps = vec![Step::Write(SSE_HEAD.to_vec())];
        steps.extend(
            pieces
                .iter()
                .map(|p| event(json!({"choices": [{"index": 0, "text": p, "finish_reason": null}]}))),
        );
        steps.push(event(
            json!({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}),
        ));
        steps.push(Step::Write(b"data: [DONE]\n\n".to_vec()));
        Reply(steps)
    }

    pub(crate) fn then(mut self, more: Reply) -> Self {
        self.0.extend(more.0);
        self
    }

    pub(crate) fn then_step(mut self, step: Step) -> Self {
        self.0.push(step);
        self
    }

    /// Waits `d` before the first byte of the answer.
    pub(crate) fn after(mut self, d: Duration) -> Self {
        self.0.insert(0, Step::Sleep(d));
        self
    }

    /// Waits `d` before each step after the head (so before each piece).
    pub(crate) fn gaps(self, d: Duration) -> Self {
        let mut steps = Vec::new();
        for (i, s) in self.0.into_iter().enumerate() {
            if i > 1 {
                steps.push(Step::Sleep(d));
            }
            steps.push(s);
        }
        Reply(steps)
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub at: Instant,
    pub path: String,
    pub body: Value,
    pub authorization: Option<String>,
    /// The client closed the connection before the script ended.
    pub cancelled: bool,
}

struct Shared {
    script: VecDeque<Reply>,
    /// Answered once the script is used up.
    default: Reply,
    hits: Vec<Hit>,
}

pub(crate) struct FaultServer {
    pub(crate) url: String,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultServer {
    /// Serves `script` in order, then `default` to every further request.
    pub(crate) async fn start(script: Vec<Reply>, default: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let shared = Arc::new(Mutex::new(Shared {
            script: script.into(),
            default,
            hits: Vec::new(),
        }));
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, s.clone()));
            }
        });
        Self { url, shared, task }
    }

    pub(crate) fn hits(&self) -> Vec<Hit> {
        self.shared.lock().hits.clone()
    }

    pub(crate) fn hit_count(&self) -> usize {
        self.shared.lock().hits.len()
    }

    /// Replaces what is left of the script.
    pub(crate) fn script(&self, replies: Vec<Reply>) {
        self.shared.lock().script = replies.into();
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head + content-length body), logs it, plays the next reply.
async fn serve(mut sock: TcpStream, shared: Arc<Mutex<Shared>>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + len {
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    let path = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
    let body = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    let (reply, index) = {
        let mut s = shared.lock();
        let reply = s.script.pop_front().unwrap_or_else(|| s.default.clone());
        s.hits.push(Hit {
            at: Instant::now(),
            path,
            body,
            authorization: header("authorization"),
            cancelled: false,
        });
        (reply, s.hits.len() - 1)
    };
    if !play(&mut sock, reply).await {
        shared.lock().hits[index].cancelled = true;
    }
}

/// Plays the steps; false when the client went away first.
async fn play(sock: &mut TcpStream, reply: Reply) -> bool {
    let mut tmp = [0u8; 64];
    for step in reply.0 {
        match step {
            Step::Write(bytes) => {
                if sock.write_all(&bytes).await.is_err() || sock.flush().await.is_err() {
                    return false;
                }
            }
            Step::Sleep(d) => {
                // A read that ends means the client closed its side.
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    r = sock.read(&mut tmp) => if matches!(r, Ok(0) | Err(_)) { return false },
                }
            }
            Step::Reset => {
                let _ = sock.set_zero_linger();
                return true;
            }
        }
    }
    let _ = sock.shutdown().await;
    true
}

/// What a client of a backend received: the text, and how the stream ended (`Ok` with the
/// `Finished` usage, or the error).
pub(crate) async fn collect(
    mut events: super::EventStream,
) -> (String, Result<genai_engine::Usage, crate::error::ApiError>) {
    use futures::StreamExt;
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(genai_engine::EngineEvent::Delta { text: t, .. }) => text.push_str(&t),
            Ok(genai_engine::EngineEvent::Finished { usage, .. }) => {
                assert!(events.next().await.is_none(), "nothing after Finished");
                return (text, Ok(usage));
            }
            Ok(genai_engine::EngineEvent::Failed { message }) => {
                return (text, Err(crate::error::ApiError::Internal(message)))
            }
            Err(e) => {
                assert!(events.next().await.is_none(), "nothing after an error");
                return (text, Err(e));
            }
        }
    }
    panic!("the stream ended without Finished or an error (after {text:?})");
}
