//! API keys and tenants through the binary: `genai-factory keys` (add prints the key once, on the
//! last line; the files hold no plaintext), 401 / UNAUTHENTICATED without a key, with a wrong one
//! and with one revoked by the CLI while the server runs, 403 / PERMISSION_DENIED without the
//! scope, `/metrics` behind the `metrics` scope or on its own listener, open mode announced once
//! and closed as soon as a key is added, and tenant isolation of search, RAG and delete.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use genai_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use pb::knowledge_client::KnowledgeClient;
use serde_json::{json, Value};

use crate::harness::{free_addr, run_to_exit, Server};

const KEYS_ENV: &str = "GENAI_AUTH__KEYS_FILE";

/// A keys file in a temporary directory, driven by the real `genai-factory keys` command.
struct Keys {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Keys {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        Self { _dir: dir, path }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["keys"];
        all.extend_from_slice(args);
        run_to_exit(&all, &[(KEYS_ENV, self.path())], Duration::from_secs(30))
    }

    /// `keys add`: the key, read from the last line of the output.
    fn add(&self, tenant: &str, scopes: &[&str]) -> String {
        let mut args = vec!["add", "--tenant", tenant];
        for s in scopes {
            args.extend(["--scope", s]);
        }
        let out = self.cli(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let key = stdout.lines().last().unwrap().to_owned();
        assert!(key.starts_with("gf_"), "{stdout}");
        key
    }

    fn server(&self) -> crate::harness::ServerBuilder {
        Server::builder().env(KEYS_ENV, self.path())
    }
}

/// The id part of a key (`gf_<id>_<secret>`).
fn id_of(key: &str) -> &str {
    &key[3..15]
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A request to the HTTP door with an optional key and extra headers: status, headers, JSON body.
async fn http(
    server: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method.parse().unwrap(), server.http_url(path));
    if let Some(k) = key {
        req = req.header("authorization", bearer(k));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (status, h, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A human-format log line without its colour codes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// A gRPC request carrying `key` as `authorization` metadata.
fn with_key<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", bearer(key).parse().unwrap());
    req
}

#[test]
fn keys_add_prints_the_key_once_and_stores_only_its_hash() {
    let keys = Keys::new();
    let out = keys.cli(&[
        "add",
        "--tenant",
        "acme",
        "--scope",
        "infer",
        "--scope",
        "knowledge:write",
        "--name",
        "ci",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap();
    assert!(
        key.starts_with("gf_") && key.len() > 50,
        "the key is the last line: {stdout}"
    );
    assert_eq!(stdout.matches(key).count(), 1, "printed once: {stdout}");
    let other = keys.add("globex", &[]);

    // No file next to the keys file holds a key or its secret part.
    for entry in std::fs::read_dir(keys.path.parent().unwrap()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for k in [key, other.as_str()] {
            assert!(!text.contains(&k[16..]), "a key's secret is on disk: {text}");
        }
    }
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&keys.path).unwrap()).unwrap();
    assert_eq!(stored["keys"][0]["id"], id_of(key));
    assert_eq!(stored["keys"][0]["scopes"], json!(["infer", "knowledge:write"]));
    assert_eq!(
        stored["keys"][1]["scopes"],
        json!(["infer"]),
        "infer is the default scope"
    );

    let list = keys.cli(&["list"]);
    let text = String::from_utf8(list.stdout).unwrap();
    assert!(list.status.success());
    assert!(
        text.contains(id_of(key)) && text.contains("acme") && text.contains("knowledge:write"),
        "{text}"
    );
    assert!(
        !text.contains(key) && !text.contains(stored["keys"][0]["hash"].as_str().unwrap()),
        "{text}"
    );

    // Columns: id, tenant, scopes, created, revoked ("-" while valid), name.
    let revoked_column = |text: &str| {
        let line = text.lines().find(|l| l.starts_with(id_of(key))).unwrap().to_owned();
        line.split_whitespace().nth(4).unwrap().to_owned()
    };
    assert_eq!(revoked_column(&text), "-", "{text}");
    let revoke = keys.cli(&["revoke", id_of(key)]);
    assert!(revoke.status.success(), "{}", String::from_utf8_lossy(&revoke.stderr));
    let text = String::from_utf8(keys.cli(&["list"]).stdout).unwrap();
    assert!(revoked_column(&text).ends_with('Z'), "a revocation time: {text}");
    let again = keys.cli(&["revoke", id_of(key)]);
    assert!(again.status.success(), "revoking twice is fine");

    // Bad input: a clear error naming the value, nothing written.
    let before = std::fs::read_to_string(&keys.path).unwrap();
    let out = keys.cli(&["add", "--tenant", "acme", "--scope", "write"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown scope \"write\"") && err.contains("knowledge:write"),
        "{err}"
    );
    let out = keys.cli(&["add", "--tenant", "acme corp"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--tenant"), "{err}");
    let out = keys.cli(&["revoke", "0123456789ab"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("0123456789ab"), "{err}");
    assert_eq!(std::fs::read_to_string(&keys.path).unwrap(), before);
}

#[tokio::test]
async fn missing_wrong_revoked_keys_and_missing_scopes_are_refused_on_both_doors() {
    let keys = Keys::new();
    let infer = keys.add("acme", &["infer"]);
    let revoked = keys.add("acme", &[]);
    let metrics = keys.add("ops", &["metrics"]);
    let server = keys.server().start().await;
    assert!(server.logs().contains("authentication is ON"), "{}", server.logs());

    // HTTP: none, malformed, wrong secret → 401 with `www-authenticate: Bearer`.
    let mut wrong = infer.clone();
    wrong.replace_range(20..21, if &infer[20..21] == "A" { "B" } else { "A" });
    for key in [None, Some("not-a-key"), Some(wrong.as_str())] {
        let (status, h, v) = http(&server, "GET", "/v1/models", key, &[], None).await;
        assert_eq!(status, 401, "{key:?}: {v}");
        assert_eq!(h["www-authenticate"], "Bearer");
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    }
    let (status, _, v) = http(&server, "GET", "/v1/models", Some(&infer), &[], None).await;
    assert_eq!(status, 200, "{v}");
    // Probes stay open.
    assert_eq!(http(&server, "GET", "/health", None, &[], None).await.0, 200);
    assert_eq!(http(&server, "GET", "/live", None, &[], None).await.0, 200);

    // Scopes: an infer key may not ingest nor scrape; a metrics key scrapes.
    let doc = json!({"documents": [{"id": "d", "content": "text"}]});
    let (status, _, v) = http(&server, "POST", "/v1/knowledge/documents", Some(&infer), &[], Some(doc)).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_permissions", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("knowledge:write"),
        "{v}"
    );
    assert_eq!(http(&server, "GET", "/metrics", Some(&infer), &[], None).await.0, 403);
    assert_eq!(http(&server, "GET", "/metrics", None, &[], None).await.0, 401);
    let (status, _, body) = http(&server, "GET", "/metrics", Some(&metrics), &[], None).await;
    assert_eq!(status, 200);
    assert!(body.as_str().unwrap().contains("genai_build_info"), "{body}");
    assert_eq!(
        http(&server, "GET", "/v1/models", Some(&metrics), &[], None).await.0,
        403
    );
    // The header cannot switch tenants.
    let (status, _, v) = http(
        &server,
        "GET",
        "/v1/models",
        Some(&infer),
        &[("x-tenant-id", "globex")],
        None,
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("x-tenant-id"), "{v}");

    // gRPC, through the generated clients.
    let channel = server.channel().await;
    let mut inference = InferenceClient::new(channel.clone());
    let e = inference.list_models(pb::ListModelsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = inference
        .list_models(with_key(pb::ListModelsRequest {}, &wrong))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    inference
        .list_models(with_key(pb::ListModelsRequest {}, &infer))
        .await
        .unwrap();
    let mut knowledge = KnowledgeClient::new(channel.clone());
    let ingest = pb::IngestRequest {
        documents: vec![pb::Document {
            id: "d".into(),
            content: "text".into(),
            ..Default::default()
        }],
    };
    let e = knowledge.ingest(with_key(ingest.clone(), &infer)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let stream = futures::stream::iter(vec![pb::IngestStreamRequest {
        document: ingest.documents[0].clone().into(),
    }]);
    let e = knowledge.ingest_stream(with_key(stream, &infer)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = knowledge
        .stats(with_key(pb::StatsRequest {}, &infer))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // gRPC health stays open for probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap();

    // Revoked through the real CLI while the server runs: refused within the reload interval.
    assert_eq!(
        http(&server, "GET", "/v1/models", Some(&revoked), &[], None).await.0,
        200
    );
    let out = keys.cli(&["revoke", id_of(&revoked)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut status = 200;
    for _ in 0..100 {
        status = http(&server, "GET", "/v1/models", Some(&revoked), &[], None).await.0;
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 401, "the revoked key is refused");
    let e = inference
        .list_models(with_key(pb::ListModelsRequest {}, &revoked))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{}", e.message());
    assert_eq!(
        http(&server, "GET", "/v1/models", Some(&infer), &[], None).await.0,
        200,
        "others still pass"
    );

    // A request's log lines carry its principal (the key id): an unknown field is warned about
    // inside the request's span.
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "e2e_unknown_field": 1});
    let (status, _, v) = http(&server, "POST", "/v1/chat/completions", Some(&infer), &[], Some(body)).await;
    assert_eq!(status, 200, "{v}");
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("e2e_unknown_field"))
        .expect("the warning");
    assert!(
        strip_ansi(line).contains(&format!("principal={}}}", id_of(&infer))),
        "{line}"
    );

    // Refusals are counted by reason.
    let (_, _, body) = http(&server, "GET", "/metrics", Some(&metrics), &[], None).await;
    let exposition = body.as_str().unwrap();
    for reason in ["missing", "malformed", "wrong_secret", "revoked", "scope", "tenant"] {
        let series = format!("genai_auth_failures_total{{reason=\"{reason}\"}}");
        assert!(
            crate::harness::series_value(exposition, &series) >= 1.0,
            "{series}: {exposition}"
        );
    }

    // The audit log names ids and reasons, never a key.
    assert!(
        logs.contains("authentication failed") && logs.contains(id_of(&revoked)),
        "{logs}"
    );
    for k in [&infer, &revoked, &metrics, &wrong] {
        assert!(!logs.contains(&k[16..]), "a key's secret is in the log");
    }
}

/// Ingests the documents of `tenant`'s key over HTTP (no `tenant` field: the key's tenant).
async fn ingest(server: &Server, key: &str, docs: &[(&str, &str)]) {
    let docs: Vec<Value> = docs
        .iter()
        .map(|(id, text)| json!({"id": id, "source": format!("{id}.txt"), "content": text}))
        .collect();
    let (status, _, v) = http(
        server,
        "POST",
        "/v1/knowledge/documents",
        Some(key),
        &[],
        Some(json!({"documents": docs})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

async fn search_ids(server: &Server, key: &str, query: &str) -> Vec<String> {
    let (status, _, v) = http(
        server,
        "POST",
        "/v1/knowledge/search",
        Some(key),
        &[],
        Some(json!({"query": query, "top_k": 5})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["document_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The chunk ids of the sources a gRPC RAG chat retrieved (all of them come on the first message).
async fn rag_sources(server: &Server, key: &str, question: &str) -> Result<Vec<String>, tonic::Status> {
    let mut client = InferenceClient::new(server.channel().await);
    let req = with_key(
        pb::ChatRequest {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: question.into(),
                ..Default::default()
            }],
            mode: pb::ChatMode::Rag as i32,
            sampling: Some(pb::SamplingParams {
                max_tokens: Some(4),
                temperature: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        },
        key,
    );
    let mut stream = client.chat(req).await?.into_inner();
    let first = stream.message().await?.expect("a first message");
    while stream.message().await?.is_some() {}
    Ok(first.citations.into_iter().map(|c| c.chunk_id).collect())
}

#[tokio::test]
async fn one_tenants_key_cannot_search_rag_or_delete_anothers_documents() {
    let keys = Keys::new();
    let acme = keys.add("acme", &["infer", "knowledge:write"]);
    let globex = keys.add("globex", &["infer", "knowledge:write"]);
    let admin = keys.add("ops", &["admin"]);
    let server = keys.server().start().await;
    let question = "What is the launch code of project Zephyr?";
    ingest(
        &server,
        &acme,
        &[(
            "zephyr",
            "The launch code of project Zephyr is AZURE-FALCON-7. Only acme staff know it.",
        )],
    )
    .await;
    ingest(
        &server,
        &globex,
        &[("bread", "Knead the dough for ten minutes and let it rise for an hour.")],
    )
    .await;

    // Search: each key sees its own tenant only.
    assert_eq!(search_ids(&server, &acme, question).await, vec!["zephyr"]);
    assert_eq!(search_ids(&server, &globex, question).await, vec!["bread"]);
    // Naming the other tenant in the body or the header is refused, on both doors.
    let (status, _, v) = http(
        &server,
        "POST",
        "/v1/knowledge/search",
        Some(&globex),
        &[],
        Some(json!({"query": question, "tenant": "acme"})),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("tenant:"), "{v}");
    let (status, _, v) = http(
        &server,
        "POST",
        "/v1/knowledge/search",
        Some(&globex),
        &[("x-tenant-id", "acme")],
        Some(json!({"query": question})),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    let mut knowledge = KnowledgeClient::new(server.channel().await);
    let e = knowledge
        .search(with_key(
            pb::SearchRequest {
                query: question.into(),
                tenant: "acme".into(),
                ..Default::default()
            },
            &globex,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = knowledge
        .ingest(with_key(
            pb::IngestRequest {
                documents: vec![pb::Document {
                    id: "zephyr".into(),
                    tenant: "acme".into(),
                    content: "overwritten".into(),
                    ..Default::default()
                }],
            },
            &globex,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("documents[0].tenant"), "{}", e.message());

    // RAG: acme's answer is grounded on its document; globex's never sees it.
    let a = rag_sources(&server, &acme, question).await.unwrap();
    assert!(a.iter().any(|c| c.starts_with("zephyr")), "{a:?}");
    let b = rag_sources(&server, &globex, question).await.unwrap();
    assert!(b.iter().all(|c| !c.starts_with("zephyr")), "{b:?}");

    // Delete: globex cannot remove acme's document (404 / NOT_FOUND), on either door.
    let (status, _, v) = http(
        &server,
        "DELETE",
        "/v1/knowledge/documents/zephyr",
        Some(&globex),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let (status, _, v) = http(
        &server,
        "DELETE",
        "/v1/knowledge/documents/zephyr?tenant=acme",
        Some(&globex),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 403, "{v}");
    let e = knowledge
        .delete(with_key(
            pb::DeleteRequest {
                tenant: String::new(),
                document_id: "zephyr".into(),
            },
            &globex,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert_eq!(
        search_ids(&server, &acme, question).await,
        vec!["zephyr"],
        "still there"
    );

    // `genai-factory ingest --server` with acme's key (from GENAI_API_KEY) lands in acme only;
    // without a key the server refuses it.
    let docs = tempfile::tempdir().unwrap();
    let file = docs.path().join("orbit.txt");
    std::fs::write(&file, "The Zephyr probe orbits the moon Europa every 3.5 days.").unwrap();
    let grpc = server.grpc_url();
    let args = ["ingest", "--server", grpc.as_str(), "--quiet", file.to_str().unwrap()];
    let out = run_to_exit(&args, &[], Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Unauthenticated"), "{err}");
    let out = run_to_exit(&args, &[("GENAI_API_KEY", acme.as_str())], Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 added") && stdout.contains("metrics scope"),
        "{stdout}"
    );
    let orbit = "Which moon does the Zephyr probe orbit?";
    let id = file.canonicalize().unwrap().display().to_string();
    assert!(search_ids(&server, &acme, orbit).await.contains(&id));
    assert!(!search_ids(&server, &globex, orbit).await.contains(&id));

    // An admin key acts for the tenant it names.
    let (status, _, v) = http(
        &server,
        "POST",
        "/v1/knowledge/search",
        Some(&admin),
        &[],
        Some(json!({"query": question, "tenant": "acme"})),
    )
    .await;
    assert_eq!(
        (status, v["hits"][0]["document_id"].as_str()),
        (200, Some("zephyr")),
        "{v}"
    );
    // And acme deletes its own.
    let (status, _, v) = http(
        &server,
        "DELETE",
        "/v1/knowledge/documents/zephyr",
        Some(&acme),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(!search_ids(&server, &acme, question)
        .await
        .contains(&"zephyr".to_owned()));
}

#[tokio::test]
async fn open_mode_says_so_once_and_closes_when_a_key_is_added() {
    let keys = Keys::new();
    let metrics_addr = free_addr();
    let server = keys
        .server()
        .env("GENAI_SERVER__METRICS_ADDR", &metrics_addr.to_string())
        .start()
        .await;
    let logs = server.logs();
    assert_eq!(logs.matches("authentication is OFF").count(), 1, "{logs}");
    assert!(logs.contains("keys add"), "the line says how to add a key: {logs}");
    // Open: no key needed; /metrics lives on its own listener only.
    assert_eq!(http(&server, "GET", "/v1/models", None, &[], None).await.0, 200);
    assert_eq!(http(&server, "GET", "/metrics", None, &[], None).await.0, 404);
    let scrape = |url: String| async move { reqwest::get(url).await.unwrap().status().as_u16() };
    assert_eq!(scrape(format!("http://{metrics_addr}/metrics")).await, 200);

    // A key added while the server runs turns authentication on.
    let key = keys.add("acme", &[]);
    let mut status = 200;
    for _ in 0..100 {
        status = http(&server, "GET", "/v1/models", None, &[], None).await.0;
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 401, "a key exists: authentication is on");
    assert_eq!(http(&server, "GET", "/v1/models", Some(&key), &[], None).await.0, 200);
    // The separate metrics listener stays unauthenticated (network-isolated by configuration).
    assert_eq!(scrape(format!("http://{metrics_addr}/metrics")).await, 200);
}
