//! Process metrics, rendered in the Prometheus text format.
//!
//! Counters and gauges are atomics or small maps behind a mutex; nothing here sits on the per-row hot
//! path except [`Metrics::changes_received`], a single relaxed atomic add per message batch.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::batch::OpCounts;
use crate::table::TableName;

#[derive(Default)]
struct Timing {
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    pub messages_received: AtomicU64,
    pub confirmed_lsn: AtomicU64,
    pub received_lsn: AtomicU64,
    pub slot_lag_bytes: AtomicI64,
    /// WAL that may still be written before `max_slot_wal_keep_size` invalidates the slot; -1 when
    /// unlimited or unknown.
    pub slot_safe_wal_bytes: AtomicI64,
    /// Age in seconds of the oldest open transaction a reload's cut waits for; 0 when none.
    pub reload_cut_blocked_seconds: AtomicI64,
    pub pending_batches: AtomicI64,
    pub bytes_written: AtomicU64,
    pub ready: std::sync::atomic::AtomicBool,
    pub reload_rows: AtomicU64,
    pub reload_bytes: AtomicU64,
    changes: Mutex<BTreeMap<(String, &'static str), u64>>,
    batches: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    timings: Mutex<BTreeMap<&'static str, Timing>>,
    last_error: Mutex<Option<String>>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn batch_sealed(&self, table: &TableName, ops: &OpCounts) {
        let t = table.dotted();
        let mut c = self.changes.lock().expect("metrics lock");
        for (op, n) in [
            ("insert", ops.insert),
            ("update", ops.update),
            ("delete", ops.delete),
            ("truncate", ops.truncate),
        ] {
            if n > 0 {
                *c.entry((t.clone(), op)).or_default() += n;
            }
        }
        drop(c);
        *self
            .batches
            .lock()
            .expect("metrics lock")
            .entry(t)
            .or_default() += 1;
    }

    pub fn error(&self, e: &crate::error::Error) {
        let kind = if e.is_transient() {
            "transient"
        } else {
            "definite"
        };
        *self
            .errors
            .lock()
            .expect("metrics lock")
            .entry((e.component(), kind))
            .or_default() += 1;
        *self.last_error.lock().expect("metrics lock") = Some(e.to_string());
    }

    pub fn clear_error(&self) {
        *self.last_error.lock().expect("metrics lock") = None;
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("metrics lock").clone()
    }

    pub fn observe(&self, what: &'static str, seconds: f64) {
        let mut t = self.timings.lock().expect("metrics lock");
        let e = t.entry(what).or_default();
        e.count += 1;
        e.sum += seconds;
    }

    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let g = |o: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            &mut o,
            "cdc_egress_messages_received_total",
            "pgoutput messages received",
            "counter",
            self.messages_received.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_confirmed_lsn",
            "LSN confirmed to PostgreSQL (as a number)",
            "gauge",
            self.confirmed_lsn.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_received_lsn",
            "highest LSN received",
            "gauge",
            self.received_lsn.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_slot_lag_bytes",
            "WAL retained by the slot (current WAL LSN minus restart LSN)",
            "gauge",
            self.slot_lag_bytes.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_slot_safe_wal_bytes",
            "WAL that may still be written before max_slot_wal_keep_size invalidates the slot (-1: no limit)",
            "gauge",
            self.slot_safe_wal_bytes.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_reload_cut_blocked_seconds",
            "age of the oldest open transaction a reload's cut is waiting for (0: none)",
            "gauge",
            self.reload_cut_blocked_seconds.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_pending_batches",
            "batches open or in flight (not yet acknowledgeable)",
            "gauge",
            self.pending_batches.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_bytes_written_total",
            "compressed bytes uploaded",
            "counter",
            self.bytes_written.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_reload_rows_total",
            "rows exported by reloads",
            "counter",
            self.reload_rows.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_reload_bytes_total",
            "compressed bytes exported by reloads",
            "counter",
            self.reload_bytes.load(Relaxed).to_string(),
        );
        g(
            &mut o,
            "cdc_egress_ready",
            "1 while streaming without errors",
            "gauge",
            (self.ready.load(Relaxed) as u8).to_string(),
        );
        let _ = writeln!(o, "# HELP cdc_egress_changes_total row changes sealed into batches\n# TYPE cdc_egress_changes_total counter");
        for ((t, op), n) in self.changes.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                o,
                "cdc_egress_changes_total{{table=\"{}\",op=\"{op}\"}} {n}",
                esc(t)
            );
        }
        let _ = writeln!(o, "# HELP cdc_egress_batches_sealed_total batches sealed\n# TYPE cdc_egress_batches_sealed_total counter");
        for (t, n) in self.batches.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                o,
                "cdc_egress_batches_sealed_total{{table=\"{}\"}} {n}",
                esc(t)
            );
        }
        let _ = writeln!(o, "# HELP cdc_egress_errors_total errors by component and kind\n# TYPE cdc_egress_errors_total counter");
        for ((c, k), n) in self.errors.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                o,
                "cdc_egress_errors_total{{component=\"{c}\",kind=\"{k}\"}} {n}"
            );
        }
        for (what, t) in self.timings.lock().expect("metrics lock").iter() {
            let name = format!("cdc_egress_{what}_seconds");
            let _ = writeln!(
                o,
                "# TYPE {name} summary\n{name}_sum {}\n{name}_count {}",
                t.sum, t.count
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.batch_sealed(
            &TableName::new("public", "t\"x"),
            &OpCounts {
                insert: 2,
                ..Default::default()
            },
        );
        m.error(&crate::error::Error::transient("nats", "down"));
        m.observe("upload", 0.5);
        let text = m.render();
        assert!(
            text.contains("cdc_egress_changes_total{table=\"public.t\\\"x\",op=\"insert\"} 2"),
            "{text}"
        );
        assert!(text.contains("cdc_egress_errors_total{component=\"nats\",kind=\"transient\"} 1"));
        assert!(text.contains("cdc_egress_upload_seconds_count 1"));
        assert_eq!(m.last_error().as_deref(), Some("down"));
    }
}
