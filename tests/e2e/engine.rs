//! The engine through the binary with SmolLM2: batching invariance and
//! preemption under a tight KV budget.

use std::collections::HashMap;

use genai_proto::v1 as pb;
use pb::inference_client::InferenceClient;

use crate::harness::Server;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three primary colors:",
    "def fibonacci(n):",
    "The quick brown fox",
    "Explain photosynthesis in one sentence.",
    "Once upon a time, in a small village,",
    "The three laws of robotics are",
];

async fn greedy_ids(client: &mut InferenceClient<tonic::transport::Channel>, prompt: &str, n: i32) -> Vec<u32> {
    let req = pb::GenerateRequest {
        prompt: prompt.into(),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(n),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut s = client.generate(req).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        ids.extend(m.token_ids);
    }
    ids
}

/// Each prompt alone, then all of them (twice over) concurrently.
async fn alone_vs_batched(server: &Server, tokens: i32) -> (HashMap<usize, Vec<u32>>, Vec<(usize, Vec<u32>)>) {
    let channel = server.channel().await;
    let mut client = InferenceClient::new(channel.clone());
    let mut alone = HashMap::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        alone.insert(i, greedy_ids(&mut client, p, tokens).await);
    }
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut c = InferenceClient::new(channel.clone());
        let p = PROMPTS[i % PROMPTS.len()];
        tasks.push(tokio::spawn(async move {
            (i % PROMPTS.len(), greedy_ids(&mut c, p, tokens).await)
        }));
    }
    let mut batched = Vec::new();
    for t in tasks {
        batched.push(t.await.unwrap());
    }
    (alone, batched)
}

#[tokio::test]
async fn greedy_output_is_identical_alone_and_among_sixteen() {
    let server = Server::start().await;
    let (alone, batched) = alone_vs_batched(&server, 24).await;
    for (i, ids) in batched {
        assert_eq!(ids.len(), 24);
        assert_eq!(ids, alone[&i], "prompt {i} changed under batching");
    }
}

#[tokio::test]
async fn preemption_under_a_tight_kv_budget_keeps_outputs() {
    // 10 MiB of KV cache = 14 blocks of 16 tokens for SmolLM2 (45 KiB per token): 16 sequences of ~60
    // tokens (4 blocks each) cannot all fit.
    let server = Server::builder()
        .env("GENAI_ENGINE__KV_CACHE_MIB", "10")
        .env("GENAI_ENGINE__MAX_BATCH_TOKENS", "64")
        // As vLLM, the step's token budget must cover one decode per running sequence.
        .env("GENAI_ENGINE__MAX_RUNNING", "64")
        .start()
        .await;
    let (alone, batched) = alone_vs_batched(&server, 48).await;
    for (i, ids) in batched {
        assert_eq!(ids.len(), 48);
        assert_eq!(ids, alone[&i], "prompt {i} changed after preemption");
    }
    assert!(
        server.metric("genai_preemptions_total").await > 0.0,
        "the budget should force preemption"
    );
    // The gauge is published right after the step that freed the blocks, a moment after the last event.
    assert_eq!(server.wait_kv_blocks_freed().await, 0.0);
}

#[tokio::test]
async fn shared_system_prompt_is_prefilled_once() {
    let server = Server::start().await;
    let mut client = InferenceClient::new(server.channel().await);
    let system = "You are a meticulous assistant for a railway company. ".repeat(12);
    let mut cached = Vec::new();
    for q in [
        "When does the first train leave?",
        "Is there a dining car?",
        "Can I bring a bicycle?",
    ] {
        let req = pb::ChatRequest {
            messages: vec![
                pb::ChatMessage {
                    role: "system".into(),
                    content: system.clone(),
                    ..Default::default()
                },
                pb::ChatMessage {
                    role: "user".into(),
                    content: q.into(),
                    ..Default::default()
                },
            ],
            sampling: Some(pb::SamplingParams {
                max_tokens: Some(4),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut s = client.chat(req).await.unwrap().into_inner();
        let mut usage = None;
        while let Some(m) = s.message().await.unwrap() {
            usage = m.usage.or(usage);
        }
        let u = usage.unwrap();
        cached.push((u.cached_prompt_tokens, u.prompt_tokens));
    }
    assert_eq!(cached[0].0, 0, "first request computes everything");
    for (c, p) in &cached[1..] {
        // Every full block of the shared prefix (> 100 tokens) comes from the cache.
        assert!(*c >= 96 && c < p, "cached {c} of {p}");
    }
    assert!(server.metric("genai_prefix_cache_hits_total").await >= 192.0);
}
