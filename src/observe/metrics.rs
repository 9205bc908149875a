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

use crate::batch::OpCounts;
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

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cdc_egress");
        let messages_received = Counter::default();
        registry.register(
            "messages_received",
            "pgoutput messages received",
            messages_received.clone(),
        );
        let confirmed_lsn = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "confirmed_lsn",
            "LSN confirmed to PostgreSQL (as a number)",
            confirmed_lsn.clone(),
        );
        let received_lsn = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "received_lsn",
            "highest LSN received (as a number)",
            received_lsn.clone(),
        );
        let slot_lag_bytes = Gauge::default();
        registry.register(
            "slot_lag_bytes",
            "WAL retained by the slot (current WAL LSN minus restart LSN)",
            slot_lag_bytes.clone(),
        );
        let slot_safe_wal_bytes = Gauge::default();
        slot_safe_wal_bytes.set(-1);
        registry.register(
            "slot_safe_wal_bytes",
            "WAL that may still be written before max_slot_wal_keep_size invalidates the slot (-1: no limit)",
            slot_safe_wal_bytes.clone(),
        );
        let reload_cut_blocked_seconds = Gauge::default();
        registry.register(
            "reload_cut_blocked_seconds",
            "age of the oldest open transaction a reload's cut is waiting for (0: none)",
            reload_cut_blocked_seconds.clone(),
        );
        let pending_batches = Gauge::default();
        registry.register(
            "pending_batches",
            "batches open or in flight (not yet acknowledgeable)",
            pending_batches.clone(),
        );
        let bytes_written = Counter::default();
        registry.register(
            "bytes_written",
            "compressed bytes uploaded",
            bytes_written.clone(),
        );
        let reload_rows = Counter::default();
        registry.register(
            "reload_rows",
            "rows exported by reloads",
            reload_rows.clone(),
        );
        let reload_bytes = Counter::default();
        registry.register(
            "reload_bytes",
            "compressed bytes exported by reloads",
            reload_bytes.clone(),
        );
        let ready_gauge = Gauge::default();
        registry.register(
            "ready",
            "1 while streaming without errors",
            ready_gauge.clone(),
        );
        let changes = Family::<Labels, Counter>::default();
        registry.register(
            "changes",
            "row changes sealed into batches, by table and operation",
            changes.clone(),
        );
        let batches = Family::<Labels, Counter>::default();
        registry.register(
            "batches_sealed",
            "batches sealed, by table",
            batches.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register(
            "errors",
            "errors by component and kind (definite or transient)",
            errors.clone(),
        );
        let timings = TIMED_STEPS
            .iter()
            .map(|step| {
                // 1 ms to ~65 s.
                let h = Histogram::new(exponential_buckets(0.001, 2.0, 17));
                registry.register(
                    format!("{step}_seconds"),
                    format!("duration of each {step}"),
                    h.clone(),
                );
                (*step, h)
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
