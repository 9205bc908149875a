//! JetStream notices against the real nats-server: `Notifier::publish_once` stores a notice exactly once
//! (see the `# Contract` of `cdc_egress::sink::notify`), also after the stream's duplicate window has passed,
//! and `Notifier::connect` fails clearly on a misconfigured stream or a server that is down.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use cdc_egress::config::{NatsConfig, SecretUrl};
use cdc_egress::sink::notify::Notifier;
use cdc_egress::table::TableName;

/// A unique stream and subject prefix; the stream is deleted on drop (also when the test panicked).
struct World {
    stream: String,
    prefix: String,
}

impl World {
    fn new(tag: &str) -> World {
        let name = common::unique(tag);
        World {
            stream: name.to_uppercase(),
            prefix: name,
        }
    }

    fn config(&self) -> NatsConfig {
        NatsConfig {
            url: Some(SecretUrl::new(common::nats_url())),
            stream: self.stream.clone(),
            subject_prefix: self.prefix.clone(),
            source: "main".into(),
            change_events: cdc_egress::config::ChangeEvents::Off,
            txn_events: false,
            schema_bucket: None,
            control_subject: None,
            auth: Default::default(),
        }
    }

    async fn notifier(&self) -> Notifier {
        Notifier::connect(&self.config())
            .await
            .unwrap()
            .expect("a NATS URL gives a notifier")
    }

    /// Creates the stream ourselves (before `Notifier::connect`) with the given duplicate window.
    async fn create_stream(&self, subjects: Vec<String>, duplicate_window: Duration) {
        // Retried like `Notifier`'s own creation: nats-server 2.9 can fail a creation that races
        // with another test deleting the account's last stream (error 10049).
        for attempt in 1.. {
            let created = js()
                .await
                .create_stream(stream::Config {
                    name: self.stream.clone(),
                    subjects: subjects.clone(),
                    storage: stream::StorageType::File,
                    duplicate_window,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => break,
                Err(e) if attempt < 5 => {
                    eprintln!("creating stream {} again: {e}", self.stream);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("create stream {}: {e}", self.stream),
            }
        }
    }

    async fn messages(&self) -> u64 {
        js().await
            .get_stream(&self.stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    }
}

impl Drop for World {
    fn drop(&mut self) {
        common::delete_stream_on_drop(self.stream.clone());
    }
}

async fn js() -> jetstream::Context {
    jetstream::new(async_nats::connect(common::nats_url()).await.unwrap())
}

/// Publishes with a `Nats-Msg-Id` but none of `publish_once`'s checks (what a crashed run had sent).
async fn raw_publish(subject: &str, msg_id: &str, payload: &'static [u8]) -> (u64, bool) {
    let ack = js()
        .await
        .send_publish(
            subject.to_string(),
            jetstream::message::PublishMessage::build()
                .payload(Bytes::from_static(payload))
                .message_id(msg_id),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    (ack.sequence, ack.duplicate)
}

fn table() -> TableName {
    TableName::new("public", "orders")
}

#[tokio::test]
async fn same_id_twice_returns_the_same_sequence_and_stores_one_message() {
    let w = World::new("once");
    let n = w.notifier().await;
    let subject = n.batch_subject(&table());
    assert_eq!(subject, format!("{}.main.batch.public.orders", w.prefix));
    let id = "public.orders/streaming/2024-01-01/A-B";
    let first = n
        .publish_once(&subject, id, Bytes::from_static(b"{\"n\":1}"))
        .await
        .unwrap();
    let again = n
        .publish_once(&subject, id, Bytes::from_static(b"{\"n\":1}"))
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(w.messages().await, 1);
    let m = js()
        .await
        .get_stream(&w.stream)
        .await
        .unwrap()
        .get_raw_message(first)
        .await
        .unwrap();
    assert_eq!(m.subject.as_str(), subject);
    assert_eq!(m.payload.as_ref(), b"{\"n\":1}");
    assert_eq!(
        m.headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str()),
        Some(id)
    );
}

#[tokio::test]
async fn different_ids_get_sequential_sequences() {
    let w = World::new("seq");
    let n = w.notifier().await;
    let a = n.batch_subject(&table());
    let b = n.batch_subject(&TableName::new("public", "accounts"));
    let mut seqs = Vec::new();
    for (subject, id) in [(&a, "1"), (&a, "2"), (&b, "3"), (&a, "4")] {
        seqs.push(
            n.publish_once(subject, id, Bytes::from(id.to_string()))
                .await
                .unwrap(),
        );
    }
    assert_eq!(seqs, vec![seqs[0], seqs[0] + 1, seqs[0] + 2, seqs[0] + 3]);
    assert_eq!(w.messages().await, 4);
    // Each was published on the condition that the subject's last message was the one before it on
    // that subject (0: none), so no other writer can have slipped in between.
    let s = js().await.get_stream(&w.stream).await.unwrap();
    let mut last_on: std::collections::HashMap<String, u64> = Default::default();
    for seq in &seqs {
        let m = s.get_raw_message(*seq).await.unwrap();
        let expected = m
            .headers
            .get(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE)
            .map(|v| v.as_str().to_string());
        let prev = last_on.insert(m.subject.to_string(), *seq).unwrap_or(0);
        assert_eq!(
            expected,
            Some(prev.to_string()),
            "message {seq} on {}",
            m.subject
        );
    }
    assert_eq!(common::stream_count(&w.stream, &a).await, 3);
    assert_eq!(common::stream_count(&w.stream, &b).await, 1);
}

/// The case the subject-sequence check exists for: the server has forgotten the id (the duplicate
/// window passed, e.g. a long restart), yet the notice is not stored twice.
#[tokio::test]
async fn same_id_after_the_duplicate_window_is_still_stored_once() {
    let w = World::new("window");
    let window = Duration::from_millis(200);
    w.create_stream(vec![format!("{}.>", w.prefix)], window)
        .await;
    let n = w.notifier().await;

    // First show that the server's own de-duplication really is over after the sleep.
    let probe = format!("{}.probe", w.prefix);
    let (p1, _) = raw_publish(&probe, "probe-id", b"p").await;
    let (p2, dup) = raw_publish(&probe, "probe-id", b"p").await;
    assert_eq!((p2, dup), (p1, true), "inside the window the server dedups");
    tokio::time::sleep(window * 3).await;
    let (p3, dup) = raw_publish(&probe, "probe-id", b"p").await;
    assert!(
        !dup && p3 > p1,
        "after the window the server stores it again"
    );

    // publish_once, a restart beyond the window, publish_once again: one message.
    let subject = n.batch_subject(&table());
    let first = n
        .publish_once(&subject, "batch-1", Bytes::from_static(b"one"))
        .await
        .unwrap();
    tokio::time::sleep(window * 3).await;
    let again = w
        .notifier()
        .await
        .publish_once(&subject, "batch-1", Bytes::from_static(b"one"))
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(common::stream_count(&w.stream, &subject).await, 1);

    // A previous run published (without recording the sequence) and crashed; beyond the window the
    // retry finds that message instead of adding a second one.
    let ddl = n.ddl_subject(&table());
    let (crashed, _) = raw_publish(&ddl, "ddl-7", b"ddl").await;
    tokio::time::sleep(window * 3).await;
    let seq = n
        .publish_once(&ddl, "ddl-7", Bytes::from_static(b"ddl"))
        .await
        .unwrap();
    assert_eq!(seq, crashed);
    assert_eq!(common::stream_count(&w.stream, &ddl).await, 1);

    // The next batch on the subject is stored normally.
    let next = n
        .publish_once(&subject, "batch-2", Bytes::from_static(b"two"))
        .await
        .unwrap();
    assert!(next > first);
    assert_eq!(common::stream_count(&w.stream, &subject).await, 2);
    assert_eq!(w.messages().await, 5, "probe 2, batches 2, ddl 1");
}

/// Several publishers racing on one subject: the expected-last-subject-sequence condition makes the
/// losers re-read and retry; every distinct notice lands exactly once, a shared id once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_publishers_neither_lose_nor_duplicate() {
    let w = World::new("race");
    let n = w.notifier().await;
    let subject = n.batch_subject(&table());
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (n, subject) = (n.clone(), subject.clone());
            tokio::spawn(async move {
                n.publish_once(&subject, &format!("distinct-{i}"), Bytes::from("d"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 4, "distinct notices get distinct sequences");
    assert_eq!(common::stream_count(&w.stream, &subject).await, 4);

    let other = n.reload_subject(&table());
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (n, other) = (n.clone(), other.clone());
            tokio::spawn(async move {
                n.publish_once(&other, "shared", Bytes::from("s"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    assert!(seqs.iter().all(|s| *s == seqs[0]), "{seqs:?}");
    assert_eq!(common::stream_count(&w.stream, &other).await, 1);
}

/// Schema and table names with NATS-reserved characters stay one subject token each.
#[tokio::test]
async fn reserved_characters_in_names_stay_one_token() {
    let w = World::new("tokens");
    let n = w.notifier().await;
    let t = TableName::new("my.schema", "a b*>%");
    let subject = n.batch_subject(&t);
    assert_eq!(
        subject,
        format!("{}.main.batch.my%2Eschema.a%20b%2A%3E%25", w.prefix)
    );
    n.publish_once(&subject, "x", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(
        common::stream_count(&w.stream, &format!("{}.main.batch.*.*", w.prefix)).await,
        1
    );
    let change = n.change_subject(&t, "insert");
    assert_eq!(
        change,
        format!("{}.main.change.my%2Eschema.a%20b%2A%3E%25.insert", w.prefix)
    );
}

#[tokio::test]
async fn stream_without_the_prefix_subjects_is_a_definite_error() {
    let w = World::new("wrongsubj");
    let other = format!("{}_other.>", w.prefix);
    w.create_stream(vec![other.clone()], Duration::from_secs(120))
        .await;
    let e = match Notifier::connect(&w.config()).await {
        Ok(_) => panic!(
            "connect accepted a stream that does not capture {}.>",
            w.prefix
        ),
        Err(e) => e,
    };
    assert!(!e.is_transient(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&w.stream), "names the stream: {msg}");
    assert!(
        msg.contains(&format!("{}.>", w.prefix)),
        "names the subjects: {msg}"
    );
    // The existing stream was left as it was.
    let info = js()
        .await
        .get_stream(&w.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .subjects
        .clone();
    assert_eq!(info, vec![other]);
}

#[tokio::test]
async fn connect_creates_a_file_stream_on_the_prefix() {
    let w = World::new("created");
    w.notifier().await;
    let config = js()
        .await
        .get_stream(&w.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(config.subjects, vec![format!("{}.>", w.prefix)]);
    assert_eq!(config.storage, stream::StorageType::File);
    // A second connect finds it and is fine with it.
    w.notifier().await;
}

#[tokio::test]
async fn nats_down_is_transient_and_names_the_url() {
    for (url, shown) in [
        ("nats://127.0.0.1:1", "nats://127.0.0.1:1"),
        ("nats://egress:Pa55w0rdX@127.0.0.1:1", "127.0.0.1:1"),
    ] {
        let cfg = NatsConfig {
            url: Some(SecretUrl::new(url)),
            stream: "UNUSED".into(),
            subject_prefix: "unused".into(),
            source: "main".into(),
            change_events: cdc_egress::config::ChangeEvents::Off,
            txn_events: false,
            schema_bucket: None,
            control_subject: None,
            auth: Default::default(),
        };
        // A guard against a hang, not a measurement: the connection is refused at once.
        let e = match tokio::time::timeout(Duration::from_secs(120), Notifier::connect(&cfg)).await
        {
            Err(_) => panic!("connecting to {url} hangs instead of failing"),
            Ok(Ok(_)) => panic!("connected to {url}"),
            Ok(Err(e)) => e,
        };
        assert!(e.is_transient(), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(shown), "names the server: {msg}");
        assert!(!msg.contains("Pa55w0rdX"), "leaks the password: {msg}");
    }
}

#[tokio::test]
async fn no_url_means_no_notices() {
    let cfg = NatsConfig {
        url: None,
        stream: "UNUSED".into(),
        subject_prefix: "unused".into(),
        source: "main".into(),
        change_events: cdc_egress::config::ChangeEvents::Off,
        txn_events: false,
        schema_bucket: None,
        control_subject: None,
        auth: Default::default(),
    };
    assert!(Notifier::connect(&cfg).await.unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// Message ids per registry incarnation; collisions; one-shot readers.

/// A registry recreated next to a surviving stream (the demo recreates its database) restarts its
/// reload ids at 1. Ids carry the registry's incarnation, so the new notice is stored, not dropped
/// as a duplicate of the old run's.
#[tokio::test]
async fn a_recreated_registry_never_reuses_an_old_runs_ids() {
    let t = World::new("incarn");
    let subject = format!("{}.reload.public.t", t.prefix);
    let old = t.notifier().await.with_incarnation("aaaaaaaaaaaa");
    let new = t.notifier().await.with_incarnation("bbbbbbbbbbbb");
    let s1 = old
        .publish_once(
            &subject,
            "reload-1",
            Bytes::from_static(b"{\"cut\":\"0/1\"}"),
        )
        .await
        .unwrap();
    let s2 = new
        .publish_once(
            &subject,
            "reload-1",
            Bytes::from_static(b"{\"cut\":\"0/2\"}"),
        )
        .await
        .unwrap();
    assert_ne!(s1, s2, "the new run's notice is a new message");
    assert_eq!(common::stream_count(&t.stream, &subject).await, 2);
}

/// JetStream calling a publish a duplicate while the last message on the subject is not ours means
/// another message holds the id: reported as a collision, never a silent drop.
#[tokio::test]
async fn an_id_collision_is_an_error_not_a_silent_drop() {
    let t = World::new("collide");
    let n = t.notifier().await.with_incarnation("cccccccccccc");
    let a = format!("{}.batch.public.a", t.prefix);
    let b = format!("{}.batch.public.b", t.prefix);
    n.publish_once(&a, "same-id", Bytes::from_static(b"first"))
        .await
        .unwrap();
    let err = n
        .publish_once(&b, "same-id", Bytes::from_static(b"second"))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("collision") && err.to_string().contains(&a),
        "names what collided: {err}"
    );
    assert_eq!(common::stream_count(&t.stream, &b).await, 0);
}

/// A notice published before ids carried the incarnation is recognised by its payload after an
/// upgrade, so completing it at start-up does not publish it twice.
#[tokio::test]
async fn a_notice_from_before_the_upgrade_is_recognised() {
    let t = World::new("legacy");
    let subject = format!("{}.batch.public.t", t.prefix);
    let legacy = t.notifier().await;
    let payload = Bytes::from_static(b"{\"batch_id\":\"x\"}");
    let s1 = legacy
        .publish_once(&subject, "x", payload.clone())
        .await
        .unwrap();
    let upgraded = t.notifier().await.with_incarnation("dddddddddddd");
    let s2 = upgraded.publish_once(&subject, "x", payload).await.unwrap();
    assert_eq!(s1, s2);
    assert_eq!(common::stream_count(&t.stream, &subject).await, 1);
}

/// `cdc-egress notices` reads a stream; it must not create one.
#[tokio::test]
async fn readers_do_not_create_the_stream() {
    let t = World::new("nocreate");
    let err = match Notifier::open_existing(&t.config()).await {
        Ok(_) => panic!("opened a stream that does not exist"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(
        js().await.get_stream(&t.stream).await.is_err(),
        "the stream was not created"
    );
}

/// NATS credentials come from files; a file that cannot be read is a configuration error naming
/// the key, before anything connects.
#[tokio::test]
async fn credential_files_are_read_and_named_when_missing() {
    let t = World::new("creds");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cr3t-token\n").unwrap();
    // The test server takes no auth; a token it does not need is accepted.
    let mut cfg = t.config();
    cfg.auth.token_file = Some(token);
    Notifier::connect(&cfg).await.unwrap().unwrap();
    for (set, key) in [
        (0, "nats.token_file"),
        (1, "nats.creds_file"),
        (2, "nats.nkey_file"),
    ] {
        let mut cfg = t.config();
        let missing = Some(dir.path().join("missing"));
        match set {
            0 => cfg.auth.token_file = missing,
            1 => cfg.auth.creds_file = missing,
            _ => cfg.auth.nkey_file = missing,
        }
        let err = match Notifier::connect(&cfg).await {
            Ok(_) => panic!("{key}: connected with a missing file"),
            Err(e) => e,
        };
        assert!(err.is_config(), "{key}: {err}");
        assert!(err.to_string().contains(key), "{key}: {err}");
    }
}
