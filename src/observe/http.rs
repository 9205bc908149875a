//! The `http.listen` endpoint: `GET /metrics` (OpenMetrics text, which Prometheus scrapes), `GET /healthz` (the process is up),
//! `GET /readyz` (200 while streaming without errors, 503 otherwise with the last error).
//!
//! A deliberately tiny HTTP/1.0-style responder: one request per connection, GET only, bounded
//! request size, so it adds no dependency and cannot be used to exhaust memory.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Metrics;

pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, crate::error::Error> {
    TcpListener::bind(addr).await.map_err(|e| {
        crate::error::Error::definite(
            crate::error::Component::Http,
            format!("cannot listen on {addr} (http.listen): {e}; choose another address or set http.listen to empty"),
        )
    })
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let mut warn = super::Throttle::new(std::time::Duration::from_secs(60));
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // E.g. out of file descriptors: wait instead of spinning on the same error.
                if warn.ready() {
                    tracing::warn!(error = %e, "metrics endpoint cannot accept connections");
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            while n < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf[n..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => {
                        n += k;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
                            || buf[..n].contains(&b'\n')
                        {
                            break;
                        }
                    }
                }
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body, ctype) = match path {
                "/metrics" => (
                    "200 OK",
                    metrics.render(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                "/healthz" => ("200 OK", "ok\n".to_string(), "text/plain"),
                "/readyz" if metrics.ready.load(Relaxed) => {
                    ("200 OK", "ready\n".to_string(), "text/plain")
                }
                "/readyz" => (
                    "503 Service Unavailable",
                    format!(
                        "not ready: {}\n",
                        metrics.last_error().unwrap_or_else(|| "starting".into())
                    ),
                    "text/plain",
                ),
                _ => ("404 Not Found", "not found\n".to_string(), "text/plain"),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
