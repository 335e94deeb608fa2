//! Hard per-tenant limits through the real binary: every limit answers 429 naming it with
//! `retry-after` and OpenAI's `x-ratelimit-*` headers (and RESOURCE_EXHAUSTED with the same
//! metadata on gRPC), a cancelled stream gives back its slot and its token reservation, and a
//! tenant's spend survives a restart.

use std::time::{Duration, Instant};

use futures::StreamExt;
use genai_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use tonic::Code;

use crate::harness::Server;

/// Prices that make one token cost 0.001 USD (prompt and completion alike).
const PRICES: &str = r#"
[ops.cost.prices]
"smollm2-135m-instruct" = { prompt_per_1k = 1.0, completion_per_1k = 1.0 }
"#;

/// POST /v1/completions as `tenant`: status, headers, body.
async fn complete(server: &Server, tenant: &str, body: Value) -> (u16, HeaderMap, Value) {
    post_as(server, "/v1/completions", tenant, body).await
}

async fn post_as(server: &Server, path: &str, tenant: &str, body: Value) -> (u16, HeaderMap, Value) {
    let mut req = reqwest::Client::new().post(server.http_url(path)).json(&body);
    if !tenant.is_empty() {
        req = req.header("x-tenant-id", tenant);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap())
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} header in {h:?}"))
        .to_str()
        .unwrap()
}

/// A 429 naming `limit`, with a whole-seconds `retry-after` of at least 1.
fn assert_limited(status: u16, h: &HeaderMap, v: &Value, limit: &str) {
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["param"], limit, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(limit), "{v}");
    let retry: u64 = header(h, "retry-after").parse().unwrap();
    assert!(retry >= 1, "{h:?}");
}

/// Polls a series until `ok` holds (gauges refresh every `tenants_state.flush_interval_ms`).
async fn wait_series(server: &Server, name: &str, labels: &[&str], ok: impl Fn(f64) -> bool) -> f64 {
    let start = Instant::now();
    loop {
        let v = server.labelled_metric(name, labels).await;
        if ok(v) || start.elapsed() > Duration::from_secs(15) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn every_limit_is_a_429_naming_it_with_openai_headers() {
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{PRICES}
[tenants.rpm]
requests_per_minute = 2
[tenants.grpc]
requests_per_minute = 1
[tenants.prompt]
max_prompt_tokens = 8
[tenants.maxtok]
max_tokens = 6
[tenants.tpm]
tokens_per_minute = 60
[tenants.budget]
budget_usd = 0.03
budget_period = "30d"
[tenants_state]
path = "{}"
flush_interval_ms = 200
"#,
        state.path().join("tenants.json").display()
    );
    let server = Server::builder().config(&config).start().await;
    let tiny = json!({"prompt": "Hello", "max_tokens": 1});

    // requests_per_minute: a burst of the limit, then 429 with the request headers.
    for left in ["1", "0"] {
        let (status, h, v) = complete(&server, "rpm", tiny.clone()).await;
        assert_eq!(status, 200, "{v}");
        // Answers carry the headers too, as OpenAI's do.
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), left);
    }
    let (status, h, v) = complete(&server, "rpm", tiny.clone()).await;
    assert_limited(status, &h, &v, "requests_per_minute");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(header(&h, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "0");
    assert!(header(&h, "x-ratelimit-reset-requests").ends_with('s'), "{h:?}");
    assert!(h.get("x-ratelimit-limit-tokens").is_none(), "no token limit configured");
    // Embeddings are requests too.
    let (status, h, v) = post_as(&server, "/v1/embeddings", "rpm", json!({"input": ["hello"]})).await;
    assert_limited(status, &h, &v, "requests_per_minute");

    // max_prompt_tokens: counted after tokenization.
    let long = json!({"prompt": "one two three four five six seven eight nine ten eleven twelve", "max_tokens": 1});
    let (status, h, v) = complete(&server, "prompt", long).await;
    assert_limited(status, &h, &v, "max_prompt_tokens");
    assert_eq!(complete(&server, "prompt", tiny.clone()).await.0, 200);

    // max_tokens: above the cap is refused; unset (chat has no door default) gets the cap.
    let (status, h, v) = complete(&server, "maxtok", json!({"prompt": "Hello", "max_tokens": 7})).await;
    assert_limited(status, &h, &v, "max_tokens");
    let chat = json!({"messages": [{"role": "user", "content": "Hello"}], "ignore_eos": true});
    let (status, _, v) = post_as(&server, "/v1/chat/completions", "maxtok", chat).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");

    // tokens_per_minute: prompt + max_tokens are reserved; the second request does not fit.
    let forty = json!({"prompt": "Hello", "max_tokens": 40, "ignore_eos": true});
    let (status, _, v) = complete(&server, "tpm", forty.clone()).await;
    assert_eq!(status, 200, "{v}");
    let used = v["usage"]["total_tokens"].as_u64().unwrap();
    let (status, h, v) = complete(&server, "tpm", forty).await;
    assert_limited(status, &h, &v, "tokens_per_minute");
    assert_eq!(header(&h, "x-ratelimit-limit-tokens"), "60");
    assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), (60 - used).to_string());
    assert!(header(&h, "x-ratelimit-reset-tokens").ends_with('s'), "{h:?}");
    let retry: u64 = header(&h, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");

    // budget_usd: 0.001 USD per token; the first request (~0.021) fits 0.03, a second cannot.
    let twenty = json!({"prompt": "Hello", "max_tokens": 20, "ignore_eos": true});
    let (status, _, v) = complete(&server, "budget", twenty.clone()).await;
    assert_eq!(status, 200, "{v}");
    let spent = v["usage"]["total_tokens"].as_f64().unwrap() / 1000.0;
    let (status, h, v) = complete(&server, "budget", twenty).await;
    assert_limited(status, &h, &v, "budget_usd");
    assert_eq!(v["error"]["code"], "insufficient_quota");
    let tenant = ["tenant=\"budget\""];
    // The gauge refreshes on a timer: wait for the finished request to show.
    let same = |v: f64| (v - spent).abs() < 1e-9;
    let shown = wait_series(&server, "genai_tenant_spend_usd", &tenant, same).await;
    assert!(same(shown), "spend gauge {shown}, expected {spent}");
    assert_eq!(server.labelled_metric("genai_tenant_budget_usd", &tenant).await, 0.03);
    let rejected = server
        .labelled_metric(
            "genai_tenant_limit_rejections_total",
            &["tenant=\"budget\"", "limit=\"budget_usd\""],
        )
        .await;
    assert_eq!(rejected, 1.0);

    // gRPC: RESOURCE_EXHAUSTED with the same metadata.
    let mut client = InferenceClient::new(server.channel().await);
    let request = || {
        let mut r = tonic::Request::new(pb::GenerateRequest {
            prompt: "Hello".into(),
            sampling: Some(pb::SamplingParams {
                max_tokens: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        });
        r.metadata_mut().insert("x-tenant-id", "grpc".parse().unwrap());
        r
    };
    let ok = client.generate(request()).await.unwrap();
    // Answers carry the tenant's limits too, in the initial metadata.
    assert_eq!(ok.metadata().get("x-ratelimit-limit-requests").unwrap(), "1");
    assert_eq!(ok.metadata().get("x-ratelimit-remaining-requests").unwrap(), "0");
    let mut s = ok.into_inner();
    while s.message().await.unwrap().is_some() {}
    let e = client.generate(request()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("requests_per_minute"), "{e:?}");
    let md = e.metadata();
    assert_eq!(md.get("x-ratelimit-limit-requests").unwrap(), "1");
    assert_eq!(md.get("x-ratelimit-remaining-requests").unwrap(), "0");
    assert!(md.get("retry-after").is_some(), "{md:?}");

    // Tenants without limits are untouched.
    for _ in 0..3 {
        assert_eq!(complete(&server, "", tiny.clone()).await.0, 200);
    }
}

#[tokio::test]
async fn a_cancelled_stream_gives_back_its_slot_and_its_reservation() {
    let config = r#"
[tenants.live]
concurrent_streams = 1
tokens_per_minute = 400
[tenants_state]
flush_interval_ms = 200
"#;
    let server = Server::builder().config(config).start().await;
    let tenant = ["tenant=\"live\""];
    // A holds the one stream and reserves prompt + 250 tokens.
    let a = reqwest::Client::new()
        .post(server.http_url("/v1/completions"))
        .header("x-tenant-id", "live")
        .json(&json!({"prompt": "Count to one thousand:", "max_tokens": 250, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 200);
    let mut a = a.bytes_stream();
    a.next().await.unwrap().unwrap();
    let (status, h, v) = complete(&server, "live", json!({"prompt": "Hi", "max_tokens": 1})).await;
    assert_limited(status, &h, &v, "concurrent_streams");
    assert_eq!(header(&h, "retry-after"), "1");
    assert_eq!(
        wait_series(&server, "genai_tenant_active_streams", &tenant, |v| v == 1.0).await,
        1.0
    );

    // The client goes away: the slot and the unused part of A's reservation come back.
    drop(a);
    assert_eq!(
        wait_series(&server, "genai_tenant_active_streams", &tenant, |v| v == 0.0).await,
        0.0
    );
    let window = server.labelled_metric("genai_tenant_window_tokens", &tenant).await;
    assert!(window < 190.0, "tokens still counted after the cancel: {window}");
    // prompt + 200 fits only if A's unused reservation was refunded (A alone reserved ~256 of 400).
    let (status, _, v) = complete(
        &server,
        "live",
        json!({"prompt": "Count to one thousand:", "max_tokens": 200}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn budget_spend_survives_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("tenants.json");
    let config = format!(
        r#"{PRICES}
[tenants.acme]
budget_usd = 0.05
budget_period = "30d"
[tenants_state]
path = "{}"
flush_interval_ms = 200
"#,
        path.display()
    );
    let tenant = ["tenant=\"acme\""];
    let server = Server::builder().config(&config).start().await;
    let (status, _, v) = complete(
        &server,
        "acme",
        json!({"prompt": "Hello", "max_tokens": 20, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let spent = v["usage"]["total_tokens"].as_f64().unwrap() / 1000.0;
    let same = |v: f64| (v - spent).abs() < 1e-9;
    let shown = wait_series(&server, "genai_tenant_spend_usd", &tenant, same).await;
    assert!(same(shown), "{shown} vs {spent}");
    assert!(server.terminate(Duration::from_secs(30)).await.success());
    let saved = std::fs::read_to_string(&path).unwrap();
    assert!(saved.contains("\"acme\""), "{saved}");

    let server = Server::builder().config(&config).start().await;
    let restored = server.labelled_metric("genai_tenant_spend_usd", &tenant).await;
    assert!(same(restored), "restored {restored}, spent {spent}");
    // ~0.021 spent: a request worth up to ~0.041 would fit a fresh 0.05 budget, not this one.
    let (status, h, v) = complete(&server, "acme", json!({"prompt": "Hello", "max_tokens": 40})).await;
    assert_limited(status, &h, &v, "budget_usd");
    let (status, _, v) = complete(&server, "acme", json!({"prompt": "Hello", "max_tokens": 10})).await;
    assert_eq!(status, 200, "{v}");
}
