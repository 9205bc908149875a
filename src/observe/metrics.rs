//! Process metrics, exposed in the OpenMetrics text format by `prometheus-client`.
//!
//! Every metric is registered once, with its help text, when [`Metrics`] is created; the endpoint
//! encodes the registry on each scrape (names, `HELP`/`TYPE` lines, label escaping and the histogram
//! series are the crate's). Counters and gauges are single atomics; nothing here sits on the per-row
//! hot path except [`Metrics::messages_received`], one relaxed add per message batch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::core::batch::OpCounts;
use crate::table::TableName;

type Labels = Vec<(&'static str, String)>;

/// The steps whose duration is measured ([`Metrics::observe`]).
pub const TIMED_STEPS: [&str; 2] = ["upload", "publish"];

pub struct Metrics {
    pub messages_received: Counter,
    /// LSN confirmed to PostgreSQL, as a number.
    pub confirmed_lsn: Gauge<u64, AtomicU64>,
    /// Highest LSN received, as a number.
    pub received_lsn: Gauge<u64, AtomicU64>,
    pub slot_lag_bytes: Gauge,
    /// WAL that may still be written before `max_slot_wal_keep_size` invalidates the slot; -1 when
    /// unlimited or unknown.
    pub slot_safe_wal_bytes: Gauge,
    /// Age in seconds of the oldest open transaction a reload's cut waits for; 0 when none.
    pub reload_cut_blocked_seconds: Gauge,
    pub pending_batches: Gauge,
    pub bytes_written: Counter,
    /// Streaming without errors (`/readyz`, and the `ready` gauge at each scrape).
    pub ready: AtomicBool,
    ready_gauge: Gauge,
    pub reload_rows: Counter,
    pub reload_bytes: Counter,
    changes: Family<Labels, Counter>,
    batches: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    timings: Vec<(&'static str, Histogram)>,
    last_error: Mutex<Option<String>>,
    registry: Registry,
}

/// Registers `metric` under `name` with its help text and returns it (metrics are shared handles:
/// the registry's copy and ours are the same counter).
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cdc_egress");
        let messages_received = registered(
            &mut registry,
            "messages_received",
            "pgoutput messages received",
            Counter::default(),
        );
        let confirmed_lsn = registered(
            &mut registry,
            "confirmed_lsn",
            "LSN confirmed to PostgreSQL (as a number)",
            Gauge::<u64, AtomicU64>::default(),
        );
        let received_lsn = registered(
            &mut registry,
            "received_lsn",
            "highest LSN received (as a number)",
            Gauge::<u64, AtomicU64>::default(),
        );
        let slot_lag_bytes = registered(
            &mut registry,
            "slot_lag_bytes",
            "WAL retained by the slot (current WAL LSN minus restart LSN)",
            Gauge::default(),
        );
        let slot_safe_wal_bytes = registered(&mut registry, "slot_safe_wal_bytes", "WAL that may still be written before max_slot_wal_keep_size invalidates the slot (-1: no limit)", Gauge::default());
        let reload_cut_blocked_seconds = registered(
            &mut registry,
            "reload_cut_blocked_seconds",
            "age of the oldest open transaction a reload's cut is waiting for (0: none)",
            Gauge::default(),
        );
        let pending_batches = registered(
            &mut registry,
            "pending_batches",
            "batches open or in flight (not yet acknowledgeable)",
            Gauge::default(),
        );
        let bytes_written = registered(
            &mut registry,
            "bytes_written",
            "compressed bytes uploaded",
            Counter::default(),
        );
        let reload_rows = registered(
            &mut registry,
            "reload_rows",
            "rows exported by reloads",
            Counter::default(),
        );
        let reload_bytes = registered(
            &mut registry,
            "reload_bytes",
            "compressed bytes exported by reloads",
            Counter::default(),
        );
        slot_safe_wal_bytes.set(-1);
        let ready_gauge = registered(
            &mut registry,
            "ready",
            "1 while streaming without errors",
            Gauge::default(),
        );
        let changes = registered(
            &mut registry,
            "changes",
            "row changes sealed into batches, by table and operation",
            Family::<Labels, Counter>::default(),
        );
        let batches = registered(
            &mut registry,
            "batches_sealed",
            "batches sealed, by table",
            Family::<Labels, Counter>::default(),
        );
        let errors = registered(
            &mut registry,
            "errors",
            "errors by component and kind (definite or transient)",
            Family::<Labels, Counter>::default(),
        );
        let timings = TIMED_STEPS
            .iter()
            .map(|step| {
                // 1 ms to ~65 s.
                let histogram = Histogram::new(exponential_buckets(0.001, 2.0, 17));
                let name = format!("{step}_seconds");
                let help = format!("duration of each {step}");
                (*step, registered(&mut registry, &name, &help, histogram))
            })
            .collect();
        Metrics {
            messages_received,
            confirmed_lsn,
            received_lsn,
            slot_lag_bytes,
            slot_safe_wal_bytes,
            reload_cut_blocked_seconds,
            pending_batches,
            bytes_written,
            ready: AtomicBool::new(false),
            ready_gauge,
            reload_rows,
            reload_bytes,
            changes,
            batches,
            errors,
            timings,
            last_error: Mutex::new(None),
            registry,
        }
    }

    pub fn batch_sealed(&self, table: &TableName, ops: &OpCounts) {
        let t = table.dotted();
        for (op, n) in [
            ("insert", ops.insert),
            ("update", ops.update),
            ("delete", ops.delete),
            ("truncate", ops.truncate),
        ] {
            if n > 0 {
                self.changes
                    .get_or_create(&vec![("table", t.clone()), ("op", op.to_string())])
                    .inc_by(n);
            }
        }
        self.batches.get_or_create(&vec![("table", t)]).inc();
    }

    pub fn error(&self, e: &crate::error::Error) {
        self.errors
            .get_or_create(&vec![
                ("component", e.component().as_str().to_string()),
                ("kind", e.kind().as_str().to_string()),
            ])
            .inc();
        *self.last_error.lock().expect("metrics lock") = Some(e.to_string());
    }

    pub fn clear_error(&self) {
        *self.last_error.lock().expect("metrics lock") = None;
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("metrics lock").clone()
    }

    /// Records one duration of `step` (one of [`TIMED_STEPS`]; others are ignored).
    pub fn observe(&self, step: &'static str, seconds: f64) {
        match self.timings.iter().find(|(s, _)| *s == step) {
            Some((_, h)) => h.observe(seconds),
            None => debug_assert!(false, "no histogram for step {step}"),
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        self.ready_gauge.set(self.ready.load(Relaxed) as i64);
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.batch_sealed(
            &TableName::new("public", "t\"x"),
            &OpCounts {
                insert: 2,
                ..Default::default()
            },
        );
        m.error(&crate::error::Error::transient(
            crate::error::Component::Nats,
            "down",
        ));
        m.observe("upload", 0.5);
        let text = m.render();
        assert!(
            text.contains("cdc_egress_changes_total{table=\"public.t\\\"x\",op=\"insert\"} 2"),
            "{text}"
        );
        assert!(text.contains("cdc_egress_errors_total{component=\"nats\",kind=\"transient\"} 1"));
        assert!(text.contains("cdc_egress_upload_seconds_count 1"), "{text}");
        assert!(
            text.contains("# HELP cdc_egress_upload_seconds duration of each upload"),
            "{text}"
        );
        assert!(text.contains("cdc_egress_slot_safe_wal_bytes -1"), "{text}");
        assert!(text.contains("cdc_egress_ready 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(m.last_error().as_deref(), Some("down"));
    }
}
