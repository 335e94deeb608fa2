//! The streaming scanner: feed text chunks split anywhere (token deltas, SSE frames), get back
//! the text that is safe to send now.
//!
//! Owns: the per-stream matching state. One anchored DFA "thread" per start position that can
//! still begin a match, stepped one byte at a time across chunk boundaries
//! (`dense::DFA::next_state`); every byte before the earliest live thread is released at once.
//!
//! Invariants:
//! - **No complete value leaves**: a byte is released only once no pattern can match a span
//!   containing it, or after the value it belongs to was replaced (redacted) or the stream was
//!   blocked. Validators run when a candidate is complete (its thread died, or hit the cap, or
//!   the stream ended); the placeholder replaces the whole span.
//! - **Hold-back is only a live partial match**: [`StreamScanner::held_bytes`] is the distance
//!   from the earliest live candidate's start to the end of the input; text that cannot start a
//!   match (spaces, most punctuation, anything after a finished word) is released by the `push`
//!   that brought it. A candidate lives at most [`crate::pii::PiiConfig::max_candidate_bytes`]
//!   bytes (then it is decided on what it matched so far), so that is the worst-case hold-back.
//!   In prose the trailing word is a live candidate (it could still become `word@domain`), so
//!   it waits for the next byte that ends it — usually the next token's leading space.
//! - **Chunking changes nothing**: decisions depend on the bytes only, never on where a chunk
//!   ended, so the concatenated output equals the one-shot redaction of the whole text.
//!
//! Long secrets (JWTs, `sk-…`, `github_pat_…`, PEM blocks) commit as soon as their prefix
//! validates, even if a longer candidate from the same start is still alive; their tail is then
//! consumed byte by byte and never held.
//!
//! Blocking: when the policy blocks an entity, the text before it is released, the entity and
//! everything after it are dropped, and every later `push` returns nothing.
//!
//! Tested: property tests below (random texts with embedded entities, split at every offset and
//! at random offsets: output equals the one-shot redaction, no complete raw value appears in any
//! release or in their concatenation, text that cannot start a match is released at once).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use regex_automata::dfa::Automaton;
use regex_automata::util::primitives::StateID;

use crate::pii::{self, Candidate, Entity, Kind, Policy, Recognizer, Tail, Vault};
use crate::verdict::{Action, Verdict};

/// A value the scanner recognized, in stream coordinates (bytes since the first push).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub entity: Entity,
    pub span: Range<u64>,
    pub action: Action,
}

/// What one `push` or `finish` lets out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Released {
    /// Safe to send now (placeholders in place of redacted values).
    pub text: String,
    /// One per value redacted in this call.
    pub verdicts: Vec<Verdict>,
    /// Set once, by the call that met a blocked entity.
    pub blocked: Option<Verdict>,
    /// Values decided in this call (redacted, allowed or blocked).
    pub found: Vec<Found>,
    /// Placeholders replaced by the caller's own value (policy `restore`).
    pub restored: usize,
}

struct Thread {
    start: u64,
    prev: Option<u8>,
    state: StateID,
    /// (end, pattern) of every match seen, in order of end.
    ends: Vec<(u64, usize)>,
    done: bool,
}

enum Mode {
    Normal,
    /// Inside a long secret whose prefix validated: bytes are consumed, never released.
    Swallow {
        entity: Entity,
        tail: Tail,
        start: u64,
        value: Vec<u8>,
        /// Pem: where the text after `-----END ` begins in `value`.
        end_marker: Option<usize>,
    },
}

/// The streaming scanner for one response. Owns the request's [`Vault`] (placeholders the
/// input redaction created, so the output numbers consistently).
pub struct StreamScanner {
    rec: Arc<Recognizer>,
    policy: Policy,
    vault: Vault,
    /// Undecided bytes `[base, pos)`.
    buf: Vec<u8>,
    base: u64,
    pos: u64,
    last: Option<u8>,
    threads: VecDeque<Thread>,
    mode: Mode,
    blocked: bool,
    aws_key_end: Option<u64>,
    /// Bytes to (re)process before new input (the tail after a long secret's prefix).
    replay: VecDeque<u8>,
    out: Released,
}

impl StreamScanner {
    pub fn new(rec: Arc<Recognizer>, policy: Policy, vault: Vault) -> Self {
        StreamScanner {
            rec,
            policy,
            vault,
            buf: Vec::new(),
            base: 0,
            pos: 0,
            last: None,
            threads: VecDeque::new(),
            mode: Mode::Normal,
            blocked: false,
            aws_key_end: None,
            replay: VecDeque::new(),
            out: Released::default(),
        }
    }

    /// Scans `chunk`; returns what may be sent now.
    pub fn push(&mut self, chunk: &str) -> Released {
        for &b in chunk.as_bytes() {
            self.replay.push_back(b);
            self.drain_replay();
        }
        std::mem::take(&mut self.out)
    }

    /// End of the stream: decides every pending candidate and releases the rest.
    pub fn finish(&mut self) -> Released {
        loop {
            self.drain_replay();
            if self.blocked {
                break;
            }
            if let Mode::Swallow { .. } = self.mode {
                self.end_swallow();
            }
            let dfa = &self.rec.dfa;
            for t in self.threads.iter_mut().filter(|t| !t.done) {
                let s = dfa.next_eoi_state(t.state);
                push_matches(dfa, s, self.pos, &mut t.ends);
                t.done = true;
            }
            self.decide();
            // A long secret's prefix may have put its tail back for replay.
            if self.replay.is_empty() && matches!(self.mode, Mode::Normal) {
                break;
            }
        }
        if !self.blocked {
            self.release(self.pos);
        }
        std::mem::take(&mut self.out)
    }

    /// Bytes received but not yet released or decided: the live partial match.
    pub fn held_bytes(&self) -> usize {
        (self.pos - self.base) as usize
    }

    /// Stream offset up to which every input byte has been decided (released, replaced or
    /// dropped): token ids of text before it can be sent.
    pub fn decided(&self) -> u64 {
        self.base
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The vault, with the placeholders this stream added.
    pub fn into_vault(self) -> Vault {
        self.vault
    }

    fn drain_replay(&mut self) {
        while let Some(b) = self.replay.pop_front() {
            if self.blocked {
                self.replay.clear();
                return;
            }
            self.step(b);
        }
    }

    fn step(&mut self, b: u8) {
        if let Mode::Swallow { .. } = self.mode {
            if self.swallow(b) {
                return;
            }
        }
        let p = self.pos;
        self.buf.push(b);
        self.pos += 1;
        let rec = &*self.rec;
        let dfa = &rec.dfa;
        let cap = rec.max_candidate;
        for t in self.threads.iter_mut().filter(|t| !t.done) {
            let s = dfa.next_state(t.state, b);
            let seen = t.ends.len();
            push_matches(dfa, s, p, &mut t.ends);
            // A long secret's prefix commits as soon as it validates: its tail is swallowed, so
            // nothing after the prefix needs to wait for longer candidates.
            let committed = t.ends[seen..].iter().copied().find(|&(end, pattern)| {
                let spec = &rec.specs[pattern];
                !matches!(spec.tail, Tail::None)
                    && (spec.validate)(&Candidate {
                        text: &self.buf[(t.start - self.base) as usize..(end - self.base) as usize],
                        prev: t.prev,
                        next: Some(b),
                        since_aws_key: None,
                    })
                    .is_some()
            });
            if let Some(c) = committed {
                t.ends = vec![c];
                t.done = true;
            } else if dfa.is_dead_state(s) || p + 1 - t.start > cap {
                t.done = true;
            } else {
                t.state = s;
            }
        }
        let start = self.rec.starts[self.last.map_or(256, usize::from)];
        let s = dfa.next_state(start, b);
        if !dfa.is_dead_state(s) {
            self.threads.push_back(Thread {
                start: p,
                prev: self.last,
                state: s,
                ends: Vec::new(),
                done: false,
            });
        }
        self.last = Some(b);
        self.decide();
    }

    /// Releases everything before the earliest live thread and applies finished candidates,
    /// earliest first.
    fn decide(&mut self) {
        while !self.blocked {
            let Some((start, done)) = self.threads.front().map(|t| (t.start, t.done)) else {
                self.release(self.pos);
                return;
            };
            self.release(start);
            if !done {
                return;
            }
            let t = self.threads.pop_front().expect("front exists");
            if let Some((end, pattern)) = self.choose(&t) {
                self.apply(&t, end, pattern);
                if !matches!(self.mode, Mode::Normal) {
                    return;
                }
            }
        }
    }

    /// The longest validated candidate of a finished thread (ties: the pattern listed first).
    fn choose(&self, t: &Thread) -> Option<(u64, usize)> {
        let mut ends = t.ends.clone();
        ends.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (end, pattern) in ends {
            let text = &self.buf[(t.start - self.base) as usize..(end - self.base) as usize];
            let next = (end < self.pos).then(|| self.buf[(end - self.base) as usize]);
            let spec = &self.rec.specs[pattern];
            let cand = Candidate {
                text,
                prev: t.prev,
                next,
                since_aws_key: self.aws_key_end.filter(|e| *e <= t.start).map(|e| t.start - e),
            };
            if let Kind::Placeholder = spec.kind {
                let restorable = std::str::from_utf8(text)
                    .ok()
                    .is_some_and(|p| self.vault.restorable(p).is_some());
                if self.policy.restore && restorable {
                    return Some((end, pattern));
                }
                continue;
            }
            if let Some(len) = (spec.validate)(&cand) {
                return Some((t.start + len as u64, pattern));
            }
        }
        None
    }

    fn apply(&mut self, t: &Thread, end: u64, pattern: usize) {
        let lo = (t.start - self.base) as usize;
        let hi = (end - self.base) as usize;
        let value = String::from_utf8_lossy(&self.buf[lo..hi]).into_owned();
        let spec = &self.rec.specs[pattern];
        let entity = match spec.kind {
            Kind::Placeholder => {
                let original = self.vault.restorable(&value).unwrap_or(&value).to_owned();
                self.out.text.push_str(&original);
                self.out.restored += 1;
                self.consume(end);
                return;
            }
            Kind::Entity(e) => e,
        };
        if entity == Entity::AwsAccessKey {
            self.aws_key_end = Some(end);
        }
        let action = self.policy.action(entity);
        match (action, spec.tail) {
            (Action::Block, _) => {
                self.out.found.push(Found {
                    entity,
                    span: t.start..end,
                    action,
                });
                let v = pii::verdict(entity, Action::Block);
                self.out.verdicts.push(v.clone());
                self.out.blocked = Some(v);
                self.blocked = true;
                self.threads.clear();
                self.buf.clear();
                self.base = self.pos;
            }
            (_, Tail::None) => {
                self.emit(entity, t.start..end, action, &value);
                self.consume(end);
            }
            (_, tail) => {
                // A long secret: the rest of it is consumed byte by byte, never held back.
                let rest: Vec<u8> = self.buf[hi..].to_vec();
                self.buf.clear();
                self.threads.clear();
                self.base = end;
                self.pos = end;
                self.last = Some(value.as_bytes()[value.len() - 1]);
                self.mode = Mode::Swallow {
                    entity,
                    tail,
                    start: t.start,
                    value: value.into_bytes(),
                    end_marker: None,
                };
                for b in rest.into_iter().rev() {
                    self.replay.push_front(b);
                }
            }
        }
    }

    /// Consumes one byte of a long secret; false when the secret ended before `b` (then `b` is
    /// scanned normally).
    fn swallow(&mut self, b: u8) -> bool {
        let Mode::Swallow {
            tail,
            value,
            end_marker,
            ..
        } = &mut self.mode
        else {
            return false;
        };
        match *tail {
            Tail::Run(pred) if pred(b) => value.push(b),
            // A PEM body is base64 lines (and, in legacy encrypted keys, `Proc-Type: 4,ENCRYPTED`
            // headers): any other byte ends a block whose END line never came.
            Tail::Pem if end_marker.is_some() || pem_byte(b) => {
                value.push(b);
                match *end_marker {
                    None if value.ends_with(b"-----END ") => *end_marker = Some(value.len()),
                    Some(m) if value.len() > m && value.ends_with(b"-----") => {
                        self.consume_swallowed(b);
                        self.end_swallow();
                        return true;
                    }
                    _ => {}
                }
            }
            _ => {
                self.end_swallow();
                return false;
            }
        }
        self.consume_swallowed(b);
        true
    }

    fn consume_swallowed(&mut self, b: u8) {
        self.pos += 1;
        self.base = self.pos;
        self.last = Some(b);
    }

    fn end_swallow(&mut self) {
        let Mode::Swallow {
            entity, start, value, ..
        } = std::mem::replace(&mut self.mode, Mode::Normal)
        else {
            return;
        };
        let action = self.policy.action(entity);
        let value = String::from_utf8_lossy(&value).into_owned();
        self.emit(entity, start..self.pos, action, &value);
    }

    /// Sends a decided, non-blocked value: its placeholder (redact) or the value itself (allow).
    fn emit(&mut self, entity: Entity, span: std::ops::Range<u64>, action: Action, value: &str) {
        self.out.found.push(Found { entity, span, action });
        if action == Action::Redact {
            let ph = self.vault.placeholder(entity, value);
            self.out.text.push_str(&ph);
            self.out.verdicts.push(pii::verdict(entity, action));
        } else {
            self.out.text.push_str(value);
        }
    }

    /// Drops the decided span `[base, end)` and the threads that started inside it.
    fn consume(&mut self, end: u64) {
        self.buf.drain(..(end - self.base) as usize);
        self.base = end;
        while self.threads.front().is_some_and(|t| t.start < end) {
            self.threads.pop_front();
        }
    }

    /// Sends `[base, upto)` as plain text.
    fn release(&mut self, upto: u64) {
        if upto <= self.base {
            return;
        }
        let n = (upto - self.base) as usize;
        // Bytes are scanned one at a time, so `upto` can fall inside a character whose last
        // bytes are not scanned yet: send up to its start, the rest with the next release.
        let (text, n) = match std::str::from_utf8(&self.buf[..n]) {
            Ok(t) => (t, n),
            Err(e) => {
                let n = e.valid_up_to();
                (std::str::from_utf8(&self.buf[..n]).unwrap_or_default(), n)
            }
        };
        if n == 0 {
            return;
        }
        self.out.text.push_str(text);
        self.buf.drain(..n);
        self.base += n as u64;
    }
}

fn pem_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b.is_ascii_whitespace() || matches!(b, b'+' | b'/' | b'=' | b'-' | b':' | b',')
}

fn push_matches(dfa: &regex_automata::dfa::dense::DFA<Vec<u32>>, s: StateID, end: u64, ends: &mut Vec<(u64, usize)>) {
    if dfa.is_match_state(s) {
        for i in 0..dfa.match_len(s) {
            ends.push((end, dfa.match_pattern(s, i).as_usize()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pii::tests::rec;
    use proptest::prelude::*;

    /// Values every recognizer must catch (each also a unit-test positive in `pii`).
    const VALUES: &[&str] = &[
        "alice@example.com",
        "john.doe+tag@mail.co.uk",
        "+1 415 555 0132",
        "(415) 555-0132",
        "020 7946 0958",
        "01 23 45 67 89",
        "4111 1111 1111 1111",
        "5555555555554444",
        "DE89 3704 0044 0532 0130 00",
        "GB82WEST12345698765432",
        "536-22-1234",
        "192.168.1.10",
        "2001:db8:85a3::8a2e:370:7334",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5",
        "sk-proj-Ab3De5Gh7Jk9Mn1Pq3St5Vw7Yz9Bc1De3Fg5Hj7Kl9",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
    ];

    /// Benign filler, including look-alikes and non-ASCII text.
    const WORDS: &[&str] = &[
        "hello",
        "the",
        "order",
        "#A-1029384756",
        "v2.14.1",
        "2024-03-01T12:30:45Z",
        "$1,299.99",
        "ISBN 978-0-306-40615-7",
        "550e8400-e29b-41d4-a716-446655440000",
        "écrit",
        "日本語",
        "naïve",
        "[EMAIL_9]",
        "(see",
        "note)",
        "x",
        "42",
        "3.14",
    ];
    const SEPS: &[&str] = &[" ", "\n", ", ", " - ", "; "];

    fn text_strategy() -> impl Strategy<Value = (String, Vec<&'static str>)> {
        let piece = prop_oneof![
            3 => prop::sample::select(WORDS).prop_map(|w| (w, false)),
            1 => prop::sample::select(VALUES).prop_map(|v| (v, true)),
        ];
        (prop::collection::vec((piece, prop::sample::select(SEPS)), 1..12)).prop_map(|pieces| {
            let mut text = String::new();
            let mut values = Vec::new();
            for ((p, is_value), sep) in pieces {
                text.push_str(p);
                text.push_str(sep);
                if is_value {
                    values.push(p);
                }
            }
            (text, values)
        })
    }

    /// Streams `chunks` and returns each release's text plus the concatenation.
    fn stream(chunks: &[&str], policy: &Policy) -> (Vec<String>, String, Option<Verdict>) {
        let mut s = StreamScanner::new(rec(), policy.clone(), Vault::new());
        let mut outs = Vec::new();
        let mut blocked = None;
        for c in chunks {
            let r = s.push(c);
            blocked = blocked.or(r.blocked);
            outs.push(r.text);
        }
        let r = s.finish();
        blocked = blocked.or(r.blocked);
        outs.push(r.text);
        let all = outs.concat();
        (outs, all, blocked)
    }

    fn boundaries(text: &str) -> Vec<usize> {
        (0..=text.len()).filter(|i| text.is_char_boundary(*i)).collect()
    }

    fn assert_no_leak(values: &[&str], outs: &[String], all: &str) {
        for v in values {
            assert!(!all.contains(v), "{v:?} leaked in {all:?}");
            assert!(outs.iter().all(|o| !o.contains(v)), "{v:?} leaked in a release");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn two_chunks_at_every_offset_equal_one_shot((text, values) in text_strategy()) {
            let policy = Policy::output_default();
            let one = rec().redact(&text, &policy, &mut Vault::new());
            for k in boundaries(&text) {
                let (outs, all, blocked) = stream(&[&text[..k], &text[k..]], &policy);
                prop_assert_eq!(&all, &one.text, "split at {}", k);
                prop_assert_eq!(&blocked, &one.blocked);
                assert_no_leak(&values, &outs, &all);
            }
        }

        #[test]
        fn random_chunks_equal_one_shot((text, values) in text_strategy(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..24)) {
            let policy = Policy::redact_all();
            let one = rec().redact(&text, &policy, &mut Vault::new());
            let b = boundaries(&text);
            let mut at: Vec<usize> = cuts.iter().map(|i| b[i.index(b.len())]).collect();
            at.sort_unstable();
            at.dedup();
            let mut chunks = Vec::new();
            let mut last = 0;
            for k in at.into_iter().chain([text.len()]) {
                chunks.push(&text[last..k]);
                last = k;
            }
            let (outs, all, _) = stream(&chunks, &policy);
            prop_assert_eq!(&all, &one.text);
            assert_no_leak(&values, &outs, &all);
        }

        #[test]
        fn one_char_chunks_equal_one_shot((text, values) in text_strategy()) {
            let policy = Policy::redact_all();
            let one = rec().redact(&text, &policy, &mut Vault::new());
            let b = boundaries(&text);
            let chunks: Vec<&str> = b.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            let (outs, all, _) = stream(&chunks, &policy);
            prop_assert_eq!(&all, &one.text);
            assert_no_leak(&values, &outs, &all);
        }

        /// Words of letters and punctuation followed by a space cannot start or continue any
        /// match: each push releases everything it was given.
        #[test]
        fn text_that_cannot_match_is_released_at_once(words in prop::collection::vec("[a-zA-Z]{1,12}[,.!?]?", 1..30)) {
            let mut s = StreamScanner::new(rec(), Policy::output_default(), Vault::new());
            for w in words {
                let chunk = format!("{w} ");
                let r = s.push(&chunk);
                prop_assert_eq!(r.text, chunk);
                prop_assert_eq!(s.held_bytes(), 0);
            }
        }
    }

    proptest! {
        /// Multi-byte characters leave whole, however the text is chunked (the scanner steps
        /// bytes, so a release may fall inside a character it has only partly seen).
        #[test]
        fn characters_are_never_split(text in "[a-zé€中😀 ,.]{0,40}", cut in 0usize..40) {
            let cut = (0..=cut.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            let mut s = StreamScanner::new(rec(), Policy::output_default(), Vault::new());
            let mut out = s.push(&text[..cut]).text;
            out.push_str(&s.push(&text[cut..]).text);
            out.push_str(&s.finish().text);
            prop_assert_eq!(out, text);
        }
    }

    #[test]
    fn hold_back_is_the_live_partial_match() {
        let mut s = StreamScanner::new(rec(), Policy::redact_all(), Vault::new());
        assert_eq!(s.push("Write to ").text, "Write to ");
        // "alice" could be the start of an address: held.
        assert_eq!(s.push("alice").text, "");
        assert_eq!(s.held_bytes(), 5);
        assert_eq!(s.push("@exa").text, "");
        let r = s.push("mple.com, thanks");
        assert_eq!(r.text, "[EMAIL_1], ");
        assert_eq!(r.verdicts.len(), 1);
        assert_eq!(s.held_bytes(), "thanks".len());
        assert_eq!(s.finish().text, "thanks");
    }

    #[test]
    fn a_block_drops_the_value_and_everything_after() {
        let mut s = StreamScanner::new(rec(), Policy::output_default(), Vault::new());
        let mut out = s.push("Here it is:\n-----BEGIN RSA PRIV").text;
        assert!(!s.is_blocked());
        let r = s.push("ATE KEY-----\nMIIEow");
        out.push_str(&r.text);
        assert_eq!(r.blocked.map(|v| v.reason), Some("private_key"));
        assert!(s.is_blocked());
        out.push_str(&s.push("more text").text);
        out.push_str(&s.finish().text);
        assert_eq!(out, "Here it is:\n");
    }

    #[test]
    fn restore_returns_only_the_callers_values() {
        let mut vault = Vault::new();
        let input = rec().redact("I am alice@example.com", &Policy::input_default(), &mut vault);
        assert_eq!(input.text, "I am [EMAIL_1]");
        vault.seal();
        let mut policy = Policy::output_default();
        policy.restore = true;
        let mut s = StreamScanner::new(rec(), policy, vault);
        let mut out = String::new();
        for c in [
            "Hello [EMA",
            "IL_1], I wrote to ",
            "bob@example.org",
            " and [EMAIL_2] and [PHONE_1].",
        ] {
            out.push_str(&s.push(c).text);
        }
        out.push_str(&s.finish().text);
        // [EMAIL_2] is the model's own value (bob's, redacted on the way out): never restored.
        assert_eq!(
            out,
            "Hello alice@example.com, I wrote to [EMAIL_2] and [EMAIL_2] and [PHONE_1]."
        );
    }

    #[test]
    fn a_truncated_key_block_ends_at_the_first_byte_it_cannot_hold() {
        let mut policy = Policy::redact_all();
        policy.set(Entity::PrivateKey, Action::Redact);
        let text =
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEF\nAASC\n\nWhat is this? Mail bob@example.org";
        let r = rec().redact(text, &policy, &mut Vault::new());
        assert_eq!(r.text, "[PRIVATE_KEY_1]? Mail [EMAIL_1]");
    }

    #[test]
    fn long_secrets_are_swallowed_not_held() {
        let jwt = VALUES[16];
        let mut s = StreamScanner::new(rec(), Policy::redact_all(), Vault::new());
        let mut out = String::new();
        let mut max_held = 0;
        for c in jwt.as_bytes().chunks(7) {
            out.push_str(&s.push(std::str::from_utf8(c).unwrap()).text);
            max_held = max_held.max(s.held_bytes());
        }
        out.push_str(&s.push(" done").text);
        out.push_str(&s.finish().text);
        assert_eq!(out, "[JWT_1] done");
        assert!(max_held < 64, "held {max_held} bytes");
    }
}
