//! Logs and metrics shared by every ccs process: the tracing subscriber and
//! the HTTP server that serves `/metrics` (Prometheus text format) and
//! `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Installs the global tracing subscriber: text or JSON lines on stderr,
/// filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second call (as in tests that start several nodes) keeps the first subscriber.
    let _ = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}

/// A check that returns whether the process is ready to serve, or why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Binds the metrics address, naming it in the error when it is taken.
pub async fn bind(addr: SocketAddr, purpose: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {purpose}: {e}"))
}

/// Installs the Prometheus recorder and serves `/metrics` and `/readyz` on
/// `listener` until the process exits.
pub async fn serve_metrics(listener: tokio::net::TcpListener, ready: Readiness) -> std::io::Result<()> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .expect("bucket list is not empty")
        .install_recorder()
        .map_err(std::io::Error::other)?;
    let app = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route(
            "/readyz",
            get(move || {
                let answer = match ready() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
                };
                std::future::ready(answer)
            }),
        );
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving metrics and readiness");
    axum::serve(listener, app).await
}
