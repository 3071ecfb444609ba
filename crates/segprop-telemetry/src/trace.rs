//! Logs and distributed traces for the three segprop processes (the CLI, the coordinator, the
//! worker).
//!
//! [`init`] installs one `tracing` subscriber per process: human-readable logs on stderr
//! (filtered by `SEGPROP_LOG`), and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, an OpenTelemetry layer that exports segprop's
//! own spans over OTLP/gRPC. Only spans and events of `segprop*` targets at `info` or above reach
//! the exporter: the exporter's own crates (tonic, h2, hyper, opentelemetry) never trace
//! themselves, and per-second calls (heartbeats, health probes) are `debug` spans.
//!
//! The trace context (W3C `traceparent`) crosses process boundaries in gRPC metadata:
//! [`inject`] writes the current span's context into an outgoing call (the clients' interceptors
//! call it), and [`server_span`] (the servers' `trace_fn`) opens one span per incoming call,
//! parented to the caller's. A job carries the context of its `SubmitJob` call
//! ([`traceparent`]) into every task assignment, and the worker parents its task span to it
//! ([`set_parent`]), so one submitted job is one trace: CLI → coordinator → worker → the worker's
//! reports back to the coordinator.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The OTLP endpoint variables, most specific first (the OpenTelemetry SDK convention).
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The process's tracing installation: call [`Tracing::shutdown`] before exiting so the spans
/// still queued are exported.
#[must_use = "call shutdown() before the process exits, or queued spans are lost"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Exports the spans still queued (waiting up to a few seconds for the receiver) and stops
    /// the exporter. Call it from outside the async runtime, while the runtime is still alive:
    /// the exporter's connection runs on it.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5))
        {
            eprintln!("warning: could not export the last traces: {e}");
        }
    }
}

/// The OTLP endpoint from the environment, with the variable that gave it: `None` when unset,
/// empty, or when `OTEL_SDK_DISABLED=true`.
pub fn otlp_endpoint() -> Option<(&'static str, String)> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    ENDPOINT_VARS.iter().find_map(|&var| {
        std::env::var(var)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(|v| (var, v))
    })
}

/// Installs the process's subscriber (see the module docs). `service` is the OTel
/// `service.name` unless `OTEL_SERVICE_NAME` says otherwise; `default_level` is the log filter
/// when `SEGPROP_LOG` is unset. With an endpoint, this must run inside a Tokio runtime (the
/// exporter's gRPC connection is spawned on it). Errors name the variable that is wrong.
pub fn init(service: &str, default_level: &str) -> anyhow::Result<Tracing> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEGPROP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        );
    let endpoint = otlp_endpoint();
    let provider = match &endpoint {
        Some((var, endpoint)) => Some(provider(service, var, endpoint)?),
        None => None,
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("segprop"))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("segprop") && *meta.level() <= tracing::Level::INFO
            }))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    Ok(Tracing { provider })
}

/// A daemon's or CLI's process: its tokio runtime, with [`init`]'s subscriber installed inside
/// it (the exporter's connection lives on the runtime).
pub struct Process {
    pub runtime: tokio::runtime::Runtime,
    tracing: Tracing,
}

/// Why a [`Process`] could not start, with the exit code it should end with.
#[derive(Debug)]
pub struct StartError {
    /// 1: no runtime (the system refused threads); 2: bad telemetry configuration.
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Process {
    /// Starts the runtime (`worker_threads`: tokio's default when `None`) and installs the
    /// subscriber for `service` with `default_level` (see [`init`]).
    pub fn start(
        service: &str,
        default_level: &str,
        worker_threads: Option<usize>,
    ) -> Result<Self, StartError> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = worker_threads {
            builder.worker_threads(n);
        }
        let runtime = builder.enable_all().build().map_err(|e| StartError {
            code: 1,
            message: format!("cannot start the async runtime: {e}"),
        })?;
        let tracing = runtime
            .block_on(async { init(service, default_level) })
            .map_err(|e| StartError {
                code: 2,
                message: format!("{e:#}"),
            })?;
        Ok(Self { runtime, tracing })
    }

    /// Exports the spans still queued, then stops the runtime.
    pub fn finish(self) {
        self.tracing.shutdown();
    }
}

fn provider(service: &str, var: &str, endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;

    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        anyhow::bail!(
            "{var}=`{endpoint}`: expected an http:// or https:// URL of an OTLP/gRPC receiver (e.g. http://otel-collector:4317)"
        );
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| anyhow::anyhow!("{var}=`{endpoint}`: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The current span's trace context as a W3C `traceparent` value; empty when spans are not
/// exported (or there is no current span).
pub fn traceparent() -> String {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return String::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// Parents `span` to the context in `traceparent` (as [`traceparent`] wrote it); an empty or
/// malformed value leaves the span where it is.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Writes the current span's trace context into an outgoing gRPC call's metadata (nothing when
/// spans are not exported).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let value = traceparent();
    if !value.is_empty()
        && let Ok(value) = value.parse()
    {
        metadata.insert("traceparent", value);
    }
}

/// One span per incoming gRPC call (a tonic server's `trace_fn`), named `Service/Method` and
/// parented to the caller's `traceparent` header when it sent one. Heartbeats, health checks and
/// reflection are `debug` spans: they are not exported.
pub fn server_span<B>(request: &http::Request<B>) -> tracing::Span {
    let path = request.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let service = service.rsplit('.').next().unwrap_or(service);
    let name = format!("{service}/{method}");
    let quiet =
        method == "Heartbeat" || service == "Health" || service.starts_with("ServerReflection");
    let span = if quiet {
        tracing::debug_span!("grpc", otel.name = %name, otel.kind = "server", rpc.system = "grpc", rpc.service = service, rpc.method = method)
    } else {
        tracing::info_span!("grpc", otel.name = %name, otel.kind = "server", rpc.system = "grpc", rpc.service = service, rpc.method = method)
    };
    if let Some(value) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        set_parent(&span, value);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber with an OTel layer backed by an SDK provider without exporter: spans get
    /// real trace ids, nothing leaves the process.
    fn with_otel<T>(f: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn traceparent_round_trips_through_metadata_and_a_server_span() {
        with_otel(|| {
            let client = tracing::info_span!("client");
            let _entered = client.enter();
            let sent = traceparent();
            // 00-<32 hex trace id>-<16 hex span id>-<flags>
            let parts: Vec<&str> = sent.split('-').collect();
            assert_eq!(parts.len(), 4, "{sent}");
            assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));
            let mut metadata = tonic::metadata::MetadataMap::new();
            inject(&mut metadata);
            assert_eq!(
                metadata.get("traceparent").and_then(|v| v.to_str().ok()),
                Some(sent.as_str())
            );

            let request = http::Request::builder()
                .uri("/segprop.v1.JobService/SubmitJob")
                .header("traceparent", &sent)
                .body(())
                .expect("request");
            let server = server_span(&request);
            let server_cx = server.context();
            let server_sc = server_cx.span().span_context().clone();
            assert_eq!(server_sc.trace_id().to_string(), parts[1], "same trace");
            assert_ne!(server_sc.span_id().to_string(), parts[2], "a new span");
        });
    }

    #[test]
    fn without_an_exporter_nothing_is_injected() {
        let span = tracing::info_span!("plain");
        let _entered = span.enter();
        assert_eq!(traceparent(), "");
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject(&mut metadata);
        assert!(metadata.get("traceparent").is_none());
    }

    #[test]
    fn a_malformed_traceparent_leaves_the_span_a_root() {
        with_otel(|| {
            let span = tracing::info_span!("task");
            set_parent(&span, "not-a-traceparent");
            set_parent(&span, "");
            let _entered = span.enter();
            assert_eq!(traceparent().len(), 55);
        });
    }

    #[test]
    fn server_spans_name_the_method_and_quiet_the_per_second_calls() {
        with_otel(|| {
            let request = |path: &str| {
                http::Request::builder()
                    .uri(path)
                    .body(())
                    .expect("request")
            };
            let submit = server_span(&request("/segprop.v1.JobService/SubmitJob"));
            assert_eq!(
                submit.metadata().map(|m| *m.level()),
                Some(tracing::Level::INFO)
            );
            for quiet in [
                "/segprop.v1.ClusterService/Heartbeat",
                "/grpc.health.v1.Health/Check",
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            ] {
                let span = server_span(&request(quiet));
                assert_eq!(
                    span.metadata().map(|m| *m.level()),
                    Some(tracing::Level::DEBUG),
                    "{quiet}"
                );
            }
        });
    }

    #[test]
    fn the_endpoint_must_be_a_url() {
        let Err(err) = provider("t", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "localhost:4317") else {
            panic!("a bare host:port was accepted");
        };
        let message = err.to_string();
        assert!(
            message.starts_with(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=`localhost:4317`: expected an http://"
            ),
            "{message}"
        );
    }
}
