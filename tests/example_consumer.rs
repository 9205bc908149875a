//! The example consumer (`examples/notice_consumer.rs`), run against a real daemon: it lands every
//! batch the notices announce, once, and a redelivery (a second durable consumer reading the same
//! notices) rewrites the same files with the same bytes.

mod common;

#[path = "../examples/notice_consumer.rs"]
mod example;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const CATCH_UP: Duration = Duration::from_secs(120);

/// Every landed file: path under the landing directory → its bytes.
fn landed(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let name = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(name, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_lands_every_announced_batch_once() {
    let db = TestDb::new("example").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE k (a text);
         CREATE PUBLICATION {} FOR TABLE t, k",
        db.publication
    ))
    .await
    .unwrap();
    let d = Daemon::start(
        &db.daemon_env(&db.out_url()),
        db.dir.path(),
        &[],
        "daemon.log",
    );
    db.wait_for_slot(&d).await;
    for i in 0..3 {
        c.batch_execute(&format!(
            "INSERT INTO t SELECT g, 'line one\nline \"two\"' FROM generate_series({0} * 100, {0} * 100 + 49) g;
             INSERT INTO k VALUES ('k{0}'); UPDATE t SET v = NULL WHERE id = {0} * 100",
            i
        ))
        .await
        .unwrap();
        db.wait_caught_up(CATCH_UP).await;
    }
    let (files, rows): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*), sum(row_count)::bigint FROM cdc_egress.files WHERE kind = 'streaming'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(files >= 4, "{files} files");
    let landing = db.dir.path().join("landing");
    let opts = example::Options {
        nats_url: nats_url(),
        stream: db.stream.clone(),
        subject: format!("{}.*.batch.>", db.prefix),
        durable: "first".into(),
        landing: landing.clone(),
    };
    let idle = Some(Duration::from_secs(2));
    let stats = example::follow(&opts, idle).await.unwrap();
    assert_eq!(
        (stats.batches, stats.rows),
        (files as u64, rows as u64),
        "every notice landed once"
    );
    let first = landed(&landing);
    assert_eq!(first.len(), files as usize);
    // Each landed file is its batch's CSV.
    let out = db.dir.path().join("out");
    for r in c
        .query(
            "SELECT batch_id, object_path FROM cdc_egress.files WHERE kind = 'streaming'",
            &[],
        )
        .await
        .unwrap()
    {
        let (batch, object): (String, String) = (r.get(0), r.get(1));
        let name = format!("{batch}.csv");
        let mut csv = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(std::fs::File::open(out.join(&object)).unwrap()),
            &mut csv,
        )
        .unwrap();
        assert_eq!(first.get(&name), Some(&csv), "{name}");
    }
    // The durable consumer acknowledged everything: nothing is delivered again.
    assert_eq!(
        example::follow(&opts, idle).await.unwrap(),
        example::Stats::default()
    );
    // A redelivery (another durable consumer from the start) lands the same bytes under the same
    // names: idempotent.
    let again = example::Options {
        durable: "second".into(),
        ..opts
    };
    let stats = example::follow(&again, idle).await.unwrap();
    assert_eq!(stats.batches, files as u64);
    assert_eq!(landed(&landing), first);
    assert!(d.stop().await.success());
    db.cleanup().await;
}
