//! The output stage: a generation's events through the streaming scanner
//! ([`genai_safety::stream::StreamScanner`]) before the observer and the doors see them.
//!
//! - Delta text passes through the scanner: what it releases goes out at once, a live partial
//!   match waits (its bytes only), a redacted value goes out as its placeholder.
//! - Token ids and logprobs travel with their text: a delta's ids go out once all of its text
//!   is decided; the ids and logprobs of a redacted (or blocked) span are never sent (they would
//!   spell the value). Ids of deltas that share a held window wait with it.
//! - A block releases the text before the value, then ends the stream with
//!   `Finished { reason: ContentFilter }` and drops the engine's stream, which cancels the
//!   generation. Usage stays exact: the prompt's tokens and every token generated so far
//!   (cached tokens are not reported by then: 0).
//! - At the engine's `Finished`, the scanner is flushed (pending candidates decided) before the
//!   final event.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use futures::StreamExt;
use genai_engine::{EngineEvent, FinishReason, PositionLogprobs, Usage};
use genai_safety::stream::{Released, StreamScanner};
use genai_safety::Action;

use super::{record, Flags, InputScan};
use crate::error::ApiError;
use crate::llm::EventStream;

/// The output stage's label in metrics and flags.
const STAGE: &str = "output_pii";

/// Why the output stage ended a stream, for the doors (SSE field, gRPC trailer).
#[derive(Clone, Default)]
pub(crate) struct Outcome(Arc<OnceLock<(&'static str, &'static str)>>);

impl Outcome {
    /// `(stage, reason)` once the stream was blocked.
    pub(crate) fn blocked(&self) -> Option<(&'static str, &'static str)> {
        self.0.get().copied()
    }
}

struct Pending {
    span: Range<u64>,
    ids: Vec<u32>,
    logprobs: Vec<PositionLogprobs>,
}

struct Scan {
    events: EventStream,
    scanner: StreamScanner,
    flags: Flags,
    outcome: Outcome,
    /// Token ids and logprobs whose text is not decided yet, in stream order.
    pending: VecDeque<Pending>,
    /// Spans replaced or dropped: ids inside them are never sent.
    hidden: Vec<Range<u64>>,
    /// Raw text received so far (bytes).
    raw: u64,
    prompt_tokens: u32,
    completion_tokens: u32,
    out: VecDeque<Result<EngineEvent, ApiError>>,
    done: bool,
}

impl InputScan {
    /// Wraps `events` with the output stage (unchanged when the tenant's policy turns it off).
    /// `prompt_tokens`: the prompt's length, for exact usage when a block ends the stream early.
    pub(crate) fn output(self, events: EventStream, prompt_tokens: u32) -> (EventStream, Outcome) {
        let outcome = Outcome::default();
        let Some(policy) = self.policy.output_pii.clone() else {
            return (events, outcome);
        };
        let scan = Scan {
            events,
            scanner: StreamScanner::new(self.rec, policy, self.vault),
            flags: self.flags,
            outcome: outcome.clone(),
            pending: VecDeque::new(),
            hidden: Vec::new(),
            raw: 0,
            prompt_tokens,
            completion_tokens: 0,
            out: VecDeque::new(),
            done: false,
        };
        let stream = futures::stream::unfold(scan, |mut s| async move {
            loop {
                if let Some(ev) = s.out.pop_front() {
                    return Some((ev, s));
                }
                if s.done {
                    return None;
                }
                // An engine stream that ends unfinished ends this one too (the pipeline reports it).
                let ev = s.events.next().await?;
                s.on_event(ev);
            }
        });
        (Box::pin(stream), outcome)
    }
}

impl Scan {
    fn on_event(&mut self, ev: Result<EngineEvent, ApiError>) {
        match ev {
            Ok(EngineEvent::Delta {
                text,
                token_ids,
                logprobs,
            }) => {
                let start = self.raw;
                self.raw += text.len() as u64;
                self.completion_tokens += token_ids.len() as u32;
                self.pending.push_back(Pending {
                    span: start..self.raw,
                    ids: token_ids,
                    logprobs,
                });
                let r = self.scanner.push(&text);
                self.emit(r, None);
            }
            Ok(EngineEvent::Finished { reason, usage }) => {
                let r = self.scanner.finish();
                self.emit(r, Some((reason, usage)));
            }
            other => {
                // Failures pass through; text still held is dropped with the stream.
                self.out.push_back(other);
                self.done = true;
            }
        }
    }

    /// Queues what the scanner released (with the ids it completes), and the end if any.
    fn emit(&mut self, r: Released, finished: Option<(FinishReason, Usage)>) {
        record(&self.flags, STAGE, &r.verdicts);
        for f in &r.found {
            if f.action == Action::Block {
                self.hidden.push(f.span.start..u64::MAX);
            } else if f.action == Action::Redact {
                self.hidden.push(f.span.clone());
            }
        }
        let decided = if r.blocked.is_some() || finished.is_some() {
            u64::MAX
        } else {
            self.scanner.decided()
        };
        let (ids, logprobs) = self.ready(decided);
        if !r.text.is_empty() || !ids.is_empty() {
            self.out.push_back(Ok(EngineEvent::Delta {
                text: r.text,
                token_ids: ids,
                logprobs,
            }));
        }
        if let Some(v) = r.blocked {
            let _ = self.outcome.0.set((STAGE, v.reason));
            self.out.push_back(Ok(EngineEvent::Finished {
                reason: FinishReason::ContentFilter,
                usage: Usage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.completion_tokens,
                    cached_prompt_tokens: 0,
                },
            }));
            // Dropping the engine's stream cancels the generation.
            self.events = Box::pin(futures::stream::empty());
            self.done = true;
        } else if let Some((reason, usage)) = finished {
            self.out.push_back(Ok(EngineEvent::Finished { reason, usage }));
            self.done = true;
        }
    }

    /// Ids and logprobs of the deltas whose text is decided up to `decided`, minus hidden spans.
    fn ready(&mut self, decided: u64) -> (Vec<u32>, Vec<PositionLogprobs>) {
        let (mut ids, mut lps) = (Vec::new(), Vec::new());
        while self.pending.front().is_some_and(|p| p.span.end <= decided) {
            let p = self.pending.pop_front().expect("front exists");
            // A delta with ids but no text yet (the engine holds partial characters) sits at
            // its offset: hidden if that offset is.
            let end = p.span.end.max(p.span.start + 1);
            if self.hidden.iter().any(|h| p.span.start < h.end && h.start < end) {
                continue;
            }
            ids.extend(p.ids);
            lps.extend(p.logprobs);
        }
        let oldest = self.pending.front().map_or(self.raw, |p| p.span.start);
        self.hidden.retain(|h| h.end > oldest);
        (ids, lps)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{SafetyChain, SafetyConfig};
    use super::*;
    use crate::pipeline::Prompt;

    fn delta(text: &str, ids: &[u32]) -> Result<EngineEvent, ApiError> {
        Ok(EngineEvent::Delta {
            text: text.into(),
            token_ids: ids.to_vec(),
            logprobs: Vec::new(),
        })
    }

    async fn run(config: &str, events: Vec<Result<EngineEvent, ApiError>>) -> (Vec<EngineEvent>, Outcome, Flags) {
        let cfg: SafetyConfig = toml::from_str(config).unwrap();
        let chain = SafetyChain::new(&cfg).unwrap();
        let flags: Flags = Default::default();
        let scan = chain
            .scan_input("t", &mut Prompt::Text("hi".into()), flags.clone())
            .await
            .unwrap();
        let (s, outcome) = scan.output(Box::pin(futures::stream::iter(events)), 7);
        let out = s.map(|e| e.unwrap()).collect().await;
        (out, outcome, flags)
    }

    fn text_of(events: &[EngineEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                EngineEvent::Delta { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn ids_of(events: &[EngineEvent]) -> Vec<u32> {
        events
            .iter()
            .flat_map(|e| match e {
                EngineEvent::Delta { token_ids, .. } => token_ids.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    const USAGE: Usage = Usage {
        prompt_tokens: 7,
        completion_tokens: 6,
        cached_prompt_tokens: 2,
    };

    #[tokio::test]
    async fn redacts_across_deltas_and_drops_the_values_ids() {
        let events = vec![
            delta("Mail ", &[1]),
            delta("bob", &[2]),
            delta("@exa", &[3]),
            delta("mple.com", &[4]),
            delta(" now", &[5]),
            delta("", &[6]),
            Ok(EngineEvent::Finished {
                reason: FinishReason::Stop,
                usage: USAGE,
            }),
        ];
        let (out, outcome, flags) = run("", events).await;
        assert_eq!(text_of(&out), "Mail [EMAIL_1] now");
        assert_eq!(ids_of(&out), vec![1, 5, 6]);
        assert_eq!(
            out.last(),
            Some(&EngineEvent::Finished {
                reason: FinishReason::Stop,
                usage: USAGE
            })
        );
        assert!(outcome.blocked().is_none());
        assert_eq!(*flags.lock().unwrap(), vec!["output_pii:redact:email".to_string()]);
        // The first delta went out on its own, before the address arrived.
        assert!(matches!(&out[0], EngineEvent::Delta { text, token_ids, .. } if text == "Mail " && token_ids == &[1]));
    }

    #[tokio::test]
    async fn a_block_ends_with_content_filter_and_exact_usage() {
        let events = vec![
            delta("Reach me at ", &[1, 2]),
            delta("bob@example.org", &[3, 4]),
            delta(" or later", &[5]),
            Ok(EngineEvent::Finished {
                reason: FinishReason::Stop,
                usage: USAGE,
            }),
        ];
        let (out, outcome, flags) = run("output_actions = { email = \"block\" }", events).await;
        assert_eq!(text_of(&out), "Reach me at ");
        assert_eq!(ids_of(&out), vec![1, 2]);
        assert_eq!(
            out.last(),
            Some(&EngineEvent::Finished {
                reason: FinishReason::ContentFilter,
                // The address is complete once the byte after it arrives (token 5): five
                // tokens were generated when the stream ended.
                usage: Usage {
                    prompt_tokens: 7,
                    completion_tokens: 5,
                    cached_prompt_tokens: 0
                }
            })
        );
        assert_eq!(outcome.blocked(), Some(("output_pii", "email")));
        assert_eq!(*flags.lock().unwrap(), vec!["output_pii:block:email".to_string()]);
    }

    #[tokio::test]
    async fn output_off_passes_events_through() {
        let events = vec![
            delta("bob@example.org", &[1]),
            Ok(EngineEvent::Finished {
                reason: FinishReason::Length,
                usage: USAGE,
            }),
        ];
        let (out, _, _) = run("output_pii = false", events).await;
        assert_eq!(text_of(&out), "bob@example.org");
        assert_eq!(ids_of(&out), vec![1]);
    }
}
