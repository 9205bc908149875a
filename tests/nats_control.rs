//! The NATS side bootstraps itself (README "Schemas in a key-value bucket", "Reloads over NATS",
//! "Transaction events"), end to end against the real PostgreSQL and nats-server: the schema bucket
//! follows DDL and survives a kill -9, reloads requested over NATS run (and bad requests get error
//! replies), and transaction events bracket each transaction's change events exactly once across a
//! crash.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;
use serde_json::Value;

const CATCH_UP: Duration = Duration::from_secs(120);

/// The test's schema bucket (the default name, derived from the stream; `TestDb::cleanup` deletes
/// it with the stream).
struct Bucket(String);

impl Bucket {
    fn of(db: &TestDb) -> Bucket {
        Bucket(format!("{}_SCHEMAS", db.stream))
    }

    async fn kv(&self) -> jetstream::kv::Store {
        let c = async_nats::connect(nats_url()).await.unwrap();
        jetstream::new(c).get_key_value(&self.0).await.unwrap()
    }

    /// Every value of `key`, oldest first (deletes would show as empty values: there are none).
    async fn history(&self, key: &str) -> Vec<Value> {
        use futures::StreamExt;
        let kv = self.kv().await;
        let mut h = kv.history(key).await.unwrap();
        let mut out = Vec::new();
        while let Some(e) = h.next().await {
            let e = e.unwrap();
            assert_eq!(
                e.operation,
                jetstream::kv::Operation::Put,
                "{key}: only puts"
            );
            out.push(serde_json::from_slice(&e.value).unwrap());
        }
        out
    }
}

fn column_names(entry: &Value) -> Vec<String> {
    entry["schema_yml"]["columns"]
        .as_array()
        .unwrap_or_else(|| panic!("schema_yml.columns in {entry}"))
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn valid_from(entry: &Value) -> (cdc_egress::lsn::Lsn, u64) {
    let p = &entry["valid_from"];
    (
        p["commit_lsn"].as_str().unwrap().parse().unwrap(),
        p["seq"].as_u64().unwrap(),
    )
}

/// Every row of the registry's `files` is notified (its schema entry is written before that).
const ALL_NOTIFIED: &str =
    "SELECT count(*) > 0 AND bool_and(notified_stream_seq IS NOT NULL) FROM cdc_egress.files";

/// Waits until the registry holds `n` DDL records and every row is notified.
async fn ddl_records_notified(db: &TestDb, d: &Daemon, n: usize) {
    let sql = format!(
        "SELECT count(*) FILTER (WHERE kind = 'ddl') = {n} AND bool_and(notified_stream_seq IS NOT NULL) FROM cdc_egress.files"
    );
    db.wait_until(&sql, CATCH_UP, d).await;
}

/// A table's entry is its newest schema after a batch, after an `ADD COLUMN` (also when the daemon
/// crashed right after writing the entry) and after a kill -9 and restart (not written again for
/// the same schema), versions in position order, once each; a dropped table's entry is a tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_bucket_holds_the_latest_schema_across_ddl_and_restarts() {
    let db = TestDb::new("kvschema").await;
    let bucket = Bucket::of(&db);
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE public.t (id int PRIMARY KEY, a text); CREATE PUBLICATION {} FOR TABLE public.t",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let key = format!("{}.public.t", db.slot);

    let d = Daemon::start(&env, db.dir.path(), &[], "first.log");
    db.wait_for_slot(&d).await;
    c.batch_execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    db.wait_until(ALL_NOTIFIED, CATCH_UP, &d).await;
    let h = bucket.history(&key).await;
    assert_eq!(h.len(), 1, "one version so far: {h:?}");
    assert_eq!(column_names(&h[0]), ["id", "a"]);
    assert_eq!(h[0]["state"], "present");
    assert_eq!(h[0]["kind"], "streaming");

    // A crash right after the DDL record's entry is written, before its row is marked notified:
    // the next run completes the row and reads the record again from the slot, and writes nothing.
    assert!(d.stop().await.success());
    let d = Daemon::start(
        &env,
        db.dir.path(),
        &[("CDC_EGRESS_TEST_FAILPOINT", "after_schema_entry")],
        "crash.log",
    );
    c.batch_execute("ALTER TABLE t ADD COLUMN b int")
        .await
        .unwrap();
    let status = d.wait_exit(CATCH_UP).await;
    assert!(!status.success(), "the failpoint aborted the daemon");
    let d = Daemon::start(&env, db.dir.path(), &[], "after-crash.log");
    c.batch_execute("INSERT INTO t VALUES (3, 'three', 3)")
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    ddl_records_notified(&db, &d, 1).await;
    let h = bucket.history(&key).await;
    assert_eq!(
        h.iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["streaming", "ddl", "streaming"],
        "the DDL record, then the batch of the new shape: {h:?}"
    );
    let ddl_cols: Vec<&str> = h[1]["ddl_yml"]["columns_after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(ddl_cols, ["id", "a", "b"]);
    assert_eq!(column_names(&h[2]), ["id", "a", "b"]);
    assert!(
        valid_from(&h[0]) < valid_from(&h[1]) && valid_from(&h[1]) < valid_from(&h[2]),
        "versions in position order: {h:?}"
    );

    // kill -9: the next run re-reads the DDL record and completes nothing twice.
    d.kill().await;
    let d = Daemon::start(&env, db.dir.path(), &[], "second.log");
    c.batch_execute("INSERT INTO t VALUES (4, 'four', 4)")
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    db.wait_until(ALL_NOTIFIED, CATCH_UP, &d).await;
    let after = bucket.history(&key).await;
    assert_eq!(after, h, "a restart writes no version again");

    c.batch_execute("DROP TABLE t").await.unwrap();
    db.wait_caught_up(CATCH_UP).await;
    ddl_records_notified(&db, &d, 2).await;
    let h = bucket.history(&key).await;
    let last = h.last().unwrap();
    assert_eq!(h.len(), 4, "{h:?}");
    assert_eq!(last["state"], "dropped", "a tombstone: {last}");
    assert!(valid_from(&h[2]) < valid_from(last));
    assert!(d.stop().await.success());
    db.cleanup().await;
}

/// Tables that changed before the bucket was configured get their entries at the next start, from
/// their newest registry rows, without any new change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_bucket_is_filled_at_start_for_quiet_tables() {
    let db = TestDb::new("kvfill").await;
    let bucket = Bucket::of(&db);
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE public.t (id int PRIMARY KEY, a text); CREATE TABLE public.u (id int PRIMARY KEY); \
         CREATE PUBLICATION {} FOR TABLE public.t, public.u",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(
        &env,
        db.dir.path(),
        &[("CDC_EGRESS_NATS_SCHEMA_BUCKET", "")],
        "without.log",
    );
    db.wait_for_slot(&d).await;
    c.batch_execute("INSERT INTO t VALUES (1, 'one'); INSERT INTO u VALUES (1)")
        .await
        .unwrap();
    db.wait_caught_up(CATCH_UP).await;
    db.wait_until(ALL_NOTIFIED, CATCH_UP, &d).await;
    assert!(d.stop().await.success());
    let js = jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    assert!(
        js.get_key_value(&bucket.0).await.is_err(),
        "no bucket while it is disabled"
    );

    let d = Daemon::start(&env, db.dir.path(), &[], "with.log");
    let keys = [
        format!("{}.public.t", db.slot),
        format!("{}.public.u", db.slot),
    ];
    wait_until(
        "both tables' entries",
        CATCH_UP,
        || d.log_tail(),
        async || {
            let Ok(kv) = js.get_key_value(&bucket.0).await else {
                return false;
            };
            let mut found = 0;
            for k in &keys {
                found += kv.entry(k).await.ok().flatten().is_some() as usize;
            }
            found == keys.len()
        },
    )
    .await;
    assert_eq!(
        column_names(&bucket.history(&keys[0]).await[0]),
        ["id", "a"]
    );
    assert_eq!(bucket.history(&keys[1]).await.len(), 1);
    assert!(d.stop().await.success());
    db.cleanup().await;
}

async fn request(subject: &str, payload: &str) -> Value {
    let c = async_nats::connect(nats_url()).await.unwrap();
    let reply = tokio::time::timeout(
        CATCH_UP,
        c.request(subject.to_string(), payload.to_string().into()),
    )
    .await
    .expect("a reply")
    .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

/// A reload requested over NATS runs to `done`; an unknown table, an unpublished one and a
/// malformed request get error replies and start nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_are_requested_over_nats() {
    let db = TestDb::new("natsreload").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE public.t (id int PRIMARY KEY, a text); \
         CREATE TABLE public.hidden (id int PRIMARY KEY); \
         INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 50) g; \
         CREATE PUBLICATION {} FOR TABLE public.t",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let mut d = Daemon::start(
        &env,
        db.dir.path(),
        &[("CDC_EGRESS_NATS_CONTROL", "true")],
        "daemon.log",
    );
    d.wait_for_log("answering reload requests over NATS", CATCH_UP)
        .await;
    let subject = format!("{}-control.{}.reload", db.prefix, db.slot);

    let ok = request(&subject, r#"{"tables": ["public.t"]}"#).await;
    assert_eq!(ok["ok"], true, "{ok}");
    let id = ok["requests"][0]["request"].as_str().unwrap().to_string();
    assert_eq!(ok["requests"][0]["table"], "public.t");
    db.wait_until(
        &format!(
            "SELECT status = 'done' AND rows = 50 FROM cdc_egress.reloads WHERE request = '{id}'"
        ),
        CATCH_UP,
        &d,
    )
    .await;

    // The reload's schema entry holds from its cut (seq 0).
    let bucket = Bucket::of(&db);
    let key = format!("{}.public.t", db.slot);
    wait_until(
        "the reload's schema entry",
        CATCH_UP,
        || d.log_tail(),
        async || bucket.kv().await.entry(&key).await.ok().flatten().is_some(),
    )
    .await;
    let h = bucket.history(&key).await;
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0]["kind"], "reload");
    assert_eq!(h[0]["valid_from"]["seq"], 0);
    assert_eq!(column_names(&h[0]), ["id", "a"]);

    for (payload, why) in [
        (r#"{"tables": ["public.nope"]}"#, "does not exist"),
        (r#"{"tables": ["public.hidden"]}"#, "is not in publication"),
        ("public.t", "malformed request"),
        (r#"{"tables": []}"#, "at least one table"),
    ] {
        let r = request(&subject, payload).await;
        assert_eq!(r["ok"], false, "{payload}: {r}");
        assert!(r["error"].as_str().unwrap().contains(why), "{payload}: {r}");
        assert_eq!(r["retry"], false, "{payload}: {r}");
    }
    let reloads: i64 = c
        .query_one("SELECT count(*) FROM cdc_egress.reloads", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reloads, 1, "the refused requests started nothing");
    assert_eq!(
        stream_count(&db.stream, ">").await,
        stream_count(&db.stream, &format!("{}.>", db.prefix)).await,
        "the stream holds no control request"
    );
    assert!(d.stop().await.success());
    db.cleanup().await;
}

/// Every message of the stream, in sequence order: (subject, payload).
async fn stream_messages(stream: &str) -> Vec<(String, Value)> {
    let c = async_nats::connect(nats_url()).await.unwrap();
    let mut s = jetstream::new(c).get_stream(stream).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            let v = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
            out.push((m.subject.to_string(), v));
        }
    }
    out
}

/// With `nats.txn_events`, each transaction's change events are bracketed by one begin and one
/// commit event with its xid, commit LSN and change count, also across a crash after delivery
/// (everything after the confirmed LSN is replayed and deduplicated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_events_bracket_each_transaction_once() {
    let db = TestDb::new("txnev").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE public.t (id int PRIMARY KEY, a text); \
         CREATE TABLE public.u (id int PRIMARY KEY); \
         CREATE TABLE public.quiet (id int PRIMARY KEY); \
         CREATE PUBLICATION {} FOR TABLE public.t, public.u",
        db.publication
    ))
    .await
    .unwrap();
    let mut env = db.daemon_env(&db.out_url());
    env.push(("CDC_EGRESS_NATS_CHANGE_EVENTS".into(), "true".into()));
    env.push(("CDC_EGRESS_NATS_TXN_EVENTS".into(), "true".into()));
    let transactions = [
        "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 3) g",
        "BEGIN; UPDATE t SET a = 'y' WHERE id = 1; INSERT INTO u VALUES (1); DELETE FROM t WHERE id = 3; COMMIT",
        "INSERT INTO quiet VALUES (1)",
        "INSERT INTO u SELECT g FROM generate_series(2, 6) g",
    ];
    // The first batch's notice aborts the daemon: the next run replays these transactions.
    db.crash_at_first_notice(&env, &transactions[..2], CATCH_UP)
        .await;
    let d = Daemon::start(&env, db.dir.path(), &[], "second.log");
    for sql in &transactions[2..] {
        c.batch_execute(sql).await.unwrap();
    }
    db.wait_caught_up(CATCH_UP).await;
    assert!(d.stop().await.success());

    let events: Vec<(String, Value)> = stream_messages(&db.stream)
        .await
        .into_iter()
        .filter(|(s, _)| s.contains(".txn.") || s.contains(".change."))
        .collect();
    let begin = format!("{}.{}.txn.begin", db.prefix, db.slot);
    let commit = format!("{}.{}.txn.commit", db.prefix, db.slot);
    // Split into transactions: begin, its changes, commit; nothing outside a bracket.
    let mut txns: Vec<(Value, Vec<Value>, Value)> = Vec::new();
    let mut open: Option<(Value, Vec<Value>)> = None;
    for (subject, v) in events {
        if subject == begin {
            assert!(open.is_none(), "begin inside a transaction: {v}");
            open = Some((v, Vec::new()));
        } else if subject == commit {
            let (b, changes) = open.take().expect("commit after a begin");
            txns.push((b, changes, v));
        } else {
            let (b, changes) = open.as_mut().expect("a change event inside a bracket");
            assert_eq!(v["commit_lsn"], b["commit_lsn"], "{v} in {b}");
            assert_eq!(v["xid"], b["xid"]);
            changes.push(v);
        }
    }
    assert!(open.is_none(), "every transaction is committed");
    let counts: Vec<usize> = txns.iter().map(|(_, ch, _)| ch.len()).collect();
    assert_eq!(
        counts,
        [3, 3, 5],
        "three transactions with events, once each: {txns:?}"
    );
    for (b, changes, cm) in &txns {
        assert_eq!(cm["changes"].as_u64().unwrap() as usize, changes.len());
        assert_eq!(b["changes"], 0);
        for k in ["commit_lsn", "xid", "commit_ts"] {
            assert_eq!(b[k], cm[k], "{k}");
        }
        let seqs: Vec<u64> = changes.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    }
    let ops: Vec<&str> = txns[1]
        .1
        .iter()
        .map(|v| v["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["update", "insert", "delete"]);
    db.cleanup().await;
}
