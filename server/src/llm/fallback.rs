//! The fallback chain: a named backend and its `fallback` list (`[[llm.backends]]`), tried in
//! order until one produces its first event.
//!
//! A [`Chain`] is itself an [`LlmBackend`], so the pipeline reserves, meters and scans one
//! stream whoever answers: the tenant is charged once (the largest of the members' prompt
//! estimates is reserved, the answering member's usage is booked), never per attempt. Each
//! member prepares the prompt its own way (the local engine tokenizes, a remote one estimates);
//! a fallback member that refuses it (a prompt too long for its context) sits this request out.
//!
//! A member is skipped at once when it is not serving — a remote one whose circuit is open, the
//! local engine when stopped. Otherwise it is submitted and its first event awaited (a remote
//! member retries inside, see [`super::remote`]): text or `Finished` commits the chain to that
//! member and everything after streams from it alone; an error before it that another backend
//! may not share (unavailable, overloaded, internal) moves to the next member; the request's own
//! fault (a 400) ends the chain. Once committed a failure is the client's error event: no
//! retry, no fallback, no spliced answers. Dropping the stream drops the member's stream and
//! cancels its work.
//!
//! Tested: `tests` below, against real HTTP servers ([`super::fault_server`], paused clock):
//! order, skipping open circuits, no fallback after the first text, and 1 000 randomized fault
//! runs; through the binary (remote → local) in `tests/e2e/resilience.rs`.

use std::sync::Arc;

use futures::StreamExt;
use genai_engine::{EngineEvent, SamplingParams};
use genai_grammar::GrammarRequest;
use genai_models::chat_template::ChatMessage;

use super::{Embeddings, EventStream, Generation, Health, LlmBackend, Prepared, PreparedInput, Tokenized};
use crate::error::ApiError;
use crate::ops::metrics::BACKEND_FALLBACKS;
use crate::pipeline::context::{Priority, RequestContext};

pub(crate) struct Chain {
    name: String,
    /// The named backend first, then its fallbacks.
    members: Vec<Arc<dyn LlmBackend>>,
}

/// An error before the first event that the next member may not share.
fn falls_back(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::Unavailable(_) | ApiError::Overloaded { .. } | ApiError::Internal(_)
    )
}

impl Chain {
    pub(crate) fn new(name: String, members: Vec<Arc<dyn LlmBackend>>) -> Self {
        Self { name, members }
    }

    async fn prepare_each<F, Fut>(&self, prepare: F) -> Result<Prepared, ApiError>
    where
        F: Fn(Arc<dyn LlmBackend>) -> Fut,
        Fut: std::future::Future<Output = Result<Prepared, ApiError>>,
    {
        let mut each = Vec::with_capacity(self.members.len());
        for (i, m) in self.members.iter().enumerate() {
            match prepare(m.clone()).await {
                Ok(p) => each.push(Some(p)),
                // The named backend's verdict is the request's.
                Err(e) if i == 0 => return Err(e),
                Err(e) => {
                    tracing::debug!(
                        backend = m.model(),
                        "fallback member refused the prompt: {}",
                        e.message()
                    );
                    each.push(None);
                }
            }
        }
        let first = each[0].as_ref().expect("the first member prepared");
        let prompt = first.prompt.clone();
        let prompt_tokens = each.iter().flatten().map(|p| p.prompt_tokens).max().unwrap_or(0);
        Ok(Prepared {
            prompt,
            prompt_tokens,
            constraint: None,
            input: PreparedInput::Chain(each),
        })
    }
}

/// Tries the members in order; see the module doc.
fn chain_events(
    name: String,
    members: Vec<Arc<dyn LlmBackend>>,
    prepared: Vec<Option<Prepared>>,
    ctx: RequestContext,
    params: SamplingParams,
) -> EventStream {
    let start = async move {
        let mut last = None;
        let mut tried = 0;
        for (member, prepared) in members.iter().zip(prepared) {
            let Some(prepared) = prepared else { continue };
            if let Health::NotServing(why) = member.health() {
                tracing::debug!(backend = member.model(), "skipped: {why}");
                last = Some(ApiError::Unavailable(why));
                continue;
            }
            if tried > 0 || last.is_some() {
                metrics::counter!(BACKEND_FALLBACKS, "backend" => name.clone(), "to" => member.model().to_owned())
                    .increment(1);
                tracing::info!(backend = %name, to = member.model(), "falling back");
            }
            tried += 1;
            let mut events = match member.submit(&ctx, prepared, params.clone()) {
                Ok(g) => g.events,
                Err(e) if falls_back(&e) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return futures::stream::once(async { Err(e) }).boxed(),
            };
            let err = match events.next().await {
                Some(Ok(EngineEvent::Failed { message })) => ApiError::Internal(message),
                Some(Ok(ev)) => return futures::stream::once(async { Ok(ev) }).chain(events).boxed(),
                Some(Err(e)) => e,
                None => ApiError::Internal(format!("backend `{}` ended without an event", member.model())),
            };
            if !falls_back(&err) {
                return futures::stream::once(async { Err(err) }).boxed();
            }
            tracing::info!(
                backend = member.model(),
                "failed before its first token: {}",
                err.message()
            );
            last = Some(err);
        }
        let err = last.unwrap_or_else(|| ApiError::Unavailable(format!("no backend of `{name}` could serve")));
        futures::stream::once(async { Err(err) }).boxed()
    };
    Box::pin(futures::stream::once(start).flatten())
}

#[async_trait::async_trait]
impl LlmBackend for Chain {
    fn model(&self) -> &str {
        &self.name
    }

    fn embedding_model(&self) -> Option<&str> {
        None
    }

    fn context_length(&self) -> usize {
        self.members[0].context_length()
    }

    /// Serving while any member is.
    fn health(&self) -> Health {
        let mut why = None;
        for m in &self.members {
            match m.health() {
                Health::Serving => return Health::Serving,
                Health::NotServing(w) => {
                    why.get_or_insert(w);
                }
            }
        }
        Health::NotServing(why.unwrap_or_default())
    }

    async fn prepare_chat(&self, messages: Vec<ChatMessage>) -> Result<Prepared, ApiError> {
        self.prepare_each(|m| {
            let messages = messages.clone();
            async move { m.prepare_chat(messages).await }
        })
        .await
    }

    async fn prepare_text(&self, prompt: String) -> Result<Prepared, ApiError> {
        self.prepare_each(|m| {
            let prompt = prompt.clone();
            async move { m.prepare_text(prompt).await }
        })
        .await
    }

    /// Each member compiles for itself; as with the prompt, the named backend's refusal is the
    /// request's, a later member that refuses is skipped.
    async fn prepare_grammar(&self, prepared: &mut Prepared, grammar: GrammarRequest) -> Result<(), ApiError> {
        let PreparedInput::Chain(each) = &mut prepared.input else {
            return Err(ApiError::Internal(format!(
                "chain `{}` was handed another backend's prompt",
                self.name
            )));
        };
        for (i, (m, slot)) in self.members.iter().zip(each.iter_mut()).enumerate() {
            let Some(p) = slot.as_mut() else { continue };
            if let Err(e) = m.prepare_grammar(p, grammar.clone()).await {
                if i == 0 {
                    return Err(e);
                }
                tracing::debug!(
                    backend = m.model(),
                    "fallback member refused the grammar: {}",
                    e.message()
                );
                *slot = None;
            }
        }
        Ok(())
    }

    fn submit(&self, ctx: &RequestContext, prepared: Prepared, params: SamplingParams) -> Result<Generation, ApiError> {
        let PreparedInput::Chain(each) = prepared.input else {
            return Err(ApiError::Internal(format!(
                "chain `{}` was handed another backend's prompt",
                self.name
            )));
        };
        Ok(Generation {
            prompt: prepared.prompt,
            events: chain_events(self.name.clone(), self.members.clone(), each, ctx.clone(), params),
        })
    }

    async fn embed(&self, texts: Vec<String>, priority: Priority) -> Result<Embeddings, ApiError> {
        self.members[0].embed(texts, priority).await
    }

    async fn tokenize(&self, text: String, add_special_tokens: bool) -> Result<Tokenized, ApiError> {
        self.members[0].tokenize(text, add_special_tokens).await
    }

    async fn detokenize(&self, ids: Vec<u32>, skip_special_tokens: bool) -> Result<String, ApiError> {
        self.members[0].detokenize(ids, skip_special_tokens).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    use super::*;
    use crate::llm::backends::BackendConfig;
    use crate::llm::fault_server::{collect, event, FaultServer, Reply, Step, SSE_HEAD};
    use crate::llm::remote::RemoteBackend;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn remote(name: &str, url: &str, max_retries: usize, failure_threshold: usize) -> Arc<dyn LlmBackend> {
        let cfg = BackendConfig {
            name: name.into(),
            base_url: url.into(),
            model: "m".into(),
            first_token_timeout: S,
            idle_timeout: S,
            max_retries,
            initial_backoff: 10 * MS,
            max_backoff: 50 * MS,
            retry_after_cap: 100 * MS,
            retry_budget_ratio: 1.0,
            retry_budget_burst: 1_000_000,
            failure_threshold,
            failure_window: 60 * S,
            open_for: 60 * S,
            ..Default::default()
        };
        Arc::new(RemoteBackend::new(&cfg, None).unwrap())
    }

    async fn ask(chain: &Chain) -> (String, Result<genai_engine::Usage, ApiError>) {
        let messages = vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        let p = chain.prepare_chat(messages).await.unwrap();
        let g = chain
            .submit(&RequestContext::for_tests(), p, SamplingParams::default())
            .unwrap();
        collect(g.events).await
    }

    #[tokio::test(start_paused = true)]
    async fn falls_back_in_order_and_skips_open_circuits_at_once() {
        let a = FaultServer::start(vec![], Reply::status(500, None)).await;
        let c = FaultServer::start(vec![], Reply::status(503, None)).await;
        let b = FaultServer::start(vec![], Reply::chat(&["from b"])).await;
        let (ra, rc, rb) = (
            remote("a", &a.url, 1, 2),
            remote("c", &c.url, 0, 1000),
            remote("b", &b.url, 0, 1000),
        );
        let chain = Chain::new("a".into(), vec![ra.clone(), rb.clone()]);
        let (text, r) = ask(&chain).await;
        assert_eq!((text.as_str(), r.is_ok()), ("from b", true));
        assert_eq!((a.hit_count(), b.hit_count()), (2, 1), "a: 1 attempt + 1 retry, then b");
        // Two failures opened a's circuit: skipped without a call.
        assert!(matches!(ra.health(), Health::NotServing(_)));
        let (text, _) = ask(&chain).await;
        assert_eq!((text.as_str(), a.hit_count(), b.hit_count()), ("from b", 2, 2));
        // In order: c (fails) before b.
        let chain = Chain::new("a".into(), vec![ra, rc, rb]);
        let (text, _) = ask(&chain).await;
        assert_eq!(
            (text.as_str(), a.hit_count(), c.hit_count(), b.hit_count()),
            ("from b", 2, 1, 3)
        );
        assert!(b.hits().iter().all(|h| h.body["messages"][0]["content"] == "hi"));
    }

    #[tokio::test(start_paused = true)]
    async fn no_fallback_once_text_was_sent_nor_for_the_requests_own_fault() {
        let a = FaultServer::start(
            vec![Reply::chat_prefix(&["a1 "])
                .then_step(Step::Sleep(10 * MS))
                .then_step(Step::Reset)],
            Reply::status(400, None),
        )
        .await;
        let b = FaultServer::start(vec![], Reply::chat(&["from b"])).await;
        let chain = Chain::new(
            "a".into(),
            vec![remote("a", &a.url, 2, 1000), remote("b", &b.url, 0, 1000)],
        );
        let (text, r) = ask(&chain).await;
        assert_eq!(text, "a1 ");
        assert!(r.unwrap_err().message().contains("mid-stream"));
        let (text, r) = ask(&chain).await;
        assert_eq!(text, "");
        assert!(matches!(r, Err(ApiError::Invalid { .. })), "{r:?}");
        assert_eq!((a.hit_count(), b.hit_count()), (2, 0), "b never asked");
        // Every member failing: the last member's failure is reported.
        let chain = Chain::new("b".into(), vec![remote("x", &a.url, 0, 1000)]);
        a.script(vec![Reply::status(502, None)]);
        let e = ask(&chain).await.1.unwrap_err().message();
        assert!(e.contains("HTTP 502"), "{e}");
    }

    /// One scripted answer: a fault drawn from `rng`, streaming `pieces` where it streams.
    fn random_reply(rng: &mut StdRng, pieces: &[&str]) -> Reply {
        let k = rng.random_range(0..=pieces.len());
        let head = |k: usize| Reply::chat_prefix(&pieces[..k]).then_step(Step::Sleep(MS));
        match rng.random_range(0..10) {
            0 | 1 => Reply::chat(pieces),
            2 => Reply::status(429, [None, Some("0"), Some("1")][rng.random_range(0..3)]),
            3 => Reply::status([500, 502, 503][rng.random_range(0..3)], None),
            4 => Reply::chat(pieces).after(5 * S),
            5 => head(k).then_step(Step::Reset),
            6 => head(k),
            7 => head(k).then_step(Step::Write(
                b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": 7".to_vec(),
            )),
            8 => head(k).then_step(Step::Sleep(10 * S)),
            _ => match rng.random_range(0..4) {
                0 => Reply::status(400, None),
                1 => Reply(vec![
                    Step::Write(SSE_HEAD.to_vec()),
                    Step::Write(vec![b'\n', 0xfe, 0xff, b'\n']),
                ]),
                2 => head(k).then_step(event(json!({"error": {"message": "upstream fell over"}}))),
                _ => Reply::chat(pieces).gaps(MS),
            },
        }
    }

    /// 1 000 requests through a two-member chain whose upstreams fail at random before and after
    /// their first text: what the client receives is always one upstream's complete text, or a
    /// prefix of one upstream's text followed by an error — never text from two attempts, and
    /// never an attempt (retry or fallback) after the first text.
    #[tokio::test(start_paused = true)]
    async fn randomized_faults_never_duplicate_or_splice_output() {
        let (pa, pb) = (["A0 ", "A1 ", "A2 ", "A3"], ["B0 ", "B1 ", "B2"]);
        let (full_a, full_b) = (pa.concat(), pb.concat());
        let a = FaultServer::start(vec![], Reply::chat(&pa)).await;
        let b = FaultServer::start(vec![], Reply::chat(&pb)).await;
        let chain = Chain::new(
            "a".into(),
            vec![remote("a", &a.url, 1, usize::MAX), remote("b", &b.url, 1, usize::MAX)],
        );
        let mut rng = StdRng::seed_from_u64(0x13);
        let (mut complete, mut cut, mut fell_back) = (0, 0, 0);
        for run in 0..1000 {
            let n = rng.random_range(0..=4);
            a.script((0..n).map(|_| random_reply(&mut rng, &pa)).collect());
            let n = rng.random_range(0..=3);
            b.script((0..n).map(|_| random_reply(&mut rng, &pb)).collect());
            let hits = || a.hit_count() + b.hit_count();
            let b_before = b.hit_count();
            let messages = vec![ChatMessage {
                role: "user".into(),
                content: format!("run {run}"),
            }];
            let p = chain.prepare_chat(messages).await.unwrap();
            let mut events = chain
                .submit(&RequestContext::for_tests(), p, SamplingParams::default())
                .unwrap()
                .events;
            let (mut text, mut at_first_text, mut end) = (String::new(), None, None);
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(EngineEvent::Delta { text: t, .. }) => {
                        at_first_text.get_or_insert_with(hits);
                        text.push_str(&t);
                    }
                    Ok(EngineEvent::Finished { .. }) => end = Some(Ok(())),
                    Ok(EngineEvent::Failed { message }) => end = Some(Err(message)),
                    Err(e) => end = Some(Err(e.message())),
                }
                if end.is_some() {
                    assert!(events.next().await.is_none(), "run {run}: events after the end");
                    break;
                }
            }
            match end.unwrap_or_else(|| panic!("run {run}: the stream ended silently after {text:?}")) {
                Ok(()) => {
                    assert!(
                        text == full_a || text == full_b,
                        "run {run}: spliced or partial {text:?}"
                    );
                    complete += 1;
                }
                Err(e) => {
                    assert!(
                        full_a.starts_with(&text) || full_b.starts_with(&text),
                        "run {run}: {text:?} then {e}"
                    );
                    cut += 1;
                }
            }
            if let Some(n) = at_first_text {
                assert_eq!(hits(), n, "run {run}: an attempt after the first text");
            }
            if text.starts_with('B') || (text.is_empty() && b.hit_count() > b_before) {
                fell_back += 1;
            }
        }
        // The faults were varied enough to exercise every path.
        assert!(
            complete > 300 && cut > 100 && fell_back > 50,
            "{complete} {cut} {fell_back}"
        );
    }
}
