//! The serving API over the real engine and SmolLM2: gRPC streaming, OpenAI
//! HTTP with SSE, concurrency, cancellation, bad input, draining.

use std::time::Duration;

use futures::StreamExt;
use genai_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use serde_json::{json, Value};
use tonic::Code;

use crate::harness::{require_openai_python, run_python, Server};

fn greedy(max_tokens: i32) -> Option<pb::SamplingParams> {
    Some(pb::SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ..Default::default()
    })
}

/// Collects a Generate/Chat stream: (text, token count, last message).
async fn drain(mut s: tonic::Streaming<pb::GenerateResponse>) -> (String, usize, pb::GenerateResponse) {
    let (mut text, mut n, mut last) = (String::new(), 0, None);
    while let Some(m) = s.message().await.unwrap() {
        text.push_str(&m.text);
        n += m.token_ids.len();
        last = Some(m);
    }
    (text, n, last.expect("at least one message"))
}

#[tokio::test]
async fn grpc_generate_and_chat_stream_with_usage() {
    let server = Server::start().await;
    let mut client = InferenceClient::new(server.channel().await);

    let req = pb::GenerateRequest {
        prompt: "The capital of France is".into(),
        sampling: greedy(8),
        ..Default::default()
    };
    let stream = client.generate(req).await.unwrap().into_inner();
    let (text, n, last) = drain(stream).await;
    let usage = last.usage.expect("usage on the last message");
    assert_eq!(last.finish_reason, "length");
    assert_eq!(usage.completion_tokens as usize, n);
    assert_eq!(n, 8);
    assert!(usage.prompt_tokens >= 5, "{usage:?}");
    assert!(text.contains("Paris"), "{text:?}");

    let req = pb::ChatRequest {
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
            ..Default::default()
        }],
        sampling: greedy(40),
        ..Default::default()
    };
    let (text, n, last) = drain(client.chat(req).await.unwrap().into_inner()).await;
    assert!(!text.trim().is_empty());
    assert_eq!(last.usage.unwrap().completion_tokens as usize, n);
    // Greedy chat over HTTP renders the same template and must give the same text.
    let body = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 40, "temperature": 0});
    let v: Value = reqwest::Client::new()
        .post(server.http_url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), text);
    assert!(["stop", "length"].contains(&last.finish_reason.as_str()));

    // Tokenize / Detokenize round trip and ListModels.
    let ids = client
        .tokenize(pb::TokenizeRequest {
            text: "Hello world".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    assert!(!ids.is_empty());
    let back = client
        .detokenize(pb::DetokenizeRequest {
            token_ids: ids,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(back.into_inner().text, "Hello world");
    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(models.iter().any(|m| m.kind == "generation" && m.context_length > 0));
}

#[tokio::test]
async fn thirty_two_concurrent_streams_complete_with_correct_usage() {
    let server = Server::start().await;
    let channel = server.channel().await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut client = InferenceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let req = pb::GenerateRequest {
                prompt: format!("Request {i}: write a sentence about the number {i}."),
                sampling: Some(pb::SamplingParams {
                    max_tokens: Some(12),
                    ignore_eos: true,
                    ..Default::default()
                }),
                ..Default::default()
            };
            drain(client.generate(req).await.unwrap().into_inner()).await
        }));
    }
    for t in tasks {
        let (_, n, last) = t.await.unwrap();
        let usage = last.usage.unwrap();
        assert_eq!(n, 12);
        assert_eq!(usage.completion_tokens, 12);
        assert_eq!(last.finish_reason, "length");
    }
}

#[tokio::test]
async fn http_chat_and_completions_stream_sse() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let body = json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 40, "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
    });
    let resp = http
        .post(server.http_url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(resp.headers().contains_key("x-request-id"));
    let text = resp.text().await.unwrap();
    let datas: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(*datas.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert!(!content.trim().is_empty(), "{content:?}");
    let finish = chunks
        .iter()
        .rev()
        .find_map(|c| c["choices"].get(0)?["finish_reason"].as_str().map(str::to_owned));
    assert!(matches!(finish.as_deref(), Some("stop" | "length")), "{finish:?}");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // Non-streamed legacy completion with vLLM's ignore_eos.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": true, "temperature": 0});
    let v: Value = http
        .post(server.http_url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let v: Value = http
        .get(server.http_url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "smollm2-135m-instruct");
}

#[tokio::test]
async fn cancellation_returns_kv_blocks() {
    let server = Server::start().await;
    let mut client = InferenceClient::new(server.channel().await);
    let req = pb::GenerateRequest {
        prompt: "Tell me a very long story about dragons.".into(),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(2000),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(req).await.unwrap().into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    assert!(server.metric("genai_kv_cache_blocks_used").await > 0.0);
    drop(stream);
    // Over HTTP too: drop an SSE response mid-stream.
    let body = json!({"prompt": "Count to one thousand:", "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let resp = reqwest::Client::new()
        .post(server.http_url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut bytes = resp.bytes_stream();
    bytes.next().await.unwrap().unwrap();
    drop(bytes);
    let used = server.wait_kv_blocks_freed().await;
    assert_eq!(used, 0.0, "cancelled requests must free their KV blocks");
    assert_eq!(server.metric("genai_num_requests_running").await, 0.0);
}

#[tokio::test]
async fn bad_grpc_input_gets_invalid_argument_naming_the_field() {
    let server = Server::start().await;
    let mut client = InferenceClient::new(server.channel().await);
    let sp = |f: fn(&mut pb::SamplingParams)| {
        let mut p = pb::SamplingParams::default();
        f(&mut p);
        Some(p)
    };
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            pb::GenerateRequest {
                prompt: String::new(),
                ..Default::default()
            },
            "prompt",
        ),
        (
            pb::GenerateRequest {
                prompt: "hi".into(),
                sampling: sp(|p| p.max_tokens = Some(0)),
                ..Default::default()
            },
            "max_tokens",
        ),
        (
            pb::GenerateRequest {
                prompt: "hi".into(),
                sampling: sp(|p| p.max_tokens = Some(-3)),
                ..Default::default()
            },
            "max_tokens",
        ),
        (
            pb::GenerateRequest {
                prompt: "hi".into(),
                sampling: sp(|p| p.max_tokens = Some(1_000_000)),
                ..Default::default()
            },
            "max_tokens",
        ),
        (
            pb::GenerateRequest {
                prompt: "hi".into(),
                sampling: sp(|p| p.temperature = Some(-1.0)),
                ..Default::default()
            },
            "temperature",
        ),
        (
            pb::GenerateRequest {
                prompt: "hi".into(),
                sampling: sp(|p| p.top_p = Some(0.0)),
                ..Default::default()
            },
            "top_p",
        ),
        (
            pb::GenerateRequest {
                prompt: "hi".into(),
                sampling: sp(|p| p.top_p = Some(1.5)),
                ..Default::default()
            },
            "top_p",
        ),
        (
            pb::GenerateRequest {
                prompt: "hi".into(),
                sampling: sp(|p| p.top_k = Some(-1)),
                ..Default::default()
            },
            "top_k",
        ),
        (
            pb::GenerateRequest {
                model: "gpt-17".into(),
                prompt: "hi".into(),
                ..Default::default()
            },
            "model",
        ),
        (
            pb::GenerateRequest {
                prompt: "word ".repeat(10_000),
                ..Default::default()
            },
            "prompt",
        ),
    ];
    for (req, field) in cases {
        let err = client
            .generate(req)
            .await
            .err()
            .unwrap_or_else(|| panic!("{field}: expected an error"));
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let err = client.chat(pb::ChatRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("messages"));
    // The server keeps serving.
    let ok = client
        .generate(pb::GenerateRequest {
            prompt: "Hi".into(),
            sampling: greedy(2),
            ..Default::default()
        })
        .await;
    assert_eq!(drain(ok.unwrap().into_inner()).await.1, 2);
}

#[tokio::test]
async fn bad_http_input_gets_400_with_openai_error_body() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let url = server.http_url("/v1/chat/completions");
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (br#"{"messages": [}"#.to_vec(), "body"),
        (json!({"messages": []}).to_string().into_bytes(), "messages"),
        (
            json!({"messages": msgs, "max_tokens": 0}).to_string().into_bytes(),
            "max_tokens",
        ),
        (
            json!({"messages": msgs, "temperature": -0.5}).to_string().into_bytes(),
            "temperature",
        ),
        (
            json!({"messages": msgs, "temperature": "hot"}).to_string().into_bytes(),
            "temperature",
        ),
        (json!({"messages": msgs, "top_p": 2}).to_string().into_bytes(), "top_p"),
        (json!({"messages": msgs, "top_k": -2}).to_string().into_bytes(), "top_k"),
        (
            json!({"messages": msgs, "model": "nope"}).to_string().into_bytes(),
            "model",
        ),
        (json!({"messages": "hello"}).to_string().into_bytes(), "messages"),
        (
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec(),
            "body",
        ),
    ];
    for (body, param) in cases {
        let resp = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{param}");
        let v: Value = resp.json().await.unwrap();
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        assert!(e["param"].as_str().unwrap().starts_with(param), "{param}: {v}");
        assert!(e["message"].as_str().unwrap().len() > 5, "{v}");
    }
    let resp = http
        .post(server.http_url("/v1/completions"))
        .json(&json!({"prompt": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn sigterm_lets_in_flight_streams_finish() {
    let server = Server::start().await;
    let mut client = InferenceClient::new(server.channel().await);
    let req = pb::GenerateRequest {
        prompt: "List the planets of the solar system.".into(),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(48),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(req).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    server.signal_term();
    let mut n = 0;
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        n += m.token_ids.len();
        last = Some(m);
    }
    let last = last.unwrap();
    assert_eq!(last.finish_reason, "length", "the in-flight stream must complete");
    assert!(n > 0);
    let status = server.terminate_wait(Duration::from_secs(40)).await;
    assert!(status.success(), "{status}");
}

/// The official Python `openai` client: a streamed chat completion and an embedding.
#[tokio::test]
async fn official_openai_python_client() {
    let Some(py) = require_openai_python() else {
        return;
    };
    let server = Server::start().await;
    let script = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
s = c.chat.completions.create(model="smollm2-135m-instruct", stream=True, max_tokens=30, temperature=0,
    messages=[{"role": "user", "content": "What is the capital of France?"}])
text = "".join((ch.choices[0].delta.content or "") for ch in s if ch.choices)
assert text.strip(), text
e = c.embeddings.create(model="all-minilm-l6-v2", input=["hello world", "paged attention"])
assert len(e.data) == 2 and len(e.data[0].embedding) == 384, e
assert abs(sum(x * x for x in e.data[0].embedding) - 1.0) < 1e-3
print("ok:", text)
"#;
    run_python(&py, script, &[&server.http_url("/v1")]).await;
}

#[tokio::test]
async fn full_queue_gets_resource_exhausted_and_429_with_retry_after() {
    // One running sequence, one waiting slot: the rest of a burst is refused at once.
    let server = Server::builder()
        .env("GENAI_ENGINE__MAX_RUNNING", "1")
        .env("GENAI_ENGINE__MAX_WAITING", "1")
        .start()
        .await;
    let channel = server.channel().await;
    let long = || pb::GenerateRequest {
        prompt: "Count slowly:".into(),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(400),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..6 {
        match InferenceClient::new(channel.clone()).generate(long()).await {
            Ok(s) => held.push(s.into_inner()),
            Err(e) => refused = Some(e),
        }
    }
    let e = refused.expect("a burst beyond running + waiting must be refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.metadata().get("retry-after").is_some());
    let resp = reqwest::Client::new()
        .post(server.http_url("/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    drop(held);
    // Once the held streams are gone the server serves again.
    let mut ok = None;
    for _ in 0..50 {
        let r = InferenceClient::new(channel.clone())
            .generate(pb::GenerateRequest {
                prompt: "Hi".into(),
                sampling: greedy(2),
                ..Default::default()
            })
            .await;
        if let Ok(s) = r {
            ok = Some(drain(s.into_inner()).await.1);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ok, Some(2));
}

#[tokio::test]
async fn grpc_deadline_ends_the_stream_and_frees_blocks() {
    let server = Server::start().await;
    let mut client = InferenceClient::new(server.channel().await);
    let mut req = tonic::Request::new(pb::GenerateRequest {
        prompt: "Write a very long essay.".into(),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(4000),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(700));
    let started = std::time::Instant::now();
    let code = match client.generate(req).await {
        Err(e) => e.code(),
        Ok(s) => {
            let mut s = s.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("a 4000-token stream cannot finish within 700 ms"),
                    Err(e) => break e.code(),
                }
            }
        }
    };
    assert!(matches!(code, Code::DeadlineExceeded | Code::Cancelled), "{code:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let used = server.wait_kv_blocks_freed().await;
    assert_eq!(used, 0.0);
}
