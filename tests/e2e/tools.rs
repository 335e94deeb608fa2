//! OpenAI tool calling through the real binary with SmolLM2: `tool_choice` required / named /
//! auto / none, parallel calls and `parallel_tool_calls = false`, arguments that validate
//! against their schemas (the jsonschema crate), tool results accepted back, the streamed
//! `delta.tool_calls` shape, the official openai client's parsing and stream reassembly, and
//! gRPC Chat with tools. Greedy decoding throughout, so a streamed answer must equal the
//! non-streamed one.

use std::collections::HashSet;

use genai_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use serde_json::{json, Value};

use crate::harness::{require_openai_python, run_python, Server};

fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": false,
    })
}

fn calculator_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
        "additionalProperties": false,
    })
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
            "parameters": weather_schema(), "strict": true}},
        {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression.",
            "parameters": calculator_schema(), "strict": true}},
    ])
}

fn schema_of(name: &str) -> Value {
    match name {
        "get_weather" => weather_schema(),
        "calculator" => calculator_schema(),
        other => panic!("the model called an undeclared tool {other:?}"),
    }
}

fn request(question: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": question}],
        "tools": tools(),
        "max_tokens": 120,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Checks the calls of a non-streamed answer; returns (name, arguments) per call.
fn checked_calls(v: &Value) -> Vec<(String, String)> {
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let msg = &choice["message"];
    assert_eq!(msg["role"], "assistant");
    assert!(msg["content"].is_null(), "a call-only answer has content null: {v}");
    let calls = msg["tool_calls"].as_array().expect("tool_calls");
    assert!(!calls.is_empty(), "{v}");
    let mut ids = HashSet::new();
    calls
        .iter()
        .map(|c| {
            let id = c["id"].as_str().unwrap();
            assert!(id.starts_with("call_") && ids.insert(id.to_owned()), "{v}");
            assert_eq!(c["type"], "function");
            let name = c["function"]["name"].as_str().unwrap().to_owned();
            let args = c["function"]["arguments"]
                .as_str()
                .expect("arguments is a string")
                .to_owned();
            let parsed: Value = serde_json::from_str(&args).unwrap_or_else(|e| panic!("{args}: {e}"));
            let validator = jsonschema::validator_for(&schema_of(&name)).unwrap();
            assert!(validator.is_valid(&parsed), "{name}({args}) does not match its schema");
            (name, args)
        })
        .collect()
}

#[tokio::test]
async fn tool_choice_modes_results_back_and_errors_over_http() {
    let server = Server::start().await;
    let chat = |body: Value| {
        let server = &server;
        async move { server.post("/v1/chat/completions", body.to_string()).await }
    };

    // required: calls from the first token, arguments valid. Greedy SmolLM2 asks for both
    // cities in two calls, so this also checks that parallel calls are admitted.
    let two_cities = "What is the weather in Paris and in Tokyo?";
    let (status, v) = chat(request(two_cities, json!({"tool_choice": "required"}))).await;
    assert_eq!(status, 200, "{v}");
    let calls = checked_calls(&v);
    assert!(calls.len() >= 2, "parallel calls expected: {v}");
    // parallel_tool_calls = false: the same request, exactly one call.
    let (_, v) = chat(request(
        two_cities,
        json!({"tool_choice": "required", "parallel_tool_calls": false}),
    ))
    .await;
    assert_eq!(checked_calls(&v).len(), 1, "{v}");
    // A named function: that one, once.
    let (_, v) = chat(request(
        "What is the weather in Paris?",
        json!({"tool_choice": {"type": "function", "function": {"name": "calculator"}}}),
    ))
    .await;
    let calls = checked_calls(&v);
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0].0, "calculator");
    // auto: text or calls, never a malformed call in the text.
    for q in ["What is the weather in Paris and in Tokyo?", "Say hello to me."] {
        let (status, v) = chat(request(q, json!({"tool_choice": "auto"}))).await;
        assert_eq!(status, 200, "{v}");
        if v["choices"][0]["finish_reason"] == "tool_calls" {
            checked_calls(&v);
        } else {
            let content = v["choices"][0]["message"]["content"].as_str().unwrap();
            assert!(!content.contains("<tool_call>"), "{v}");
            assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
        }
    }
    // none: plain text.
    let (_, v) = chat(request("Say hello to me.", json!({"tool_choice": "none"}))).await;
    assert_ne!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim()
            .is_empty(),
        "{v}"
    );

    // A conversation with an assistant call (content null) and the tool's result is accepted.
    let history = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees and sunny"},
    ]);
    for choice in ["none", "auto"] {
        let mut body = request("", json!({"tool_choice": choice}));
        body["messages"] = history.clone();
        let (status, v) = chat(body).await;
        assert_eq!(status, 200, "{choice}: {v}");
        let msg = &v["choices"][0]["message"];
        assert!(msg["content"].is_string() || msg["tool_calls"].is_array(), "{v}");
    }

    // Bad declarations and histories: 400 naming the field.
    let dup = json!([
        {"type": "function", "function": {"name": "f"}},
        {"type": "function", "function": {"name": "f"}},
    ]);
    let cases = [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice.function.name",
        ),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tools": dup}), "tools[1].function.name"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 7}}}}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}),
            "tools[0].type",
        ),
        (json!({"tools": [], "tool_choice": "required"}), "tool_choice"),
        (json!({"mode": "rag"}), "tools"),
        (json!({"response_format": {"type": "json_object"}}), "tools"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_zz", "content": "x"}]}),
            "messages[1].tool_call_id",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
    ];
    for (extra, param) in cases {
        let (status, v) = chat(request("hi", extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    // Tools stay refused where they mean nothing (legacy completions).
    let (status, v) = server
        .post("/v1/completions", json!({"prompt": "hi", "tools": tools()}).to_string())
        .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("tools")), "{v}");
}

/// The `data:` payloads of an SSE body, up to `[DONE]` (which must end it).
fn sse_chunks(body: &str) -> Vec<Value> {
    let datas: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{body}");
    datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn streamed_tool_calls_have_openai_shape_and_equal_the_plain_answer() {
    let server = Server::start().await;
    let body = request("What is the weather in Paris?", json!({"tool_choice": "required"}));
    let (_, plain) = server.post("/v1/chat/completions", body.to_string()).await;
    let expected = checked_calls(&plain);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = reqwest::Client::new()
        .post(server.http_url("/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let chunks = sse_chunks(&text);
    let mut calls: Vec<(String, String, String)> = Vec::new(); // (id, name, arguments)
    let mut finish = None;
    let mut usage = None;
    let mut fragments_per_call = Vec::new();
    for (n, c) in chunks.iter().enumerate() {
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            assert!(c["choices"].as_array().unwrap().is_empty(), "{c}");
            usage = Some(u.clone());
            continue;
        }
        let choice = &c["choices"][0];
        let delta = &choice["delta"];
        if n == 0 {
            assert_eq!(delta["role"], "assistant", "{c}");
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
        for tc in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = tc["index"].as_u64().expect("index on every fragment") as usize;
            if index == calls.len() {
                // First fragment of an index: id, type, name, arguments "".
                assert_eq!(tc["type"], "function", "{tc}");
                assert_eq!(tc["function"]["arguments"], "", "{tc}");
                calls.push((
                    tc["id"].as_str().unwrap().to_owned(),
                    tc["function"]["name"].as_str().unwrap().to_owned(),
                    String::new(),
                ));
                fragments_per_call.push(0);
            } else {
                assert!(index < calls.len(), "fragment of an unopened index: {tc}");
                // Later fragments: only the index and an arguments piece.
                assert!(tc.get("id").is_none() && tc.get("type").is_none(), "{tc}");
                assert!(tc["function"].get("name").is_none(), "{tc}");
                calls[index].2.push_str(tc["function"]["arguments"].as_str().unwrap());
                fragments_per_call[index] += 1;
            }
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"), "{text}");
    let usage = usage.expect("usage chunk with include_usage");
    assert_eq!(usage["completion_tokens"], plain["usage"]["completion_tokens"]);
    let got: Vec<(String, String)> = calls.iter().map(|(_, n, a)| (n.clone(), a.clone())).collect();
    assert_eq!(got, expected, "streamed calls equal the plain answer's");
    // Arguments arrive as they are generated, not as one piece at the end.
    assert!(fragments_per_call.iter().all(|&n| n > 1), "{fragments_per_call:?}");
}

/// The official openai client: `message.tool_calls` parsed, and the streaming helper
/// (`chat.completions.stream` → `get_final_completion`) reassembles the same calls, including
/// `parsed_arguments` of the strict tool.
#[tokio::test]
async fn official_openai_client_parses_and_reassembles_tool_calls() {
    let Some(py) = require_openai_python() else {
        return;
    };
    let server = Server::start().await;
    let script = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
tools = json.loads(sys.argv[2])
kw = dict(model="smollm2-135m-instruct", max_tokens=120, temperature=0, tools=tools,
          messages=[{"role": "user", "content": "What is the weather in Paris?"}])
for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
    r = c.chat.completions.create(tool_choice=choice, **kw)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", r
    assert m.content is None and m.tool_calls, m
    plain = [(t.id.startswith("call_"), t.type, t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls]
    with c.chat.completions.stream(tool_choice=choice, **kw) as s:
        final = s.get_final_completion()
    fm = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls", final
    streamed = [(t.id.startswith("call_"), t.type, t.function.name, json.loads(t.function.arguments)) for t in fm.tool_calls]
    assert streamed == plain, (streamed, plain)
    for t in fm.tool_calls:
        if t.function.name == "get_weather":
            # strict tool: the helper parses the arguments itself
            assert t.function.parsed_arguments == json.loads(t.function.arguments), t
            assert set(t.function.parsed_arguments) == {"city", "unit"}, t
    # The calls and a result go back in the next turn.
    follow = kw["messages"] + [fm.model_dump(include={"role", "content", "tool_calls"}, exclude_none=True)] + [
        {"role": "tool", "tool_call_id": t.id, "content": "18 degrees"} for t in fm.tool_calls]
    again = c.chat.completions.create(model=kw["model"], max_tokens=20, temperature=0, tools=tools,
                                      tool_choice="none", messages=follow)
    assert again.choices[0].message.content, again
print("ok")
"#;
    run_python(&py, script, &[&server.http_url("/v1"), &tools().to_string()]).await;
}

#[tokio::test]
async fn grpc_chat_with_tools_streams_call_deltas() {
    let server = Server::start().await;
    let mut client = InferenceClient::new(server.channel().await);
    let tool = |name: &str, schema: &Value| pb::Tool {
        name: name.into(),
        description: format!("{name} tool"),
        parameters_json: schema.to_string(),
        strict: true,
    };
    let req = |messages: Vec<pb::ChatMessage>, mode: &str, name: &str| pb::ChatRequest {
        messages,
        tools: vec![
            tool("get_weather", &weather_schema()),
            tool("calculator", &calculator_schema()),
        ],
        tool_choice: Some(pb::ToolChoice {
            mode: mode.into(),
            name: name.into(),
        }),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(120),
            ..Default::default()
        }),
        ..Default::default()
    };
    let user = pb::ChatMessage {
        role: "user".into(),
        content: "What is the weather in Paris?".into(),
        ..Default::default()
    };
    let mut s = client
        .chat(req(vec![user.clone()], "function", "get_weather"))
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut calls, mut last) = (String::new(), Vec::<pb::ToolCall>::new(), None);
    while let Some(m) = s.message().await.unwrap() {
        text.push_str(&m.text);
        for d in &m.tool_calls {
            let i = d.index as usize;
            if i == calls.len() {
                assert!(
                    d.id.starts_with("call_") && !d.name.is_empty() && d.arguments.is_empty(),
                    "{d:?}"
                );
                calls.push(pb::ToolCall {
                    id: d.id.clone(),
                    name: d.name.clone(),
                    arguments: String::new(),
                });
            } else {
                assert!(d.id.is_empty() && d.name.is_empty(), "{d:?}");
                calls[i].arguments.push_str(&d.arguments);
            }
        }
        last = Some(m);
    }
    assert_eq!(last.unwrap().finish_reason, "tool_calls");
    assert!(text.is_empty(), "{text:?}");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].name, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
    assert!(
        jsonschema::validator_for(&weather_schema()).unwrap().is_valid(&args),
        "{args}"
    );

    // The call and its result go back; a bad choice names its field.
    let history = vec![
        user,
        pb::ChatMessage {
            role: "assistant".into(),
            tool_calls: calls.clone(),
            ..Default::default()
        },
        pb::ChatMessage {
            role: "tool".into(),
            content: "18 degrees".into(),
            tool_call_id: calls[0].id.clone(),
            ..Default::default()
        },
    ];
    let mut s = client.chat(req(history, "none", "")).await.unwrap().into_inner();
    let mut answer = String::new();
    while let Some(m) = s.message().await.unwrap() {
        assert!(m.tool_calls.is_empty());
        answer.push_str(&m.text);
    }
    assert!(!answer.trim().is_empty());
    let e = client
        .chat(req(vec![pb::ChatMessage::default()], "function", "nope"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("tool_choice.name"), "{e:?}");
}
