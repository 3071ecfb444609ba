//! The Prometheus text exposition format (version 0.0.4) and the HTTP server that serves it.
//!
//! Daemons render their metrics from their own state on every scrape ([`Exposition`]), so
//! nothing is counted twice and a restarted coordinator reports what its state store says.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A text exposition under construction: families in the order they are started, each with its
/// HELP and TYPE lines, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
    current: Option<String>,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the family `name` (`[a-zA-Z_:][a-zA-Z0-9_:]*`; counters end in `_total`).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        debug_assert!(valid_name(name), "metric name {name}");
        debug_assert!(kind != Kind::Counter || name.ends_with("_total"));
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        self.current = Some(name.to_string());
        self
    }

    /// A sample of the current family, with `labels` (name, value).
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let name = self
            .current
            .as_deref()
            .expect("a sample belongs to a family: call family() first");
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                debug_assert!(valid_name(label) && !label.contains(':'), "label {label}");
                if i > 0 {
                    self.text.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.text, "{label}=\"{v}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
        self
    }

    pub fn finish(self) -> String {
        self.text
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

/// Renders the exposition on every scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` (the exposition `render` returns) and `GET /healthz` (`ok`) on `addr`.
/// Returns the bound address; the server runs until the process ends.
pub async fn serve(addr: SocketAddr, render: Render) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics listener {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        render(),
                    )
                        .into_response()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics and /healthz");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_samples_render_in_the_text_format() {
        let mut e = Exposition::new();
        e.family("segprop_jobs", Kind::Gauge, "Jobs by state.")
            .sample(&[("state", "running")], 2.0)
            .sample(&[("state", "failed")], 0.0);
        e.family("segprop_task_retries_total", Kind::Counter, "Retries.")
            .sample(&[], 3.0);
        e.family("segprop_stage_loss", Kind::Gauge, "Loss.")
            .sample(&[("job", "a\"b\\c\nd")], f64::NAN);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP segprop_jobs Jobs by state.\n# TYPE segprop_jobs gauge\n\
             segprop_jobs{state=\"running\"} 2\nsegprop_jobs{state=\"failed\"} 0\n\
             # HELP segprop_task_retries_total Retries.\n# TYPE segprop_task_retries_total counter\n\
             segprop_task_retries_total 3\n\
             # HELP segprop_stage_loss Loss.\n# TYPE segprop_stage_loss gauge\n\
             segprop_stage_loss{job=\"a\\\"b\\\\c\\nd\"} NaN\n"
        );
    }

    #[tokio::test]
    async fn the_server_answers_metrics_and_healthz() {
        let addr = serve(
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(|| "# HELP x X.\n# TYPE x gauge\nx 1\n".to_string()),
        )
        .await
        .expect("serve");
        for (path, expect) in [("/metrics", "x 1"), ("/healthz", "ok")] {
            let body = http_get(addr, path).await;
            assert!(body.starts_with("HTTP/1.1 200"), "{path}: {body}");
            assert!(body.contains(expect), "{path}: {body}");
        }
        assert!(http_get(addr, "/nothing").await.starts_with("HTTP/1.1 404"));
    }

    async fn http_get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }
}
