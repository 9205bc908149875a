//! Object store conformance: the operations of `cdc_egress::sink::store::Store` (see its `# Contract`) and
//! `write::remove_orphans`, written once as functions taking a `&Store` and run against every backend
//! we can run here: the local filesystem, an S3-compatible server (moto), Azure Blob Storage (Azurite)
//! and Google Cloud Storage (fake-gcs-server), all on loopback.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;

use cdc_egress::error::Kind;
use cdc_egress::sink::layout::Namespace;
use cdc_egress::sink::store::Store;
use cdc_egress::sink::store::PART_SIZE;
use cdc_egress::sink::upload::remove_orphans;
use cdc_egress::table::TableName;
use common::gcs::{gcs_endpoint, gcs_options, GcsAdapter};
use common::{s3_options, unique_bucket};
use object_store::path::{Path, PathPart};
use sha2::Digest;

/// What a check needs to know about the backend beyond the `Store` itself.
enum Backend {
    File {
        dir: PathBuf,
    },
    /// An object store: `scheme://bucket/...` URLs, opened with `options`.
    Remote {
        scheme: &'static str,
        bucket: String,
        options: BTreeMap<String, String>,
        /// S3 reports a multipart upload in the ETag (`…-<parts>`).
        multipart_etag: bool,
        /// Whether the test server implements multipart uploads (objects above `PART_SIZE`).
        multipart: bool,
    },
}

impl Ctx {
    fn multipart(&self) -> bool {
        !matches!(
            self.backend,
            Backend::Remote {
                multipart: false,
                ..
            }
        )
    }
}

struct Ctx {
    backend: Backend,
    /// Local scratch space for `put_file` sources.
    scratch: tempfile::TempDir,
}

/// `<root>/<rel>`, each `/`-separated segment of `rel` encoded as one path part.
fn at(store: &Store, rel: &str) -> Path {
    Path::from_iter(
        store
            .root()
            .parts()
            .chain(rel.split('/').map(|s| PathPart::from(s.to_string()))),
    )
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

fn scratch_file(ctx: &Ctx, name: &str, bytes: &[u8]) -> PathBuf {
    let p = ctx.scratch.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------
// Helpers for the object stores.

/// Fetches a `scheme://bucket/key` URL as a consumer would: the key is the URL's path, literally.
async fn fetch_url(backend: &Backend, url: &str) -> Vec<u8> {
    let Backend::Remote {
        scheme,
        bucket,
        options,
        ..
    } = backend
    else {
        panic!("{url}: not an object store URL")
    };
    let key = url
        .strip_prefix(&format!("{scheme}://{bucket}/"))
        .unwrap_or_else(|| panic!("{url} is not in {scheme}://{bucket}/"));
    let bucket_store = Store::open(&format!("{scheme}://{bucket}"), options).unwrap();
    bucket_store
        .get(&Path::parse(key).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .to_vec()
}

// ---------------------------------------------------------------------------------------------
// The suite.

async fn put_bytes_and_get_round_trip(store: &Store, _ctx: &Ctx) {
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let p = at(store, "rt/all-bytes.bin");
    store.put_bytes(&p, all_bytes.clone()).await.unwrap();
    assert_eq!(store.get(&p).await.unwrap(), all_bytes);

    let empty = at(store, "rt/empty");
    store.put_bytes(&empty, Vec::new()).await.unwrap();
    assert!(store.get(&empty).await.unwrap().is_empty());
    assert!(store.exists(&empty).await.unwrap());

    let missing = at(store, "rt/missing.bin");
    let e = store
        .get(&missing)
        .await
        .expect_err("get of a missing object");
    assert!(
        e.to_string().contains("rt/missing.bin"),
        "the error names the object: {e}"
    );
}

async fn put_file_small_round_trip(store: &Store, ctx: &Ctx) {
    let data = noise(1000, 7);
    let f = scratch_file(ctx, "small", &data);
    let p = at(store, "file/small.bin");
    store.put_file(&p, &f, data.len() as u64).await.unwrap();
    assert_eq!(store.get(&p).await.unwrap(), data);

    // Exactly one part's worth still goes up in one request, and round-trips.
    let data = noise(PART_SIZE, 8);
    let f = scratch_file(ctx, "one-part", &data);
    let p = at(store, "file/one-part.bin");
    store.put_file(&p, &f, data.len() as u64).await.unwrap();
    let got = store.get(&p).await.unwrap();
    assert!(got == data, "PART_SIZE file differs after round trip");
}

/// Above [`PART_SIZE`] the multipart path runs; on S3 the ETag of a multipart object says so.
async fn put_file_large_round_trip(store: &Store, ctx: &Ctx) {
    for (name, len, parts) in [
        ("large.bin", 12 * 1024 * 1024 + 123, 3),
        ("part-and-a-byte.bin", PART_SIZE + 1, 2),
    ] {
        let data = noise(len, len as u64);
        let f = scratch_file(ctx, name, &data);
        let p = at(store, &format!("file/{name}"));
        store.put_file(&p, &f, len as u64).await.unwrap();
        let got = store.get(&p).await.unwrap();
        assert_eq!(got.len(), len, "{name}: length after round trip");
        assert!(
            sha(&got) == sha(&data),
            "{name}: content differs after round trip"
        );
        let listed = store.list(&at(store, "file")).await.unwrap();
        let meta = listed
            .iter()
            .find(|m| m.location == p)
            .unwrap_or_else(|| panic!("{name} not listed"));
        assert_eq!(meta.size, len as u64);
        if let Backend::Remote {
            multipart_etag: true,
            ..
        } = &ctx.backend
        {
            let etag = meta.e_tag.as_deref().unwrap_or_default().trim_matches('"');
            assert!(
                etag.ends_with(&format!("-{parts}")),
                "{name}: expected a {parts}-part multipart upload, ETag is {etag:?}"
            );
        }
    }
}

/// Uploads side by side share the store's memory budget (`UPLOAD_BUDGET`, one part): large and
/// small files started together all complete (none waits forever on another's share), each intact.
async fn concurrent_uploads_share_the_budget(store: &Store, ctx: &Ctx) {
    let mut files = Vec::new();
    for (i, len) in [
        11 * 1024 * 1024 + 7,
        PART_SIZE,
        3 * 1024 * 1024,
        100,
        2 * PART_SIZE + 1,
        4 * 1024 * 1024 + 5,
    ]
    .into_iter()
    .enumerate()
    {
        // Without multipart support only the single-request sizes are sent.
        if len > PART_SIZE && !ctx.multipart() {
            continue;
        }
        let data = noise(len, 100 + i as u64);
        let f = scratch_file(ctx, &format!("side-{i}.bin"), &data);
        files.push((at(store, &format!("side/{i}.bin")), f, data));
    }
    let uploads = files
        .iter()
        .map(|(p, f, data)| store.put_file(p, f, data.len() as u64));
    let results = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        futures::future::join_all(uploads),
    )
    .await
    .expect("uploads side by side did not complete within 120 s");
    for ((p, _, data), r) in files.iter().zip(results) {
        r.unwrap_or_else(|e| panic!("{p}: {e}"));
        let got = store.get(p).await.unwrap();
        assert!(sha(&got) == sha(data), "{p}: content differs");
    }
}

/// A spool file whose size is not the one recorded (it grew, or it is short) is an error, and no
/// object appears: the sizes and checksums in the registry always describe the object's bytes.
async fn put_file_refuses_a_file_of_another_size(store: &Store, ctx: &Ctx) {
    let mut sizes = vec![1000usize];
    if ctx.multipart() {
        sizes.push(PART_SIZE + 1000);
    }
    for len in sizes {
        let data = noise(len, 7 + len as u64);
        let f = scratch_file(ctx, &format!("sized-{len}.bin"), &data);
        for (claimed, what) in [(len - 1, "longer"), (len + 1, "shorter")] {
            let p = at(store, &format!("sized/{len}-{what}.bin"));
            let e = store
                .put_file(&p, &f, claimed as u64)
                .await
                .expect_err(&format!(
                    "a {len}-byte file {what} than {claimed} was uploaded"
                ));
            assert!(
                e.to_string().contains(&f.display().to_string()),
                "the error names the spool file: {e}"
            );
            assert!(
                !store.exists(&p).await.unwrap(),
                "{p} exists after a failed upload"
            );
        }
    }
}

async fn overwrite_with_same_bytes_is_harmless(store: &Store, ctx: &Ctx) {
    let data = noise(2048, 11);
    let p = at(store, "over/x.bin");
    store.put_bytes(&p, data.clone()).await.unwrap();
    store.put_bytes(&p, data.clone()).await.unwrap();
    assert_eq!(store.get(&p).await.unwrap(), data);

    let big = noise(PART_SIZE + 4096, 12);
    let f = scratch_file(ctx, "over-big", &big);
    let q = at(store, "over/big.bin");
    if ctx.multipart() {
        store.put_file(&q, &f, big.len() as u64).await.unwrap();
        store.put_file(&q, &f, big.len() as u64).await.unwrap();
        assert!(store.get(&q).await.unwrap() == big);
    } else {
        store
            .put_bytes(&q, b"no multipart here".to_vec())
            .await
            .unwrap();
    }

    let listed: Vec<Path> = store
        .list(&at(store, "over"))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.location)
        .collect();
    assert_eq!(listed.len(), 2, "one object per name: {listed:?}");
}

async fn exists_true_and_false(store: &Store, _ctx: &Ctx) {
    let p = at(store, "ex/dir/obj");
    assert!(!store.exists(&p).await.unwrap());
    store.put_bytes(&p, b"x".to_vec()).await.unwrap();
    assert!(store.exists(&p).await.unwrap());
    assert!(!store.exists(&at(store, "ex/dir/obj2")).await.unwrap());
    // A "directory" is not an object.
    assert!(!store.exists(&at(store, "ex/dir")).await.unwrap());
}

async fn list_under_a_prefix(store: &Store, _ctx: &Ctx) {
    let objects = [
        ("list/x/1", 1usize),
        ("list/x/2", 22),
        ("list/x/sub/3", 333),
        ("list/y/4", 4),
        // Shares the string prefix `list` but not the path segment: never part of list("list").
        ("listing/5", 5),
    ];
    for (rel, len) in objects {
        store
            .put_bytes(&at(store, rel), vec![b'a'; len])
            .await
            .unwrap();
    }
    let listed = |v: Vec<object_store::ObjectMeta>| -> BTreeSet<(String, u64)> {
        v.into_iter()
            .map(|m| (m.location.to_string(), m.size))
            .collect()
    };
    let want = |rels: &[(&str, usize)]| -> BTreeSet<(String, u64)> {
        rels.iter()
            .map(|(r, n)| (at(store, r).to_string(), *n as u64))
            .collect()
    };
    assert_eq!(
        listed(store.list(&at(store, "list/x")).await.unwrap()),
        want(&objects[..3])
    );
    assert_eq!(
        listed(store.list(&at(store, "list")).await.unwrap()),
        want(&objects[..4])
    );
    assert!(store
        .list(&at(store, "list/none"))
        .await
        .unwrap()
        .is_empty());
}

async fn list_dirs_names_the_children(store: &Store, _ctx: &Ctx) {
    for rel in ["dirs/a/1", "dirs/a/deep/2", "dirs/b/3", "dirs/file-at-top"] {
        store
            .put_bytes(&at(store, rel), b"d".to_vec())
            .await
            .unwrap();
    }
    let dirs: BTreeSet<String> = store
        .list_dirs(&at(store, "dirs"))
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(dirs, BTreeSet::from(["a".to_string(), "b".to_string()]));
    assert_eq!(
        store.list_dirs(&at(store, "dirs/a")).await.unwrap(),
        vec!["deep".to_string()]
    );
    assert!(store
        .list_dirs(&at(store, "dirs/nothing"))
        .await
        .unwrap()
        .is_empty());
}

async fn delete_and_delete_missing(store: &Store, _ctx: &Ctx) {
    let p = at(store, "del/one");
    let keep = at(store, "del/two");
    store.put_bytes(&p, b"1".to_vec()).await.unwrap();
    store.put_bytes(&keep, b"2".to_vec()).await.unwrap();
    store.delete(&p).await.unwrap();
    assert!(!store.exists(&p).await.unwrap());
    assert!(store.get(&p).await.is_err());
    assert!(
        store.exists(&keep).await.unwrap(),
        "only the named object goes"
    );
    store
        .delete(&p)
        .await
        .expect("deleting a missing object is Ok");
    store
        .delete(&at(store, "del/never-was"))
        .await
        .expect("deleting a never-written object is Ok");
    let left: Vec<String> = store
        .list(&at(store, "del"))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    assert_eq!(left, vec![keep.to_string()]);
}

async fn url_of_shape(store: &Store, ctx: &Ctx) {
    let p = at(store, "urls/public.t/data.csv.gz");
    store.put_bytes(&p, b"u".to_vec()).await.unwrap();
    let url = store.url_of(&p);
    match &ctx.backend {
        Backend::File { dir } => {
            let abs = dir.canonicalize().unwrap();
            assert_eq!(
                url,
                url::Url::from_file_path(abs.join("urls/public.t/data.csv.gz"))
                    .unwrap()
                    .to_string()
            );
            assert!(url.starts_with("file:///"), "{url}");
            let file = url::Url::parse(&url).unwrap().to_file_path().unwrap();
            assert_eq!(std::fs::read(file).unwrap(), b"u");
        }
        backend @ Backend::Remote { scheme, bucket, .. } => {
            assert_eq!(
                url,
                format!(
                    "{scheme}://{bucket}/{}/urls/public.t/data.csv.gz",
                    store.root()
                )
            );
            assert_eq!(fetch_url(backend, &url).await, b"u");
        }
    }
}

/// A segment with spaces, unicode, `%` and characters `object_store` escapes round-trips, lists as
/// the same path, and its URL names the stored object (S3: the key, literally).
async fn odd_path_segments(store: &Store, ctx: &Ctx) {
    for (i, seg) in ODD_SEGMENTS.iter().enumerate() {
        let p = at(store, &format!("odd/{seg}/v.txt"));
        let body = format!("content {i} of {seg}");
        store.put_bytes(&p, body.clone()).await.unwrap();
        assert_eq!(store.get(&p).await.unwrap(), body.as_bytes(), "{seg:?}");
        assert!(store.exists(&p).await.unwrap(), "{seg:?}");
        let listed: Vec<Path> = store
            .list(&at(store, &format!("odd/{seg}")))
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.location)
            .collect();
        assert_eq!(listed, vec![p.clone()], "{seg:?}");
        let url = store.url_of(&p);
        match &ctx.backend {
            backend @ Backend::Remote { .. } => {
                assert_eq!(fetch_url(backend, &url).await, body.as_bytes(), "{url}");
            }
            // Names object_store does not escape give a file URL of the file itself (escaped ones:
            // see `file_url_of_escaped_names_resolves_to_the_object`).
            Backend::File { .. } if p.as_ref().contains('%') => {}
            Backend::File { .. } => {
                let file = url::Url::parse(&url).unwrap().to_file_path().unwrap();
                assert_eq!(std::fs::read(&file).unwrap(), body.as_bytes(), "{url}");
            }
        }
    }
    let dirs: BTreeSet<String> = store
        .list_dirs(&at(store, "odd"))
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(dirs.len(), 6, "{dirs:?}");
    assert!(dirs.contains("a b"), "{dirs:?}");
}

const ODD_SEGMENTS: [&str; 6] = [
    "a b",
    "ünï cödé 🦀",
    "100%",
    "%41",
    "we#ird?*<x>",
    "tab\tand\"quote",
];

/// What `list_dirs` returns must name the directory again: the daemon passes each name to
/// `remove_orphans` as a table directory, which encodes it into a path part.
async fn list_dirs_names_round_trip(store: &Store, _ctx: &Ctx) {
    for seg in ODD_SEGMENTS {
        store
            .put_bytes(&at(store, &format!("rtdirs/{seg}/v")), seg.to_string())
            .await
            .unwrap();
    }
    let dirs: BTreeSet<String> = store
        .list_dirs(&at(store, "rtdirs"))
        .await
        .unwrap()
        .into_iter()
        .collect();
    let want: BTreeSet<String> = ODD_SEGMENTS.iter().map(|s| s.to_string()).collect();
    assert_eq!(dirs, want);
    // What the daemon does with each name: use it as a path part and list below it.
    for d in &dirs {
        assert!(
            !store
                .list(&at(store, &format!("rtdirs/{d}")))
                .await
                .unwrap()
                .is_empty(),
            "list_dirs name {d:?} names no directory"
        );
    }
}

/// `remove_orphans` deletes batch directories without a manifest that are not committed, on the
/// dates it is given (all dates when none), and nothing else.
async fn remove_orphans_on_a_fake_layout(store: &Store, _ctx: &Ctx) {
    const A: &str = "0000000001000000.00000000-0000000001000100.00000002";
    const C: &str = "0000000001000200.00000000-0000000001000300.00000000";
    const E: &str = "0000000001000400.00000000-0000000001000500.00000001";
    const G: &str = "0000000002000000.00000000-0000000002000100.00000000";
    let ns = Namespace::new(store.root(), "orph");
    let table = TableName::new("public", "t");
    let t = ns.table_key(&table);
    assert_eq!(t, "orph/public/t");
    let orphan_day1 = [
        format!("{t}/streaming/2024-01-01/{A}/data.csv.gz"),
        format!("{t}/streaming/2024-01-01/{A}/schema.yml"),
    ];
    let orphan_day2 = [format!("{t}/streaming/2024-01-02/{G}/data.csv.gz")];
    let kept = [
        // complete: has its manifest
        format!("{t}/streaming/2024-01-01/{C}/data.csv.gz"),
        format!("{t}/streaming/2024-01-01/{C}/schema.yml"),
        format!("{t}/streaming/2024-01-01/{C}/manifest.json"),
        // no manifest yet, but committed in the registry (a crash between register and manifest)
        format!("{t}/streaming/2024-01-01/{E}/data.csv.gz"),
        // reload files, other tables and other sources' tables are never touched
        format!("{t}/reload/1/part-00001.csv.gz"),
        format!("orph/public/other/streaming/2024-01-01/{A}/data.csv.gz"),
        format!("other/public/t/streaming/2024-01-01/{A}/data.csv.gz"),
    ];
    for rel in orphan_day1.iter().chain(&orphan_day2).chain(&kept) {
        store
            .put_bytes(&at(store, rel), b"x".to_vec())
            .await
            .unwrap();
    }
    let committed: HashSet<String> = [format!("{t}/streaming/2024-01-01/{E}")].into();

    let n = remove_orphans(
        store,
        &ns,
        &table,
        Some(&["2024-01-01".to_string()]),
        &committed,
    )
    .await
    .unwrap();
    assert_eq!(n, 2, "the two objects of the orphan on 2024-01-01");
    for rel in &orphan_day1 {
        assert!(!store.exists(&at(store, rel)).await.unwrap(), "{rel} kept");
    }
    assert!(
        store.exists(&at(store, &orphan_day2[0])).await.unwrap(),
        "dates not asked for are not touched"
    );

    let n = remove_orphans(store, &ns, &table, None, &committed)
        .await
        .unwrap();
    assert_eq!(n, 1, "all dates: the orphan on 2024-01-02");
    assert!(!store.exists(&at(store, &orphan_day2[0])).await.unwrap());
    for rel in &kept {
        assert!(
            store.exists(&at(store, rel)).await.unwrap(),
            "{rel} deleted"
        );
    }
    assert_eq!(
        remove_orphans(store, &ns, &table, None, &committed)
            .await
            .unwrap(),
        0,
        "idempotent"
    );
    // Without the committed set, the committed directory without a manifest is an orphan.
    assert_eq!(
        remove_orphans(store, &ns, &table, None, &HashSet::new())
            .await
            .unwrap(),
        1
    );
}

async fn conformance(store: &Store, ctx: &Ctx) {
    macro_rules! check {
        ($f:ident) => {
            eprintln!("conformance check: {}", stringify!($f));
            $f(store, ctx).await;
        };
    }
    check!(put_bytes_and_get_round_trip);
    check!(put_file_small_round_trip);
    if ctx.multipart() {
        check!(put_file_large_round_trip);
    } else {
        eprintln!("conformance check: put_file_large_round_trip SKIPPED (the test server has no multipart upload)");
    }
    check!(concurrent_uploads_share_the_budget);
    check!(put_file_refuses_a_file_of_another_size);
    check!(overwrite_with_same_bytes_is_harmless);
    check!(exists_true_and_false);
    check!(list_under_a_prefix);
    check!(list_dirs_names_the_children);
    check!(delete_and_delete_missing);
    check!(url_of_shape);
    check!(odd_path_segments);
    check!(remove_orphans_on_a_fake_layout);
}

// ---------------------------------------------------------------------------------------------
// Backends.

/// The object stores the suite runs against, each a server on loopback.
#[derive(Clone, Copy, Debug)]
enum Cloud {
    S3,
    Azure,
    /// fake-gcs-server behind the adapter of `tests/common/gcs.rs` (no multipart uploads).
    Gcs,
}

/// A fresh, empty bucket (container) on `cloud`'s test server: its scheme, name and options
/// (GCS: through `adapter`).
async fn create_bucket(
    cloud: Cloud,
    tag: &str,
    adapter: Option<&GcsAdapter>,
) -> (&'static str, String, BTreeMap<String, String>) {
    let bucket = unique_bucket(tag);
    match cloud {
        Cloud::S3 => {
            let endpoint = common::s3_endpoint();
            common::create_bucket(&endpoint, &bucket).await;
            ("s3", bucket, s3_options(&endpoint))
        }
        Cloud::Azure => {
            let endpoint = common::azure_endpoint();
            common::azure_container(&endpoint, "PUT", &bucket).await;
            ("az", bucket, common::azure_options(&endpoint))
        }
        Cloud::Gcs => {
            common::gcs::create_gcs_bucket(&gcs_endpoint(), &bucket).await;
            ("gs", bucket, gcs_options(&adapter.unwrap().url))
        }
    }
}

/// Deletes every object of the bucket, then the bucket.
async fn drop_bucket(cloud: Cloud, bucket: &str) {
    match cloud {
        Cloud::S3 => {
            let endpoint = common::s3_endpoint();
            let store = Store::open(&format!("s3://{bucket}"), &s3_options(&endpoint)).unwrap();
            for m in store.list(&Path::default()).await.unwrap() {
                store.delete(&m.location).await.unwrap();
            }
            let (status, body) =
                common::http_request(&endpoint, "DELETE", &format!("/{bucket}"), &[], b"").await;
            assert!(
                status == 204 || status == 200,
                "delete bucket: {status} {body}"
            );
        }
        // Deleting a container deletes its blobs.
        Cloud::Azure => common::azure_container(&common::azure_endpoint(), "DELETE", bucket).await,
        Cloud::Gcs => common::gcs::drop_gcs_bucket(&gcs_endpoint(), bucket).await,
    }
}

/// A store in a fresh temporary directory (with a space in its name).
fn local_store() -> (tempfile::TempDir, Store, Ctx) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("out root");
    let store = Store::open(&format!("file://{}", root.display()), &BTreeMap::new()).unwrap();
    assert!(root.is_dir(), "open creates the directory");
    let ctx = Ctx {
        backend: Backend::File { dir: root },
        scratch: tempfile::tempdir().unwrap(),
    };
    (dir, store, ctx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_filesystem() {
    let (_dir, store, ctx) = local_store();
    conformance(&store, &ctx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_list_dirs_names_round_trip() {
    let (_dir, store, ctx) = local_store();
    list_dirs_names_round_trip(&store, &ctx).await;
}

/// Runs `check` against a fresh bucket of `cloud` (below a two-segment root prefix), then deletes
/// the bucket, also when the check panicked.
async fn with_remote_store<F, Fut>(cloud: Cloud, tag: &str, check: F)
where
    F: FnOnce(Store, Ctx) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let adapter = match cloud {
        Cloud::Gcs => Some(GcsAdapter::start(&gcs_endpoint()).await),
        _ => None,
    };
    let (scheme, bucket, options) = create_bucket(cloud, tag, adapter.as_ref()).await;
    let store = Store::open(&format!("{scheme}://{bucket}/conformance/root"), &options).unwrap();
    assert_eq!(store.root().as_ref(), "conformance/root");
    let ctx = Ctx {
        backend: Backend::Remote {
            scheme,
            bucket: bucket.clone(),
            options: options.clone(),
            multipart_etag: matches!(cloud, Cloud::S3),
            multipart: !matches!(cloud, Cloud::Gcs),
        },
        scratch: tempfile::tempdir().unwrap(),
    };
    let result = tokio::spawn(check(store, ctx)).await;
    // Nothing was written outside the root.
    let everything = Store::open(&format!("{scheme}://{bucket}"), &options)
        .unwrap()
        .list(&Path::default())
        .await;
    drop_bucket(cloud, &bucket).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
    let everything = everything.unwrap();
    assert!(!everything.is_empty());
    for m in &everything {
        assert!(
            m.location.as_ref().starts_with("conformance/root/"),
            "{cloud:?}: {} is outside the root",
            m.location
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_compatible_server() {
    with_remote_store(Cloud::S3, "conf", |store, ctx| async move {
        conformance(&store, &ctx).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_list_dirs_names_round_trip() {
    with_remote_store(Cloud::S3, "dirs", |store, ctx| async move {
        list_dirs_names_round_trip(&store, &ctx).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_blob_emulator() {
    with_remote_store(Cloud::Azure, "azconf", |store, ctx| async move {
        conformance(&store, &ctx).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_list_dirs_names_round_trip() {
    with_remote_store(Cloud::Azure, "azdirs", |store, ctx| async move {
        list_dirs_names_round_trip(&store, &ctx).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_emulator() {
    with_remote_store(Cloud::Gcs, "gsconf", |store, ctx| async move {
        conformance(&store, &ctx).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_list_dirs_names_round_trip() {
    with_remote_store(Cloud::Gcs, "gsdirs", |store, ctx| async move {
        list_dirs_names_round_trip(&store, &ctx).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Opening: errors are definite and say what is wrong.

fn open_err(url: &str, options: &BTreeMap<String, String>) -> cdc_egress::error::Error {
    match Store::open(url, options) {
        Ok(_) => panic!("Store::open({url:?}) succeeded"),
        Err(e) => e,
    }
}

#[test]
fn open_errors_are_definite_and_named() {
    let none = BTreeMap::new();
    for (url, needle) in [
        ("ftp://host/dir", "ftp"),
        ("http://127.0.0.1:5000/bucket", "http"),
        ("s3://", "bucket"),
        ("gs:///", "bucket"),
        ("file://", "directory"),
        ("just-a-path/out", "not a URL"),
    ] {
        let e = open_err(url, &none);
        assert_eq!(e.kind(), Kind::Definite, "{url}: {e}");
        assert!(e.to_string().contains(needle), "{url}: {e}");
    }

    // A directory that cannot be created: the message names it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let under = file.join("sub");
    let e = open_err(&format!("file://{}", under.display()), &none);
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    assert!(e.to_string().contains(&under.display().to_string()), "{e}");

    // A value object_store cannot parse.
    let mut opts = s3_options("http://127.0.0.1:5000");
    opts.insert("aws_allow_http".into(), "maybe".into());
    let e = open_err("s3://some-bucket/p", &opts);
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    assert!(e.to_string().contains("maybe"), "{e}");
}

/// A misspelt option must not be ignored: `aws_endpont` silently dropped means writing to real AWS.
#[test]
fn open_rejects_unknown_option_keys() {
    let mut opts = s3_options("http://127.0.0.1:5000");
    let endpoint = opts.remove("aws_endpoint").unwrap();
    opts.insert("aws_endpont".into(), endpoint);
    let e = open_err("s3://some-bucket/p", &opts);
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    assert!(e.to_string().contains("aws_endpont"), "{e}");
}

/// The Azure and GCS options the tests and the README use are accepted; a misspelt key is named, and
/// a malformed service-account key is a definite error that does not repeat its value.
#[test]
fn azure_and_gcs_options() {
    Store::open("az://c/p", &common::azure_options("http://127.0.0.1:10000")).unwrap();
    Store::open("gs://b/p", &gcs_options("http://127.0.0.1:4443")).unwrap();
    for (url, key) in [
        ("az://c/p", "azure_storage_acount_key"),
        ("gs://b/p", "google_service_acount_key"),
        ("gs://b/p", "aws_endpoint"),
    ] {
        let e = open_err(url, &[(key.to_string(), "x".to_string())].into());
        assert_eq!(e.kind(), Kind::Definite, "{e}");
        assert!(e.to_string().contains(key), "{e}");
    }
    let e = open_err(
        "gs://b/p",
        &[(
            "google_service_account_key".to_string(),
            "{not json s3cr3t".to_string(),
        )]
        .into(),
    );
    assert_eq!(e.kind(), Kind::Definite, "{e}");
    assert!(!e.to_string().contains("s3cr3t"), "{e}");
}

/// A bucket that does not exist cannot be detected without the network; the first write fails and
/// says which bucket.
#[tokio::test]
async fn missing_bucket_is_named_on_first_write() {
    let endpoint = common::s3_endpoint();
    let bucket = unique_bucket("nobucket");
    let store = Store::open(&format!("s3://{bucket}/p"), &s3_options(&endpoint)).unwrap();
    let e = store
        .put_bytes(&at(&store, "x"), b"x".to_vec())
        .await
        .expect_err("put into a missing bucket");
    let msg = e.to_string();
    assert!(
        msg.contains("NoSuchBucket") || msg.contains(&bucket),
        "the error says the bucket is missing: {msg}"
    );
}

/// The file URL of an object whose name `object_store` had to escape must still name that object.
#[tokio::test]
async fn file_url_of_escaped_names_resolves_to_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &format!("file://{}", dir.path().display()),
        &BTreeMap::new(),
    )
    .unwrap();
    for seg in ["café", "100%", "we#ird?"] {
        let p = at(&store, &format!("{seg}/v.txt"));
        store.put_bytes(&p, seg.to_string()).await.unwrap();
        let url = store.url_of(&p);
        let file = url::Url::parse(&url).unwrap().to_file_path().unwrap();
        assert_eq!(
            std::fs::read(&file).ok().as_deref(),
            Some(seg.as_bytes()),
            "{url} decodes to {}, which is not the object",
            file.display()
        );
    }
}

/// A local upload killed in the middle leaves `<name>#<n>`, which listings hide but a reader of the
/// directory sees: writing the directory's manifest removes it (and nothing else).
#[tokio::test]
async fn a_manifest_clears_stale_staging_files_of_interrupted_local_uploads() {
    let (_dir, store, ctx) = local_store();
    let Backend::File { dir: root } = &ctx.backend else {
        unreachable!()
    };
    let batch = Path::from("public.t/reload/7");
    store
        .put_bytes(&batch.clone().join("part-00001.csv.gz"), b"data".to_vec())
        .await
        .unwrap();
    let on_disk = root.join("public.t/reload/7");
    std::fs::write(on_disk.join("part-00002.csv.gz#1"), b"half").unwrap();
    std::fs::write(on_disk.join("keep#me"), b"not a staging name").unwrap();
    cdc_egress::sink::upload::put_manifest(
        &store,
        &batch.clone().join("manifest.json"),
        b"{}".to_vec(),
    )
    .await
    .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&on_disk)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["keep#me", "manifest.json", "part-00001.csv.gz"]);
}

/// Start-up orphan removal also clears what local uploads killed in the middle left: `<name>#<n>`
/// files, hidden from listings, including in a directory that holds nothing else.
#[tokio::test]
async fn orphan_removal_clears_staging_files_of_interrupted_local_uploads() {
    let (_dir, store, ctx) = local_store();
    let Backend::File { dir: root } = &ctx.backend else {
        unreachable!()
    };
    let ns = Namespace::new(store.root(), "src");
    let table = TableName::new("public", "t");
    let day = root.join("src/public/t/streaming/2024-01-01");
    let only_staging = day.join("0000000001000000.00000000-0000000001000100.00000002");
    let orphan = day.join("0000000001000200.00000000-0000000001000300.00000000");
    std::fs::create_dir_all(&only_staging).unwrap();
    std::fs::write(only_staging.join("data.csv.gz#1"), b"half").unwrap();
    let data = ns
        .table_dir(&table)
        .join("streaming")
        .join("2024-01-01")
        .join("0000000001000200.00000000-0000000001000300.00000000")
        .join("data.csv.gz");
    store.put_bytes(&data, b"x".to_vec()).await.unwrap();
    std::fs::write(orphan.join("schema.yml#2"), b"half").unwrap();
    let n = remove_orphans(
        &store,
        &ns,
        &table,
        Some(&["2024-01-01".to_string()]),
        &HashSet::new(),
    )
    .await
    .unwrap();
    assert_eq!(n, 3, "the orphan's data file and both staging files");
    for d in [&only_staging, &orphan] {
        let left = std::fs::read_dir(d).map_or(0, |r| r.flatten().count());
        assert_eq!(left, 0, "{} still holds files", d.display());
    }
}
