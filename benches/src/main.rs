//! `genai-load`: a gRPC load generator for `genai.v1.Inference/Generate`
//! (streaming), the Rust stand-in for ghz that also measures what ghz cannot:
//! time to first token and inter-token latency at engine-token granularity.
//!
//! N concurrent workers pull from a fixed number of requests (or run until a
//! duration passes), each streaming one Generate call; the report gives
//! requests/s, output tokens/s, TTFT / inter-token / end-to-end percentiles and
//! error counts, as text and optionally JSON. With `--metrics-url` it also
//! samples the server's KV-cache gauges during the run and reports the paging
//! waste (slots of held blocks that hold no token) at the peak of KV use.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use genai_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use serde_json::json;
use tonic::transport::Endpoint;

#[derive(Parser, Debug)]
#[command(name = "genai-load", about = "gRPC streaming load generator for genai.v1.Inference")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Concurrent streams.
    #[arg(short, long, default_value_t = 16)]
    concurrency: usize,
    /// Total requests (ignored when --duration is given).
    #[arg(short = 'n', long, default_value_t = 64)]
    requests: usize,
    /// Run for this many seconds instead of a fixed request count.
    #[arg(long)]
    duration: Option<f64>,
    /// New tokens per request.
    #[arg(long, default_value_t = 128)]
    max_tokens: i32,
    /// Keep generating past EOS so every request yields max_tokens.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ignore_eos: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// File with one prompt per line (default: a built-in set of ~64-token prompts).
    #[arg(long)]
    prompts: Option<std::path::PathBuf>,
    /// Use the Chat RPC (chat template) instead of Generate.
    #[arg(long)]
    chat: bool,
    /// The server's Prometheus endpoint (e.g. http://127.0.0.1:8080/metrics): sample KV-cache use.
    #[arg(long)]
    metrics_url: Option<String>,
    /// Write the report as JSON here too.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
}

const PROMPTS: &[&str] = &[
    "Write a short story about a lighthouse keeper who finds a message in a bottle on a cold winter morning. Describe the weather, the sound of the waves and what the message says.",
    "Explain to a twelve year old student how a bicycle stays upright while moving. Mention the role of the wheels, the rider's balance and steering, and keep it simple and friendly.",
    "Describe the water cycle in a few clear steps: evaporation, condensation, precipitation and collection. Give one everyday example for each step so a beginner can follow along.",
    "List five practical tips for someone learning to cook at home for the first time, covering planning meals, buying ingredients, kitchen safety, and cleaning up afterwards.",
    "Summarise the main causes and effects of the industrial revolution in Britain, touching on steam power, factories, cities, working conditions and changes in daily life.",
    "Write a polite email to a neighbour asking them to keep the noise down in the evenings, mentioning that you start work early and suggesting a friendly conversation about it.",
    "Compare cats and dogs as pets for a family living in a small apartment in a big city. Consider space, exercise, cost, time commitment and allergies in your answer.",
    "Give a step by step explanation of how to plant a small vegetable garden on a balcony, including choosing containers, soil, seeds, watering schedules and sunlight needs.",
];

/// KV-cache gauges at the sample with the most blocks in use.
#[derive(Default, Debug, Clone, Copy)]
struct KvPeak {
    samples: usize,
    blocks_used: f64,
    blocks_total: f64,
    live_tokens: f64,
    waste_ratio: f64,
}

/// Polls `url` every 100 ms until `stop`, keeping the sample with the most KV blocks in use.
async fn sample_kv(url: String, stop: Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<KvPeak> {
    let client = reqwest::Client::new();
    let mut peak = KvPeak::default();
    while !stop.load(Ordering::Relaxed) {
        let text = client.get(&url).send().await?.error_for_status()?.text().await?;
        let gauge = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let used = gauge("genai_kv_cache_blocks_used");
        peak.samples += 1;
        if used >= peak.blocks_used {
            peak = KvPeak {
                samples: peak.samples,
                blocks_used: used,
                blocks_total: used + gauge("genai_kv_cache_blocks_free"),
                live_tokens: gauge("genai_kv_cache_live_tokens"),
                waste_ratio: gauge("genai_kv_cache_waste_ratio"),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(peak)
}

#[derive(Default)]
struct Sample {
    ttft: Option<Duration>,
    itl: Vec<Duration>,
    e2e: Duration,
    tokens: usize,
    error: Option<String>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[idx.min(v.len() - 1)]
}

async fn one(mut client: InferenceClient<tonic::transport::Channel>, args: &Args, prompt: String) -> Sample {
    let sampling = Some(pb::SamplingParams {
        max_tokens: Some(args.max_tokens),
        ignore_eos: args.ignore_eos,
        temperature: Some(args.temperature),
        ..Default::default()
    });
    let start = Instant::now();
    let res = if args.chat {
        let messages = vec![pb::ChatMessage {
            role: "user".into(),
            content: prompt,
            ..Default::default()
        }];
        client
            .chat(pb::ChatRequest {
                messages,
                sampling,
                ..Default::default()
            })
            .await
    } else {
        client
            .generate(pb::GenerateRequest {
                prompt,
                sampling,
                ..Default::default()
            })
            .await
    };
    let mut s = Sample::default();
    let mut stream = match res {
        Ok(r) => r.into_inner(),
        Err(e) => {
            s.error = Some(format!("{:?}", e.code()));
            return s;
        }
    };
    let mut last = start;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                let now = Instant::now();
                if !m.token_ids.is_empty() {
                    if s.ttft.is_none() {
                        s.ttft = Some(now - start);
                    } else {
                        // Several tokens in one message share the gap between messages.
                        let gap = (now - last) / m.token_ids.len() as u32;
                        s.itl.extend(std::iter::repeat_n(gap, m.token_ids.len()));
                    }
                    s.tokens += m.token_ids.len();
                    last = now;
                }
            }
            Ok(None) => break,
            Err(e) => {
                s.error = Some(format!("{:?}", e.code()));
                break;
            }
        }
    }
    s.e2e = start.elapsed();
    s
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let prompts: Vec<String> = match &args.prompts {
        Some(p) => std::fs::read_to_string(p)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        None => PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    anyhow::ensure!(!prompts.is_empty(), "no prompts");
    let channel = Endpoint::from_shared(args.addr.clone())?.connect().await?;
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = args.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = args
        .metrics_url
        .clone()
        .map(|url| tokio::spawn(sample_kv(url, stop_sampling.clone())));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (args, next, prompts) = (args.clone(), next.clone(), prompts.clone());
        let client = InferenceClient::new(channel.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let more = match deadline {
                    Some(d) => Instant::now() < d,
                    None => i < args.requests,
                };
                if !more {
                    return out;
                }
                // A per-request tag keeps prompts distinct (no accidental prefix-cache hits across requests).
                let prompt = format!("[{i}] {}", prompts[i % prompts.len()]);
                out.push(one(client.clone(), &args, prompt).await);
            }
        }));
    }
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await?);
    }
    let wall = started.elapsed().as_secs_f64();
    stop_sampling.store(true, Ordering::Relaxed);
    let kv = match sampler {
        Some(h) => Some(h.await??),
        None => None,
    };
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for s in samples.iter().filter_map(|s| s.error.clone()) {
        *errors.entry(s).or_default() += 1;
    }
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let mut ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft.as_ref().map(ms)).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|s| s.itl.iter().map(ms)).collect();
    let mut e2e: Vec<f64> = ok.iter().map(|s| ms(&s.e2e)).collect();
    let mut report = json!({
        "concurrency": args.concurrency,
        "requests": samples.len(),
        "ok": ok.len(),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": ok.len() as f64 / wall,
        "output_tokens_per_s": tokens as f64 / wall,
        "ttft_ms_p50": pct(&mut ttft, 50.0), "ttft_ms_p90": pct(&mut ttft, 90.0), "ttft_ms_p99": pct(&mut ttft, 99.0),
        "itl_ms_p50": pct(&mut itl, 50.0), "itl_ms_p90": pct(&mut itl, 90.0), "itl_ms_p99": pct(&mut itl, 99.0),
        "e2e_ms_p50": pct(&mut e2e, 50.0), "e2e_ms_p90": pct(&mut e2e, 90.0), "e2e_ms_p99": pct(&mut e2e, 99.0),
    });
    println!(
        "c={} requests={} ok={} errors={:?} wall={:.1}s  {:.2} req/s  {:.1} tok/s",
        args.concurrency,
        samples.len(),
        ok.len(),
        errors,
        wall,
        report["requests_per_s"].as_f64().unwrap_or(0.0),
        report["output_tokens_per_s"].as_f64().unwrap_or(0.0)
    );
    for k in ["ttft", "itl", "e2e"] {
        println!(
            "  {k:<5} ms  p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}",
            report[format!("{k}_ms_p50")].as_f64().unwrap_or(f64::NAN),
            report[format!("{k}_ms_p90")].as_f64().unwrap_or(f64::NAN),
            report[format!("{k}_ms_p99")].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(kv) = kv {
        println!(
            "  kv peak: {} of {} blocks held, {} live tokens, waste {:.1}% ({} samples)",
            kv.blocks_used,
            kv.blocks_total,
            kv.live_tokens,
            kv.waste_ratio * 100.0,
            kv.samples
        );
        report["kv_peak"] = json!({
            "blocks_used": kv.blocks_used, "blocks_total": kv.blocks_total,
            "live_tokens": kv.live_tokens, "waste_ratio": kv.waste_ratio, "samples": kv.samples,
        });
    }
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
