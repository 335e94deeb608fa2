//! Starts the real `genai-factory` binary on free loopback ports with the real
//! models, waits for it to become healthy, and kills it on drop. Also the one
//! check for the external tools some tests drive the server with.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_genai-factory");

/// The binary under test: cargo's build of it, or `GENAI_E2E_BIN` — a copy taken right after the
/// build, for checkouts that share one target directory (another checkout's build would replace
/// cargo's file while the tests run).
fn bin() -> PathBuf {
    std::env::var_os("GENAI_E2E_BIN").map_or_else(|| PathBuf::from(BIN), PathBuf::from)
}

/// The repository root (tests/ sits next to server/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("server/ has a parent")
        .to_path_buf()
}

/// The real models fetched by scripts/fetch-models.sh.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("GENAI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"));
    assert!(
        dir.join("smollm2-135m-instruct").is_dir(),
        "models missing in {}: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

/// `name` (on `PATH`, or a path), when `name PROBE...` runs and succeeds. Otherwise the caller
/// skips, saying so on the real stderr (libtest captures `eprintln!` of passing tests, which would
/// hide the skip), unless `GENAI_REQUIRE_TOOLS=1` (set by scripts/test.sh): then the test fails, so a
/// run that is meant to check against the tool cannot pass without it.
pub fn require_tool(name: &str, probe: &[&str], install: &str) -> Option<PathBuf> {
    let found = if name.contains('/') {
        Some(PathBuf::from(name)).filter(|p| p.is_file())
    } else {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
    };
    let works = found.filter(|path| {
        Command::new(path)
            .args(probe)
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if works.is_none() {
        let what = format!("`{name} {}`", probe.join(" "));
        assert!(
            std::env::var("GENAI_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{what} did not run, and GENAI_REQUIRE_TOOLS=1 requires it; install it: {install}"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (NOT CHECKED): {what} did not run; install it: {install} (GENAI_REQUIRE_TOOLS=1 fails instead)"
        );
    }
    works
}

/// A `genai-factory` command that sees none of the developer's `GENAI_*` variables (the server
/// reads config overrides from them, and refuses unknown ones such as `GENAI_REQUIRE_TOOLS`) nor
/// `RUST_LOG`: a test's server runs with the test's settings only.
fn command() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.as_encoded_bytes().starts_with(b"GENAI_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `genai-factory ARGS` to completion (for start-up failures), bounded in time.
pub fn run_to_exit(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = command();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn genai-factory");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("collect output");
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "genai-factory {args:?} did not exit within {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running server; killed on drop.
pub struct Server {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

pub struct ServerBuilder {
    envs: Vec<(String, String)>,
    config: Option<String>,
}

impl ServerBuilder {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// A config file (TOML text) passed with `--config`, for sections the environment cannot
    /// express well (tables of tenants, prices).
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.into());
        self
    }

    /// Spawns the server and waits until GET /health answers 200.
    pub async fn start(self) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let grpc = free_addr();
        let http = free_addr();
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = command();
        cmd.arg("serve")
            .arg("--grpc-addr")
            .arg(grpc.to_string())
            .arg("--http-addr")
            .arg(http.to_string())
            .arg("--models-dir")
            .arg(models_dir())
            .current_dir(dir.path())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(toml) = &self.config {
            let path = dir.path().join("config.toml");
            std::fs::write(&path, toml).expect("write config");
            cmd.arg("--config").arg(path);
        }
        let child = cmd.spawn().expect("spawn genai-factory serve");
        let mut server = Server {
            child: Some(child),
            grpc,
            http,
            log_path,
            _dir: dir,
        };
        server.wait_healthy(Duration::from_secs(180)).await;
        server
    }
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            envs: Vec::new(),
            config: None,
        }
    }

    pub async fn start() -> Server {
        Self::builder().start().await
    }

    /// POSTs a JSON body (any bytes: some tests send malformed or huge ones) to the HTTP door:
    /// the status and the parsed reply (a JSON string when the reply is not JSON).
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(self.http_url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The value of the first series of `name` in /metrics (0 when absent: not yet recorded).
    pub async fn metric(&self, name: &str) -> f64 {
        series_value(&self.metrics_text().await, name)
    }

    /// The sum of `name`'s series whose label sets contain every one of `labels` (each written
    /// `key="value"`); 0 when none does.
    pub async fn labelled_metric(&self, name: &str, labels: &[&str]) -> f64 {
        let prefix = format!("{name}{{");
        self.metrics_text()
            .await
            .lines()
            .filter(|l| l.starts_with(&prefix) && labels.iter().all(|lb| l.contains(lb)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn metrics_text(&self) -> String {
        reqwest::get(self.http_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls until no KV block is held (cancellation / deadline frees them within an engine step;
    /// up to 10 s, as a step is slow while the whole suite's servers share two cores).
    pub async fn wait_kv_blocks_freed(&self) -> f64 {
        let mut used = f64::MAX;
        for _ in 0..200 {
            used = self.metric("genai_kv_cache_blocks_used").await;
            if used == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        used
    }

    /// A fresh gRPC channel to the server.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.grpc_url())
            .expect("valid url")
            .connect()
            .await
            .expect("connect")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    async fn wait_healthy(&mut self, timeout: Duration) {
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(self.http_url("/health")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("server exited early with {status}; log:\n{}", self.logs());
            }
            assert!(
                start.elapsed() < timeout,
                "server not healthy within {timeout:?}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(self, timeout: Duration) -> ExitStatus {
        self.signal_term();
        self.terminate_wait(timeout).await
    }

    pub fn signal_term(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits for the process to exit (after a signal).
    pub async fn terminate_wait(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                panic!(
                    "server did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The value of the first series of `name` in a Prometheus exposition (0 when absent).
/// The Python interpreter with the official `openai` client (`GENAI_TEST_PYTHON`, else
/// `python3`), or None to skip (see [`require_tool`]).
pub fn require_openai_python() -> Option<PathBuf> {
    let py = std::env::var("GENAI_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    require_tool(
        &py,
        &["-c", "import openai"],
        "pip install openai (scripts/test.sh installs it; GENAI_TEST_PYTHON names another interpreter)",
    )
}

/// Runs `python -c script args...` and fails the test, with its output, unless it succeeds.
pub async fn run_python(py: &Path, script: &str, args: &[&str]) {
    let out = tokio::process::Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn series_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}
