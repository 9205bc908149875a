//! A small consumer of cdc-egress batch notices, using only async-nats and object_store (plus
//! flate2, sha2 and serde_json): it follows `<prefix>.<source>.batch.>` with a durable JetStream
//! consumer and lands each batch's CSV rows in a local directory, exactly once.
//!
//! ```text
//! cargo run --example notice_consumer -- nats://127.0.0.1:4222 CDC_EGRESS_DEMO 'demo.shop.batch.>' landing/
//! ```
//!
//! The rules it follows (README "Notices" and "What it writes"):
//! - the notice is the batch's `manifest.json`: `data_url` names the gzipped CSV, `checksum` its
//!   sha256, `rows` its data rows;
//! - a notice is acknowledged only after its file is landed, so a crash redelivers it;
//! - landing is idempotent: each batch becomes `<dir>/<batch id>.csv` (`<source>/<schema>/<table>/
//!   streaming/<date>/<first>-<last>.csv`, names encoded as in the output), written to a temporary
//!   name and renamed, so a redelivered notice rewrites the same file with the same bytes and a
//!   reader never sees half a file. Batches of a table sort by date and name in commit order.
//!
//! Object store options (credentials, endpoints) come from `OBJECT_STORE_<KEY>` environment
//! variables, e.g. `OBJECT_STORE_AWS_ENDPOINT=http://127.0.0.1:5000`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use sha2::Digest;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the consumer follows and where it lands the rows.
#[derive(Debug, Clone)]
pub struct Options {
    pub nats_url: String,
    pub stream: String,
    /// e.g. `demo.shop.batch.>`
    pub subject: String,
    /// The durable consumer's name: progress survives restarts under it.
    pub durable: String,
    pub landing: PathBuf,
}

/// The part of a notice this consumer needs.
#[derive(Debug, serde::Deserialize)]
pub struct Notice {
    /// The batch's folder below the output root: `<source>/<schema>/<table>/…`, names encoded.
    pub batch_id: String,
    pub data_url: String,
    pub checksum: String,
    pub rows: u64,
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub batches: u64,
    pub rows: u64,
}

/// Lands notices until none arrives for `idle` (`None`: forever).
pub async fn follow(opts: &Options, idle: Option<Duration>) -> Result<Stats, BoxError> {
    let client = async_nats::connect(&opts.nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&opts.stream).await?;
    let consumer = stream
        .get_or_create_consumer(
            &opts.durable,
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(opts.durable.clone()),
                filter_subject: opts.subject.clone(),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(60),
                ..Default::default()
            },
        )
        .await?;
    let mut stats = Stats::default();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(64)
            .expires(idle.unwrap_or(Duration::from_secs(5)))
            .messages()
            .await?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message?;
            let notice: Notice = serde_json::from_slice(&message.payload)?;
            stats.rows += land(&notice, &opts.landing).await?;
            stats.batches += 1;
            got += 1;
            // Acknowledged only once landed; the double ack waits for the server's confirmation.
            message.double_ack().await?;
        }
        if got == 0 && idle.is_some() {
            return Ok(stats);
        }
    }
}

/// Downloads, checks and lands one batch; returns its data rows.
pub async fn land(notice: &Notice, landing: &Path) -> Result<u64, BoxError> {
    let url = url::Url::parse(&notice.data_url)?;
    let options: Vec<(String, String)> = std::env::vars()
        .filter_map(|(k, v)| {
            k.strip_prefix("OBJECT_STORE_")
                .map(|k| (k.to_lowercase(), v))
        })
        .collect();
    let (store, path) = object_store::parse_url_opts(&url, options)?;
    let data = store.get(&path).await?.bytes().await?;
    let sum = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
    if sum != notice.checksum {
        return Err(format!(
            "{}: checksum {sum}, notice says {}",
            notice.data_url, notice.checksum
        )
        .into());
    }
    let mut csv = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&data[..]), &mut csv)?;
    // Rows never hold a bare newline outside quotes except as record ends; counting records needs
    // the quotes, so count line ends outside them.
    let (mut records, mut quoted) = (0u64, false);
    for &b in &csv {
        match b {
            b'"' => quoted = !quoted,
            b'\n' if !quoted => records += 1,
            _ => {}
        }
    }
    let rows = records.saturating_sub(1);
    if rows != notice.rows {
        return Err(format!(
            "{}: {rows} rows, notice says {}",
            notice.data_url, notice.rows
        )
        .into());
    }
    // The batch id is the batch's directory below the output root, each segment encoded (README
    // "What it writes": `/`, `.`, `..` and the like are percent-encoded), so it is a safe relative
    // path with a folder of its own per table; its last segment, `<first>-<last>`, sorts in commit
    // order.
    let segments: Vec<&str> = notice.batch_id.split('/').collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == ".." || s.contains('\\'))
    {
        return Err(format!("unexpected batch id {:?}", notice.batch_id).into());
    }
    let (name, parents) = segments.split_last().ok_or("an empty batch id")?;
    let dir = parents.iter().fold(landing.to_path_buf(), |d, s| d.join(s));
    tokio::fs::create_dir_all(&dir).await?;
    let tmp = dir.join(format!(".{name}.tmp"));
    tokio::fs::write(&tmp, &csv).await?;
    tokio::fs::File::open(&tmp).await?.sync_all().await?;
    tokio::fs::rename(&tmp, dir.join(format!("{name}.csv"))).await?;
    Ok(rows)
}

#[allow(dead_code)] // an integration test includes this file for `follow` and `land`
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [nats_url, stream, subject, landing] = &args[..] else {
        eprintln!("usage: notice_consumer NATS_URL STREAM SUBJECT LANDING_DIR");
        std::process::exit(2);
    };
    let opts = Options {
        nats_url: nats_url.clone(),
        stream: stream.clone(),
        subject: subject.clone(),
        durable: "notice_consumer_example".into(),
        landing: landing.into(),
    };
    let stats = follow(&opts, None).await?;
    println!("landed {} batches, {} rows", stats.batches, stats.rows);
    Ok(())
}
