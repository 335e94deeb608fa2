//! The assistant service through the binary and SmolLM2: the agent answers arithmetic through
//! the `calculator` tool (HTTP SSE and gRPC `Ask`), RAG streams its sources, chat answers,
//! `auto` routes, and bad input is refused naming the field.

use genai_proto::v1 as pb;
use pb::assistant_client::AssistantClient;
use serde_json::{json, Value};

use crate::harness::{repo_root, Server};

/// The SSE events of a streamed answer, as (event name, JSON data).
async fn sse(server: &Server, body: Value) -> Vec<(String, Value)> {
    let resp = reqwest::Client::new()
        .post(server.http_url("/v1/assistant/ask"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let mut events = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_owned();
        } else if let Some(d) = line.strip_prefix("data: ") {
            events.push((std::mem::take(&mut name), serde_json::from_str(d).unwrap()));
        }
    }
    events
}

fn of<'a>(events: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|(k, _)| k == kind).map(|(_, v)| v).collect()
}

fn question(q: &str) -> Value {
    json!([{"role": "user", "content": q}])
}

const ARITHMETIC: &str = "What is 1234 * 5678?";

#[tokio::test]
async fn agent_answers_arithmetic_through_the_calculator_on_sse_and_grpc() {
    // Priced, so that the charge of every step shows in the tenant's spend.
    let server = Server::builder()
        .config("[ops.cost.prices.smollm2-135m-instruct]\nprompt_per_1k = 1.0\ncompletion_per_1k = 2.0\n")
        .start()
        .await;
    let events = sse(
        &server,
        json!({"messages": question(ARITHMETIC), "mode": "agent", "stream": true, "temperature": 0, "max_tokens": 96}),
    )
    .await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds[0], "route", "{kinds:?}");
    assert_eq!(events[0].1["mode"], "agent");
    assert_eq!(kinds[kinds.len() - 2..], ["usage", "done"], "{events:?}");
    let calls = of(&events, "tool_call");
    assert!(!calls.is_empty(), "no tool call: {events:?}");
    assert_eq!(calls[0]["name"], "calculator", "{events:?}");
    let args: Value = serde_json::from_str(calls[0]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["expression"].is_string(), "{args}");
    let results = of(&events, "tool_result");
    assert_eq!(results[0]["id"], calls[0]["id"]);
    assert!(results[0]["output"].as_str().unwrap().contains("7006652"), "{events:?}");
    let usage = of(&events, "usage")[0];
    assert!(usage["steps"].as_u64().unwrap() >= 2, "{usage}");
    let (p, c) = (
        usage["prompt_tokens"].as_f64().unwrap(),
        usage["completion_tokens"].as_f64().unwrap(),
    );
    let cost = usage["cost_usd"].as_f64().unwrap();
    assert!((cost - (p + 2.0 * c) / 1000.0).abs() < 1e-9, "{usage}");
    // Every step was admitted and charged to the tenant: its settled spend is the whole run's.
    let start = std::time::Instant::now();
    let mut spent = 0.0;
    while start.elapsed() < std::time::Duration::from_secs(15) {
        spent = server
            .labelled_metric("genai_tenant_spend_usd", &["tenant=\"default\""])
            .await;
        if (spent - cost).abs() < 1e-6 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!((spent - cost).abs() < 1e-6, "spend {spent}, the run's cost {cost}");

    // The same through gRPC.
    let mut client = AssistantClient::new(server.channel().await);
    let mut stream = client
        .ask(pb::AskRequest {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: ARITHMETIC.into(),
                ..Default::default()
            }],
            mode: pb::AssistantMode::Agent as i32,
            sampling: Some(pb::SamplingParams {
                temperature: Some(0.0),
                max_tokens: Some(96),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(ev) = stream.message().await.unwrap() {
        got.push(ev.event.unwrap());
    }
    use pb::ask_event::Event as E;
    assert!(matches!(&got[0], E::Route(r) if r.mode == "agent" && r.reason == "explicit"));
    let call = got
        .iter()
        .find_map(|e| match e {
            E::ToolCall(c) => Some(c.clone()),
            _ => None,
        })
        .expect("a tool call");
    assert_eq!(call.name, "calculator");
    let result = got
        .iter()
        .find_map(|e| match e {
            E::ToolResult(r) if r.id == call.id => Some(r.clone()),
            _ => None,
        })
        .expect("its result");
    assert!(result.output.contains("7006652"), "{result:?}");
    assert!(matches!(got.last(), Some(E::Usage(u)) if u.steps >= 2));
    assert!(
        server
            .labelled_metric(
                "genai_agent_tool_calls_total",
                &["tool=\"calculator\"", "outcome=\"ok\""]
            )
            .await
            >= 2.0
    );
}

/// The bundled corpus, into the default tenant's knowledge base.
async fn ingest(server: &Server) {
    let text = std::fs::read_to_string(repo_root().join("tests/data/corpus/passages.jsonl")).unwrap();
    let docs: Vec<Value> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            json!({"id": v["id"], "source": format!("{}.txt", v["id"].as_str().unwrap()), "content": v["text"]})
        })
        .collect();
    let (status, v) = server
        .post("/v1/knowledge/documents", json!({ "documents": docs }).to_string())
        .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn rag_streams_its_sources_chat_answers_and_auto_routes() {
    let server = Server::start().await;
    ingest(&server).await;
    let q = "Which planet has a giant storm called the Great Red Spot?";
    let events = sse(
        &server,
        json!({"messages": question(q), "mode": "rag", "stream": true, "temperature": 0, "max_tokens": 32}),
    )
    .await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds[..2], ["route", "retrieval"], "{kinds:?}");
    let sources = events[1].1["sources"].as_array().unwrap();
    assert!(!sources.is_empty());
    assert_eq!(sources[0]["source"], "astronomy-2.txt", "{sources:?}");
    assert!(sources.iter().all(|s| s["text"].is_string() && s["score"].is_number()));
    assert!(!of(&events, "token").is_empty());
    assert_eq!(of(&events, "usage")[0]["steps"], 1);

    // Not streamed: one JSON with the route, all the sources and the answer.
    let (status, v) = server
        .post(
            "/v1/assistant/ask",
            json!({"messages": question(q), "mode": "rag", "max_tokens": 32, "temperature": 0}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["route"]["mode"], "rag");
    assert_eq!(v["sources"].as_array().unwrap().len(), sources.len());
    assert!(!v["answer"].as_str().unwrap().trim().is_empty(), "{v}");

    // Chat: tokens and usage, no sources.
    let events = sse(
        &server,
        json!({"messages": question("Say hello."), "mode": "chat", "stream": true, "max_tokens": 16}),
    )
    .await;
    assert_eq!(events[0].1["mode"], "chat");
    assert!(of(&events, "retrieval").is_empty());
    let answer: String = of(&events, "token")
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert!(!answer.trim().is_empty());
    assert!(matches!(
        of(&events, "usage")[0]["finish_reason"].as_str(),
        Some("stop" | "length")
    ));

    // Auto: the router's rules send arithmetic to the agent and say why; the client leaves
    // after the route event (the agent's run is cancelled with the stream).
    let mut resp = reqwest::Client::new()
        .post(server.http_url("/v1/assistant/ask"))
        .json(&json!({"messages": question("What is 17 * 23?"), "stream": true}))
        .send()
        .await
        .unwrap();
    let mut head = String::new();
    while !head.contains("\n\n") {
        head.push_str(&String::from_utf8_lossy(&resp.chunk().await.unwrap().unwrap()));
    }
    drop(resp);
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("event: route"), "{head}");
    let route: Value = serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(route["mode"], "agent", "{route}");
    assert!(route["reason"].as_str().unwrap().starts_with("rule"), "{route}");
    assert_eq!(route["confidence"], 1.0);
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let server = Server::start().await;
    for (body, param) in [
        (json!({"messages": question("hi"), "mode": "wizard"}), "mode"),
        (json!({"messages": question("hi"), "mode": 3}), "mode"),
        (json!({"messages": [], "mode": "chat"}), "messages"),
        (
            json!({"messages": question("hi"), "mode": "chat", "tools": ["calculator"]}),
            "tools",
        ),
        (
            json!({"messages": question("hi"), "mode": "agent", "tools": ["shell"]}),
            "tools[0]",
        ),
        (
            json!({"messages": question("hi"), "mode": "agent", "tool_choice": "shell"}),
            "tool_choice",
        ),
        (
            json!({"messages": question("hi"), "mode": "agent", "max_steps": 1000}),
            "max_steps",
        ),
    ] {
        let (status, v) = server.post("/v1/assistant/ask", body.to_string()).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let mut client = AssistantClient::new(server.channel().await);
    let e = client
        .ask(pb::AskRequest {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            mode: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("mode"), "{}", e.message());
}
