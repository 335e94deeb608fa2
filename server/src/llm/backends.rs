//! `[[llm.backends]]`: the named remote backends, their settings, and the lookup of a request's
//! `model` among them.
//!
//! Each table names one OpenAI-compatible upstream (`kind = "openai"`): clients address it by
//! `name` through the request's `model`; it forwards to `base_url` with the upstream's own
//! `model` id. Its `fallback` list names the backends tried, in order, when it fails before the
//! first token (`"local"` is the local engine). [`Backends`] is built once at start-up (the
//! config validated, each `api_key_env` read) and hands the pipeline a [`Chain`] per request.
//!
//! Invariants: names are unique and never shadow the local engine (`"local"`, `"default"`, the
//! local model's name); every fallback names a configured backend or `"local"`, never the
//! backend itself; a validation error names the key (`llm.backends[1].fallback`).
//!
//! Tested: `tests` below (validation, durations, lookup); the chains through the binary in
//! `tests/e2e/resilience.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::fallback::Chain;
use super::remote::RemoteBackend;
use super::LlmBackend;

/// The name a fallback list uses for the local engine.
pub(crate) const LOCAL: &str = "local";

/// `[llm]`: backends besides the local engine.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Remote OpenAI-compatible backends (`[[llm.backends]]`).
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `/v1/chat/completions` and `/v1/completions` with SSE streaming.
    #[default]
    Openai,
}

/// One `[[llm.backends]]` table. Durations are humantime strings ("250ms", "5s", "1m").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// What clients send as `model` to reach this backend.
    pub name: String,
    pub kind: BackendKind,
    /// The upstream's root, e.g. "https://api.openai.com" or "http://10.0.0.7:8080" (`/v1/...`
    /// is appended; a trailing `/v1` is accepted too).
    pub base_url: String,
    /// The upstream's model id, sent as its `model`.
    pub model: String,
    /// Environment variable holding the API key, sent as `Authorization: Bearer`.
    pub api_key_env: Option<String>,
    /// TCP (+ TLS) connection set-up.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// From sending the request to the first generated text (retryable: no token was sent yet).
    #[serde(with = "duration")]
    pub first_token_timeout: Duration,
    /// Between two chunks once text flows (ends the stream with an error: never retried).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Retries of one request before the first token (0 = none).
    pub max_retries: usize,
    /// The first backoff; it doubles per retry up to `max_backoff`. Each wait is drawn
    /// uniformly from zero to that bound (full jitter).
    #[serde(with = "duration")]
    pub initial_backoff: Duration,
    #[serde(with = "duration")]
    pub max_backoff: Duration,
    /// A `Retry-After` is waited as sent, up to this.
    #[serde(with = "duration")]
    pub retry_after_cap: Duration,
    /// Retries may add at most this fraction to the requests (a token bucket per backend)...
    pub retry_budget_ratio: f64,
    /// ...plus this many in a burst (the bucket's size; it starts full).
    pub retry_budget_burst: usize,
    /// Failed attempts within `failure_window` that open the circuit.
    pub failure_threshold: usize,
    #[serde(with = "duration")]
    pub failure_window: Duration,
    /// How long an open circuit refuses before letting one probe through (half-open).
    #[serde(with = "duration")]
    pub open_for: Duration,
    /// Backends tried in order when this one fails before the first token ("local" = the local
    /// engine).
    pub fallback: Vec<String>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: BackendKind::Openai,
            base_url: String::new(),
            model: String::new(),
            api_key_env: None,
            connect_timeout: Duration::from_secs(5),
            first_token_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            max_retries: 2,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            retry_after_cap: Duration::from_secs(10),
            retry_budget_ratio: 0.2,
            retry_budget_burst: 10,
            failure_threshold: 5,
            failure_window: Duration::from_secs(30),
            open_for: Duration::from_secs(30),
            fallback: Vec::new(),
        }
    }
}

/// Humantime strings in the file, `Duration` in the program.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like \"250ms\" or \"5s\": {e}")))
    }
}

impl LlmConfig {
    /// Checks every table; `local_model` is the local engine's name (which no backend may take).
    pub fn validate(&self, local_model: &str) -> anyhow::Result<()> {
        let names: Vec<&str> = self.backends.iter().map(|b| b.name.as_str()).collect();
        for (i, b) in self.backends.iter().enumerate() {
            let key = |k: &str| format!("llm.backends[{i}].{k}");
            if b.name.trim().is_empty() {
                bail!("invalid config: {} must not be empty", key("name"));
            }
            if [LOCAL, "default", local_model].contains(&b.name.as_str()) {
                bail!(
                    "invalid config: {} = {:?} names the local engine; choose another name",
                    key("name"),
                    b.name
                );
            }
            if names[..i].contains(&b.name.as_str()) {
                bail!("invalid config: {} = {:?} is used twice", key("name"), b.name);
            }
            if !(b.base_url.starts_with("http://") || b.base_url.starts_with("https://"))
                || reqwest::Url::parse(&b.base_url).is_err()
            {
                bail!(
                    "invalid config: {} must be an http:// or https:// URL (got {:?})",
                    key("base_url"),
                    b.base_url
                );
            }
            if b.model.trim().is_empty() {
                bail!(
                    "invalid config: {} (the upstream's model id) must not be empty",
                    key("model")
                );
            }
            if let Some(env) = &b.api_key_env {
                if env.is_empty() {
                    bail!(
                        "invalid config: {} must name an environment variable",
                        key("api_key_env")
                    );
                }
            }
            for (k, d) in [
                ("connect_timeout", b.connect_timeout),
                ("first_token_timeout", b.first_token_timeout),
                ("idle_timeout", b.idle_timeout),
                ("failure_window", b.failure_window),
                ("open_for", b.open_for),
            ] {
                if d.is_zero() {
                    bail!("invalid config: {} must be > 0", key(k));
                }
            }
            if b.initial_backoff > b.max_backoff {
                bail!("invalid config: {} must be <= max_backoff", key("initial_backoff"));
            }
            if !(b.retry_budget_ratio.is_finite() && (0.0..=1.0).contains(&b.retry_budget_ratio)) {
                bail!(
                    "invalid config: {} must be in [0, 1] (got {})",
                    key("retry_budget_ratio"),
                    b.retry_budget_ratio
                );
            }
            if b.failure_threshold == 0 {
                bail!("invalid config: {} must be > 0", key("failure_threshold"));
            }
            for (j, f) in b.fallback.iter().enumerate() {
                let k = key(&format!("fallback[{j}]"));
                if f == &b.name {
                    bail!("invalid config: {k} = {f:?} is the backend itself");
                }
                if f != LOCAL && !names.contains(&f.as_str()) {
                    bail!("invalid config: {k} = {f:?} is neither \"local\" nor a configured backend's name");
                }
                if b.fallback[..j].contains(f) {
                    bail!("invalid config: {k} = {f:?} is listed twice");
                }
            }
        }
        Ok(())
    }
}

/// The remote backends by name, with their fallback lists.
#[derive(Default)]
pub(crate) struct Backends {
    remotes: BTreeMap<String, (Arc<RemoteBackend>, Vec<String>)>,
}

impl Backends {
    /// Builds every backend of a validated config; a missing `api_key_env` variable is an error
    /// naming the key.
    pub(crate) fn from_config(cfg: &LlmConfig) -> anyhow::Result<Self> {
        let mut remotes = BTreeMap::new();
        for (i, b) in cfg.backends.iter().enumerate() {
            let api_key = match &b.api_key_env {
                None => None,
                Some(var) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => Some(v),
                    _ => bail!("llm.backends[{i}].api_key_env: the environment variable {var} is not set"),
                },
            };
            let remote = RemoteBackend::new(b, api_key)?;
            remotes.insert(b.name.clone(), (Arc::new(remote), b.fallback.clone()));
        }
        Ok(Self { remotes })
    }

    /// The remote backends' names (what `/v1/models` lists besides the local models).
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.remotes.keys().map(String::as_str)
    }

    /// The chain serving `model` (the backend, then its fallbacks), or `None` when no remote
    /// backend has that name. `local` is left out of the chain where it is not loaded.
    pub(crate) fn chain(&self, model: &str, local: Option<Arc<dyn LlmBackend>>) -> Option<Arc<dyn LlmBackend>> {
        let (primary, fallback) = self.remotes.get(model)?;
        let mut members: Vec<Arc<dyn LlmBackend>> = vec![primary.clone()];
        for name in fallback {
            if name == LOCAL {
                members.extend(local.clone());
            } else if let Some((b, _)) = self.remotes.get(name) {
                members.push(b.clone());
            }
        }
        Some(Arc::new(Chain::new(model.to_owned(), members)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> anyhow::Result<LlmConfig> {
        let c: LlmConfig = toml::from_str(toml)?;
        c.validate("smollm2")?;
        Ok(c)
    }

    #[test]
    fn tables_parse_with_defaults_and_durations() {
        let c = parse(
            r#"
            [[backends]]
            name = "gpt"
            base_url = "https://api.example.com"
            model = "gpt-4o-mini"
            api_key_env = "EXAMPLE_KEY"
            first_token_timeout = "2s"
            initial_backoff = "50ms"
            fallback = ["peer", "local"]
            [[backends]]
            name = "peer"
            kind = "openai"
            base_url = "http://127.0.0.1:9000/v1"
            model = "smollm2-135m-instruct"
            "#,
        )
        .unwrap();
        let b = &c.backends[0];
        assert_eq!(b.first_token_timeout, Duration::from_millis(2000));
        assert_eq!(b.initial_backoff, Duration::from_millis(50));
        assert_eq!(b.idle_timeout, Duration::from_secs(30));
        assert_eq!(b.fallback, ["peer", "local"]);
        assert_eq!(c.backends[1].kind, BackendKind::Openai);
        // The printed form reads back the same.
        let printed = toml::to_string(&c).unwrap();
        let again: LlmConfig = toml::from_str(&printed).unwrap();
        assert_eq!(again.backends[0].first_token_timeout, b.first_token_timeout);
    }

    #[test]
    fn errors_name_the_key() {
        let base = "[[backends]]\nname = \"a\"\nbase_url = \"http://x:1\"\nmodel = \"m\"\n";
        let cases = [
            (
                "[[backends]]\nbase_url = \"http://x:1\"\nmodel = \"m\"\n",
                "llm.backends[0].name",
            ),
            (
                "[[backends]]\nname = \"local\"\nbase_url = \"http://x:1\"\nmodel = \"m\"\n",
                "llm.backends[0].name",
            ),
            (
                "[[backends]]\nname = \"smollm2\"\nbase_url = \"http://x:1\"\nmodel = \"m\"\n",
                "llm.backends[0].name",
            ),
            (
                "[[backends]]\nname = \"a\"\nbase_url = \"ftp://x\"\nmodel = \"m\"\n",
                "llm.backends[0].base_url",
            ),
            (
                "[[backends]]\nname = \"a\"\nbase_url = \"http://x:1\"\n",
                "llm.backends[0].model",
            ),
            (&format!("{base}fallback = [\"nope\"]\n"), "llm.backends[0].fallback[0]"),
            (&format!("{base}fallback = [\"a\"]\n"), "llm.backends[0].fallback[0]"),
            (
                &format!("{base}fallback = [\"local\", \"local\"]\n"),
                "llm.backends[0].fallback[1]",
            ),
            (
                &format!("{base}retry_budget_ratio = 2.0\n"),
                "llm.backends[0].retry_budget_ratio",
            ),
            (
                &format!("{base}idle_timeout = \"0s\"\n"),
                "llm.backends[0].idle_timeout",
            ),
            (
                &format!("{base}failure_threshold = 0\n"),
                "llm.backends[0].failure_threshold",
            ),
            (&format!("{base}{base}"), "llm.backends[1].name"),
        ];
        for (toml, key) in cases {
            let e = parse(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        let e = parse(&format!("{base}idle_timeout = \"soon\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("idle_timeout") && e.contains("soon"), "{e}");
        let e = parse(&format!("{base}retries = 3\n")).unwrap_err().to_string();
        assert!(e.contains("retries"), "{e}");
    }

    #[test]
    fn a_missing_key_variable_names_the_key_and_lookup_builds_chains() {
        let c = parse(
            "[[backends]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1\"\nmodel = \"m\"\n\
             api_key_env = \"GENAI_TEST_SURELY_UNSET_KEY\"\n",
        )
        .unwrap();
        let e = Backends::from_config(&c).err().unwrap().to_string();
        assert!(
            e.contains("llm.backends[0].api_key_env") && e.contains("GENAI_TEST_SURELY_UNSET_KEY"),
            "{e}"
        );
        let c = parse(
            "[[backends]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1\"\nmodel = \"m\"\nfallback = [\"b\"]\n\
             [[backends]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:2\"\nmodel = \"m\"\n",
        )
        .unwrap();
        let b = Backends::from_config(&c).unwrap();
        assert_eq!(b.names().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(b.chain("a", None).unwrap().model(), "a");
        assert!(b.chain("c", None).is_none());
    }
}
