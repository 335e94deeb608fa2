//! Structured logging with `tracing`: human-readable or JSON lines on stderr
//! (`[log]`), and — in binaries built with the `otlp` feature — span export
//! to an OpenTelemetry collector over OTLP/gRPC when `ops.otlp_endpoint` is set.
//!
//! Invariants: the `[log]` filter applies to both outputs; JSON lines carry the
//! current span's fields (so `request_id` from `ops::request_id`) and the span
//! list; export never blocks a request (spans are batched on the SDK's own
//! thread, sent by a one-thread Tokio runtime owned by the returned guard);
//! dropping the [`TelemetryGuard`] flushes pending spans. Setting
//! `ops.otlp_endpoint` in a binary without the feature is a start-up error, not
//! a silent no-op.
//!
//! Tests: the error without the feature; with it (`cargo test --features
//! otlp`), spans carrying `request_id` reach a real OTLP/gRPC trace receiver
//! (the collector's tonic service from `opentelemetry-proto`) on localhost.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat, OpsConfig};

/// Keeps trace export alive; drop it last (flushes pending spans).
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    _otlp: Option<otlp::Export>,
}

pub fn init(cfg: &LogConfig, ops: &OpsConfig) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .map_err(|e| anyhow::anyhow!("invalid config: key `log.level`: {e}"))?;
    let fmt = match cfg.format {
        LogFormat::Human => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };

    #[cfg(feature = "otlp")]
    let (otlp_layer, otlp) = match &ops.otlp_endpoint {
        Some(endpoint) => {
            let (layer, export) = otlp::layer(endpoint)?;
            (Some(layer), Some(export))
        }
        None => (None, None),
    };
    #[cfg(not(feature = "otlp"))]
    let otlp_layer: Option<tracing_subscriber::layer::Identity> = match &ops.otlp_endpoint {
        Some(_) => anyhow::bail!(
            "invalid config: ops.otlp_endpoint is set but this binary was built without the `otlp` feature; \
             rebuild with `--features otlp` or remove the key"
        ),
        None => None,
    };

    tracing_subscriber::registry()
        .with(otlp_layer)
        .with(filter)
        .with(fmt)
        .try_init()
        .map_err(|e| anyhow::anyhow!("initialising logging: {e}"))?;
    Ok(TelemetryGuard {
        #[cfg(feature = "otlp")]
        _otlp: otlp,
    })
}

#[cfg(feature = "otlp")]
pub mod otlp {
    //! The OTLP/gRPC span exporter and its `tracing` layer.

    use anyhow::Context;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    /// The tracer provider and the runtime its gRPC channel lives on.
    pub struct Export {
        provider: SdkTracerProvider,
        // Outlives the provider's shutdown in `drop`: the final flush still needs the channel.
        _runtime: tokio::runtime::Runtime,
    }

    impl Export {
        /// Sends every finished span now.
        pub fn flush(&self) -> anyhow::Result<()> {
            self.provider
                .force_flush()
                .context("flushing spans to the OTLP endpoint")
        }
    }

    impl Drop for Export {
        fn drop(&mut self) {
            if let Err(e) = self.provider.shutdown() {
                eprintln!("warning: flushing spans to the OTLP endpoint failed: {e}");
            }
        }
    }

    /// A layer exporting spans (with their fields as attributes) to `endpoint`.
    pub fn layer<S>(endpoint: &str) -> anyhow::Result<(Box<dyn Layer<S> + Send + Sync>, Export)>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        // tonic's lazy channel spawns its worker on the current runtime: give it one of its own,
        // independent of the server's runtime and of when that one is built.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .context("starting the OTLP export runtime")?;
        let exporter = {
            let _enter = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("ops.otlp_endpoint: cannot build an OTLP exporter for {endpoint}"))?
        };
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("genai-factory")
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("genai-factory");
        let layer = tracing_opentelemetry::layer().with_tracer(tracer).boxed();
        Ok((
            layer,
            Export {
                provider,
                _runtime: runtime,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "otlp"))]
    #[test]
    fn otlp_endpoint_without_the_feature_is_an_error_naming_the_key() {
        let ops = OpsConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            ..Default::default()
        };
        let e = init(&LogConfig::default(), &ops).err().expect("must fail").to_string();
        assert!(e.contains("ops.otlp_endpoint") && e.contains("--features otlp"), "{e}");
    }

    /// Spans reach a real OTLP/gRPC endpoint: a plain HTTP/2 server records the Export request bytes
    /// (protobuf strings are stored verbatim, so the attribute name and value are visible in them).
    #[cfg(feature = "otlp")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_with_request_id_reach_an_otlp_receiver() {
        use axum::body::Bytes;
        use std::time::Duration;
        use tracing_subscriber::Registry;

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Bytes)>();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: Bytes| {
            let _ = tx.send((uri.path().to_owned(), body));
            async { ([("content-type", "application/grpc"), ("grpc-status", "0")], "") }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let (layer, export) = otlp::layer::<Registry>(&format!("http://{addr}")).unwrap();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            let span = tracing::error_span!("request", request_id = "otlp-test-id-42");
            let _entered = span.enter();
            tracing::info!("inside the request");
        });
        // Flushing and dropping block (and drop a runtime): off the async workers.
        tokio::task::spawn_blocking(move || {
            let _ = export.flush(); // the stub's reply has no message; the export itself is what we check
            drop(export);
        })
        .await
        .unwrap();
        let (path, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(path, "/opentelemetry.proto.collector.trace.v1.TraceService/Export");
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(
            has(b"request_id") && has(b"otlp-test-id-42") && has(b"genai-factory"),
            "{body:?}"
        );
    }
}
