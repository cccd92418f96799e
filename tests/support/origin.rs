//! Origins on loopback: pingora HTTP(S) servers that echo what they saw of each request,
//! and a recorder that keeps every request an origin was sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::http::ServerSession;
use tokio::sync::watch;

use super::*;

/// What an origin saw of one request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: HashMap<String, String>,
    pub body_len: usize,
}

impl Seen {
    /// The `Authorization` header the origin got.
    pub fn authorization(&self) -> Option<&str> {
        self.headers.get("authorization").map(String::as_str)
    }
}

/// A request's headers, name → value (lossy UTF-8), as a test server saw them.
pub fn header_map(req: &pingora::http::RequestHeader) -> HashMap<String, String> {
    req.headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect()
}

/// An origin that answers every request with a JSON [`Seen`] of it, and keeps each [`Seen`]
/// ([`Origin::seen`]).
/// `/sleep/<ms>` waits before answering; `/bytes/<n>` answers with n bytes; `/pad/<n>` puts n
/// spaces before the echo; `/hop-by-hop` adds hop-by-hop response headers; `/set-cookie` opens
/// a session; `/gzip` claims a compressed body.
struct Echo {
    requests: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    /// A protected origin: only a bearer token issued for this audience gets through, and,
    /// like a real API, its answers never repeat the token (the `authorization` value is
    /// left out of the echo; [`Origin::seen`] has it) — but on `/debug/echo`, a debug route
    /// that echoes the request whole.
    guard: Option<(Issued, String)>,
}

#[async_trait]
impl ServeHttp for Echo {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut body_len = 0;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body_len += chunk.len();
        }
        let req = session.req_header();
        if let Some((issued, audience)) = &self.guard {
            let presented = req
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string);
            let valid = presented
                .and_then(|t| issued.lock().expect("issued").get(&t).cloned())
                .is_some_and(|a| &a == audience);
            if !valid {
                let mut r = Response::new(b"{\"error\":\"invalid_token\"}".to_vec());
                *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                r.headers_mut().insert("content-length", 23.into());
                return r;
            }
        }
        let target = String::from_utf8_lossy(req.raw_path()).to_string();
        let path = req.uri.path().to_string();
        if let Some(ms) = path.strip_prefix("/sleep/").and_then(|v| v.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let mut seen = Seen {
            method: req.method.to_string(),
            target,
            headers: header_map(req),
            body_len,
        };
        self.seen.lock().expect("seen").push(seen.clone());
        let body = match path
            .strip_prefix("/bytes/")
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(n) => vec![b'x'; n],
            None => {
                // Except on its debug route, which echoes everything.
                if self.guard.is_some() && path != "/debug/echo" {
                    seen.headers.remove("authorization");
                }
                // `/pad/<n>`: n filler bytes before the echo.
                let pad = path
                    .strip_prefix("/pad/")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                let mut body = vec![b' '; pad];
                body.extend(serde_json::to_vec(&seen).expect("json"));
                body
            }
        };
        let mut r = Response::new(body);
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("hv"));
        if path == "/set-cookie" {
            r.headers_mut().insert(
                "set-cookie",
                "session=opened-with-the-token; Secure".parse().expect("hv"),
            );
        }
        if path == "/gzip" {
            r.headers_mut()
                .insert("content-encoding", "gzip".parse().expect("hv"));
        }
        if path == "/hop-by-hop" {
            for (name, value) in [
                ("proxy-authenticate", "Basic realm=\"origin\""),
                ("keep-alive", "timeout=5"),
                ("x-origin-kept", "1"),
            ] {
                r.headers_mut().insert(name, value.parse().expect("hv"));
            }
        }
        let len = r.body().len();
        r.headers_mut().insert("content-length", len.into());
        r
    }
}

/// A running origin server on loopback.
pub struct Origin {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    _stop: watch::Sender<bool>,
}

impl Origin {
    /// A plain-HTTP origin on 127.0.0.1.
    pub fn http() -> Origin {
        Self::start(None)
    }

    /// An HTTPS origin on 127.0.0.1 with a certificate from `ca` (for localhost).
    pub fn https(ca: &TestCa) -> Origin {
        Self::https_for(ca, &[])
    }

    /// An HTTPS origin on 127.0.0.1 whose certificate from `ca` also names `names`.
    pub fn https_for(ca: &TestCa, names: &[&str]) -> Origin {
        Self::start(Some(Self::tls_for(ca, names)))
    }

    /// An HTTPS origin for `host` (certificate from [`origin_ca`]) that accepts only bearer
    /// tokens `endpoint` issued for `audience`.
    pub fn protected(host: &str, endpoint: &TokenEndpoint, audience: &str) -> Origin {
        Self::protected_by(host, endpoint.issued.clone(), audience)
    }

    /// An HTTPS origin for `host` (certificate from [`origin_ca`]) that accepts only bearer
    /// tokens in `issued` for `audience`.
    pub fn protected_by(host: &str, issued: Issued, audience: &str) -> Origin {
        Self::start_guarded(
            Some(Self::tls_for(origin_ca(), &[host])),
            Some((issued, audience.to_string())),
        )
    }

    /// An HTTPS origin for `host` (certificate from [`origin_ca`]) that echoes every request
    /// whole, credentials included: the kind of origin whose answers must never reach a
    /// sandbox when the gateway injected a token.
    pub fn echoing(host: &str) -> Origin {
        Self::start(Some(Self::tls_for(origin_ca(), &[host])))
    }

    fn tls_for(ca: &TestCa, names: &[&str]) -> TlsSettings {
        let (cert, key) = ca.server_cert(names);
        TlsSettings::intermediate(
            cert.to_str().expect("utf8 path"),
            key.to_str().expect("utf8 path"),
        )
        .expect("TLS settings")
    }

    fn start(tls: Option<TlsSettings>) -> Origin {
        Self::start_guarded(tls, None)
    }

    fn start_guarded(tls: Option<TlsSettings>, guard: Option<(Issued, String)>) -> Origin {
        let requests = Arc::new(AtomicUsize::new(0));
        let socket =
            tollgate_gateway::egress::listener::bind("127.0.0.1:0".parse().expect("addr"), None)
                .expect("bind origin");
        let addr = socket.local_addr().expect("addr");
        let (stop, watch) = watch::channel(false);
        let seen = Arc::default();
        let app = Echo {
            requests: requests.clone(),
            seen: Arc::clone(&seen),
            guard,
        };
        tollgate_gateway::egress::listener::serve("origin", socket, app, tls, watch);
        Origin {
            addr,
            requests,
            seen,
            _stop: stop,
        }
    }

    /// Every request this origin saw, oldest first, as it saw them.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// The last request this origin saw.
    pub fn last_seen(&self) -> Seen {
        self.seen().pop().expect("the origin saw no request")
    }

    /// How many requests reached this origin.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// A raw TCP origin that records every byte it receives and never answers.
pub struct Recorder {
    pub addr: SocketAddr,
    bytes: Arc<std::sync::Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// A recorder on an ephemeral loopback port.
    pub async fn start() -> Recorder {
        Self::start_on("127.0.0.1:0").await.expect("bind recorder")
    }

    /// A recorder on `addr` (a fixed port may be taken, or need root: the caller decides).
    pub async fn start_on(addr: &str) -> std::io::Result<Recorder> {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let bytes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (sink, count) = (bytes.clone(), connections.clone());
        let task = tokio::spawn(async move {
            let mut open = tokio::task::JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let sink = sink.clone();
                open.spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        sink.lock().expect("sink").extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Ok(Recorder {
            addr,
            bytes,
            connections,
            task,
        })
    }

    /// Everything received so far, as text.
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().expect("bytes")).to_string()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
