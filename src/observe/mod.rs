//! Observability: Prometheus metrics, the `/metrics` `/healthz` `/readyz` endpoint, and log setup.

pub mod http;
pub mod metrics;

pub use metrics::Metrics;

/// Installs the global `tracing` subscriber (text or JSON) honouring `RUST_LOG` over `level`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_logging(format: &LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// At most once per `period`, the first time at once: for warnings repeated while a condition
/// lasts. (`Instant::now() - period` would panic on a machine up for less than `period`.)
#[derive(Debug)]
pub struct Throttle {
    period: std::time::Duration,
    last: Option<std::time::Instant>,
}

impl Throttle {
    pub fn new(period: std::time::Duration) -> Throttle {
        Throttle { period, last: None }
    }

    /// True when the period has passed since the last `true` (or there was none); then restarts it.
    pub fn ready(&mut self) -> bool {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.period)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn throttle_fires_first_then_once_per_period() {
        let mut t = Throttle::new(std::time::Duration::from_secs(3600));
        assert!(t.ready());
        assert!(!t.ready());
        let mut z = Throttle::new(std::time::Duration::ZERO);
        assert!(z.ready() && z.ready());
    }
}
