//! Fault injection end to end (issue 9): origins that reset, stall or answer garbage, token
//! endpoints that answer garbage, a data directory whose disk is full or read-only, and a
//! gateway killed with SIGKILL again and again under a mixed workload.
//!
//! Everything is real: the faulty origin is a raw TCP server on loopback, the gateway is the
//! `tollgate` binary, the client is curl, and the full disk is a small tmpfs (tests that need
//! root to mount one say so and skip).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::tls::{ServerTlsStream, TlsAcceptor};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

// ---------------------------------------------------------------------------------------------
// Upstream faults

/// What a [`FaultyOrigin`] does with each connection.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Accepts, then resets the connection (SO_LINGER 0) without reading.
    Reset,
    /// Reads the request, then resets.
    ResetAfterRequest,
    /// Reads the request and never answers.
    Stall,
    /// Answers with a status line that is not HTTP.
    GarbageStatus,
    /// Answers with a header line that has no colon.
    InvalidHeader,
    /// Answers with two different Content-Length values.
    ConflictingLengths,
    /// Announces 1000 body bytes, sends 10 and closes.
    ShortBody,
    /// Announces 1000 body bytes, sends 10 and stalls.
    StallMidBody,
}

/// A raw TCP origin on loopback (in the clear, or TLS with a test CA's certificate) that
/// misbehaves in one way. Dropping it stops it and closes every connection it holds.
struct FaultyOrigin {
    addr: SocketAddr,
    tls: bool,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyOrigin {
    fn start(fault: Fault) -> FaultyOrigin {
        Self::start_with(fault, None)
    }

    /// Speaks TLS with a certificate from `ca` for localhost, then misbehaves inside.
    fn start_tls(fault: Fault, ca: &TestCa) -> FaultyOrigin {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key) = ca.server_cert(&[]);
        let chain = CertificateDer::pem_file_iter(&cert)
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = PrivateKeyDer::from_pem_file(&key).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        Self::start_with(fault, Some(TlsAcceptor::from(Arc::new(config))))
    }

    fn start_with(fault: Fault, tls: Option<TlsAcceptor>) -> FaultyOrigin {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let is_tls = tls.is_some();
        let task = tokio::spawn(async move {
            // Connection tasks live in the set: aborting the accept task drops them all.
            let mut held = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                match tls.clone() {
                    None => held.spawn(misbehave(stream, fault)),
                    Some(acceptor) => held.spawn(async move {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            misbehave(stream, fault).await;
                        }
                    }),
                };
            }
        });
        FaultyOrigin {
            addr,
            tls: is_tls,
            connections,
            task,
        }
    }

    /// A URL on this origin (`https://localhost:…` for a TLS one: its certificate's name).
    fn url(&self, path: &str) -> String {
        match self.tls {
            false => format!("http://{}{path}", self.addr),
            true => format!("https://localhost:{}{path}", self.addr.port()),
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection a [`FaultyOrigin`] can misbehave on: TCP, or TLS over TCP.
trait OriginConn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Closes with RST instead of FIN (SO_LINGER 0).
    fn reset(self);
}

impl OriginConn for TcpStream {
    fn reset(self) {
        self.set_zero_linger().expect("SO_LINGER");
        drop(self);
    }
}

impl OriginConn for ServerTlsStream<TcpStream> {
    fn reset(self) {
        self.into_inner().0.reset();
    }
}

/// Reads one request head (and a body announced by Content-Length) from `stream`.
async fn read_request(stream: &mut impl OriginConn) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                return;
            }
        }
    }
}

/// Keeps the connection open without a word, until the origin is dropped (or 60 s pass).
async fn stall(stream: impl OriginConn) {
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(stream);
}

async fn misbehave(mut stream: impl OriginConn, fault: Fault) {
    if let Fault::Reset = fault {
        return stream.reset();
    }
    read_request(&mut stream).await;
    let answer: &[u8] = match fault {
        Fault::Reset | Fault::ResetAfterRequest => return stream.reset(),
        Fault::Stall => return stall(stream).await,
        Fault::GarbageStatus => b"SPDY/9 banana\r\nContent-Length: 2\r\n\r\nok",
        Fault::InvalidHeader => {
            b"HTTP/1.1 200 OK\r\nThis line has no colon\r\nContent-Length: 2\r\n\r\nok"
        }
        Fault::ConflictingLengths => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        }
        Fault::ShortBody | Fault::StallMidBody => {
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n0123456789"
        }
    };
    let _ = stream.write_all(answer).await;
    let _ = stream.flush().await;
    if let Fault::StallMidBody = fault {
        stall(stream).await;
    }
}

/// Review agent `a` on 127.0.0.1; reads are allowed and writes need approval; origins on
/// loopback are reachable (with certificates from `ca`, if given); an origin gets 500 ms to
/// answer.
fn fault_gateway(ca: Option<&TestCa>, extra: &str) -> Gateway {
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}read_timeout_ms = 500\n{extra}\n{REVIEW_AGENT}",
        loopback_upstream(ca.map(TestCa::cert_path).as_deref())
    );
    Gateway::start_with_policies(&config, &[APPROVAL_POLICIES])
}

/// The gateway still serves a normal request.
async fn still_serves(gw: &Gateway, healthy: &Origin, after: &str) {
    let r = curl_async(args![
        "-x",
        gw.proxy_url(),
        format!("http://127.0.0.1:{}/after", healthy.port())
    ])
    .await;
    assert_eq!(r.status, 200, "after {after}: {r:?}");
    assert_eq!(r.seen().target, "/after");
}

/// What an origin can do wrong before its answer, and what the sandbox gets for each.
const BEFORE_THE_ANSWER: [(Fault, u16, &str); 6] = [
    (Fault::Reset, 502, "upstream_reset"),
    (Fault::ResetAfterRequest, 502, "upstream_reset"),
    (Fault::Stall, 504, "upstream_timeout"),
    (Fault::GarbageStatus, 502, "upstream_bad_response"),
    (Fault::InvalidHeader, 502, "upstream_bad_response"),
    (Fault::ConflictingLengths, 502, "upstream_bad_response"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_before_the_answer_get_clear_gateway_errors() {
    if no_curl() {
        return;
    }
    let healthy = Origin::http();
    let gw = fault_gateway(None, "");
    for (fault, status, error) in BEFORE_THE_ANSWER {
        let origin = FaultyOrigin::start(fault);
        let r = curl_async(args!["-x", gw.proxy_url(), origin.url("/read")]).await;
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (status, Some(error)),
            "{fault:?}: {r:?}"
        );
        assert!(
            r.json()["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&origin.addr.to_string())),
            "{fault:?}: the detail names the origin: {r:?}"
        );
        assert!(origin.connections() >= 1, "{fault:?}: the origin was asked");
        still_serves(&gw, &healthy, &format!("{fault:?}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_after_an_approval_get_clear_gateway_errors() {
    if no_curl() {
        return;
    }
    // A released request is sent by the gateway itself (not pingora's proxy path).
    let healthy = Origin::http();
    let gw = fault_gateway(None, "");
    for (fault, status, error) in [
        (Fault::Reset, 502, "upstream_reset"),
        (Fault::Stall, 504, "upstream_timeout"),
        (Fault::GarbageStatus, 502, "upstream_bad_response"),
        (Fault::ConflictingLengths, 502, "upstream_bad_response"),
    ] {
        let origin = FaultyOrigin::start(fault);
        let held = post_in_background(&gw, &origin.url("/write"), "payload", &[]);
        let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
            .as_str()
            .expect("id")
            .to_string();
        let ack = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
        assert_eq!(ack.status, 200, "{ack:?}");
        let r = held.await.expect("curl");
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (status, Some(error)),
            "{fault:?}: {r:?}"
        );
        still_serves(&gw, &healthy, &format!("approved {fault:?}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_short_closes_the_sandbox_connection() {
    if no_curl() {
        return;
    }
    let healthy = Origin::http();
    let gw = fault_gateway(None, "");
    for fault in [Fault::ShortBody, Fault::StallMidBody] {
        let origin = FaultyOrigin::start(fault);
        // The head (200, length 1000) is on its way before the body breaks off: the sandbox
        // must see the answer end early (curl 18: transfer closed with data outstanding), never
        // a complete-looking answer and never a connection left open.
        let r = curl_async(args!["-x", gw.proxy_url(), origin.url("/read")]).await;
        assert_eq!(r.status, 200, "{fault:?}: {r:?}");
        assert!(
            r.exit == 18 || r.exit == 56,
            "{fault:?}: curl must report a truncated answer: {r:?}"
        );
        assert!(r.body.len() < 1000, "{fault:?}: {r:?}");
        still_serves(&gw, &healthy, &format!("{fault:?}")).await;

        // The same for a request released by an approval (the gateway relays it itself).
        let held = post_in_background(&gw, &origin.url("/write"), "payload", &[]);
        let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
            .as_str()
            .expect("id")
            .to_string();
        let ack = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
        assert_eq!(ack.status, 200, "{ack:?}");
        let r = held.await.expect("curl");
        assert_eq!(r.status, 200, "approved {fault:?}: {r:?}");
        assert!(
            r.exit == 18 || r.exit == 56,
            "approved {fault:?}: curl must report a truncated answer: {r:?}"
        );
        still_serves(&gw, &healthy, &format!("approved {fault:?}")).await;
    }
    // The audit trail says the answers broke off.
    let page = gw.admin_call("GET", "/v1/agents/a/audit", None).json();
    let records = page["records"].as_array().cloned().unwrap_or_default();
    let broken = records
        .iter()
        .filter(|r| r["path"] == "/read" && !r["error"].is_null())
        .count();
    assert_eq!(broken, 2, "{page}");
}

/// curl through `gw`'s tunnel to `url`, speaking HTTP/2 inside when `http2` (from
/// 127.0.0.2, agent b, when `agent_b`).
async fn curl_tunnel(gw: &Gateway, url: &str, http2: bool, agent_b: bool) -> CurlResult {
    let mut a = args![
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        url
    ];
    if http2 {
        a.push("--http2".into());
    }
    if agent_b {
        a.extend(args!["--interface", "127.0.0.2"]);
    }
    curl_async(a).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_inside_an_http2_tunnel_get_clear_errors_on_their_stream() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("faulty origins");
    let healthy = Origin::https(&ca);
    let gw = fault_gateway(Some(&ca), "");
    let healthy_url = format!("https://localhost:{}/after", healthy.port());
    for (fault, status, error) in BEFORE_THE_ANSWER {
        let origin = FaultyOrigin::start_tls(fault, &ca);
        let r = curl_tunnel(&gw, &origin.url("/read"), true, false).await;
        assert_eq!(
            (
                r.status,
                r.json()["error"].as_str(),
                r.http_version.as_str()
            ),
            (status, Some(error), "2"),
            "{fault:?}: {r:?}"
        );
        assert!(origin.connections() >= 1, "{fault:?}: the origin was asked");
        let after = curl_tunnel(&gw, &healthy_url, true, false).await;
        assert_eq!(after.status, 200, "after {fault:?}: {after:?}");
    }
    // An answer that breaks off after its head: the stream must end in an error (curl 92: an
    // HTTP/2 stream reset — the gateway cancels it, before or after relaying the head; 18: data
    // outstanding), never as a complete-looking answer.
    for fault in [Fault::ShortBody, Fault::StallMidBody] {
        let origin = FaultyOrigin::start_tls(fault, &ca);
        let r = curl_tunnel(&gw, &origin.url("/read"), true, false).await;
        assert!(r.status == 0 || r.status == 200, "{fault:?}: {r:?}");
        assert!(
            [16, 18, 56, 92].contains(&r.exit),
            "{fault:?}: curl must report a broken answer: {r:?}"
        );
        assert!(r.body.len() < 1000, "{fault:?}: {r:?}");
        let after = curl_tunnel(&gw, &healthy_url, true, false).await;
        assert_eq!(after.status, 200, "after {fault:?}: {after:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_agents_are_served_while_an_origin_stalls_requests() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("faulty origins");
    let healthy = Origin::https(&ca);
    let stalled = FaultyOrigin::start_tls(Fault::Stall, &ca);
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}read_timeout_ms = 20000\n\
         [[agents]]\nid = \"b\"\nrun_mode = \"Autonomous\"\npeers = [\"127.0.0.2\"]\n{REVIEW_AGENT}",
        loopback_upstream(Some(&ca.cert_path()))
    );
    let gw = Gateway::start_with_policies(&config, &[APPROVAL_POLICIES]);
    // Agent a: 24 requests stuck at the stalled origin, over HTTP/2 tunnels.
    let stuck: Vec<_> = (0..24)
        .map(|n| {
            let url = stalled.url(&format!("/stuck/{n}"));
            let proxy = gw.proxy_url();
            let ca_cert = gw.ca_cert();
            tokio::spawn(async move {
                curl_async(args![
                    "-x",
                    proxy,
                    "--cacert",
                    ca_cert.display(),
                    "--http2",
                    url
                ])
                .await
            })
        })
        .collect();
    for _ in 0..500 {
        if stalled.connections() >= 24 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        stalled.connections() >= 24,
        "the stuck requests reached the origin"
    );
    // Meanwhile agent b is served, over HTTP/2 and HTTP/1.1, while a's requests stay stuck.
    let url = format!("https://localhost:{}/b", healthy.port());
    for n in 0..10 {
        let r = curl_tunnel(&gw, &url, n % 2 == 0, true).await;
        assert_eq!(r.status, 200, "agent b, request {n}: {r:?}");
    }
    assert_eq!(
        stuck.iter().filter(|s| s.is_finished()).count(),
        0,
        "agent a's requests are still waiting for the stalled origin"
    );
    // Stopping the origin ends the stuck requests with a gateway error, not a hang.
    drop(stalled);
    for s in stuck {
        let r = s.await.expect("curl");
        assert_eq!(r.status / 100, 5, "{r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Token endpoint garbage

const CLIENT_ID: &str = "faults-client";
const CLIENT_SECRET: &str = "faults-client-secret-5b7e";
const AUDIENCE: &str = "api://protected/.default";
const HOST: &str = "api.protected.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_answering_garbage_gives_502_and_forwards_nothing() {
    if no_curl() {
        return;
    }
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::ZERO);
    let origin = Origin::protected(HOST, &endpoint, AUDIENCE);
    let config = entra_config(
        &endpoint,
        CLIENT_ID,
        r#"{ env = "FAULTS_CLIENT_SECRET" }"#,
        HOST,
        origin.port(),
        AUDIENCE,
    ) + r#"
[credentials]
backoff_initial_ms = 50
backoff_max_ms = 50

[[agents]]
id = "a"
run_mode = "Autonomous"
identity = "entra"
peers = ["127.0.0.1"]
"#;
    let gw = Gateway::start_with_env(
        &config,
        &[ALLOW_ALL],
        "",
        &[
            ("FAULTS_CLIENT_SECRET", CLIENT_SECRET),
            ("RUST_LOG", "debug"),
        ],
    );
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc"}"#))
            .status,
        201
    );
    let url = format!("https://{HOST}:{}/resource", origin.port());
    for (mode, detail) in [
        (TokenMode::NotJson, "no usable token"),
        (TokenMode::NoAccessToken, "no usable token"),
        (TokenMode::Huge, "too much data"),
    ] {
        endpoint.set_mode(mode);
        let asked = endpoint.requests();
        // A refusal from the backoff of the previous mode names no endpoint answer; wait it out.
        let mut r = curl_async(via(&gw, &url)).await;
        for _ in 0..50 {
            if endpoint.requests() > asked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            r = curl_async(via(&gw, &url)).await;
        }
        assert!(
            endpoint.requests() > asked,
            "{mode:?}: the endpoint was asked"
        );
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (502, Some("credential_unavailable")),
            "{mode:?}: {r:?}"
        );
        assert!(
            r.json()["detail"]
                .as_str()
                .is_some_and(|d| d.contains(detail)),
            "{mode:?}: {r:?}"
        );
        for secret in [CLIENT_SECRET, GARBAGE_TOKEN, "endpoint-internal-text"] {
            assert!(!r.body.contains(secret), "{mode:?}: body carries {secret}");
        }
        assert_eq!(origin.requests(), 0, "{mode:?}: nothing is forwarded");
    }
    // The endpoint recovers: the next request (after the backoff) gets a token.
    endpoint.set_mode(TokenMode::Normal);
    let mut r = curl_async(via(&gw, &url)).await;
    for _ in 0..50 {
        if r.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        r = curl_async(via(&gw, &url)).await;
    }
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(origin.requests(), 1);
    let log = gw.log();
    for secret in [CLIENT_SECRET, GARBAGE_TOKEN, "endpoint-internal-text"] {
        assert!(!log.contains(secret), "the log carries {secret}");
    }
}

// ---------------------------------------------------------------------------------------------
// Durability under SIGKILL

/// A small deterministic generator (xorshift64*), seeded from the clock and printed, so a
/// failing sequence of kill points can be replayed with `TOLLGATE_KILL_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> (Rng, u64) {
        let seed = std::env::var("TOLLGATE_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        (Rng(seed), seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Starts the kill-loop gateway in `dir`: agent `a` (Review) on 127.0.0.1, reads allowed,
/// writes held for approval, and an approver `alice`.
fn start_durable(dir: tempfile::TempDir) -> Gateway {
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir).expect("policy dir");
    std::fs::write(policy_dir.join(APPROVAL_POLICIES.0), APPROVAL_POLICIES.1).expect("policy");
    let alice = dir.path().join("alice.token");
    std::fs::write(&alice, "alice-kill-loop-token\n").expect("token");
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n[[admin.approvers]]\nname = \"alice\"\ntoken = {{ file = {alice:?} }}\n\
         {REVIEW_AGENT}\n[policy]\ndir = {policy_dir:?}\n",
        loopback_upstream(None)
    );
    Gateway::start_in(dir, &config)
}

/// Every audit record of agent `a` the admin API returns, by position.
fn audit_records(gw: &Gateway) -> std::collections::BTreeMap<u64, serde_json::Value> {
    let mut all = std::collections::BTreeMap::new();
    let mut since = 0;
    loop {
        let page = gw.admin_call(
            "GET",
            &format!("/v1/agents/a/audit?since={since}&limit=1000"),
            None,
        );
        assert_eq!(page.status, 200, "{page:?}");
        let page = page.json();
        let records = page["records"].as_array().cloned().unwrap_or_default();
        if records.is_empty() {
            return all;
        }
        for record in records {
            let seq = record["seq"].as_u64().expect("seq");
            since = seq + 1;
            all.insert(seq, record);
        }
    }
}

/// `tollgate audit verify --agent a`: exit code and output.
fn audit_verify(gw: &Gateway) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["audit", "verify", "--agent", "a", "--admin"])
        .arg(format!("http://{}", gw.admin))
        .arg("--token-file")
        .arg(gw.data_dir().join("admin-token"))
        .output()
        .expect("run tollgate audit verify");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Holds a POST, waits until it is pending, and returns its approval id and the request.
async fn hold_one(
    gw: &Gateway,
    url: &str,
    body: &str,
) -> (String, tokio::task::JoinHandle<CurlResult>) {
    let held = post_in_background(gw, url, body, &[]);
    let id = wait_for_approvals(gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    (id, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_across_repeated_kills() {
    if no_curl() {
        return;
    }
    const ROUNDS: usize = 8;
    let (mut rng, seed) = Rng::new();
    eprintln!("kill loop seed {seed} (TOLLGATE_KILL_SEED={seed} replays it)");
    let origin = Origin::http();
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", origin.port());
    // What the gateway acknowledged: approval id → (state, approver); audit seq → record.
    let mut decided: std::collections::HashMap<String, (String, String)> = Default::default();
    let mut audited: std::collections::BTreeMap<u64, serde_json::Value> = Default::default();
    let (mut kills, mut checks_of_approvals, mut checks_of_records) = (0, 0, 0);
    let mut dir = tempfile::tempdir().expect("tempdir");

    for round in 0..=ROUNDS {
        let gw = start_durable(dir);
        // Everything acknowledged before the last kill is there, unchanged.
        for (id, (state, approver)) in &decided {
            let got = gw.admin_call("GET", &format!("/v1/approvals/{id}"), None);
            assert_eq!(got.status, 200, "round {round}, approval {id}: {got:?}");
            let got = got.json();
            assert_eq!(
                (got["state"].as_str(), got["approver"].as_str()),
                (Some(state.as_str()), Some(approver.as_str())),
                "round {round}, approval {id}: {got}"
            );
            checks_of_approvals += 1;
        }
        let now = audit_records(&gw);
        for (seq, record) in &audited {
            assert_eq!(
                now.get(seq),
                Some(record),
                "round {round}: audit record {seq}"
            );
            checks_of_records += 1;
        }
        let (code, out) = audit_verify(&gw);
        if !audited.is_empty() {
            assert_eq!(code, 0, "round {round}: {out}");
            assert!(out.contains("chain intact"), "round {round}: {out}");
        }
        if round == ROUNDS {
            break;
        }

        // Reads in the background all the time, so the kill also lands mid-request and
        // mid-audit-batch.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (stop, proxy, target) = (stop.clone(), gw.proxy_url(), url("/read"));
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    let _ = curl_async(args!["-x", &proxy, "--max-time", "2", &target]).await;
                }
            })
        };
        // A few operations, then the kill at one of several points.
        for step in 0..(1 + rng.below(4)) {
            let r = curl_async(args![
                "-x",
                gw.proxy_url(),
                url(&format!("/get/{round}/{step}"))
            ])
            .await;
            assert_eq!(r.status, 200, "{r:?}");
            let (id, held) = hold_one(&gw, &url("/write"), &format!("r{round}s{step}")).await;
            let (alice, admin) = (Some("alice-kill-loop-token"), Some(gw.admin_token()));
            let (approver, token) = if rng.below(2) == 0 {
                ("alice", alice.map(str::to_string))
            } else {
                ("admin", admin)
            };
            let (state, ack) = if rng.below(3) == 0 {
                let ack = gw.admin_as(
                    token.as_deref(),
                    "POST",
                    &format!("/v1/approvals/{id}/deny"),
                    Some(r#"{"reason":"kill loop says no"}"#),
                );
                ("denied", ack)
            } else {
                let ack = gw.admin_as(
                    token.as_deref(),
                    "POST",
                    &format!("/v1/approvals/{id}/approve"),
                    None,
                );
                ("approved", ack)
            };
            assert_eq!(ack.status, 200, "{ack:?}");
            decided.insert(id, (state.to_string(), approver.to_string()));
            let _ = held.await;
        }
        // The kill point: right after a decision was acknowledged (its request still on its
        // way), while a request is held, or in the middle of the reads.
        let in_flight = match rng.below(3) {
            0 => {
                let (id, held) = hold_one(&gw, &url("/write"), "last").await;
                let ack = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
                assert_eq!(ack.status, 200, "{ack:?}");
                decided.insert(id, ("approved".into(), "admin".into()));
                Some(held)
            }
            1 => Some(hold_one(&gw, &url("/write"), "pending at the kill").await.1),
            _ => {
                tokio::time::sleep(Duration::from_millis(rng.below(120))).await;
                None
            }
        };
        // What the admin API has shown is acknowledged too.
        audited = audit_records(&gw);
        stop.store(true, Ordering::Release);
        dir = gw.stop();
        kills += 1;
        let _ = reader.await;
        if let Some(held) = in_flight {
            let _ = held.await;
        }
    }
    eprintln!(
        "kill loop: {kills} kills, {} approvals acknowledged ({checks_of_approvals} checks after restarts), \
         {} audit records acknowledged ({checks_of_records} checks after restarts), audit chain verified after every restart",
        decided.len(),
        audited.len()
    );
    assert!(kills == ROUNDS && !decided.is_empty() && !audited.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Storage faults

/// A filesystem mounted for a test; unmounted (lazily, so nothing left running can keep it)
/// when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// `mount <args> <at>`, creating `at` first.
fn mount(args: &[&str], at: &std::path::Path) -> Result<Mounted, String> {
    std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("mount")
        .args(args)
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(Mounted(at.to_path_buf()))
}

/// Changes the options of the mount at `at` (e.g. `remount,bind,ro`).
fn remount(options: &str, at: &std::path::Path) {
    let out = std::process::Command::new("mount")
        .args(["-o", options])
        .arg(at)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "mount -o {options}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fills the filesystem holding `dir` with one file until a write fails; returns the file.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler");
    for chunk in [64 * 1024, 4096, 1] {
        let block = vec![0u8; chunk];
        while file.write_all(&block).is_ok() {}
    }
    path
}

/// Waits (up to 5 s) until the agent's audit trail has at least `n` records, and returns it.
async fn audited_at_least(
    gw: &Gateway,
    n: usize,
) -> std::collections::BTreeMap<u64, serde_json::Value> {
    for _ in 0..250 {
        let records = audit_records(gw);
        if records.len() >= n {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the audit trail never reached {n} records");
}

/// After a restart or a recovery: the approval `id` is still approved by `approver`, every record in
/// `audited` is unchanged, the chain is intact, and the gateway serves reads and writes.
async fn all_there_and_serving(
    gw: &Gateway,
    origin: &Origin,
    (id, approver): (&str, &str),
    audited: &std::collections::BTreeMap<u64, serde_json::Value>,
) {
    let got = gw
        .admin_call("GET", &format!("/v1/approvals/{id}"), None)
        .json();
    assert_eq!(
        (got["state"].as_str(), got["approver"].as_str()),
        (Some("approved"), Some(approver)),
        "{got}"
    );
    let now = audit_records(gw);
    for (seq, record) in audited {
        assert_eq!(now.get(seq), Some(record), "audit record {seq}");
    }
    let (code, out) = audit_verify(gw);
    assert!(code == 0 && out.contains("chain intact"), "{out}");
    let url = format!("http://127.0.0.1:{}/again", origin.port());
    let r = curl_async(via(gw, &url)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let (id, held) = hold_one(gw, &url, "again").await;
    let ack = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(ack.status, 200, "{ack:?}");
    assert_eq!(held.await.expect("curl").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_all_forwarding_and_freeing_it_recovers_without_a_restart() {
    if no_curl() {
        return;
    }
    if !is_root() {
        eprintln!("SKIP: simulating a full disk mounts a tmpfs, which needs root");
        return;
    }
    let origin = Origin::http();
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", origin.port());
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let _tmpfs = match mount(&["-t", "tmpfs", "-o", "size=8m", "tmpfs"], &data) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIP: cannot mount a tmpfs for the data directory: {e}");
            return;
        }
    };
    let gw = start_durable(dir);

    // Before: a write approved and sent, a read; both audited.
    let (id, held) = hold_one(&gw, &url("/write"), "before").await;
    let ack = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(ack.status, 200, "{ack:?}");
    assert_eq!(held.await.expect("curl").status, 200);
    let r = curl_async(args!["-x", gw.proxy_url(), url("/read")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let audited = audited_at_least(&gw, 2).await;

    // The disk fills up. Reads go on until an audit record cannot be written; from then on
    // every request is refused, and nothing reaches the origin.
    let filler = fill(&data);
    let mut refused = None;
    for n in 0..500 {
        let r = curl_async(args!["-x", gw.proxy_url(), url(&format!("/read/{n}"))]).await;
        if r.status == 503 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.expect("a full disk never refused a request");
    assert_eq!(
        refused.json()["error"],
        "storage_unavailable",
        "{refused:?}"
    );
    let sent = origin.requests();
    let write = curl_async(args![
        "-x",
        gw.proxy_url(),
        "--data-binary",
        "during",
        url("/write")
    ])
    .await;
    assert_eq!(
        (write.status, write.json()["error"].as_str()),
        (503, Some("storage_unavailable")),
        "{write:?}"
    );
    let read = curl_async(args!["-x", gw.proxy_url(), url("/read")]).await;
    assert_eq!(read.status, 503, "{read:?}");
    assert_eq!(
        origin.requests(),
        sent,
        "nothing is forwarded that cannot be audited"
    );
    let pending = gw
        .admin_call("GET", "/v1/approvals?state=pending", None)
        .json();
    assert_eq!(
        pending["approvals"].as_array().map(Vec::len),
        Some(0),
        "{pending}"
    );
    // Reported: readiness, a metric, an error in the log.
    let ready = gw.admin_call("GET", "/readyz", None);
    assert_eq!(
        (ready.status, ready.json()["error"].as_str()),
        (503, Some("storage_unavailable")),
        "{ready:?}"
    );
    assert!(gw.metric("tollgate_storage_write_errors_total") >= 1);
    assert!(gw.metric("tollgate_audit_records_dropped_total") >= 1);
    assert!(gw.log_contains("the store cannot write"), "{}", gw.log());

    // Space comes back: the gateway reopens its store by itself (every 2 s) and serves
    // again, with nothing acknowledged missing and the chain intact; and so after a restart.
    std::fs::remove_file(filler).expect("free the disk");
    let mut ready = gw.admin_call("GET", "/readyz", None);
    for _ in 0..100 {
        if ready.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = gw.admin_call("GET", "/readyz", None);
    }
    assert_eq!(
        ready.status,
        200,
        "never recovered: {ready:?}\n{}",
        gw.log()
    );
    assert!(
        gw.log_contains("the store takes writes again"),
        "{}",
        gw.log()
    );
    all_there_and_serving(&gw, &origin, (&id, "admin"), &audited).await;
    let audited = audit_records(&gw);
    let dir = gw.stop();
    let gw = start_durable(dir);
    all_there_and_serving(&gw, &origin, (&id, "admin"), &audited).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_directory_stops_the_start_with_a_clear_error() {
    if !is_root() {
        eprintln!("SKIP: making the data directory read-only for root needs a read-only bind mount, which needs root");
        return;
    }
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let dir = tempfile::tempdir().expect("tempdir");
    let (real, data) = (dir.path().join("data-real"), dir.path().join("data"));
    std::fs::create_dir_all(&real).expect("real data dir");
    let _bind = match mount(&["--bind", real.to_str().expect("utf8")], &data) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIP: cannot bind-mount the data directory: {e}");
            return;
        }
    };
    let gw = start_durable(dir);
    let url = format!("http://127.0.0.1:{}/write", origin.port());
    let (id, held) = hold_one(&gw, &url, "before").await;
    let ack = gw.admin_as(
        Some("alice-kill-loop-token"),
        "POST",
        &format!("/v1/approvals/{id}/approve"),
        None,
    );
    assert_eq!(ack.status, 200, "{ack:?}");
    assert_eq!(held.await.expect("curl").status, 200);
    let audited = audited_at_least(&gw, 1).await;
    let dir = gw.stop();

    // Read-only (a running gateway's open journal keeps the kernel from remounting, so the
    // disk turns read-only while it is down): the gateway must not start half-working.
    remount("remount,bind,ro", &data);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(dir.path().join("tollgate.toml"))
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    let mut exited = None;
    for _ in 0..200 {
        if let Some(status) = child.try_wait().expect("wait") {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the gateway kept running on a read-only data directory");
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(!exited.expect("status").success(), "{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert!(
        !stderr.contains("another gateway"),
        "a misleading hint: {stderr}"
    );

    // Writable again: everything is there.
    remount("remount,bind,rw", &data);
    let gw = start_durable(dir);
    all_there_and_serving(&gw, &origin, (&id, "alice"), &audited).await;
}

// ---------------------------------------------------------------------------------------------
// Panics

/// Panics are injected with the `fault-injection` feature, which only test builds have, armed
/// by `TOLLGATE_FAULT_INJECTION=1` (`gateway/src/egress/panics.rs`): a request to
/// `/__tollgate_fault/panic/<place>` panics there, after its origin answered. Unarmed, the
/// same request is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_serving_still_answers_records_and_counts_the_request() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n{REVIEW_AGENT}",
        loopback_upstream(None)
    );
    let gw = Gateway::start_with_env(
        &config,
        &[APPROVAL_POLICIES],
        "",
        &[("TOLLGATE_FAULT_INJECTION", "1")],
    );
    let base = format!("http://127.0.0.1:{}", origin.port());
    assert_eq!(gw.metric("tollgate_panics_total"), 0);

    // On the path pingora proxies: the origin answered, then the gateway panicked.
    let read = curl_async(args![
        "-x",
        gw.proxy_url(),
        format!("{base}/__tollgate_fault/panic/response")
    ])
    .await;
    assert_eq!(read.status, 502, "{read:?}");
    assert_eq!(read.json()["error"], "internal_error", "{read:?}");
    assert_eq!(origin.requests(), 1, "the request reached its origin");

    // On the gateway's own send path: an approved write, sent, answered, then a panic.
    let held = post_in_background(
        &gw,
        &format!("{base}/__tollgate_fault/panic/send"),
        "{}",
        &[],
    );
    let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let approved = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(approved.status, 200, "{approved:?}");
    let sent = held.await.expect("curl");
    assert_eq!(sent.status, 502, "{sent:?}");
    assert_eq!(sent.json()["error"], "internal_error", "{sent:?}");
    assert_eq!(
        origin.requests(),
        2,
        "the approved write reached its origin"
    );

    // After the answer's head went out: the connection is closed, and the answer never looks
    // whole.
    let held = post_in_background(
        &gw,
        &format!("{base}/__tollgate_fault/panic/relay"),
        "{}",
        &[],
    );
    let id_relay = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let approved = gw.admin_call("POST", &format!("/v1/approvals/{id_relay}/approve"), None);
    assert_eq!(approved.status, 200, "{approved:?}");
    let cut = held.await.expect("curl");
    assert_ne!(
        cut.exit, 0,
        "an answer cut short by a panic looked complete: {cut:?}"
    );
    assert_eq!(origin.requests(), 3);

    // While a held request waits for approval, parked outside pingora: answered, recorded,
    // nothing recorded as pending, nothing sent.
    let parked = curl_async(args![
        "-x",
        gw.proxy_url(),
        "-d",
        "{}",
        format!("{base}/__tollgate_fault/panic/parked")
    ])
    .await;
    assert_eq!(parked.status, 502, "{parked:?}");
    assert_eq!(parked.json()["error"], "internal_error", "{parked:?}");
    assert_eq!(origin.requests(), 3);
    assert!(wait_for_approvals(&gw, "state=pending", 0).is_empty());

    // All four are in the agent's audit trail, as failures, and counted.
    let records = support::audit_records(&gw, "a", 4);
    let failed: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["error"] == "internal_error")
        .collect();
    assert_eq!(failed.len(), 4, "{records:?}");
    // Each with the status the sandbox saw: 502, or the origin's when its head was out.
    for (path, status) in [
        ("response", 502),
        ("send", 502),
        ("relay", 200),
        ("parked", 502),
    ] {
        let path = format!("/__tollgate_fault/panic/{path}");
        assert!(
            failed
                .iter()
                .any(|r| r["path"] == path.as_str() && r["status"] == status),
            "{path}: {records:?}"
        );
    }
    assert!(failed
        .iter()
        .any(|r| r["path"] == "/__tollgate_fault/panic/response"));
    assert!(failed
        .iter()
        .any(|r| r["path"] == "/__tollgate_fault/panic/send" && r["approval"] == id.as_str()));
    assert_eq!(gw.metric("tollgate_panics_total"), 4);
    // Each panic's message reached the log, through the gateway's log writer.
    let log = gw.log();
    assert!(
        log.contains("' panicked at ") && log.contains("fault injected: a panic in response"),
        "{log}"
    );
    // The gateway serves on.
    let after = curl_async(args!["-x", gw.proxy_url(), format!("{base}/after")]).await;
    assert_eq!(after.status, 200, "{after:?}");
    drop(gw);

    // Not armed, the same build injects nothing.
    let gw = Gateway::start_with_policies(&config, &[APPROVAL_POLICIES]);
    let read = curl_async(args![
        "-x",
        gw.proxy_url(),
        format!("{base}/__tollgate_fault/panic/response")
    ])
    .await;
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(gw.metric("tollgate_panics_total"), 0);
}
