//! Metrics, request ids, JSON logs and the request log after real traffic.

use std::time::Duration;

use genai_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use serde_json::{json, Value};

use crate::harness::{require_tool, series_value, Server};

#[tokio::test]
async fn traffic_moves_metrics_and_lands_in_the_request_log() {
    let promtool = require_tool("promtool", &["--version"], "apt-get install prometheus (Debian/Ubuntu)");
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("requests");
    let server = Server::builder()
        .env("GENAI_LOG__FORMAT", "json")
        .env("GENAI_OPS__REQUEST_LOG__ENABLED", "true")
        .env("GENAI_OPS__REQUEST_LOG__DIR", log_dir.to_str().unwrap())
        .start()
        .await;
    let before = reqwest::get(server.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let mut client = InferenceClient::new(server.channel().await);
    let mut req = tonic::Request::new(pb::GenerateRequest {
        prompt: "Hello there".into(),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(5),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    req.metadata_mut().insert("x-request-id", "e2e-grpc-1".parse().unwrap());
    let resp = client.generate(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "e2e-grpc-1");
    let mut s = resp.into_inner();
    while s.message().await.unwrap().is_some() {}

    let http = reqwest::Client::new();
    let r = http
        .post(server.http_url("/v1/completions"))
        .header("x-request-id", "e2e-http-1")
        .json(&json!({"prompt": "Hi", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "e2e-http-1");
    r.bytes().await.unwrap();
    let r = http
        .post(server.http_url("/v1/feedback"))
        .json(&json!({"request_id": "e2e-http-1", "rating": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let bad = http
        .post(server.http_url("/v1/feedback"))
        .json(&json!({"request_id": "e2e-http-1", "rating": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let after = reqwest::get(server.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "genai_time_to_first_token_seconds_count",
        "genai_e2e_request_latency_seconds_count",
        "genai_generation_tokens_total",
        "genai_prompt_tokens_total",
        "genai_decode_step_seconds_count",
    ] {
        assert!(
            series_value(&after, series) > series_value(&before, series),
            "{series} did not move"
        );
    }
    assert!(
        after.contains("genai_requests_total{api=\"grpc\",method=\"Generate\",status=\"OK\""),
        "{after}"
    );
    assert!(after.contains("genai_requests_total{api=\"http\",method=\"/v1/completions\",status=\"200\""));

    // The live exposition passes promtool.
    if let Some(promtool) = promtool {
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(after.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Request log: one JSON line per request with its id; prompts hashed by default.
    let lines = poll_lines(&log_dir, 3).await;
    let grpc_line = lines
        .iter()
        .find(|v| v["request_id"] == "e2e-grpc-1")
        .expect("grpc request logged");
    assert_eq!(grpc_line["completion_tokens"], 5);
    assert_ne!(
        grpc_line["prompt"], "Hello there",
        "raw prompt text must not be logged in hash mode"
    );
    assert!(
        lines
            .iter()
            .any(|v| v["request_id"] == "e2e-http-1" && v["type"] == "feedback"),
        "{lines:?}"
    );

    // Server log lines are JSON and the request's lines carry its id.
    let logs = server.logs();
    let tagged = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.to_string().contains("e2e-grpc-1"))
        .count();
    assert!(tagged > 0, "no JSON log line carries the request id:\n{logs}");
}

async fn poll_lines(dir: &std::path::Path, want: usize) -> Vec<Value> {
    for _ in 0..100 {
        let mut lines = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            lines.extend(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()));
        }
        if lines.len() >= want {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("request log in {} has fewer than {want} lines", dir.display());
}
