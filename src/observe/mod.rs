//! Observability: Prometheus metrics, the `/metrics` `/healthz` `/readyz` endpoint, and log setup.

pub mod http;
pub mod metrics;

pub use metrics::Metrics;

/// Installs the global `tracing` subscriber (text or JSON) honouring `RUST_LOG` over `level`.
pub fn init_logging(format: &crate::config::LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        crate::config::LogFormat::Json => builder.json().try_init(),
        crate::config::LogFormat::Text => builder.try_init(),
    };
}
