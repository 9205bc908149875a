//! Publish conformance: the operations of `cdc_egress::sink::notify::Publish` (see its `# Contract`),
//! written once as checks generic over a [`Backend`] and run against JetStream (a fresh stream per
//! check on the test nats-server, deleted afterwards) and against the in-memory double
//! `MemoryNotifier` that delivery tests stand on.

mod common;

use bytes::Bytes;
use cdc_egress::config::{NatsConfig, SecretUrl};
use cdc_egress::core::batch::Position;
use cdc_egress::error::Kind;
use cdc_egress::lsn::Lsn;
use cdc_egress::sink::notify::memory::MemoryNotifier;
use cdc_egress::sink::notify::schemas::{EntryPosition, SchemaEntry, SchemaHead};
use cdc_egress::sink::notify::{Notifier, Publish};
use cdc_egress::table::TableName;

/// What a check needs to read back beyond the trait.
trait Backend {
    type P: Publish;
    fn publisher(&self) -> &Self::P;
    /// Every stored message as (sequence, subject, payload), in sequence order.
    async fn stored(&self) -> Vec<(u64, String, Bytes)>;
}

/// A JetStream stream of its own, deleted on drop (also when the check panicked).
struct Js {
    notifier: Notifier,
    stream: String,
}

impl Backend for Js {
    type P = Notifier;
    fn publisher(&self) -> &Notifier {
        &self.notifier
    }
    async fn stored(&self) -> Vec<(u64, String, Bytes)> {
        self.notifier.recent(1000).await.unwrap()
    }
}

impl Drop for Js {
    fn drop(&mut self) {
        common::delete_stream_on_drop(self.stream.clone());
    }
}

impl Backend for MemoryNotifier {
    type P = MemoryNotifier;
    fn publisher(&self) -> &MemoryNotifier {
        self
    }
    async fn stored(&self) -> Vec<(u64, String, Bytes)> {
        self.published()
            .into_iter()
            .map(|m| (m.seq, m.subject, m.payload))
            .collect()
    }
}

fn orders() -> TableName {
    TableName::new("public", "orders")
}

fn accounts() -> TableName {
    TableName::new("sales", "accounts")
}

// ---------------------------------------------------------------------------------------------
// The suite.

async fn sequences_increase_over_all_subjects<B: Backend>(b: &B) {
    let p = b.publisher();
    let sent = [
        (p.batch_subject(&orders()), "b1", "one"),
        (p.reload_subject(&orders()), "r1", "two"),
        (p.batch_subject(&accounts()), "b2", "three"),
        (p.ddl_subject(&orders()), "d1", "four"),
        (p.batch_subject(&orders()), "b3", "five"),
    ];
    let mut seqs = Vec::new();
    for (subject, id, payload) in &sent {
        seqs.push(
            p.publish_once(subject, id, Bytes::from(*payload))
                .await
                .unwrap(),
        );
    }
    assert!(seqs[0] > 0, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let stored = b.stored().await;
    let expected: Vec<_> = seqs
        .iter()
        .zip(&sent)
        .map(|(s, (subject, _, payload))| (*s, subject.clone(), Bytes::from(*payload)))
        .collect();
    assert_eq!(stored, expected);
}

async fn the_same_id_again_returns_the_original_sequence<B: Backend>(b: &B) {
    let p = b.publisher();
    let subject = p.batch_subject(&orders());
    let payload = Bytes::from_static(b"{\"n\":1}");
    let seq = p
        .publish_once(&subject, "batch-1", payload.clone())
        .await
        .unwrap();
    assert_eq!(
        p.publish_once(&subject, "batch-1", payload.clone())
            .await
            .unwrap(),
        seq
    );
    // Still the last on its subject: the id names the notice, the payload is not compared.
    assert_eq!(
        p.publish_once(&subject, "batch-1", Bytes::from_static(b"other"))
            .await
            .unwrap(),
        seq
    );
    assert_eq!(b.stored().await, vec![(seq, subject, payload)]);
}

async fn a_repeat_behind_later_messages_returns_the_original_inside_the_window<B: Backend>(b: &B) {
    let p = b.publisher();
    let subject = p.batch_subject(&orders());
    let first = p
        .publish_once(&subject, "batch-1", Bytes::from("one"))
        .await
        .unwrap();
    let second = p
        .publish_once(&subject, "batch-2", Bytes::from("two"))
        .await
        .unwrap();
    assert!(first < second);
    assert_eq!(
        p.publish_once(&subject, "batch-1", Bytes::from("one"))
            .await
            .unwrap(),
        first
    );
    assert_eq!(b.stored().await.len(), 2);
}

async fn the_same_id_with_other_content_is_a_definite_collision<B: Backend>(b: &B) {
    let p = b.publisher();
    let a = p.batch_subject(&orders());
    let other = p.reload_subject(&orders());
    let seq = p
        .publish_once(&a, "same-id", Bytes::from("first"))
        .await
        .unwrap();
    let e = p
        .publish_once(&other, "same-id", Bytes::from("second"))
        .await
        .expect_err("an id collision is not a success");
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    assert!(e.to_string().contains("collision"), "{e}");
    assert_eq!(b.stored().await, vec![(seq, a, Bytes::from("first"))]);
}

async fn notice_subjects_are_built_from_the_prefix<B: Backend>(b: &B) {
    let p = b.publisher();
    let prefix = p.subject_prefix().to_string();
    let t = TableName::new("my.schema", "a b*");
    assert_eq!(
        p.batch_subject(&t),
        format!("{prefix}.batch.my%2Eschema.a%20b%2A")
    );
    assert_eq!(
        p.reload_subject(&t),
        format!("{prefix}.reload.my%2Eschema.a%20b%2A")
    );
    assert_eq!(
        p.ddl_subject(&t),
        format!("{prefix}.ddl.my%2Eschema.a%20b%2A")
    );
    // The subjects are really publishable (one token per name).
    let seq = p
        .publish_once(&p.batch_subject(&t), "odd", Bytes::from("x"))
        .await
        .unwrap();
    assert_eq!(
        b.stored().await,
        vec![(seq, p.batch_subject(&t), Bytes::from("x"))]
    );
}

/// A schema entry of `public.orders` holding from `(lsn, 1)` with columns `fingerprint`.
fn schema_entry(lsn: u64, fingerprint: &str) -> (SchemaHead, Bytes) {
    let head = SchemaHead {
        valid_from: Position::new(Lsn(lsn), 1),
        state: "present".into(),
        fingerprint: Some(fingerprint.into()),
    };
    let entry = SchemaEntry {
        source: "main".into(),
        table: "public.orders".into(),
        schema: "public".into(),
        table_name: "orders".into(),
        state: head.state.clone(),
        kind: "streaming".into(),
        valid_from: EntryPosition {
            commit_lsn: Lsn(lsn).to_string(),
            seq: 1,
        },
        schema_version: 1,
        schema_fingerprint: head.fingerprint.clone(),
        batch_id: format!("main/public/orders/{lsn}"),
        schema_yml: None,
        ddl_yml: None,
    };
    (head, entry.to_json())
}

/// A schema entry is written once; a repeat (a replay) or an older head writes nothing and is
/// reported current; a later head with other columns replaces it.
async fn schema_entries_only_move_forward<B: Backend>(b: &B) {
    let p = b.publisher();
    assert!(p.keeps_schemas());
    let key = "main.public.orders";
    let (v1, body1) = schema_entry(0x100, "a");
    assert!(!p.schema_current(key, &v1).await.unwrap(), "no entry yet");
    assert!(p.put_schema(key, &v1, body1.clone()).await.unwrap());
    assert!(p.schema_current(key, &v1).await.unwrap());
    assert!(!p.put_schema(key, &v1, body1).await.unwrap(), "a replay");
    let (old, body_old) = schema_entry(0x90, "b");
    assert!(p.schema_current(key, &old).await.unwrap());
    assert!(!p.put_schema(key, &old, body_old).await.unwrap(), "older");
    let (same, body_same) = schema_entry(0x180, "a");
    assert!(
        !p.put_schema(key, &same, body_same).await.unwrap(),
        "same columns"
    );
    let (v2, body2) = schema_entry(0x200, "b");
    assert!(!p.schema_current(key, &v2).await.unwrap());
    assert!(p.put_schema(key, &v2, body2).await.unwrap());
    assert!(p.schema_current(key, &v2).await.unwrap());
    assert!(
        !p.put_schema(key, &v1, schema_entry(0x100, "a").1)
            .await
            .unwrap(),
        "never back"
    );
}

/// Runs every check against a fresh backend from `fresh`.
async fn conformance<B: Backend, F: AsyncFnMut() -> B>(mut fresh: F) {
    macro_rules! check {
        ($f:ident) => {
            eprintln!("conformance check: {}", stringify!($f));
            $f(&fresh().await).await;
        };
    }
    check!(sequences_increase_over_all_subjects);
    check!(the_same_id_again_returns_the_original_sequence);
    check!(a_repeat_behind_later_messages_returns_the_original_inside_the_window);
    check!(the_same_id_with_other_content_is_a_definite_collision);
    check!(notice_subjects_are_built_from_the_prefix);
    check!(schema_entries_only_move_forward);
}

// ---------------------------------------------------------------------------------------------
// Backends.

#[tokio::test]
async fn in_memory() {
    conformance(async || MemoryNotifier::new("cdct_memory").with_schemas()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream() {
    conformance(async || {
        let name = common::unique("pubconf");
        let cfg = NatsConfig {
            url: Some(SecretUrl::new(common::nats_url())),
            stream: name.to_uppercase(),
            // The bucket `common::delete_stream` deletes with the stream.
            schema_bucket: Some(format!("{}_SCHEMAS", name.to_uppercase())),
            subject_prefix: name,
            source: "main".into(),
            change_events: cdc_egress::config::ChangeEvents::Off,
            txn_events: false,
            control_subject: None,
            auth: Default::default(),
        };
        let notifier = Notifier::connect(&cfg)
            .await
            .unwrap()
            .expect("a NATS URL gives a notifier");
        Js {
            notifier,
            stream: cfg.stream,
        }
    })
    .await;
}
