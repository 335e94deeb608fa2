//! Hard per-request limits (`[limits]`), checked on the decoded request before any
//! tokenization, rendering, retrieval or queueing. Every violation is an `ApiError::Invalid`
//! naming the field and the limit, so both doors answer 400 / INVALID_ARGUMENT.
//!
//! Tested below, one case per limit.

use std::cell::Cell;
use std::fmt;

use genai_models::chat_template::ChatMessage;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};

use super::sampling::SamplingInput;
use crate::config::LimitsConfig;
use crate::error::ApiError;

#[derive(Debug, Clone)]
pub(crate) struct Limits(LimitsConfig);

impl Limits {
    pub(crate) fn new(cfg: LimitsConfig) -> Self {
        Self(cfg)
    }

    pub(crate) fn config(&self) -> &LimitsConfig {
        &self.0
    }

    pub(crate) fn check_prompt(&self, prompt: &str) -> Result<(), ApiError> {
        let max = self.0.max_prompt_bytes;
        if prompt.len() > max {
            return Err(too_long("prompt", prompt.len(), max, "limits.max_prompt_bytes"));
        }
        Ok(())
    }

    pub(crate) fn check_messages(&self, messages: &[ChatMessage]) -> Result<(), ApiError> {
        let max = self.0.max_messages;
        if messages.len() > max {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "{} messages; at most {max} per request (limits.max_messages)",
                    messages.len()
                ),
            ));
        }
        let bytes: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
        if bytes > self.0.max_prompt_bytes {
            return Err(too_long(
                "messages",
                bytes,
                self.0.max_prompt_bytes,
                "limits.max_prompt_bytes",
            ));
        }
        Ok(())
    }

    pub(crate) fn check_sampling(&self, s: &SamplingInput) -> Result<(), ApiError> {
        let l = &self.0;
        if s.stop.len() > l.max_stop {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "{} stop strings; at most {} (limits.max_stop)",
                    s.stop.len(),
                    l.max_stop
                ),
            ));
        }
        if let Some((i, t)) = s.stop.iter().enumerate().find(|(_, t)| t.len() > l.max_stop_bytes) {
            return Err(too_long(
                &format!("stop[{i}]"),
                t.len(),
                l.max_stop_bytes,
                "limits.max_stop_bytes",
            ));
        }
        if s.stop_token_ids.len() > l.max_stop_token_ids {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!(
                    "{} ids; at most {} (limits.max_stop_token_ids)",
                    s.stop_token_ids.len(),
                    l.max_stop_token_ids
                ),
            ));
        }
        if let Some(n) = s.logprobs {
            if n > l.max_logprobs as i64 {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("{n} alternatives; at most {} (limits.max_logprobs)", l.max_logprobs),
                ));
            }
        }
        Ok(())
    }

    /// Embeddings inputs already decoded (gRPC): count (at least one), then each input's length.
    pub(crate) fn check_inputs(&self, texts: &[String]) -> Result<(), ApiError> {
        let l = &self.0;
        if texts.len() > l.max_embedding_inputs {
            return Err(too_many_inputs(texts.len(), l.max_embedding_inputs));
        }
        if texts.is_empty() {
            return Err(no_inputs());
        }
        texts.iter().enumerate().try_for_each(|(i, t)| self.check_input(i, t))
    }

    fn check_input(&self, i: usize, t: &str) -> Result<(), ApiError> {
        let max = self.0.max_input_chars;
        // Bytes bound chars from above: count chars only when the bytes could exceed the limit.
        if t.len() > max && t.chars().count() > max {
            return Err(ApiError::invalid(
                format!("input[{i}]"),
                format!(
                    "{} characters; at most {max} (limits.max_input_chars)",
                    t.chars().count()
                ),
            ));
        }
        if t.is_empty() {
            return Err(ApiError::invalid(format!("input[{i}]"), "must not be empty"));
        }
        Ok(())
    }

    /// Decodes an embeddings `input` (a string or an array of strings) straight from the JSON
    /// text, stopping at the first input over a limit: a body of a million tiny inputs costs a
    /// scan of the first few hundred, not a million allocations.
    pub(crate) fn parse_inputs(&self, json: &str) -> Result<Vec<String>, ApiError> {
        let violation = Cell::new(None);
        let seed = Inputs {
            limits: self,
            violation: &violation,
        };
        let mut de = serde_json::Deserializer::from_str(json);
        match seed.deserialize(&mut de) {
            Ok(v) => Ok(v),
            Err(e) => Err(violation.take().unwrap_or_else(|| {
                ApiError::invalid("input", format!("must be a string or an array of strings: {e}"))
            })),
        }
    }
}

fn too_long(field: &str, got: usize, max: usize, key: &str) -> ApiError {
    ApiError::invalid(field, format!("{got} bytes; at most {max} ({key})"))
}

fn no_inputs() -> ApiError {
    ApiError::invalid("input", "at least one input is required")
}

fn too_many_inputs(got: usize, max: usize) -> ApiError {
    ApiError::invalid(
        "input",
        format!("{got} inputs; at most {max} per request (limits.max_embedding_inputs)"),
    )
}

struct Inputs<'a> {
    limits: &'a Limits,
    violation: &'a Cell<Option<ApiError>>,
}

impl Inputs<'_> {
    fn fail<E: de::Error>(&self, e: ApiError) -> E {
        let msg = e.message();
        self.violation.set(Some(e));
        E::custom(msg)
    }
}

impl<'de> DeserializeSeed<'de> for Inputs<'_> {
    type Value = Vec<String>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Inputs<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or an array of strings")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        self.limits.check_input(0, s).map_err(|e| self.fail(e))?;
        Ok(vec![s.to_owned()])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let max = self.limits.0.max_embedding_inputs;
        let mut out = Vec::new();
        while let Some(s) = seq.next_element::<std::borrow::Cow<'de, str>>()? {
            if out.len() == max {
                return Err(self.fail(ApiError::invalid(
                    "input",
                    format!("more than {max} inputs; at most {max} per request (limits.max_embedding_inputs)"),
                )));
            }
            self.limits.check_input(out.len(), &s).map_err(|e| self.fail(e))?;
            out.push(s.into_owned());
        }
        if out.is_empty() {
            return Err(self.fail(no_inputs()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::new(LimitsConfig::default())
    }

    fn param(e: ApiError) -> String {
        match e {
            ApiError::Invalid { param, message } => format!("{param}: {message}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn each_limit_names_its_field_and_key() {
        let l = limits();
        let big = "x".repeat(l.config().max_prompt_bytes + 1);
        assert!(param(l.check_prompt(&big).unwrap_err()).starts_with("prompt: "));
        let hi = ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        };
        let msgs = vec![hi; l.config().max_messages + 1];
        assert!(param(l.check_messages(&msgs).unwrap_err()).contains("limits.max_messages"));
        let mut s = SamplingInput {
            stop: vec!["a".into(); 17],
            ..Default::default()
        };
        assert!(param(l.check_sampling(&s).unwrap_err()).starts_with("stop: 17 stop strings"));
        s.stop = vec!["x".repeat(257)];
        assert!(param(l.check_sampling(&s).unwrap_err()).starts_with("stop[0]: 257 bytes"));
        s.stop = vec![];
        s.stop_token_ids = vec![1; 65];
        assert!(param(l.check_sampling(&s).unwrap_err()).starts_with("stop_token_ids"));
        s.stop_token_ids = vec![];
        s.logprobs = Some(21);
        assert!(param(l.check_sampling(&s).unwrap_err()).starts_with("top_logprobs"));
        s.logprobs = Some(20);
        assert!(l.check_sampling(&s).is_ok());
    }

    #[test]
    fn inputs_parse_stops_at_the_limit() {
        let l = limits();
        assert_eq!(l.parse_inputs(r#""one""#).unwrap(), vec!["one"]);
        assert_eq!(l.parse_inputs(r#"["a", "b\u00e9"]"#).unwrap(), vec!["a", "bé"]);
        let many = format!("[{}\"a\"]", "\"a\",".repeat(300_000));
        let e = param(l.parse_inputs(&many).unwrap_err());
        assert!(e.starts_with("input: more than 256 inputs"), "{e}");
        let long = format!("[\"a\", \"{}\"]", "é".repeat(40_000));
        assert!(param(l.parse_inputs(&long).unwrap_err()).starts_with("input[1]: 40000 characters"));
        assert!(param(l.parse_inputs(r#"["a", ""]"#).unwrap_err()).starts_with("input[1]: must not be empty"));
        assert!(param(l.parse_inputs("[]").unwrap_err()).starts_with("input: at least one"));
        assert!(param(l.parse_inputs("[1, 2]").unwrap_err()).starts_with("input: must be a string"));
        let texts = vec!["a".to_string(); 257];
        assert!(param(l.check_inputs(&texts).unwrap_err()).starts_with("input: 257 inputs"));
    }
}
