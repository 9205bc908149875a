//! `healthcheck [http://HOST:PORT/PATH]` (default `http://127.0.0.1:9187/healthz`): one HTTP/1.0
//! GET with a 3 s timeout. Exit 0 when the status is 2xx, 1 otherwise (the reason on stderr).
//! Only plain `http://` with a literal address or `localhost`: it probes the process next to it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_URL: &str = "http://127.0.0.1:9187/healthz";
const TIMEOUT: Duration = Duration::from_secs(3);

fn split(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        || authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

fn probe(url: &str) -> Result<String, String> {
    let (authority, path) = split(url)?;
    let addr: SocketAddr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| format!("{addr}: {e}"))?;
    let mut buf = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let status_line = text.lines().next().unwrap_or_default().to_string();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or_default();
    if code.starts_with('2') && code.len() == 3 {
        Ok(status_line)
    } else if status_line.is_empty() {
        Err(format!("{url}: empty response"))
    } else {
        Err(format!("{url}: {status_line} {body}"))
    }
}

fn main() -> ExitCode {
    let url = std::env::args().nth(1).unwrap_or_else(|| DEFAULT_URL.to_string());
    match probe(&url) {
        Ok(status) => {
            println!("{url}: {status}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}
