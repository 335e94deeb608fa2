//! The streaming tool-call parser: the engine's text deltas in, content and tool-call events
//! out, as they are generated.
//!
//! Holds back only what may still turn out to be part of a call: a suffix that could be the
//! start of `<tool_call>` (and the whitespace run before it, which is dropped when a call does
//! follow, so a call-only answer has no content). Inside a call it emits `CallStart` (id, name)
//! as soon as the name's closing quote arrives, then every piece of the arguments object the
//! moment it arrives (brace depth and string state tracked, so the end of the object is found
//! without waiting for `</tool_call>`). Whitespace around the JSON punctuation is tolerated,
//! although the grammar writes one fixed layout.
//!
//! A malformed header (before a name was read) is not a call: its text goes out as content, as
//! an unconstrained model wrote it. Anything malformed after a `CallStart` went out is an error
//! at [`ToolCallParser::finish`], as is a call that does not match its schema: what was
//! streamed cannot be taken back, so the answer fails instead of passing on a bad call.
//!
//! Tested below: every split of the input at every byte boundary gives the same events once
//! merged; text before a call, several calls, fallbacks and failures.

use genai_engine::FinishReason;

use super::prompt::{CALL_CLOSE, CALL_OPEN};
use super::{call_id, ToolCall, ToolSet};

/// What the parser makes of the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolEvent {
    /// Text for the message's `content`.
    Content(String),
    /// A call begins (the first event of each index).
    CallStart { index: usize, id: String, name: String },
    /// The next piece of a call's arguments (JSON text; concatenated they are the object).
    Arguments { index: usize, fragment: String },
}

/// Literals between `<tool_call>` and the name's opening quote, between the name and the
/// arguments, and after them; whitespace may precede each.
const HEAD: &[&str] = &["{", "\"name\"", ":", "\""];
const BETWEEN: &[&str] = &[",", "\"arguments\"", ":"];
const TAIL: &[&str] = &["}", CALL_CLOSE];

#[derive(Debug)]
enum State {
    Text,
    /// After `<tool_call>`; `raw` is the text consumed from the whitespace before the trigger
    /// on (given back as content if this turns out not to be a call).
    Head {
        step: usize,
        raw: String,
    },
    /// Inside the name string.
    Name {
        raw: String,
        name: String,
        escaped: bool,
    },
    Between {
        step: usize,
    },
    Args {
        depth: usize,
        in_string: bool,
        escaped: bool,
    },
    Tail {
        step: usize,
    },
}

pub(crate) struct ToolCallParser {
    tools: ToolSet,
    state: State,
    /// Input not consumed yet (held back).
    pending: String,
    calls: Vec<ToolCall>,
    failed: Option<String>,
}

enum Lit {
    /// Matched, consuming this many bytes.
    Done(usize),
    NeedMore,
    Mismatch,
}

/// Matches `lit` at the start of `s`, after optional whitespace.
fn lit(s: &str, lit: &str) -> Lit {
    let t = s.trim_start();
    if t.is_empty() {
        Lit::NeedMore
    } else if t.starts_with(lit) {
        Lit::Done(s.len() - t.len() + lit.len())
    } else if lit.starts_with(t) {
        Lit::NeedMore
    } else {
        Lit::Mismatch
    }
}

/// Where the text that can be emitted ends: before the trailing whitespace run and any suffix
/// that could begin `<tool_call>`.
fn emit_end(s: &str) -> usize {
    let mut end = s.len();
    for k in (1..CALL_OPEN.len()).rev() {
        if s.len() >= k && s.is_char_boundary(s.len() - k) && CALL_OPEN.starts_with(&s[s.len() - k..]) {
            end = s.len() - k;
            break;
        }
    }
    s[..end].trim_end().len()
}

impl ToolCallParser {
    pub(crate) fn new(tools: ToolSet) -> Self {
        Self {
            tools,
            state: State::Text,
            pending: String::new(),
            calls: Vec::new(),
            failed: None,
        }
    }

    /// The calls so far (the last one may still be open).
    pub(crate) fn calls(&self) -> &[ToolCall] {
        &self.calls
    }

    /// Feeds the next text delta.
    pub(crate) fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        if self.failed.is_some() {
            return out;
        }
        self.pending.push_str(text);
        while self.step(&mut out) {}
        out
    }

    /// Consumes what it can of `pending`; false when it needs more input.
    fn step(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        match &mut self.state {
            State::Text => match self.pending.find(CALL_OPEN) {
                Some(i) => {
                    let text = self.pending[..i].trim_end().len();
                    if !self.pending[..text].trim_start().is_empty() {
                        emit(out, ToolEvent::Content(self.pending[..text].to_owned()));
                    }
                    // The gap before the trigger goes with it: dropped if a call follows.
                    let mut raw: String = self.pending.drain(..i + CALL_OPEN.len()).collect();
                    raw.drain(..text);
                    self.state = State::Head { step: 0, raw };
                    true
                }
                None => {
                    let end = emit_end(&self.pending);
                    if end > 0 {
                        let text: String = self.pending.drain(..end).collect();
                        emit(out, ToolEvent::Content(text));
                    }
                    false
                }
            },
            State::Head { step, raw } => match lit(&self.pending, HEAD[*step]) {
                Lit::Done(n) => {
                    raw.extend(self.pending.drain(..n));
                    *step += 1;
                    if *step == HEAD.len() {
                        self.state = State::Name {
                            raw: std::mem::take(raw),
                            name: String::new(),
                            escaped: false,
                        };
                    }
                    true
                }
                Lit::NeedMore => false,
                Lit::Mismatch => {
                    let raw = std::mem::take(raw);
                    self.not_a_call(out, raw);
                    true
                }
            },
            State::Name { raw, name, escaped } => {
                let mut closed = None;
                for (i, c) in self.pending.char_indices() {
                    if *escaped {
                        *escaped = false;
                    } else if c == '\\' {
                        *escaped = true;
                    } else if c == '"' {
                        closed = Some(i);
                        break;
                    }
                    name.push(c);
                }
                let Some(i) = closed else {
                    raw.extend(self.pending.drain(..));
                    return false;
                };
                raw.extend(self.pending.drain(..=i));
                let quoted = format!("\"{name}\"");
                match serde_json::from_str::<String>(&quoted) {
                    Ok(n) if self.tools.index_of(&n).is_some() => {
                        let index = self.calls.len();
                        let id = call_id();
                        emit(
                            out,
                            ToolEvent::CallStart {
                                index,
                                id: id.clone(),
                                name: n.clone(),
                            },
                        );
                        self.calls.push(ToolCall {
                            id,
                            name: n,
                            arguments: String::new(),
                        });
                        self.state = State::Between { step: 0 };
                    }
                    // Not a name of ours: the model wrote something call-like, not a call.
                    _ => {
                        let raw = std::mem::take(raw);
                        self.not_a_call(out, raw);
                    }
                }
                true
            }
            State::Between { step } => match lit(&self.pending, BETWEEN[*step]) {
                Lit::Done(n) => {
                    self.pending.drain(..n);
                    *step += 1;
                    if *step == BETWEEN.len() {
                        self.state = State::Args {
                            depth: 0,
                            in_string: false,
                            escaped: false,
                        };
                    }
                    true
                }
                Lit::NeedMore => false,
                Lit::Mismatch => {
                    let why = format!("expected {:?} after the tool name", BETWEEN[*step]);
                    self.fail(why)
                }
            },
            State::Args {
                depth,
                in_string,
                escaped,
            } => {
                if *depth == 0 {
                    let t = self.pending.trim_start();
                    if t.is_empty() {
                        return false;
                    }
                    if !t.starts_with('{') {
                        return self.fail("the arguments are not a JSON object".into());
                    }
                    let ws = self.pending.len() - t.len();
                    self.pending.drain(..ws);
                }
                let mut end = None;
                for (i, c) in self.pending.char_indices() {
                    if *in_string {
                        if *escaped {
                            *escaped = false;
                        } else if c == '\\' {
                            *escaped = true;
                        } else if c == '"' {
                            *in_string = false;
                        }
                        continue;
                    }
                    match c {
                        '"' => *in_string = true,
                        '{' | '[' => *depth += 1,
                        '}' | ']' => {
                            *depth -= 1;
                            if *depth == 0 {
                                end = Some(i + 1);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let n = end.unwrap_or(self.pending.len());
                let fragment: String = self.pending.drain(..n).collect();
                let index = self.calls.len() - 1;
                self.calls[index].arguments.push_str(&fragment);
                emit(out, ToolEvent::Arguments { index, fragment });
                if end.is_some() {
                    self.state = State::Tail { step: 0 };
                    true
                } else {
                    false
                }
            }
            State::Tail { step } => match lit(&self.pending, TAIL[*step]) {
                Lit::Done(n) => {
                    self.pending.drain(..n);
                    *step += 1;
                    if *step == TAIL.len() {
                        self.state = State::Text;
                    }
                    true
                }
                Lit::NeedMore => false,
                Lit::Mismatch => {
                    let why = format!("expected {:?} after the arguments", TAIL[*step]);
                    self.fail(why)
                }
            },
        }
    }

    /// What followed `<tool_call>` is no call: it goes out as text, and parsing resumes after
    /// the trigger.
    fn not_a_call(&mut self, out: &mut Vec<ToolEvent>, raw: String) {
        emit(out, ToolEvent::Content(raw));
        self.state = State::Text;
    }

    fn fail(&mut self, why: String) -> bool {
        let index = self.calls.len().saturating_sub(1);
        self.failed = Some(format!("malformed tool call {index}: {why}"));
        false
    }

    /// Ends the answer: flushes held-back text and checks the calls. Returns the last events
    /// and the finish reason to report (`"tool_calls"` when the model stopped after calls).
    /// Errors describe a malformed, unfinished or invalid call.
    pub(crate) fn finish(&mut self, reason: FinishReason) -> Result<(Vec<ToolEvent>, &'static str), String> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.pending);
        let state = std::mem::replace(&mut self.state, State::Text);
        let open_call = match state {
            State::Text => {
                // Trailing whitespace is content only when it is not just the gap after calls.
                if !rest.is_empty() && (self.calls.is_empty() || !rest.trim().is_empty()) {
                    emit(&mut out, ToolEvent::Content(rest));
                }
                false
            }
            // Cut off before a name: that was text.
            State::Head { raw, .. } | State::Name { raw, .. } => {
                emit(&mut out, ToolEvent::Content(raw + &rest));
                false
            }
            State::Between { .. } | State::Args { .. } | State::Tail { .. } => true,
        };
        if reason != FinishReason::Stop {
            // Cut by max_tokens or the output filter: what was generated stands, unchecked.
            return Ok((out, reason.as_str()));
        }
        if open_call {
            return Err(format!(
                "the model stopped inside tool call {}",
                self.calls.len().saturating_sub(1)
            ));
        }
        if self.calls.is_empty() {
            if self.tools.0.forced {
                return Err("the model answered without the required tool call".into());
            }
            return Ok((out, reason.as_str()));
        }
        if !self.tools.0.parallel && self.calls.len() > 1 {
            return Err(format!(
                "{} tool calls, but parallel_tool_calls is false",
                self.calls.len()
            ));
        }
        for c in &self.calls {
            self.tools.check_arguments(&c.name, &c.arguments)?;
        }
        Ok((out, "tool_calls"))
    }
}

/// Appends, merging with the previous event of the same kind (and index).
fn emit(out: &mut Vec<ToolEvent>, ev: ToolEvent) {
    match (out.last_mut(), ev) {
        (Some(ToolEvent::Content(a)), ToolEvent::Content(b)) => a.push_str(&b),
        (Some(ToolEvent::Arguments { index: i, fragment: a }), ToolEvent::Arguments { index: j, fragment: b })
            if *i == j =>
        {
            a.push_str(&b)
        }
        (_, ToolEvent::Content(b)) if b.is_empty() => {}
        (_, ev) => out.push(ev),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::set;
    use super::super::{ToolChoice, ToolSet};
    use super::*;

    /// All events of `chunks` fed in order, merged, with ids blanked (they are random).
    fn run(tools: &ToolSet, chunks: &[&str], reason: FinishReason) -> Result<(Vec<ToolEvent>, &'static str), String> {
        let mut p = tools.parser();
        let mut all = Vec::new();
        for c in chunks {
            for ev in p.push(c) {
                emit(&mut all, ev);
            }
        }
        let (last, finish) = p.finish(reason)?;
        for ev in last {
            emit(&mut all, ev);
        }
        for ev in &mut all {
            if let ToolEvent::CallStart { id, .. } = ev {
                assert!(id.starts_with("call_"), "{id}");
                id.clear();
            }
        }
        Ok((all, finish))
    }

    fn start(index: usize, name: &str) -> ToolEvent {
        ToolEvent::CallStart {
            index,
            id: String::new(),
            name: name.into(),
        }
    }

    fn args(index: usize, fragment: &str) -> ToolEvent {
        ToolEvent::Arguments {
            index,
            fragment: fragment.into(),
        }
    }

    /// Feeds `text` split at every pair of byte positions (three pieces, char boundaries) and
    /// checks each gives `expected`.
    fn every_split(tools: &ToolSet, text: &str, expected: &[ToolEvent], finish: &str) {
        let cuts: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let (events, f) = run(tools, &[&text[..a], &text[a..b], &text[b..]], FinishReason::Stop)
                    .unwrap_or_else(|e| panic!("split {a}/{b}: {e}"));
                assert_eq!(events, expected, "split at {a}/{b}");
                assert_eq!(f, finish, "split at {a}/{b}");
            }
        }
    }

    #[test]
    fn plain_text_passes_through() {
        let s = set(ToolChoice::Auto, true);
        let text = "The answer is <b>42</b> — a <tool_ call? no.\n";
        every_split(&s, text, &[ToolEvent::Content(text.into())], "stop");
    }

    #[test]
    fn text_then_one_call_at_every_split() {
        let s = set(ToolChoice::Auto, true);
        let text = "Let me check é.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris {x} \\\"y\\\"\"}}\n</tool_call>";
        every_split(
            &s,
            text,
            &[
                ToolEvent::Content("Let me check é.".into()),
                start(0, "get_weather"),
                args(0, "{\"city\": \"Paris {x} \\\"y\\\"\"}"),
            ],
            "tool_calls",
        );
    }

    #[test]
    fn several_calls_at_every_split() {
        let s = set(ToolChoice::Required, true);
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"unit\": \"c\"}}\n</tool_call>\n\
                    <tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>\n";
        every_split(
            &s,
            text,
            &[
                start(0, "get_weather"),
                args(0, "{\"city\": \"Oslo\", \"unit\": \"c\"}"),
                start(1, "now"),
                args(1, "{}"),
            ],
            "tool_calls",
        );
    }

    #[test]
    fn arguments_stream_before_the_call_ends() {
        let s = set(ToolChoice::Auto, true);
        let mut p = s.parser();
        assert!(p.push("<tool_call>\n{\"name\": \"get_w").is_empty());
        let ev = p.push("eather\", \"arguments\": {\"ci");
        assert!(matches!(&ev[0], ToolEvent::CallStart { index: 0, name, .. } if name == "get_weather"));
        assert_eq!(ev[1], args(0, "{\"ci"));
        assert_eq!(p.push("ty\": \"Rome\"}"), vec![args(0, "ty\": \"Rome\"}")]);
        assert!(p.push("}\n</tool_call>").is_empty());
        assert_eq!(p.calls()[0].arguments, "{\"city\": \"Rome\"}");
        assert_eq!(p.finish(FinishReason::Stop).unwrap(), (vec![], "tool_calls"));
    }

    #[test]
    fn only_a_possible_trigger_is_held_back() {
        let s = set(ToolChoice::Auto, true);
        let mut p = s.parser();
        assert_eq!(p.push("a <tool"), vec![ToolEvent::Content("a".into())]);
        assert_eq!(p.push("box>"), vec![ToolEvent::Content(" <toolbox>".into())]);
        // A trailing whitespace run waits for what follows it.
        assert_eq!(p.push(" x \n"), vec![ToolEvent::Content(" x".into())]);
        assert_eq!(
            p.finish(FinishReason::Stop).unwrap(),
            (vec![ToolEvent::Content(" \n".into())], "stop")
        );
    }

    #[test]
    fn call_like_text_that_is_no_call_stays_text() {
        let s = set(ToolChoice::Auto, true);
        let text = "<tool_call> is how I call tools";
        every_split(&s, text, &[ToolEvent::Content(text.into())], "stop");
        let unknown = "x \n<tool_call>{\"name\": \"rm_rf\"} nope";
        every_split(&s, unknown, &[ToolEvent::Content(unknown.into())], "stop");
    }

    #[test]
    fn broken_or_invalid_calls_fail_the_answer() {
        let s = set(ToolChoice::Auto, false);
        let call =
            |name: &str, a: &str| format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {a}}}\n</tool_call>");
        let fails = |chunks: &[&str], reason| run(&s, chunks, reason).unwrap_err();
        assert!(fails(&[&call("get_weather", "{\"city\": 1}")], FinishReason::Stop).contains("schema"));
        assert!(
            fails(&["<tool_call>{\"name\": \"now\", \"args\": {}}"], FinishReason::Stop)
                .contains("after the tool name")
        );
        assert!(fails(
            &["<tool_call>{\"name\": \"now\", \"arguments\": [1]}"],
            FinishReason::Stop
        )
        .contains("not a JSON object"));
        assert!(fails(
            &["<tool_call>{\"name\": \"now\", \"arguments\": {}} oops"],
            FinishReason::Stop
        )
        .contains("after the arguments"));
        assert!(
            fails(&["<tool_call>{\"name\": \"now\", \"arguments\": {"], FinishReason::Stop).contains("stopped inside")
        );
        let two = format!("{}\n{}", call("now", "{}"), call("now", "{}"));
        assert!(fails(&[&two], FinishReason::Stop).contains("parallel_tool_calls"));
        // Cut by max_tokens: what was generated stands, finish_reason stays "length".
        let (ev, f) = run(
            &s,
            &["<tool_call>{\"name\": \"now\", \"arguments\": {\"a"],
            FinishReason::Length,
        )
        .unwrap();
        assert_eq!(f, "length");
        assert_eq!(ev, vec![start(0, "now"), args(0, "{\"a")]);
        // A forced call that never came.
        let forced = set(ToolChoice::Required, true);
        assert!(run(&forced, &["just text"], FinishReason::Stop)
            .unwrap_err()
            .contains("required"));
    }
}
