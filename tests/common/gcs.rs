//! Google Cloud Storage for the tests: fake-gcs-server (`CDC_EGRESS_TEST_GCS_ENDPOINT`), reached
//! through a small loopback adapter.
//!
//! object_store talks to GCS through the XML API. fake-gcs-server, the GCS emulator the package
//! registries offer, serves that API's GET, HEAD, listing and DELETE as GCS does, but not its two
//! write calls:
//! - a plain `PUT /<bucket>/<object>`: it takes that only as a signed-URL upload (with an
//!   `X-Goog-Algorithm` query parameter) and then answers without the `ETag` header GCS sends and
//!   object_store requires;
//! - the XML multipart upload (`POST ?uploads`, `PUT ?partNumber&uploadId`, `POST ?uploadId`).
//!
//! [`GcsAdapter`] forwards every request unchanged, except that it sends a plain object PUT as the
//! emulator's signed-URL upload and adds the object's ETag to the answer, and answers multipart
//! requests with 501. So the GCS tests run object_store's GCS client, with this project's options,
//! against the emulator, except for multipart uploads (objects above `PART_SIZE`), which no
//! emulator available here implements.

use std::collections::BTreeMap;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The fake-gcs-server address, or a panic that says how to get one (not silently skipped).
pub fn gcs_endpoint() -> String {
    let u = std::env::var("CDC_EGRESS_TEST_GCS_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "CDC_EGRESS_TEST_GCS_ENDPOINT is not set: run the tests with deploy/test.sh (it starts \
             fake-gcs-server), or run `bash deploy/local/services.sh --gcs` and export \
             CDC_EGRESS_TEST_GCS_ENDPOINT=http://127.0.0.1:4443"
        )
    });
    super::assert_loopback(&u);
    u.trim_end_matches('/').to_string()
}

/// `output.options` for a `gs://bucket/prefix` output served at `base_url`: a service-account key
/// that turns OAuth off and names the server (object_store's way to reach a GCS emulator).
pub fn gcs_options(base_url: &str) -> BTreeMap<String, String> {
    let key = serde_json::json!({
        "gcs_base_url": base_url,
        "disable_oauth": true,
        "client_email": "",
        "private_key": "",
        "private_key_id": "",
    });
    [("google_service_account_key".to_string(), key.to_string())].into()
}

/// Creates a bucket on fake-gcs-server (JSON API, no authentication).
pub async fn create_gcs_bucket(endpoint: &str, bucket: &str) {
    let body = serde_json::json!({ "name": bucket }).to_string();
    let (status, text) = super::http_request(
        endpoint,
        "POST",
        "/storage/v1/b?project=cdc-egress-test",
        &[("Content-Type", "application/json".into())],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "create bucket {bucket}: {text}");
}

/// Deletes every object of the bucket, then the bucket.
pub async fn drop_gcs_bucket(endpoint: &str, bucket: &str) {
    let adapter = GcsAdapter::start(endpoint).await;
    let store =
        cdc_egress::sink::store::Store::open(&format!("gs://{bucket}"), &gcs_options(&adapter.url))
            .unwrap();
    for m in store
        .list(&object_store::path::Path::default())
        .await
        .unwrap()
    {
        store.delete(&m.location).await.unwrap();
    }
    let (status, text) = super::http_request(
        endpoint,
        "DELETE",
        &format!("/storage/v1/b/{bucket}"),
        &[],
        b"",
    )
    .await;
    assert!(
        status == 200 || status == 204,
        "delete bucket {bucket}: {status} {text}"
    );
}

/// The adapter, listening on an ephemeral loopback port until dropped.
pub struct GcsAdapter {
    /// `http://127.0.0.1:<port>`: use it as `gcs_base_url`.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GcsAdapter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GcsAdapter {
    /// Starts an adapter in front of fake-gcs-server at `upstream` (`http://host:port`, the
    /// server's `-public-host`).
    pub async fn start(upstream: &str) -> GcsAdapter {
        super::assert_loopback(upstream);
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    // A broken connection only fails the request on it; object_store says so.
                    let _ = serve(conn, &upstream).await;
                });
            }
        });
        GcsAdapter { url, task }
    }
}

/// Serves the requests of one client connection (kept alive), each over its own upstream connection.
async fn serve(conn: TcpStream, upstream: &str) -> std::io::Result<()> {
    let (rd, mut wr) = conn.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        let mut headers = Vec::new();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            rd.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            let (k, v) = (k.trim().to_string(), v.trim().to_string());
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.parse().unwrap_or(0),
                "transfer-encoding" => {
                    return Err(std::io::Error::other(
                        "GCS adapter: chunked request bodies are not handled",
                    ));
                }
                "host" | "connection" => continue,
                _ => {}
            }
            headers.push((k, v));
        }
        let mut body = vec![0u8; len];
        rd.read_exact(&mut body).await?;

        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let object_put = method == "PUT" && query.is_empty() && path.matches('/').count() >= 2;
        let multipart = query
            .split('&')
            .any(|p| p == "uploads" || p == "uploads=" || p.starts_with("uploadId="));
        let (status_line, mut resp_headers, resp_body) = if multipart {
            let msg = b"fake-gcs-server does not implement the XML multipart upload".to_vec();
            (
                "HTTP/1.1 501 Not Implemented".to_string(),
                vec![("Content-Type".to_string(), "text/plain".to_string())],
                msg,
            )
        } else {
            let target = if object_put {
                format!("{path}?X-Goog-Algorithm=GOOG4-RSA-SHA256")
            } else {
                target.clone()
            };
            forward(upstream, &method, &target, &headers, &body).await?
        };
        if object_put && status_line.contains(" 200 ") {
            // GCS answers an XML PUT with the object's ETag (and generation) as headers.
            let meta: serde_json::Value = serde_json::from_slice(&resp_body).unwrap_or_default();
            if let Some(etag) = meta["etag"].as_str() {
                resp_headers.push(("ETag".into(), format!("\"{etag}\"")));
            }
            if let Some(generation) = meta["generation"].as_str() {
                resp_headers.push(("x-goog-generation".into(), generation.to_string()));
            }
        }
        let mut out = format!("{status_line}\r\n");
        for (k, v) in &resp_headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if method != "HEAD" {
            out.push_str(&format!("Content-Length: {}\r\n", resp_body.len()));
        }
        out.push_str("\r\n");
        wr.write_all(out.as_bytes()).await?;
        if method != "HEAD" {
            wr.write_all(&resp_body).await?;
        }
    }
}

type Response = (String, Vec<(String, String)>, Vec<u8>);

/// One request upstream (`Connection: close`); the answer with its body read whole (de-chunked).
/// For other methods than HEAD the body framing headers are dropped (the caller sets its own).
async fn forward(
    upstream: &str,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(upstream).await?;
    let mut req =
        format!("{method} {target} HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n");
    for (k, v) in headers {
        if !k.eq_ignore_ascii_case("content-length") {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).await?;
    s.write_all(body).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of response head from fake-gcs-server"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut rest = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_string();
    let mut chunked = false;
    let mut out_headers = Vec::new();
    for l in lines {
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        let (k, v) = (k.trim().to_string(), v.trim().to_string());
        let lk = k.to_ascii_lowercase();
        if lk == "transfer-encoding" {
            chunked = v.eq_ignore_ascii_case("chunked");
            continue;
        }
        if lk == "connection" || (lk == "content-length" && method != "HEAD") {
            continue;
        }
        out_headers.push((k, v));
    }
    if chunked {
        rest = dechunk(&rest)?;
    }
    Ok((status_line, out_headers, rest))
}

fn dechunk(mut b: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = || std::io::Error::other("bad chunked body from fake-gcs-server");
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad())?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).ok_or_else(bad)?);
        b = b.get(size + 2..).ok_or_else(bad)?;
    }
}
