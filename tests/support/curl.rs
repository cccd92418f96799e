//! curl as the client (the system's own), and raw exchanges on a socket.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use super::*;

/// Prints why a test is skipped and returns true when `curl` is missing.
pub fn no_curl() -> bool {
    let ok = Command::new("curl").arg("--version").output().is_ok();
    if !ok {
        eprintln!("SKIP: curl is not installed (apt-get install -y curl)");
    }
    !ok
}

/// What curl got.
#[derive(Debug)]
pub struct CurlResult {
    /// curl's exit code (0 on any HTTP response).
    pub exit: i32,
    /// The HTTP status (0 if none).
    pub status: u16,
    /// The response body.
    pub body: String,
    /// curl's stderr (with -v: the TLS and header trace).
    pub stderr: String,
    /// `%{http_version}`.
    pub http_version: String,
}

impl CurlResult {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The body as what the echo origin saw.
    pub fn seen(&self) -> Seen {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not an echo ({e}): {:?}", self.body))
    }
}

/// Runs curl with `args` (silent, with a 20 s limit) and collects status, body and trace.
pub fn curl(args: &[&str]) -> CurlResult {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(args)
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, trailer) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    let mut trailer = trailer.split_whitespace();
    let status = trailer.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let http_version = trailer.next().unwrap_or_default().to_string();
    CurlResult {
        exit: out.status.code().unwrap_or(-1),
        status,
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        http_version,
    }
}

/// curl on a blocking thread, for use inside async tests.
pub async fn curl_async(args: Vec<String>) -> CurlResult {
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&refs)
    })
    .await
    .expect("curl thread")
}

/// Sends raw bytes to `addr` and returns everything read until the peer closes or 5 s pass.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(request).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // One response is enough for a request that did not ask to keep going.
                if out.windows(4).any(|w| w == b"\r\n\r\n") && response_complete(&out) {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

fn response_complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    body.len() >= len
}
