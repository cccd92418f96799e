//! Real parts for end-to-end tests: the `tollgate` binary as a child process, origin servers
//! (plain HTTP and HTTPS with their own test CA) on loopback, and curl as the client.
//!
//! Nothing here is mocked: the gateway is the release artefact users run, the origins are
//! pingora HTTP servers on real sockets, and curl is the system's curl.

#![allow(dead_code)] // each test binary uses a different part of this module
pub mod tunnel;
pub mod webdriver;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::http::ServerSession;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use tokio::sync::watch;

/// Prints why a test is skipped and returns true when `curl` is missing.
pub fn no_curl() -> bool {
    let ok = Command::new("curl").arg("--version").output().is_ok();
    if !ok {
        eprintln!("SKIP: curl is not installed (apt-get install -y curl)");
    }
    !ok
}

/// The CA of every test's protected origins ([`Origin::protected`]): one per test binary, so
/// [`entra_config`] can trust it without being told.
pub fn origin_ca() -> &'static TestCa {
    static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| TestCa::new("protected origins"))
}

/// A CA of the test's own, for origin certificates the gateway must verify.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("write CA");
        TestCa { dir, issuer }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes a server certificate for `names`, localhost and 127.0.0.1; returns (cert, key)
    /// paths.
    pub fn server_cert(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut all = vec!["localhost".to_string()];
        all.extend(names.iter().map(|n| n.to_string()));
        let mut params = CertificateParams::new(all).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        // Files of their own: an origin may read them after another was issued.
        static ISSUED: AtomicUsize = AtomicUsize::new(0);
        let n = ISSUED.fetch_add(1, Ordering::Relaxed);
        let cert_path = self.dir.path().join(format!("server-{n}.pem"));
        let key_path = self.dir.path().join(format!("server-{n}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}

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

/// Tokens a protected origin accepts: just `token`, for `audience`.
pub fn issued(token: &str, audience: &str) -> Issued {
    Arc::new(std::sync::Mutex::new(HashMap::from([(
        token.to_string(),
        audience.to_string(),
    )])))
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

/// Tokens a [`TokenEndpoint`] issued: token → audience.
pub type Issued = Arc<std::sync::Mutex<HashMap<String, String>>>;

/// How a [`TokenEndpoint`] behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// Issue tokens.
    Normal,
    /// Answer 500.
    Failing,
    /// Answer 200 with a body that is not JSON (an HTML error page).
    NotJson,
    /// Answer 200 with JSON that has no `access_token`.
    NoAccessToken,
    /// Answer 200 with 1 MiB of JSON (a usable token at its very end).
    Huge,
}

/// A token-like value the garbage [`TokenMode`]s carry: it must never be used or shown.
pub const GARBAGE_TOKEN: &str = "garbage-token-3c9d41";

/// A real OAuth 2.0 client-credentials token endpoint (RFC 6749 §4.4) on loopback: it checks
/// the client id and secret, and issues random tokens with a short `expires_in`.
pub struct TokenEndpoint {
    pub addr: SocketAddr,
    pub issued: Issued,
    requests: Arc<AtomicUsize>,
    mode: Arc<std::sync::Mutex<TokenMode>>,
    _stop: watch::Sender<bool>,
}

struct TokenApp {
    client_id: String,
    client_secret: String,
    expires_in: u64,
    delay: Duration,
    issued: Issued,
    requests: Arc<AtomicUsize>,
    mode: Arc<std::sync::Mutex<TokenMode>>,
}

#[async_trait]
impl ServeHttp for TokenApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body.extend_from_slice(&chunk);
        }
        tokio::time::sleep(self.delay).await;
        let reply = |status: u16, json: serde_json::Value| {
            let mut r = Response::new(json.to_string().into_bytes());
            *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
            r.headers_mut()
                .insert("content-type", "application/json".parse().expect("hv"));
            let len = r.body().len();
            r.headers_mut().insert("content-length", len.into());
            r
        };
        let mode = *self.mode.lock().expect("mode");
        match mode {
            TokenMode::Normal => {}
            TokenMode::Failing => {
                return reply(
                    500,
                    serde_json::json!({"error": "temporarily_unavailable", "secret_detail": "endpoint-internal-text"}),
                )
            }
            TokenMode::NotJson => {
                let mut r = Response::new(
                    format!("<html>endpoint-internal-text access_token={GARBAGE_TOKEN}</html>")
                        .into_bytes(),
                );
                r.headers_mut()
                    .insert("content-type", "text/html".parse().expect("hv"));
                let len = r.body().len();
                r.headers_mut().insert("content-length", len.into());
                return r;
            }
            TokenMode::NoAccessToken => {
                return reply(
                    200,
                    serde_json::json!({"token_type": "Bearer", "expires_in": 3600, "token": GARBAGE_TOKEN}),
                )
            }
            TokenMode::Huge => {
                return reply(
                    200,
                    serde_json::json!({"padding": "x".repeat(1 << 20), "expires_in": 3600, "access_token": GARBAGE_TOKEN}),
                )
            }
        }
        let form: HashMap<String, String> = String::from_utf8_lossy(&body)
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| {
                let decode = |x: &str| {
                    percent_encoding::percent_decode_str(x)
                        .decode_utf8_lossy()
                        .to_string()
                };
                (decode(k), decode(v))
            })
            .collect();
        let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        if session.req_header().method != http::Method::POST
            || get("grant_type") != "client_credentials"
        {
            return reply(400, serde_json::json!({"error": "unsupported_grant_type"}));
        }
        if get("client_id") != self.client_id || get("client_secret") != self.client_secret {
            return reply(401, serde_json::json!({"error": "invalid_client"}));
        }
        let token = format!("tok-{}", hex_token());
        self.issued
            .lock()
            .expect("issued")
            .insert(token.clone(), get("scope").to_string());
        reply(
            200,
            serde_json::json!({"token_type": "Bearer", "expires_in": self.expires_in, "access_token": token}),
        )
    }
}

fn hex_token() -> String {
    use std::fmt::Write;
    let bytes: [u8; 16] = rand::random();
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl TokenEndpoint {
    /// Starts an endpoint for `client_id` / `client_secret` issuing tokens valid for
    /// `expires_in` seconds, answering after `delay`.
    pub fn start(
        client_id: &str,
        client_secret: &str,
        expires_in: u64,
        delay: Duration,
    ) -> TokenEndpoint {
        let socket = tollgate_gateway::listener::bind("127.0.0.1:0".parse().expect("addr"), None)
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let issued: Issued = Default::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let mode = Arc::new(std::sync::Mutex::new(TokenMode::Normal));
        let (stop, watch) = watch::channel(false);
        let app = TokenApp {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            expires_in,
            delay,
            issued: issued.clone(),
            requests: requests.clone(),
            mode: mode.clone(),
        };
        tollgate_gateway::listener::serve("token-endpoint", socket, app, None, watch);
        TokenEndpoint {
            addr,
            issued,
            requests,
            mode,
            _stop: stop,
        }
    }

    /// How many token requests arrived.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Switches between issuing and failing.
    pub fn set_mode(&self, mode: TokenMode) {
        *self.mode.lock().expect("mode") = mode;
    }

    /// The token endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}/oauth2/v2.0/token", self.addr)
    }

    /// Every token issued so far.
    pub fn tokens(&self) -> Vec<String> {
        self.issued
            .lock()
            .expect("issued")
            .keys()
            .cloned()
            .collect()
    }
}

/// The Azure managed-identity token protocol on loopback: `GET …?api-version=…&resource=…`
/// with `Metadata: true` (IMDS), or with `X-IDENTITY-HEADER: <secret>` (the
/// IDENTITY_ENDPOINT variant) when started with one. Tokens are issued for the resource.
pub struct ManagedIdentityEndpoint {
    pub addr: SocketAddr,
    pub issued: Issued,
    requests: Arc<AtomicUsize>,
    _stop: watch::Sender<bool>,
}

struct ManagedIdentityApp {
    identity_header: Option<String>,
    issued: Issued,
    requests: Arc<AtomicUsize>,
}

#[async_trait]
impl ServeHttp for ManagedIdentityApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let req = session.req_header();
        let header = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let query: HashMap<String, String> = req
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .to_string(),
                )
            })
            .collect();
        let authorized = match &self.identity_header {
            Some(secret) => header("x-identity-header").as_deref() == Some(secret.as_str()),
            None => header("metadata").as_deref() == Some("true"),
        };
        let (status, body) = match (
            req.method == http::Method::GET,
            authorized,
            query.get("resource"),
            query.get("api-version"),
        ) {
            (true, true, Some(resource), Some(_)) => {
                let token = format!("mi-{}", hex_token());
                self.issued
                    .lock()
                    .expect("issued")
                    .insert(token.clone(), resource.clone());
                (
                    200,
                    serde_json::json!({"access_token": token, "expires_in": "3599", "resource": resource, "token_type": "Bearer"}),
                )
            }
            _ => (400, serde_json::json!({"error": "invalid_request"})),
        };
        let mut r = Response::new(body.to_string().into_bytes());
        *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
        let len = r.body().len();
        r.headers_mut().insert("content-length", len.into());
        r
    }
}

impl ManagedIdentityEndpoint {
    /// Starts the endpoint; with `identity_header`, it requires that secret.
    pub fn start(identity_header: Option<&str>) -> ManagedIdentityEndpoint {
        let socket = tollgate_gateway::listener::bind("127.0.0.1:0".parse().expect("addr"), None)
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let issued: Issued = Default::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (stop, watch) = watch::channel(false);
        let app = ManagedIdentityApp {
            identity_header: identity_header.map(str::to_string),
            issued: issued.clone(),
            requests: requests.clone(),
        };
        tollgate_gateway::listener::serve("mi-endpoint", socket, app, None, watch);
        ManagedIdentityEndpoint {
            addr,
            issued,
            requests,
            _stop: stop,
        }
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}/metadata/identity/oauth2/token", self.addr)
    }

    /// How many token requests arrived.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
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
        let socket = tollgate_gateway::listener::bind("127.0.0.1:0".parse().expect("addr"), None)
            .expect("bind origin");
        let addr = socket.local_addr().expect("addr");
        let (stop, watch) = watch::channel(false);
        let seen = Arc::default();
        let app = Echo {
            requests: requests.clone(),
            seen: Arc::clone(&seen),
            guard,
        };
        tollgate_gateway::listener::serve("origin", socket, app, tls, watch);
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

/// The `tollgate` binary, running as a child process with its own data directory.
pub struct Gateway {
    child: Child,
    pub dir: tempfile::TempDir,
    pub egress: SocketAddr,
    pub admin: SocketAddr,
    pub agent_listeners: HashMap<String, SocketAddr>,
    pub banner: Vec<String>,
}

impl Gateway {
    /// Starts `tollgate serve` with `config` (TOML); `data_dir` is set to a fresh temp dir
    /// unless the config names one.
    pub fn start(config: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, config)
    }

    /// Starts `tollgate serve` with `config` and a policy directory holding `policies`
    /// (file name, Cedar text).
    pub fn start_with_policies(config: &str, policies: &[(&str, &str)]) -> Gateway {
        Self::start_with_policy_settings(config, policies, "")
    }

    /// Like [`Gateway::start_with_policies`], with more `[policy]` lines (e.g. the watch
    /// interval).
    pub fn start_with_policy_settings(
        config: &str,
        policies: &[(&str, &str)],
        settings: &str,
    ) -> Gateway {
        Self::start_with_env(config, policies, settings, &[])
    }

    /// Like [`Gateway::start_with_policy_settings`], with environment variables for the
    /// gateway process (e.g. `RUST_LOG=debug`, or a secret's variable).
    pub fn start_with_env(
        config: &str,
        policies: &[(&str, &str)],
        settings: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).expect("policy dir");
        for (name, text) in policies {
            std::fs::write(policy_dir.join(name), text).expect("write policy");
        }
        let config = format!("{config}\n[policy]\ndir = {policy_dir:?}\n{settings}");
        let mut cmd = Self::command(&dir, &config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd, dir)
    }

    /// A `tollgate serve` command for `config` in `dir` (its data directory is `dir/data`).
    fn command(dir: &tempfile::TempDir, config: &str) -> Command {
        let config_path = dir.path().join("tollgate.toml");
        let config = format!("data_dir = {:?}\n{config}", dir.path().join("data"));
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("serve").arg("--config").arg(&config_path);
        cmd
    }

    /// The policy directory of a gateway started with [`Gateway::start_with_policies`].
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// Starts `tollgate serve` in `dir` (its data directory is `dir/data`).
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Gateway {
        let cmd = Self::command(&dir, config);
        Self::spawn(cmd, dir)
    }

    /// Spawns a prepared `tollgate serve` command and waits for its banner.
    pub fn spawn(mut cmd: Command, dir: tempfile::TempDir) -> Gateway {
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log file");
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        cmd.current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().expect("spawn tollgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line == "ready" => break,
                Ok(line) => banner.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let log =
                        std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
                    panic!("tollgate did not start; stdout: {banner:?}\nlog:\n{log}");
                }
            }
        }
        let find = |prefix: &str| -> SocketAddr {
            banner
                .iter()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .and_then(|rest| rest.trim().strip_prefix("http://"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix:?} line in banner {banner:?}"))
        };
        let egress = find("egress proxy:");
        let admin = find("admin API:");
        let agent_listeners = banner
            .iter()
            .filter_map(|l| l.trim().strip_prefix("agent listener:"))
            .filter_map(|rest| {
                let mut parts = rest.split_whitespace();
                let id = parts.next()?.to_string();
                let addr = parts.next()?.strip_prefix("http://")?.parse().ok()?;
                Some((id, addr))
            })
            .collect();
        Gateway {
            child,
            dir,
            egress,
            admin,
            agent_listeners,
            banner,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.data_dir().join("ca.pem")
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string()
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.egress)
    }

    /// Everything the gateway logged until now. It writes lines of info and below in
    /// batches, every 50 ms: this waits out one batch and a margin first, so that a line
    /// logged before the call is in what it returns (a check that a secret is *not* logged
    /// would otherwise pass too early).
    pub fn log(&self) -> String {
        std::thread::sleep(Duration::from_millis(200));
        self.log_written()
    }

    /// What the gateway's log file holds at this moment.
    fn log_written(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Calls the admin API with the admin token.
    pub fn admin_call(&self, method: &str, path: &str, body: Option<&str>) -> CurlResult {
        self.admin_as(Some(&self.admin_token()), method, path, body)
    }

    /// Calls the admin API presenting `token` (or none).
    pub fn admin_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> CurlResult {
        let mut args = vec![
            "-X".to_string(),
            method.to_string(),
            format!("http://{}{path}", self.admin),
        ];
        if let Some(token) = token {
            args.extend(["-H".to_string(), format!("Authorization: Bearer {token}")]);
        }
        if let Some(body) = body {
            args.extend([
                "-H".into(),
                "content-type: application/json".into(),
                "--data-binary".into(),
                body.into(),
            ]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&refs)
    }

    /// Waits (up to 5 s) until the log contains `needle`; the gateway logs a request after it
    /// has answered it, so a client can be faster than the log line.
    pub fn log_contains(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if self.log_written().contains(needle) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the gateway and hands back its directory (to restart on the same data).
    pub fn stop(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// Builds an argument vector from anything string-like.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$($a.to_string()),*] };
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

/// The config lines that let the gateway reach test origins on loopback and trust `ca`.
pub fn loopback_upstream(ca: Option<&Path>) -> String {
    let mut s = String::from("[upstream]\nallow_networks = [\"127.0.0.1/32\"]\n");
    if let Some(ca) = ca {
        s.push_str(&format!("extra_ca_file = {:?}\n", ca));
    }
    s
}

/// The shipped run-mode policies alone (`policies/default/run-modes.cedar`): the run modes as
/// users get them, without the allowlist (test origins are on loopback).
pub const RUN_MODES: (&str, &str) = (
    "run-modes.cedar",
    include_str!("../../policies/default/run-modes.cedar"),
);

/// A policy that permits everything: for tests of the data path, not of policies.
pub const ALLOW_ALL: (&str, &str) = (
    "allow-all.cedar",
    "@id(\"allow-all\")\npermit (principal, action, resource);\n",
);

/// The repository's default policy files (policies/default/).
pub fn default_policies() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("policies/default")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().to_string();
            (name, std::fs::read_to_string(&p).expect("read policy"))
        })
        .collect();
    files.sort();
    files
}

/// The listeners on port 0 so parallel tests never collide.
pub const EPHEMERAL_LISTENERS: &str =
    "[egress]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";

/// Whether the tests run as root (needed for network namespaces).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Why this machine cannot run a network-namespace test (root, `ip`, and `nft` when
/// `firewall`), or `None` when it can.
pub fn missing_namespace_tools(firewall: bool) -> Option<String> {
    if !is_root() {
        return Some("network namespaces need root".into());
    }
    let mut tools = vec![("ip", "iproute2")];
    if firewall {
        tools.push(("nft", "nftables"));
    }
    for (program, package) in tools {
        if Command::new(program).arg("-V").output().is_err() {
            return Some(format!(
                "{program} is missing (apt-get install -y {package})"
            ));
        }
    }
    None
}

/// Runs curl (silent, 5 s at most) with `args` inside network namespace `ns`.
pub async fn curl_in_netns(ns: &str, args: &[&str]) -> std::process::Output {
    let mut full: Vec<String> = ["netns", "exec", ns, "curl", "-sS", "--max-time", "5"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    full.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        Command::new("ip")
            .args(&full)
            .output()
            .expect("run ip netns exec")
    })
    .await
    .expect("join")
}

/// Runs `tollgate serve` on `config` (data in `dir`), which must fail to start; returns what
/// it printed on stderr.
pub fn start_fails(dir: &Path, config: &str) -> String {
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        format!("data_dir = {:?}\n{config}", dir.join("data")),
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run tollgate");
    assert!(
        !out.status.success(),
        "tollgate started although it should not have"
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Policies for approval tests: reads are allowed, writes need approval.
pub const APPROVAL_POLICIES: (&str, &str) = (
    "approvals.cedar",
    "@id(\"reads\")\npermit (principal, action == Action::\"read\", resource);\n\n\
     @id(\"approved-writes\")\npermit (principal, action == Action::\"write\", resource) when { context.approved };\n",
);

/// A Review-mode agent `a` for requests from 127.0.0.1.
pub const REVIEW_AGENT: &str =
    "[[agents]]\nid = \"a\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n";

/// POSTs `body` to `url` through `gw` in the background (with more curl `extra` arguments):
/// a request that needs approval is held until someone decides.
pub fn post_in_background(
    gw: &Gateway,
    url: &str,
    body: &str,
    extra: &[&str],
) -> tokio::task::JoinHandle<CurlResult> {
    let mut a = args![
        "-x",
        gw.proxy_url(),
        "-X",
        "POST",
        "--data-binary",
        body,
        url
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    tokio::spawn(curl_async(a))
}

/// Waits (up to 10 s) until exactly `n` approvals match `filter` (a query string, e.g.
/// `state=pending&agent=a`), and returns them.
pub fn wait_for_approvals(gw: &Gateway, filter: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = gw.admin_call("GET", &format!("/v1/approvals?{filter}"), None);
        assert_eq!(listed.status, 200, "{listed:?}");
        let approvals = listed.json()["approvals"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if approvals.len() == n {
            return approvals;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} approvals for {filter}, have {approvals:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The audit records of `agent`, once there are at least `n` (the audit thread writes them
/// within its flush interval); panics after 5 s with what there is.
pub fn audit_records(gw: &Gateway, agent: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let records = gw
            .admin_call("GET", &format!("/v1/agents/{agent}/audit"), None)
            .json()["records"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if records.len() >= n {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} audit records of {agent}, have {records:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Hex SHA-256, as approval records show a body's.
pub fn sha256_hex(data: &[u8]) -> String {
    tollgate_gateway::approval::body_sha256(data)
}

/// The start of a config in which the gateway gets tokens from `endpoint` (identity provider
/// `entra`, OAuth client credentials as `client_id` with the secret `secret`, a TOML value
/// such as `{ env = "X" }`) for `host` (pinned to 127.0.0.1) over TLS on `port` (a protected
/// origin's: [`origin_ca`] is trusted), with audience `audience`.
/// Lines that follow at once belong to that `[[credential_rules]]` entry.
pub fn entra_config(
    endpoint: &TokenEndpoint,
    client_id: &str,
    secret: &str,
    host: &str,
    port: u16,
    audience: &str,
) -> String {
    format!(
        r#"{EPHEMERAL_LISTENERS}{upstream}resolve = {{ "{host}" = "127.0.0.1" }}

[[identity_providers]]
name = "entra"
kind = "client_credentials"
token_url = "{url}"
client_id = "{client_id}"
client_secret = {secret}

[[credential_rules]]
hosts = ["{host}"]
ports = [{port}]
audience = "{audience}"
"#,
        upstream = loopback_upstream(Some(&origin_ca().cert_path())),
        url = endpoint.url(),
    )
}

/// curl arguments for a request through `gw` to `url`, trusting the gateway's CA (for
/// https:// URLs, which the gateway intercepts).
pub fn via(gw: &Gateway, url: &str) -> Vec<String> {
    args![
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        url
    ]
}
