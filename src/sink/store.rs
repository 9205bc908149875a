//! The object store behind `output.url`, and the few operations the pipeline needs from it.
//!
//! # Contract
//! - `put_bytes` and `put_file` are atomic: a reader sees the whole object or nothing (object_store
//!   guarantees this for single puts and completed multipart uploads; the local backend writes a
//!   temporary file and renames it).
//! - `put_file` streams from disk in parts of [`PART_SIZE`], one part in memory at a time; memory does
//!   not grow with the file.
//! - Writing the same object twice with the same bytes is harmless (names are deterministic).
//! - Errors are classified: authentication/permission/invalid-path problems are definite; everything
//!   else (network, throttling, 5xx) is transient and retried by the caller.
//!
//! The conformance suite in `tests/store_conformance.rs` runs these operations against every backend,
//! each a server on loopback: the local filesystem, S3 (moto), Azure (Azurite) and GCS
//! (fake-gcs-server, which has no multipart upload, so the large-file checks are skipped there).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::error::{Component, Error, Kind};

/// Multipart part size (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 5 * 1024 * 1024;
/// How much of a spool file `put_file` reads at a time (a divisor of [`PART_SIZE`]).
const READ_CHUNK: usize = 1024 * 1024;
/// The file data the `put_file` calls sharing one budget hold in memory at once, at most (the
/// streaming delivery's budget; [`Store::with_own_budget`] gives the reload exporter its own): a
/// whole part, or small files side by side (the usual streaming batch) within one part's size plus
/// one read. A file or part of `PART_SIZE` waits until the others are stored. Without it, two 5 MiB
/// files uploaded at once added 10 MiB to the daemon's peak RSS (`benches/throughput.sh`, change
/// events).
pub const UPLOAD_BUDGET: usize = PART_SIZE + READ_CHUNK;

fn upload_budget() -> Arc<tokio::sync::Semaphore> {
    budget_of(UPLOAD_BUDGET)
}

fn budget_of(bytes: usize) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(bytes.max(UPLOAD_BUDGET) / 1024))
}

const SCHEMES: &[&str] = &[
    "file", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl",
];

/// Validates `output.url` without touching the network.
pub fn check_output_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not a URL; expected file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"))?;
    if !SCHEMES.contains(&scheme) {
        return Err(format!(
            "unsupported scheme {scheme:?}; expected one of {}",
            SCHEMES.join(", ")
        ));
    }
    if scheme != "file" && rest.trim_matches('/').is_empty() {
        return Err(format!("{url:?} names no bucket or container"));
    }
    if scheme == "file" && rest.is_empty() {
        return Err("file:// URL names no directory".into());
    }
    Ok(())
}

fn parsed_scheme(url: &str) -> &str {
    url.split_once("://").map(|(s, _)| s).unwrap_or("")
}

/// Rejects option keys the backend does not know (object_store would silently ignore a misspelt
/// `aws_endpont` and talk to the real cloud).
fn check_option_keys(scheme: &str, options: &BTreeMap<String, String>) -> Result<(), Error> {
    for key in options.keys() {
        if !is_option_key(scheme, key) {
            return Err(Error::definite(
                Component::Config,
                format!("output.options.{key} is not an option of the {scheme}:// backend (see the object_store configuration keys; any of them can also be given as <key>_file)"),
            ));
        }
    }
    Ok(())
}

/// Whether `key` is a configuration key of the `scheme` backend (or of every client).
fn is_option_key(scheme: &str, key: &str) -> bool {
    use std::str::FromStr;
    let k = key.to_ascii_lowercase();
    object_store::ClientConfigKey::from_str(&k).is_ok()
        || match scheme {
            "s3" | "s3a" => object_store::aws::AmazonS3ConfigKey::from_str(&k).is_ok(),
            "gs" => object_store::gcp::GoogleConfigKey::from_str(&k).is_ok(),
            _ => object_store::azure::AzureConfigKey::from_str(&k).is_ok(),
        }
}

/// `<key>_file = <path>` gives the value of `<key>` from a file (its content without the trailing
/// newline), so credentials such as `aws_secret_access_key_file` can come from mounted secrets.
/// Keys the backend itself takes as paths (`aws_web_identity_token_file`, …) pass unchanged.
fn options_from_files(
    scheme: &str,
    options: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (key, value) in options {
        match key.strip_suffix("_file") {
            Some(base) if !is_option_key(scheme, key) && is_option_key(scheme, base) => {
                if options.contains_key(base) {
                    return Err(Error::definite(
                        Component::Config,
                        format!("output.options.{base} and output.options.{key} are both set: keep one of them"),
                    ));
                }
                let text = std::fs::read_to_string(value).map_err(|e| {
                    Error::definite(
                        Component::Config,
                        format!("output.options.{key} {value}: {e}"),
                    )
                })?;
                out.insert(
                    base.to_string(),
                    text.trim_end_matches(['\n', '\r']).to_string(),
                );
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(out)
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// File data that `put_file` calls of this store (and its clones) may hold in memory at once,
    /// in KiB: [`UPLOAD_BUDGET`].
    budget: Arc<tokio::sync::Semaphore>,
    root: Path,
    /// The directory of a `file://` store (object names are stored as escaped file names in it).
    local_dir: Option<std::path::PathBuf>,
    /// Prefix of every object URL shown to users (`s3://bucket`, `file:///abs/dir`), without root.
    base_url: String,
}

fn classify(op: &str, path: &Path, e: object_store::Error) -> Error {
    let kind = match e {
        object_store::Error::InvalidPath { .. }
        | object_store::Error::NotSupported { .. }
        | object_store::Error::NotImplemented { .. }
        | object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }
        | object_store::Error::UnknownConfigurationKey { .. } => Kind::Definite,
        _ => Kind::Transient,
    };
    Error::caused_by(
        kind,
        Component::ObjectStore,
        format!("object store {op} {path}"),
        e,
    )
}

impl Store {
    /// Opens the store for `url` with `options` (object_store configuration keys such as
    /// `aws_endpoint`, `aws_region`, `aws_allow_http`, `aws_access_key_id`). A relative `file://`
    /// path is resolved against the current directory and created.
    pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Store, Error> {
        check_output_url(url)
            .map_err(|e| Error::definite(Component::Config, format!("output.url: {e}")))?;
        if let Some(rest) = url.strip_prefix("file://") {
            let dir = std::path::Path::new(rest);
            let dir = if dir.is_absolute() {
                dir.to_path_buf()
            } else {
                std::env::current_dir()
                    .map_err(|e| {
                        Error::definite(Component::Config, format!("current directory: {e}"))
                    })?
                    .join(dir)
            };
            std::fs::create_dir_all(&dir).map_err(|e| {
                Error::definite(
                    Component::ObjectStore,
                    format!("cannot create output directory {}: {e}", dir.display()),
                )
            })?;
            let dir = dir.canonicalize().map_err(|e| {
                Error::definite(Component::ObjectStore, format!("{}: {e}", dir.display()))
            })?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| {
                    Error::definite(Component::ObjectStore, format!("{}: {e}", dir.display()))
                })?
                .with_automatic_cleanup(true);
            if let Some(k) = options.keys().next() {
                return Err(Error::definite(
                    Component::Config,
                    format!("output.options.{k}: a file:// output takes no options"),
                ));
            }
            return Ok(Store {
                inner: Arc::new(fs),
                budget: upload_budget(),
                root: Path::default(),
                base_url: format!("file://{}", dir.display()),
                local_dir: Some(dir),
            });
        }
        // The HTTP client of a cloud store takes its TLS provider from the process default.
        crate::pg::install_default_provider();
        let options = &options_from_files(parsed_scheme(url), options)?;
        check_option_keys(parsed_scheme(url), options)?;
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::definite(Component::Config, format!("output.url {url:?}: {e}")))?;
        let (store, root) = object_store::parse_url_opts(&parsed, options.iter()).map_err(|e| {
            Error::definite(
                Component::Config,
                format!("output.url {url:?} with output.options: {e}"),
            )
        })?;
        let base_url = format!(
            "{}://{}",
            parsed.scheme(),
            parsed.host_str().unwrap_or_default()
        );
        Ok(Store {
            inner: Arc::from(store),
            budget: upload_budget(),
            root,
            base_url,
            local_dir: None,
        })
    }

    /// The same store with a budget of its own of `bytes` (at least [`UPLOAD_BUDGET`]) for its
    /// `put_file` calls and those of its clones: the reload exporter's parallel workers upload
    /// their parts side by side, and never queue streaming batches behind them.
    pub fn with_own_budget(&self, bytes: usize) -> Store {
        Store {
            budget: budget_of(bytes),
            ..self.clone()
        }
    }

    /// The configured prefix inside the bucket (empty for the local filesystem).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The URL a user or consumer would use for `path`. For `file://` stores it is a proper file URL
    /// of the escaped file name on disk (so decoding it gives that file); for object stores it is
    /// `scheme://bucket/key` with the key as stored.
    pub fn url_of(&self, path: &Path) -> String {
        match &self.local_dir {
            Some(dir) => url::Url::from_file_path(dir.join(path.as_ref()))
                .map(|u| u.to_string())
                .unwrap_or_else(|_| format!("{}/{}", self.base_url, path)),
            None => format!("{}/{}", self.base_url, path),
        }
    }

    /// Removes what interrupted uploads left in the directory `dir` of a `file://` store: the
    /// local backend writes a multipart upload to `<name>#<n>` and renames it when complete, so a
    /// process killed in the middle leaves that file behind, invisible to listings but visible to
    /// anyone reading the directory. Call it only for a directory whose uploads are all complete
    /// (right before its `manifest.json` is written): any staging file left there is stale. A no-op
    /// on object stores, whose unfinished multipart uploads are invisible.
    pub fn remove_stale_staging(&self, dir: &Path) -> Result<usize, Error> {
        let Some(root) = &self.local_dir else {
            return Ok(0);
        };
        let dir = root.join(dir.as_ref());
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(Error::transient(
                    Component::ObjectStore,
                    format!("list {}: {e}", dir.display()),
                ))
            }
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let is_staging =
                name.to_str()
                    .and_then(|n| n.rsplit_once('#'))
                    .is_some_and(|(stem, n)| {
                        !stem.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                    });
            if is_staging && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// [`Store::remove_stale_staging`] for `dir` and each directory directly below it; for a
    /// caller that knows no upload into any of them is running.
    pub fn remove_stale_staging_below(&self, dir: &Path) -> Result<usize, Error> {
        let Some(root) = &self.local_dir else {
            return Ok(0);
        };
        let mut removed = self.remove_stale_staging(dir)?;
        let subdirs = match std::fs::read_dir(root.join(dir.as_ref())) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => {
                return Err(Error::transient(
                    Component::ObjectStore,
                    format!("list {}: {e}", root.join(dir.as_ref()).display()),
                ))
            }
        };
        for entry in subdirs.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if let Some(name) = entry.file_name().to_str() {
                    // On disk the segment is as the store encoded it.
                    let sub = Path::parse(format!("{dir}/{name}")).unwrap_or_else(|_| dir.clone());
                    removed += self.remove_stale_staging(&sub)?;
                }
            }
        }
        Ok(removed)
    }

    pub async fn put_bytes(
        &self,
        path: &Path,
        bytes: impl Into<bytes::Bytes>,
    ) -> Result<(), Error> {
        self.inner
            .put(path, PutPayload::from(bytes.into()))
            .await
            .map(|_| ())
            .map_err(|e| classify("put", path, e))
    }

    /// Uploads a local file, in one request when small, else as a multipart upload of
    /// [`PART_SIZE`] parts, one at a time: the next part is gathered only once the previous one is
    /// stored, so an upload holds at most one part in memory (ARCHITECTURE.md, invariant 4).
    pub async fn put_file(
        &self,
        path: &Path,
        file: &std::path::Path,
        len: u64,
    ) -> Result<(), Error> {
        let read_err = |e: std::io::Error| {
            Error::transient(
                Component::Spool,
                format!("cannot read spool file {}: {e}", file.display()),
            )
        };
        // Each piece of the file in memory holds its share of the budget until it is stored; a
        // piece takes its whole share at once, so two uploads never wait on each other's halves.
        let budget = |bytes: usize| {
            let kib = bytes.div_ceil(1024).clamp(1, UPLOAD_BUDGET / 1024) as u32;
            self.budget.clone().acquire_many_owned(kib)
        };
        let wrong_size = |got: u64| {
            Error::transient(
                Component::Spool,
                format!(
                    "spool file {} does not hold the {len} bytes written to it (found {got}{})",
                    file.display(),
                    if got > len { " or more" } else { "" }
                ),
            )
        };
        if len <= PART_SIZE as u64 {
            let _held = budget(len as usize)
                .await
                .expect("the budget is never closed");
            let mut bytes = Vec::with_capacity(len as usize);
            let f = tokio::fs::File::open(file).await.map_err(read_err)?;
            // One byte more than expected shows a file that grew.
            f.take(len + 1)
                .read_to_end(&mut bytes)
                .await
                .map_err(read_err)?;
            if bytes.len() as u64 != len {
                return Err(wrong_size(bytes.len() as u64));
            }
            return self.put_bytes(path, bytes).await;
        }
        let mut f = tokio::fs::File::open(file).await.map_err(read_err)?;
        let upload = self
            .inner
            .put_multipart(path)
            .await
            .map_err(|e| classify("put_multipart", path, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        // Every failure after this point aborts the upload, so no incomplete multipart upload
        // is left behind (they are billed until a lifecycle rule removes them).
        let gathered: Result<_, Error> = async {
            let mut left = len;
            let mut held = None;
            while left > 0 {
                if held.is_some() {
                    // The previous part is stored before the next one is gathered.
                    writer
                        .wait_for_capacity(1)
                        .await
                        .map_err(|e| classify("upload part", path, e))?;
                    drop(held.take());
                }
                // One part: its share of the budget, then its chunks read whole and handed over
                // without a copy (a full part's last chunk starts its upload).
                let part = left.min(PART_SIZE as u64) as usize;
                held = Some(budget(part).await.expect("the budget is never closed"));
                let mut gathered = 0;
                while gathered < part {
                    let mut chunk = bytes::BytesMut::zeroed(READ_CHUNK.min(part - gathered));
                    f.read_exact(&mut chunk).await.map_err(read_err)?;
                    gathered += chunk.len();
                    writer.put(chunk.freeze());
                }
                left -= part as u64;
            }
            if f.read(&mut [0u8; 1]).await.map_err(read_err)? != 0 {
                return Err(wrong_size(len + 1));
            }
            Ok(held)
        }
        .await;
        let held = match gathered {
            Ok(held) => held,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        };
        // `finish` uploads the last part (when shorter than PART_SIZE) and completes the upload
        // (aborting it on failure); the last share of the budget is held until then.
        let done = writer
            .finish()
            .await
            .map(|_| ())
            .map_err(|e| classify("complete multipart", path, e));
        drop(held);
        done
    }

    pub async fn get(&self, path: &Path) -> Result<bytes::Bytes, Error> {
        let r = self
            .inner
            .get(path)
            .await
            .map_err(|e| classify("get", path, e))?;
        r.bytes().await.map_err(|e| classify("get", path, e))
    }

    /// [`Store::get`], with a missing object as `None` rather than an error (a reader that knows
    /// the object must exist decides what its absence means).
    pub async fn get_opt(&self, path: &Path) -> Result<Option<bytes::Bytes>, Error> {
        match self.inner.get(path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| classify("get", path, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(classify("get", path, e)),
        }
    }

    pub async fn exists(&self, path: &Path) -> Result<bool, Error> {
        match self.inner.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(classify("head", path, e)),
        }
    }

    /// Every object below `prefix`, in no particular order.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>, Error> {
        self.inner
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| classify("list", prefix, e))
    }

    /// The names of the "directories" directly below `prefix` (common prefixes of a delimited listing).
    pub async fn list_dirs(&self, prefix: &Path) -> Result<Vec<String>, Error> {
        let r = self
            .inner
            .list_with_delimiter(Some(prefix))
            .await
            .map_err(|e| classify("list", prefix, e))?;
        // Names come back escaped (`100%25`); return them as they were given, so that callers can
        // use them as path parts again.
        Ok(r.common_prefixes
            .iter()
            .filter_map(|p| p.filename())
            .map(|f| {
                percent_encoding::percent_decode_str(f)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect())
    }

    /// Deletes an object; a missing object is not an error.
    pub async fn delete(&self, path: &Path) -> Result<(), Error> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify("delete", path, e)),
        }
    }
}
