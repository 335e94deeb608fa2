//! `http_get`: fetches a URL whose host is on the operator's allow-list
//! (`[agent] http_allow_hosts`), with a size and a time limit.
//!
//! Allow-list entries: `host` (any port), `host:port`, or `*.domain` (any subdomain, not the
//! domain itself); matching ignores case. Only `http` and `https` URLs without credentials are
//! fetched; every redirect hop is checked against the list too (at most 3 hops), so an allowed
//! host cannot bounce the agent elsewhere. The body is read up to `http_max_bytes` and cut
//! there; the whole call is bounded by `http_timeout_ms`. The list is by host name: an operator
//! who lists a host trusts what it resolves to.
//!
//! Invariants: no connection is opened to a host that is not on the list; an empty list refuses
//! every URL (the default).
//!
//! Tested below against a real local HTTP server (axum on 127.0.0.1): an allowed fetch, a
//! refusal that never reaches the server, a redirect to a host off the list, the size cut, bad
//! schemes and credentials.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::Url;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_args, Tool, ToolContext, ToolError};
use crate::assistant::AgentConfig;

/// Redirect hops followed at most.
const MAX_REDIRECTS: usize = 3;

/// The hosts the agent may fetch from.
#[derive(Debug, Clone)]
pub(crate) struct AllowList(Vec<String>);

impl AllowList {
    pub(crate) fn new(entries: &[String]) -> Self {
        AllowList(entries.iter().map(|e| e.trim().to_ascii_lowercase()).collect())
    }

    /// Whether `url`'s host (and port) is on the list.
    pub(crate) fn allows(&self, url: &Url) -> bool {
        let Some(host) = url.host_str().map(|h| h.to_ascii_lowercase()) else {
            return false;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url.port_or_known_default();
        self.0.iter().any(|e| {
            if let Some(domain) = e.strip_prefix("*.") {
                return host.len() > domain.len() + 1
                    && host.ends_with(domain)
                    && host.as_bytes()[host.len() - domain.len() - 1] == b'.';
            }
            match e.rsplit_once(':') {
                // `host:port`, unless it is a bare IPv6 address.
                Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => {
                    h == host && port == p.parse::<u16>().ok()
                }
                _ => e.trim_start_matches('[').trim_end_matches(']') == host,
            }
        })
    }
}

/// The error a redirect to a host off the list fails with (found again in reqwest's error chain).
#[derive(Debug)]
struct RedirectRefused(String);

impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "redirect to {} refused: the host is not in [agent] http_allow_hosts",
            self.0
        )
    }
}

impl std::error::Error for RedirectRefused {}

pub(crate) struct HttpGet {
    client: reqwest::Client,
    allow: AllowList,
    max_bytes: usize,
    timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    url: String,
}

impl HttpGet {
    pub(crate) fn new(cfg: &AgentConfig) -> anyhow::Result<Self> {
        let allow = AllowList::new(&cfg.http_allow_hosts);
        let hops = allow.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if hops.allows(attempt.url()) {
                attempt.follow()
            } else {
                let to = attempt.url().host_str().unwrap_or_default().to_owned();
                attempt.error(RedirectRefused(to))
            }
        });
        let timeout = Duration::from_millis(cfg.http_timeout_ms);
        let client = reqwest::Client::builder()
            .redirect(policy)
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("genai-factory-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            allow,
            max_bytes: cfg.http_max_bytes,
            timeout,
        })
    }

    /// The URL, if it may be fetched.
    fn check(&self, raw: &str) -> Result<Url, ToolError> {
        let url = Url::parse(raw.trim()).map_err(|e| ToolError::InvalidArguments(format!("url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ToolError::Refused(format!(
                "only http and https URLs are fetched, not {:?}",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ToolError::Refused("URLs with credentials are not fetched".into()));
        }
        if !self.allow.allows(&url) {
            return Err(ToolError::Refused(format!(
                "the host {:?} is not in [agent] http_allow_hosts",
                url.host_str().unwrap_or_default()
            )));
        }
        Ok(url)
    }
}

#[async_trait]
impl Tool for HttpGet {
    fn name(&self) -> &'static str {
        "http_get"
    }

    fn description(&self) -> &'static str {
        "Fetches a web page or API response by URL (HTTP GET); only hosts the operator allows."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "url": {"type": "string", "description": "The http:// or https:// URL to fetch."}
            },
            "required": ["url"],
            "additionalProperties": false
        })
    }

    /// The client's own timeout ends the call first; this bounds it even if the client does not.
    fn timeout(&self) -> Duration {
        self.timeout + Duration::from_secs(1)
    }

    async fn run(&self, args: Value, _ctx: &ToolContext) -> Result<String, ToolError> {
        let a: Args = parse_args(args)?;
        let url = self.check(&a.url)?;
        let mut resp = self.client.get(url).send().await.map_err(request_error)?;
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut body = Vec::new();
        let mut cut = false;
        while let Some(chunk) = resp.chunk().await.map_err(request_error)? {
            let room = self.max_bytes - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                cut = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let mut out = format!(
            "HTTP {status}\ncontent-type: {ctype}\n\n{}",
            String::from_utf8_lossy(&body)
        );
        if cut {
            out.push_str(&format!("\n[truncated at {} bytes]", self.max_bytes));
        }
        Ok(out)
    }
}

fn request_error(e: reqwest::Error) -> ToolError {
    let mut src: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<RedirectRefused>() {
            return ToolError::Refused(r.to_string());
        }
        src = s.source();
    }
    if e.is_timeout() {
        return ToolError::Failed("the request timed out".into());
    }
    ToolError::Failed(format!("request failed: {}", e.without_url()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::extract::State;
    use axum::response::Redirect;
    use axum::routing::get;

    use super::*;

    /// A real HTTP server on 127.0.0.1 counting the requests it answers.
    async fn server() -> (u16, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/hello", get(|| async { "hello from the test server" }))
            .route("/big", get(|| async { "x".repeat(10_000) }))
            .route(
                "/elsewhere",
                get(move || async move { Redirect::temporary(&format!("http://localhost:{port}/hello")) }),
            )
            .route("/here", get(|| async { Redirect::temporary("/hello") }))
            .layer(axum::middleware::from_fn_with_state(
                hits.clone(),
                |State(h): State<Arc<AtomicUsize>>, req, next: axum::middleware::Next| async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    next.run(req).await
                },
            ));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (port, hits)
    }

    fn tool(allow: &[&str], max_bytes: usize) -> HttpGet {
        HttpGet::new(&AgentConfig {
            http_allow_hosts: allow.iter().map(|s| s.to_string()).collect(),
            http_max_bytes: max_bytes,
            ..AgentConfig::default()
        })
        .unwrap()
    }

    async fn get_url(t: &HttpGet, url: String) -> Result<String, ToolError> {
        t.run(json!({ "url": url }), &ToolContext::default()).await
    }

    #[tokio::test]
    async fn fetches_from_allowed_hosts_only() {
        let (port, hits) = server().await;
        let ok = get_url(&tool(&["127.0.0.1"], 4096), format!("http://127.0.0.1:{port}/hello"))
            .await
            .unwrap();
        assert!(ok.starts_with("HTTP 200 OK\n"), "{ok}");
        assert!(ok.ends_with("hello from the test server"), "{ok}");
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        // Off the list (by host, by port, by an empty list): refused before any connection.
        for (allow, why) in [
            (vec!["example.org"], "not in [agent] http_allow_hosts"),
            (vec!["127.0.0.1:1"], "not in [agent] http_allow_hosts"),
            (vec![], "not in [agent] http_allow_hosts"),
        ] {
            let e = get_url(&tool(&allow, 4096), format!("http://127.0.0.1:{port}/hello"))
                .await
                .unwrap_err();
            assert!(matches!(&e, ToolError::Refused(m) if m.contains(why)), "{allow:?}: {e}");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1, "a refused URL never reaches the server");

        let t = tool(&[&format!("127.0.0.1:{port}")], 4096);
        assert!(get_url(&t, format!("http://127.0.0.1:{port}/hello")).await.is_ok());
    }

    #[tokio::test]
    async fn redirects_are_checked_hop_by_hop() {
        let (port, hits) = server().await;
        let t = tool(&["127.0.0.1"], 4096);
        let e = get_url(&t, format!("http://127.0.0.1:{port}/elsewhere"))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ToolError::Refused(m) if m.contains("redirect to localhost refused")),
            "{e}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1, "the redirect target was not fetched");
        // A redirect within the allowed host is followed.
        let ok = get_url(&t, format!("http://127.0.0.1:{port}/here")).await.unwrap();
        assert!(ok.ends_with("hello from the test server"), "{ok}");
    }

    #[tokio::test]
    async fn bodies_are_cut_at_the_size_limit() {
        let (port, _) = server().await;
        let out = get_url(&tool(&["127.0.0.1"], 1000), format!("http://127.0.0.1:{port}/big"))
            .await
            .unwrap();
        assert!(out.ends_with("[truncated at 1000 bytes]"), "{out}");
        let body = out.split_once("\n\n").unwrap().1;
        assert_eq!(body.matches('x').count(), 1000);
    }

    #[tokio::test]
    async fn bad_urls_are_refused_by_name() {
        let t = tool(&["127.0.0.1", "*.example.com"], 4096);
        for (url, want) in [
            ("file:///etc/passwd", "only http and https"),
            ("http://user:pw@127.0.0.1/", "credentials"),
            ("ftp://127.0.0.1/", "only http and https"),
        ] {
            let e = get_url(&t, url.into()).await.unwrap_err();
            assert!(matches!(&e, ToolError::Refused(m) if m.contains(want)), "{url}: {e}");
        }
        let e = get_url(&t, "not a url".into()).await.unwrap_err();
        assert!(
            matches!(&e, ToolError::InvalidArguments(m) if m.starts_with("url:")),
            "{e}"
        );
        let list = AllowList::new(&["*.example.com".into(), "API.test:8443".into(), "[::1]".into()]);
        let ok = |u: &str| list.allows(&Url::parse(u).unwrap());
        assert!(ok("https://docs.example.com/x") && ok("http://a.b.example.com/"));
        assert!(!ok("https://example.com/") && !ok("https://badexample.com/"));
        assert!(ok("http://api.test:8443/") && !ok("http://api.test/"));
        assert!(ok("http://[::1]:8080/"));
    }
}
