//! Remote backends through the real binary: a `[[llm.backends]]` entry whose upstream (a real
//! HTTP server in this test) answers 500 falls back to the local engine, its circuit opens and
//! `/metrics` shows it; and a backend pointing at a second genai-factory relays its answer
//! exactly (the same greedy text and usage as asking that server directly), streamed and not,
//! to our own HTTP clients and the official openai client.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::harness::{require_openai_python, run_python, Server};

const LOCAL: &str = "smollm2-135m-instruct";

/// An upstream that answers every chat completion with a 500; returns its URL and hit counter.
async fn failing_upstream() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"error": {"message": "upstream exploded", "type": "server_error"}})),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

/// The text of a streamed chat completion's SSE body (and that it ended with `[DONE]`).
fn sse_content(body: &str) -> String {
    let datas: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{body}");
    datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_failing_remote_falls_back_to_local_and_its_circuit_opens() {
    let (url, hits) = failing_upstream().await;
    let server = Server::builder()
        .config(&format!(
            r#"
[[llm.backends]]
name = "flaky"
kind = "openai"
base_url = "{url}"
model = "upstream-model"
max_retries = 1
initial_backoff = "10ms"
max_backoff = "20ms"
failure_threshold = 2
open_for = "10m"
fallback = ["local"]

[tenants.default]
tokens_per_minute = 1000000
"#
        ))
        .start()
        .await;
    let http = reqwest::Client::new();
    let models: Value = http
        .get(server.http_url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(ids.contains(&"flaky") && ids.contains(&LOCAL), "{ids:?}");

    let ask = |stream: bool| {
        json!({"model": "flaky", "stream": stream, "max_tokens": 12, "temperature": 0,
               "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    };
    let (status, v) = server.post("/v1/chat/completions", ask(false).to_string()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "flaky");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim()
            .is_empty(),
        "{v}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "one attempt and one retry, then the local engine"
    );
    // Charged once, for what the local engine used: the failed attempts cost the tenant nothing.
    let used = v["usage"]["total_tokens"].as_f64().unwrap();
    let mut window = 0.0;
    for _ in 0..100 {
        window = server
            .labelled_metric("genai_tenant_window_tokens", &[r#"tenant="default""#])
            .await;
        if window == used {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(window, used, "the tenant's tokens in the window");
    let flaky = r#"backend="flaky""#;
    assert_eq!(
        server.labelled_metric("genai_backend_circuit_state", &[flaky]).await,
        1.0,
        "open"
    );
    assert_eq!(
        server
            .labelled_metric("genai_backend_attempts_total", &[flaky, r#"outcome="server_error""#])
            .await,
        2.0
    );
    assert_eq!(
        server.labelled_metric("genai_backend_retries_total", &[flaky]).await,
        1.0
    );
    let to_local = format!(r#"to="{LOCAL}""#);
    assert_eq!(
        server
            .labelled_metric("genai_backend_fallbacks_total", &[flaky, &to_local])
            .await,
        1.0
    );

    // Open: the next request goes to the local engine without calling the upstream.
    let resp = http
        .post(server.http_url("/v1/chat/completions"))
        .json(&ask(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!sse_content(&resp.text().await.unwrap()).trim().is_empty());
    assert_eq!(hits.load(Ordering::SeqCst), 2, "skipped while open");
    assert_eq!(
        server
            .labelled_metric("genai_backend_fallbacks_total", &[flaky, &to_local])
            .await,
        2.0
    );
    // What only local models do is refused clearly for a remote name.
    let (status, v) = server
        .post("/v1/embeddings", json!({"model": "flaky", "input": "x"}).to_string())
        .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("model")), "{v}");
}

#[tokio::test]
async fn a_remote_backend_relays_another_genai_factory_exactly() {
    let upstream = Server::start().await;
    let server = Server::builder()
        .config(&format!(
            "[[llm.backends]]\nname = \"peer\"\nbase_url = \"{}\"\nmodel = \"{LOCAL}\"\n",
            upstream.http_url("")
        ))
        .start()
        .await;
    let ask = |model: &str, stream: bool| {
        json!({"model": model, "stream": stream, "max_tokens": 24, "temperature": 0,
               "messages": [{"role": "user", "content": "Name three colours."}]})
        .to_string()
    };
    let (status, direct) = upstream.post("/v1/chat/completions", ask(LOCAL, false)).await;
    assert_eq!(status, 200, "{direct}");
    let (status, relayed) = server.post("/v1/chat/completions", ask("peer", false)).await;
    assert_eq!(status, 200, "{relayed}");
    assert_eq!(relayed["model"], "peer");
    let want = direct["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!want.is_empty());
    assert_eq!(relayed["choices"][0]["message"]["content"], want);
    assert_eq!(
        relayed["choices"][0]["finish_reason"],
        direct["choices"][0]["finish_reason"]
    );
    // The upstream's own usage (reported with include_usage), not our estimate.
    assert_eq!(relayed["usage"]["prompt_tokens"], direct["usage"]["prompt_tokens"]);
    assert_eq!(
        relayed["usage"]["completion_tokens"],
        direct["usage"]["completion_tokens"]
    );

    let resp = reqwest::Client::new()
        .post(server.http_url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(ask("peer", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(sse_content(&resp.text().await.unwrap()), want);

    let Some(py) = require_openai_python() else {
        return;
    };
    let script = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
s = c.chat.completions.create(model="peer", stream=True, max_tokens=24, temperature=0,
    messages=[{"role": "user", "content": "Name three colours."}])
text = "".join((ch.choices[0].delta.content or "") for ch in s if ch.choices)
assert text == sys.argv[2], (text, sys.argv[2])
print("ok:", text)
"#;
    run_python(&py, script, &[&server.http_url("/v1"), want]).await;
}
