//! Structured output through the real binary and SmolLM2: `response_format` and the vLLM
//! `guided_*` fields on both OpenAI endpoints (streamed and not), gRPC `structured_output` on
//! Generate and Chat, mixed constrained and free requests batched together, field-naming
//! errors, and the official openai client's `chat.completions.parse`. Every JSON output is
//! checked against its schema with the `jsonschema` crate.

use genai_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use serde_json::{json, Value};

use crate::harness::{require_openai_python, run_python, Server};

/// Nested objects, an enum, bounds and required fields; strings bounded so greedy decoding of a
/// tiny model still ends well within max_tokens.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["engineer", "artist", "doctor"]},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}
        },
        "required": ["name", "age", "role", "address", "skills"],
        "additionalProperties": false
    })
}

fn assert_valid(schema: &Value, text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let validator = jsonschema::validator_for(schema).unwrap();
    if let Err(e) = validator.validate(&v) {
        panic!("{text} violates the schema: {e}");
    }
}

/// POSTs `body` to `path` (non-streamed): (status, reply).
async fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    server.post(path, body.to_string()).await
}

/// The text and finish reason of a non-streamed reply of either endpoint.
fn answer(v: &Value) -> (String, String) {
    let c = &v["choices"][0];
    let text = c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap_or_else(|| panic!("{v}"));
    (text.to_owned(), c["finish_reason"].as_str().unwrap().to_owned())
}

/// POSTs with `stream: true` and reassembles the SSE chunks: (text, finish reason).
async fn post_streamed(server: &Server, path: &str, body: &Value) -> (String, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(server.http_url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sse = resp.text().await.unwrap();
    let mut text = String::new();
    let mut finish = String::new();
    for data in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let Some(c) = chunk["choices"].get(0) else { continue };
        if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
            text.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    (text, finish)
}

fn chat(content: &str) -> Value {
    json!({"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 200})
}

fn completion(prompt: &str) -> Value {
    json!({"prompt": prompt, "temperature": 0, "max_tokens": 200})
}

#[tokio::test]
async fn json_schema_output_validates_on_both_endpoints_streamed_and_not() {
    let server = Server::start().await;
    let schema = person_schema();
    let mut c = chat("Describe a fictional person as JSON.");
    c["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}});
    let mut p = completion("A person record in JSON:");
    p["guided_json"] = schema.clone();
    for (path, body) in [("/v1/chat/completions", &c), ("/v1/completions", &p)] {
        let (status, v) = post(&server, path, body).await;
        assert_eq!(status, 200, "{v}");
        let (text, finish) = answer(&v);
        assert_valid(&schema, &text);
        // The grammar ended the output, not max_tokens.
        assert_eq!(finish, "stop", "{path}: {text}");
        let (streamed, finish) = post_streamed(&server, path, body).await;
        assert_eq!((streamed.as_str(), finish.as_str()), (text.as_str(), "stop"), "{path}");
    }
    // json_object, and guided_json given as JSON text (as vLLM accepts it).
    let mut c = chat("Give me a JSON object describing the weather.");
    c["response_format"] = json!({"type": "json_object"});
    let (text, _) = answer(&post(&server, "/v1/chat/completions", &c).await.1);
    assert!(serde_json::from_str::<Value>(&text).unwrap().is_object(), "{text}");
    let mut p = completion("Weather:");
    p["guided_json"] = json!(json!({"type": "object", "properties": {"sunny": {"type": "boolean"}}, "required": ["sunny"], "additionalProperties": false}).to_string());
    let (text, _) = answer(&post(&server, "/v1/completions", &p).await.1);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["sunny"].is_boolean(), "{text}");
    // "text" is no constraint at all.
    let mut c = chat("Say hi.");
    c["response_format"] = json!({"type": "text"});
    c["max_tokens"] = json!(5);
    assert_eq!(post(&server, "/v1/chat/completions", &c).await.0, 200);
}

#[tokio::test]
async fn regex_choice_and_lark_match_on_both_endpoints() {
    let server = Server::start().await;
    // Not phone-number shaped: the output stage would redact a phone number (PII).
    let sku = regex::Regex::new(r"^SKU-[0-9]{4}-[A-Z]{2}$").unwrap();
    let choices = ["positive", "negative", "neutral"];
    let lark = r#"start: "<call>" name " " %json {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": false} "</call>"
name: "square" | "cube""#;
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let base = if path.contains("chat") {
            chat("Answer as asked.")
        } else {
            completion("Answer:")
        };
        let mut b = base.clone();
        b["guided_regex"] = json!("SKU-[0-9]{4}-[A-Z]{2}");
        let (text, finish) = answer(&post(&server, path, &b).await.1);
        assert!(sku.is_match(&text), "{path}: {text:?}");
        assert_eq!(finish, "stop", "a fixed-length regex ends itself");
        assert_eq!(post_streamed(&server, path, &b).await.0, text);

        let mut b = base.clone();
        b["guided_choice"] = json!(choices);
        let (text, finish) = answer(&post(&server, path, &b).await.1);
        assert!(choices.contains(&text.as_str()), "{path}: {text:?}");
        assert_eq!(finish, "stop");
        let (streamed, finish) = post_streamed(&server, path, &b).await;
        assert_eq!((streamed.as_str(), finish.as_str()), (text.as_str(), "stop"));

        let mut b = base.clone();
        b["guided_grammar"] = json!(lark);
        let (text, _) = answer(&post(&server, path, &b).await.1);
        let inner = text
            .strip_prefix("<call>")
            .and_then(|t| t.strip_suffix("</call>"))
            .unwrap_or_else(|| panic!("{text:?}"));
        let (name, args) = inner.split_once(' ').unwrap();
        assert!(name == "square" || name == "cube", "{text}");
        assert!(serde_json::from_str::<Value>(args).unwrap()["x"].is_i64(), "{text}");
    }
}

#[tokio::test]
async fn constrained_and_free_requests_batch_together() {
    let server = Server::start().await;
    let schema = person_schema();
    let code = regex::Regex::new(r"^[a-z]{4}-[0-9]{2}$").unwrap();
    // Sampled (not greedy) with seeds: the masks, not the argmax, keep each output valid.
    let mut bodies = Vec::new();
    for i in 0..12u64 {
        let subjects = ["a painter", "a baker", "a sailor", "a gardener"];
        let mut b = chat(&format!("Describe {} from town number {i}.", subjects[i as usize % 4]));
        b["temperature"] = json!(0.9);
        b["seed"] = json!(i);
        match i % 4 {
            0 => {
                b["response_format"] =
                    json!({"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": true}})
            }
            1 => b["guided_regex"] = json!("[a-z]{4}-[0-9]{2}"),
            2 => b["guided_choice"] = json!(["yes", "no"]),
            _ => b["max_tokens"] = json!(40),
        }
        bodies.push(b);
    }
    let replies = futures::future::join_all(bodies.iter().map(|b| post(&server, "/v1/chat/completions", b))).await;
    for (i, (status, v)) in replies.iter().enumerate() {
        assert_eq!(*status, 200, "{v}");
        let (text, finish) = answer(v);
        match i % 4 {
            0 => assert_valid(&schema, &text),
            1 => assert!(code.is_match(&text), "{text:?}"),
            2 => assert!(text == "yes" || text == "no", "{text:?}"),
            _ => assert!(!text.is_empty() && (finish == "stop" || finish == "length")),
        }
    }
}

#[tokio::test]
async fn unusable_structured_output_is_a_400_naming_the_field() {
    let server = Server::start().await;
    let cases = [
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"}),
            "guided_regex",
        ),
        (
            json!({"guided_choice": ["a"], "guided_grammar": "start: \"a\""}),
            "guided_grammar",
        ),
        (json!({"response_format": {"type": "xml"}}), "response_format.type"),
        (
            json!({"response_format": {"type": "json_schema"}}),
            "response_format.json_schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}, "strict": true}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": true}, "strict": true}}}),
            "response_format.json_schema.schema",
        ),
        (json!({"guided_json": "{not json"}), "guided_json"),
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_grammar": "start: undefined_rule"}), "guided_grammar"),
        (json!({"guided_regex": 42}), "guided_regex"),
    ];
    for (extra, param) in cases {
        let mut body = chat("hi");
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = post(&server, "/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    // Not strict: a keyword that cannot be enforced is ignored, the request is served.
    let mut body = chat("List two numbers.");
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 2, "uniqueItems": true}}});
    let (status, v) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(serde_json::from_str::<Value>(&answer(&v).0).unwrap().is_array());
}

fn structured(kind: pb::structured_output::Kind) -> Option<pb::StructuredOutput> {
    Some(pb::StructuredOutput { kind: Some(kind) })
}

async fn drain(mut s: tonic::Streaming<pb::GenerateResponse>) -> (String, String) {
    let (mut text, mut finish) = (String::new(), String::new());
    while let Some(m) = s.message().await.unwrap() {
        text.push_str(&m.text);
        if !m.finish_reason.is_empty() {
            finish = m.finish_reason;
        }
    }
    (text, finish)
}

#[tokio::test]
async fn grpc_generate_and_chat_carry_structured_output() {
    use pb::structured_output::Kind;
    let server = Server::start().await;
    let mut client = InferenceClient::new(server.channel().await);
    let sampling = Some(pb::SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(200),
        ..Default::default()
    });
    let schema = person_schema();
    let chat = pb::ChatRequest {
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: "Describe a fictional person.".into(),
            ..Default::default()
        }],
        sampling: sampling.clone(),
        structured_output: structured(Kind::JsonSchema(pb::JsonSchemaFormat {
            name: "person".into(),
            schema: schema.to_string(),
            strict: true,
        })),
        ..Default::default()
    };
    let (text, finish) = drain(client.chat(chat).await.unwrap().into_inner()).await;
    assert_valid(&schema, &text);
    assert_eq!(finish, "stop");

    let generate = |kind| pb::GenerateRequest {
        prompt: "The answer is".into(),
        sampling: sampling.clone(),
        structured_output: structured(kind),
        ..Default::default()
    };
    let (text, _) = drain(
        client
            .generate(generate(Kind::Regex("[A-Z][a-z]{2,8}".into())))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(
        regex::Regex::new("^[A-Z][a-z]{2,8}$").unwrap().is_match(&text),
        "{text:?}"
    );
    let choice = Kind::Choice(pb::Choices {
        choices: vec!["red".into(), "green".into()],
    });
    let (text, finish) = drain(client.generate(generate(choice)).await.unwrap().into_inner()).await;
    assert!(text == "red" || text == "green", "{text:?}");
    assert_eq!(finish, "stop");
    let (text, _) = drain(
        client
            .generate(generate(Kind::JsonObject(true)))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(serde_json::from_str::<Value>(&text).unwrap().is_object(), "{text}");

    // Bad input: INVALID_ARGUMENT naming the field.
    let bad = [
        (
            Kind::JsonSchema(pb::JsonSchemaFormat {
                schema: "{oops".into(),
                ..Default::default()
            }),
            "structured_output.json_schema.schema",
        ),
        (Kind::Regex("[".into()), "structured_output.regex"),
        (Kind::Grammar("start: nope".into()), "structured_output.grammar"),
        (Kind::Choice(pb::Choices::default()), "structured_output.choice"),
    ];
    for (kind, field) in bad {
        let status = client.generate(generate(kind)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {}", status.message());
    }
}

#[tokio::test]
async fn official_openai_client_parse_and_streamed_json_schema() {
    let Some(py) = require_openai_python() else {
        return;
    };
    let server = Server::start().await;
    let script = r#"
import json, sys, typing, openai, pydantic

class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=20)
    country: typing.Literal["France", "Spain", "Italy"]

class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)
    address: Address
    hobbies: list[str] = pydantic.Field(max_length=3)

c = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
messages = [{"role": "user", "content": "Invent a person who lives in Europe."}]
# parse(): the client sends a strict json_schema built from the model and validates the answer.
r = c.chat.completions.parse(model="smollm2-135m-instruct", messages=messages, response_format=Person,
    temperature=0, max_tokens=200)
p = r.choices[0].message.parsed
assert isinstance(p, Person), r
assert r.choices[0].finish_reason == "stop", r
# The same schema, streamed: the reassembled deltas validate too.
schema = openai.lib._pydantic.to_strict_json_schema(Person)
s = c.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0.8, seed=3,
    max_tokens=200, stream=True,
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
text = "".join((ch.choices[0].delta.content or "") for ch in s if ch.choices)
Person.model_validate_json(text)
# Legacy completions with vLLM's extra field.
t = c.completions.create(model="smollm2-135m-instruct", prompt="Pick one:", max_tokens=10,
    extra_body={"guided_choice": ["alpha", "beta"]})
assert t.choices[0].text in ("alpha", "beta"), t
print("ok:", p, text)
"#;
    run_python(&py, script, &[&server.http_url("/v1")]).await;
}
