//! Hostile TLS and HTTP/2 from a sandbox, through the real egress listener: CONNECTs the
//! policy denies, CONNECT targets that are not ports, ClientHellos whose server name (or its
//! absence) disagrees with the CONNECT, and HTTP/2 abuse inside an intercepted tunnel (rapid
//! reset, more streams than the gateway allows, a flood of requests). Real sockets, real
//! rustls (ring) on the client, the `h2` crate or hand-written HTTP/2 frames where the crate
//! would be too polite, the real `tollgate` binary and pingora origins.

mod support;

use std::time::Duration;

use support::tunnel::{connect, tunnel, Tls};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Agent `a` on 127.0.0.1 and agent `b` on 127.0.0.2, loopback origins allowed, `extra`
/// config lines, and `policies`.
fn gateway(ca: &TestCa, extra: &str, policies: &[(&str, &str)]) -> Gateway {
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}{extra}\n\
         [[agents]]\nid = \"a\"\nrun_mode = \"Autonomous\"\npeers = [\"127.0.0.1\"]\n\
         [[agents]]\nid = \"b\"\nrun_mode = \"Autonomous\"\npeers = [\"127.0.0.2\"]\n",
        loopback_upstream(Some(&ca.cert_path()))
    );
    Gateway::start_with_policies(&config, policies)
}

/// One HTTP/1.1 GET over `io`; returns the status line and body.
async fn get_h1<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    authority: &str,
    path: &str,
) -> String {
    io.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write request");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

/// A request from agent `b` (127.0.0.2) through the gateway with curl: is the gateway still
/// serving everyone else?
async fn second_agent_served(gw: &Gateway, origin: &Origin, http2: bool) -> CurlResult {
    let url = format!("https://localhost:{}/second-agent", origin.port());
    let mut a = args![
        "--interface",
        "127.0.0.2",
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        &url
    ];
    if http2 {
        a.push("--http2".into());
    }
    curl_async(a).await
}

const POLICIES: (&str, &str) = (
    "hostile.cedar",
    "@id(\"allow-all\")\npermit (principal, action, resource);\n\n\
     @id(\"only-localhost\")\nforbid (principal, action, resource)\n\
     unless { resource in Domain::\"localhost\" || resource == Host::\"127.0.0.1\" };\n\n\
     @id(\"no-port-9\")\nforbid (principal, action, resource) when { context.port == 9 };\n\n\
     @id(\"no-admin-path\")\nforbid (principal, action, resource) when { context.path == \"/admin\" };\n",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_the_policy_denies_is_refused_before_any_tls() {
    let ca = TestCa::new("origin");
    // The origin's certificate also names evil.test, and evil.test resolves to it: only the
    // policy stands between a CONNECT to evil.test and this origin.
    let origin = Origin::https_for(&ca, &["evil.test"]);
    let gw = gateway(
        &ca,
        "resolve = { \"evil.test\" = \"127.0.0.1\" }\n",
        &[POLICIES],
    );
    let mut failures = Vec::new();
    for authority in [
        format!("evil.test:{}", origin.port()),
        "localhost:9".to_string(),
    ] {
        let (head, mut tcp) = connect(gw.egress, &authority).await;
        // The refusal is the whole answer: the gateway closes without a handshake.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
        let answer = format!("{head}{}", String::from_utf8_lossy(&rest));
        if !head.starts_with("HTTP/1.1 403") || !answer.contains("\"error\":\"denied\"") {
            failures.push(format!("CONNECT {authority}: {answer:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        gw.log_contains("only-localhost") && gw.log_contains("no-port-9"),
        "the log names the deciding policies:\n{}",
        gw.log()
    );
    // Each refused tunnel leaves an audit record of agent a, naming its authority and the
    // deciding policy (written by the audit thread within its flush interval).
    let refused = [
        (format!("evil.test:{}", origin.port()), "only-localhost"),
        ("localhost:9".to_string(), "no-port-9"),
    ];
    let mut records = Vec::new();
    for _ in 0..100 {
        records = gw.admin_call("GET", "/v1/agents/a/audit", None).json()["records"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if records.len() >= refused.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(records.len(), refused.len(), "{records:?}");
    for (record, (authority, policy)) in records.iter().zip(&refused) {
        assert_eq!(
            (
                record["method"].as_str(),
                record["host"].as_str(),
                record["decision"].as_str(),
                record["status"].as_u64(),
                record["policies"][0].as_str()
            ),
            (
                Some("CONNECT"),
                Some(authority.as_str()),
                Some("deny"),
                Some(403),
                Some(*policy)
            ),
            "{record}"
        );
    }

    // A policy on something a CONNECT does not show (the path) does not refuse the tunnel:
    // the requests inside it are decided one by one.
    let authority = format!("localhost:{}", origin.port());
    let mut tls = tunnel(&gw, &authority, "localhost", true, &[b"http/1.1"])
        .await
        .expect("an allowed CONNECT is intercepted");
    let answer = get_h1(&mut tls, &authority, "/admin").await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("no-admin-path"), "{answer}");
    let mut tls = tunnel(&gw, &authority, "localhost", true, &[b"http/1.1"])
        .await
        .expect("an allowed CONNECT is intercepted");
    let answer = get_h1(&mut tls, &authority, "/fine").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        origin.requests(),
        1,
        "only the allowed request reaches the origin"
    );
}

#[test]
fn a_malformed_connect_gets_400() {
    let ca = TestCa::new("origin");
    let gw = gateway(&ca, "", &[ALLOW_ALL]);
    let mut failures = Vec::new();
    for authority in [
        "localhost:0",
        "localhost:https",
        "localhost:65536",
        "localhost:-1",
        "localhost:+443",
        "localhost:",
        "[::1]:0",
    ] {
        let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        let answer = raw_exchange(gw.egress, request.as_bytes());
        if !answer.starts_with("HTTP/1.1 400") || !answer.contains("\"error\":\"bad_request\"") {
            failures.push(format!("CONNECT {authority}: {answer:?}"));
        }
    }
    // A CONNECT head framed with bare LFs is refused like any other such head.
    for request in [
        "CONNECT localhost:443 HTTP/1.1\nHost: localhost:443\n\n",
        "CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\n\r\n",
    ] {
        let answer = raw_exchange(gw.egress, request.as_bytes());
        if !answer.starts_with("HTTP/1.1 400") || !answer.contains("LF without CR") {
            failures.push(format!("{request:?}: {answer:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let again = raw_exchange(gw.egress, b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(again.starts_with("HTTP/1.1 400"), "still serving: {again}");
}

/// `openssl s_client` through the gateway's CONNECT to `connect`, sending `servername` as
/// SNI (openssl sends an IP literal as SNI if told to, which rustls never does) and requiring
/// a certificate valid for the address `verify_ip`. Returns whether the handshake completed
/// and verified against the gateway's CA, and what openssl said.
async fn openssl_handshake(
    gw: &Gateway,
    connect: &str,
    servername: &str,
    verify_ip: &str,
) -> (bool, String) {
    let args = vec![
        "s_client".to_string(),
        "-proxy".into(),
        gw.egress.to_string(),
        "-connect".into(),
        connect.into(),
        "-servername".into(),
        servername.into(),
        "-CAfile".into(),
        gw.ca_cert().display().to_string(),
        "-verify_ip".into(),
        verify_ip.into(),
        "-verify_return_error".into(),
        "-brief".into(),
    ];
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new("openssl")
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run openssl");
        // Closing stdin ends the session once the handshake is over.
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("openssl output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (text.contains("CONNECTION ESTABLISHED"), text)
    })
    .await
    .expect("openssl thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_whose_server_name_disagrees_with_the_connect_is_refused() {
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "", &[ALLOW_ALL]);
    let by_name = format!("localhost:{}", origin.port());
    let by_ip = format!("127.0.0.1:{}", origin.port());

    // No SNI for a CONNECT that names a host: refused.
    let refused = tunnel(&gw, &by_name, "localhost", false, &[b"http/1.1"]).await;
    assert!(refused.is_err(), "a ClientHello without SNI was accepted");
    assert!(
        gw.log_contains("has no server name"),
        "the log says why:\n{}",
        gw.log()
    );
    // A DNS name as SNI for a CONNECT to an IP address: refused.
    let refused = tunnel(&gw, &by_ip, "localhost", true, &[b"http/1.1"]).await;
    assert!(refused.is_err(), "SNI localhost inside CONNECT 127.0.0.1");

    // No SNI for an IP-literal CONNECT (what clients send for an address): served.
    let mut tls = tunnel(&gw, &by_ip, "127.0.0.1", true, &[b"http/1.1"])
        .await
        .expect("an IP-literal CONNECT without SNI is intercepted");
    let answer = get_h1(&mut tls, &by_ip, "/by-ip").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(origin.requests(), 1);

    // IP literals as SNI (sent by openssl). RFC 6066 allows only DNS names there, and rustls
    // ignores an IP literal: it counts as no SNI. So inside a CONNECT to a name it is refused,
    // and inside a CONNECT to an address the leaf is still the CONNECT address's, whatever
    // address the SNI claims (and the tunnel goes to the CONNECT address).
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP (IP-literal SNI part): openssl is not installed (apt-get install -y openssl)"
        );
    } else {
        let (ok, text) = openssl_handshake(&gw, &by_name, "127.0.0.1", "127.0.0.1").await;
        assert!(
            !ok,
            "SNI 127.0.0.1 inside CONNECT localhost was accepted:\n{text}"
        );
        let (ok, text) = openssl_handshake(&gw, &by_ip, "10.0.0.1", "10.0.0.1").await;
        assert!(
            !ok,
            "SNI 10.0.0.1 inside CONNECT 127.0.0.1 got a certificate for 10.0.0.1:\n{text}"
        );
        let (ok, text) = openssl_handshake(&gw, &by_ip, "10.0.0.1", "127.0.0.1").await;
        assert!(ok, "the leaf is the CONNECT address's:\n{text}");
        let (ok, text) = openssl_handshake(&gw, &by_ip, "127.0.0.1", "127.0.0.1").await;
        assert!(
            ok,
            "SNI 127.0.0.1 inside CONNECT 127.0.0.1 was refused:\n{text}"
        );
    }
    assert_eq!(
        origin.requests(),
        1,
        "nothing of a refused tunnel is forwarded"
    );

    let after = second_agent_served(&gw, &origin, false).await;
    assert_eq!(after.status, 200, "the gateway keeps serving: {after:?}");
}

/// An HTTP/2 client connection through a tunnel to `origin` (ALPN h2, checked).
async fn h2_client(
    gw: &Gateway,
    origin: &Origin,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let authority = format!("localhost:{}", origin.port());
    let tls = tunnel(gw, &authority, "localhost", true, &[b"h2"])
        .await
        .expect("tunnel");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN must select h2"
    );
    let (send, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    (send, tokio::spawn(connection))
}

fn h2_get(origin: &Origin, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("GET")
        .uri(format!("https://localhost:{}{path}", origin.port()))
        .body(())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_cut_off_and_mostly_never_reaches_the_origin() {
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "", &[ALLOW_ALL]);
    let (mut send, connection) = h2_client(&gw, &origin).await;
    const STREAMS: usize = 5_000;
    let mut opened = 0;
    let mut stopped = None;
    for _ in 0..STREAMS {
        send = match send.clone().ready().await {
            Ok(s) => s,
            Err(e) => {
                stopped = Some(e);
                break;
            }
        };
        match send.send_request(h2_get(&origin, "/reset"), false) {
            Ok((_response, mut body)) => {
                body.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(e) => {
                stopped = Some(e);
                break;
            }
        }
    }
    drop(send);
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    let reached = origin.requests();
    eprintln!(
        "rapid reset: {opened} streams opened and reset, stopped by {stopped:?}; \
         connection ended {ended:?}; {reached} request(s) reached the origin"
    );
    let goaway = stopped
        .as_ref()
        .is_some_and(|e| e.is_go_away() || e.is_io() || e.reason().is_some());
    assert!(
        goaway && opened < STREAMS,
        "the gateway must cut off a connection that keeps resetting streams \
         ({opened} opened, stopped by {stopped:?})"
    );
    assert!(
        reached <= 100,
        "{reached} reset requests reached the origin (bound: the stream limit, 100)"
    );
    let after = second_agent_served(&gw, &origin, true).await;
    assert_eq!(after.status, 200, "the gateway keeps serving: {after:?}");
    assert_eq!(after.http_version, "2", "{after:?}");
}

/// A tunnel to `authority` (a `localhost` origin) speaking HTTP/2, with the client's preface
/// and an empty SETTINGS frame sent: ready for hand-written frames.
async fn raw_h2(gw: &Gateway, authority: &str) -> Tls {
    let mut tls = tunnel(gw, authority, "localhost", true, &[b"h2"])
        .await
        .expect("tunnel");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    tls.write_all(&out).await.expect("preface");
    tls
}

/// A raw HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A HEADERS block for `GET https://authority path` in HPACK without Huffman or indexing.
fn hpack_get(authority: &str, path: &str) -> Vec<u8> {
    // :method GET (static 2), :scheme https (static 7).
    let mut out = vec![0x82, 0x87];
    for (index, value) in [(4u8, path), (1u8, authority)] {
        // Literal without indexing, indexed name (:path 4, :authority 1), 7-bit length.
        out.push(index);
        assert!(value.len() < 127, "short values only");
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;

/// Reads one frame: (type, flags, stream id, payload); `None` at the end of the stream.
async fn read_frame<S: AsyncRead + Unpin>(io: &mut S) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_http2_streams_than_allowed_are_refused_and_never_reach_the_origin() {
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "", &[ALLOW_ALL]);
    let authority = format!("localhost:{}", origin.port());
    // Hand-written frames: the h2 crate would respect the gateway's limit.
    let mut tls = raw_h2(&gw, &authority).await;
    let mut limit = None;
    while limit.is_none() {
        let (kind, flags, _, payload) = read_frame(&mut tls).await.expect("server SETTINGS");
        if kind == SETTINGS && flags & 0x1 == 0 {
            // SETTINGS_MAX_CONCURRENT_STREAMS is 0x3.
            limit = payload
                .chunks(6)
                .find(|s| s[..2] == [0, 3])
                .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]) as usize);
            assert!(limit.is_some(), "the gateway must announce a stream limit");
        }
    }
    let limit = limit.expect("limit");
    assert!(limit <= 1000, "a stream limit of {limit} is no limit");
    let streams = 2 * limit + 50;
    let mut out = frame(SETTINGS, 0x1, 0, &[]);
    for i in 0..streams {
        let id = 2 * i as u32 + 1;
        out.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            id,
            &hpack_get(&authority, "/sleep/1500"),
        ));
    }
    tls.write_all(&out).await.expect("flood");
    // Read until every stream is answered or refused, or the connection ends.
    let (mut answered, mut refused, mut goaway) = (0usize, 0usize, false);
    let mut done = std::collections::HashSet::new();
    let read = async {
        while done.len() < streams {
            let Some((kind, flags, id, payload)) = read_frame(&mut tls).await else {
                break;
            };
            match kind {
                RST_STREAM if done.insert(id) => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if code == REFUSED_STREAM {
                        refused += 1;
                    }
                }
                GOAWAY => goaway = true,
                _ if flags & END_STREAM != 0 && id != 0 && done.insert(id) => answered += 1,
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), read).await;
    let reached = origin.requests();
    eprintln!(
        "stream flood: {streams} streams, limit {limit}: {answered} answered, {refused} refused, \
         GOAWAY {goaway}, {reached} reached the origin"
    );
    assert!(
        reached <= limit,
        "{reached} requests reached the origin over one connection, more than the limit {limit}"
    );
    assert!(
        refused >= streams - limit || goaway,
        "streams over the limit must be refused ({refused} refused)"
    );
    let after = second_agent_served(&gw, &origin, true).await;
    assert_eq!(after.status, 200, "the gateway keeps serving: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_http2_requests_on_one_connection_leaves_others_served() {
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "", &[ALLOW_ALL]);
    let (send, connection) = h2_client(&gw, &origin).await;
    let probe = send.clone();
    const REQUESTS: usize = 3_000;
    let request = h2_get(&origin, "/flood");
    let flood = tokio::spawn(async move {
        let mut responses = Vec::with_capacity(REQUESTS);
        let mut send = send;
        for _ in 0..REQUESTS {
            send = match send.ready().await {
                Ok(s) => s,
                Err(_) => break,
            };
            match send.send_request(request.clone(), true) {
                Ok((response, _)) => responses.push(tokio::spawn(async move {
                    response.await.map(|r| r.status().as_u16()).ok()
                })),
                Err(_) => break,
            }
        }
        let mut ok = 0;
        for r in responses {
            if let Ok(Some(200)) = r.await {
                ok += 1;
            }
        }
        ok
    });
    // Another agent, while the flood runs (it may also finish first: no timing is assumed).
    let during = second_agent_served(&gw, &origin, true).await;
    let ok = flood.await.expect("flood task");
    // The server's SETTINGS have long arrived.
    assert!(
        probe.current_max_send_streams() <= 1000,
        "the gateway announces a stream limit ({})",
        probe.current_max_send_streams()
    );
    connection.abort();
    let reached = origin.requests();
    eprintln!("request flood: {ok} of {REQUESTS} answered 200; {reached} reached the origin");
    assert_eq!(during.status, 200, "another agent is served: {during:?}");
    assert!(ok > 0, "the flooding connection was served at first");
    assert!(
        reached <= ok + 1 + 100,
        "{reached} reached the origin but only {ok} (+1) were answered"
    );
    let after = second_agent_served(&gw, &origin, false).await;
    assert_eq!(after.status, 200, "the gateway keeps serving: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_too_slowly_inside_a_tunnel_is_cut_off() {
    let ca = TestCa::new("slow-tunnel");
    let origin = Origin::https(&ca);
    let gw = gateway(
        &ca,
        "[limits]\nrequest_head_timeout_ms = 600\n",
        &[ALLOW_ALL],
    );
    let authority = format!("localhost:{}", origin.port());
    let mut tls = tunnel(&gw, &authority, "localhost", true, &[b"http/1.1"])
        .await
        .expect("tunnel");
    // A header line every 200 ms for 3 s: each read is quick, the head never ends in time.
    let mut cut_off = false;
    let line = format!("GET /slow HTTP/1.1\r\nHost: {authority}\r\n");
    if tls.write_all(line.as_bytes()).await.is_err() {
        cut_off = true;
    }
    for _ in 0..15 {
        if cut_off {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        cut_off = tls.write_all(b"X-Slow: 1\r\n").await.is_err() || tls.flush().await.is_err();
    }
    let _ = tls.write_all(b"\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("HTTP/1.1 200") && origin.requests() == 0,
        "the slow head was served inside the tunnel: {answer:?}"
    );
    let served = second_agent_served(&gw, &origin, false).await;
    assert_eq!(served.status, 200, "{served:?}");
}

/// A HEADERS block for an HTTP/2 extended CONNECT (RFC 8441) to `authority` asking for
/// `protocol`, in HPACK without Huffman or indexing.
fn hpack_extended_connect(authority: &str, protocol: &str) -> Vec<u8> {
    // :scheme https (static 7).
    let mut out = vec![0x87];
    // Literal without indexing, indexed name: :method (2), :path (4), :authority (1).
    for (index, value) in [(2u8, "CONNECT"), (4u8, "/chat"), (1u8, authority)] {
        out.push(index);
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    // Literal without indexing, new name: :protocol.
    out.push(0);
    out.push(b":protocol".len() as u8);
    out.extend_from_slice(b":protocol");
    out.push(protocol.len() as u8);
    out.extend_from_slice(protocol.as_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_extended_connect_never_reaches_the_origin() {
    // The gateway does not offer RFC 8441 (SETTINGS_ENABLE_CONNECT_PROTOCOL): a WebSocket
    // over HTTP/2 cannot be asked for, so an upgrade never bypasses its policy that way.
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "", &[ALLOW_ALL]);
    let authority = format!("localhost:{}", origin.port());
    let mut tls = raw_h2(&gw, &authority).await;
    let mut offered = false;
    let mut ended = None;
    let exchange = async {
        loop {
            let Some((kind, flags, id, payload)) = read_frame(&mut tls).await else {
                break;
            };
            if kind == SETTINGS && flags & 0x1 == 0 {
                // SETTINGS_ENABLE_CONNECT_PROTOCOL is 0x8.
                offered = payload.chunks(6).any(|s| s[..2] == [0, 8] && s[5] == 1);
                let mut out = frame(SETTINGS, 0x1, 0, &[]);
                out.extend(frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &hpack_extended_connect(&authority, "websocket"),
                ));
                tls.write_all(&out).await.expect("extended CONNECT");
            } else if (matches!(kind, RST_STREAM | HEADERS) && id == 1) || kind == GOAWAY {
                ended = Some(kind);
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), exchange).await;
    assert!(!offered, "the gateway must not offer extended CONNECT");
    assert!(
        matches!(ended, Some(RST_STREAM | GOAWAY)),
        "the stream must be reset or the connection closed, got frame type {ended:?}"
    );
    assert_eq!(origin.requests(), 0);
    let after = second_agent_served(&gw, &origin, true).await;
    assert_eq!(after.status, 200, "the gateway keeps serving: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_head_inside_a_tunnel_gets_a_reason_and_an_audit_record() {
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "", &[ALLOW_ALL]);
    let authority = format!("localhost:{}", origin.port());
    let mut tls = tunnel(&gw, &authority, "localhost", true, &[b"http/1.1"])
        .await
        .expect("tunnel");
    tls.write_all(
        format!("GET /inside?q=secret HTTP/1.1\r\nHost: {authority}\r\nX-A: a\0b\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains("\"error\":\"bad_request\""), "{answer:?}");
    assert_eq!(origin.requests(), 0);
    let records = audit_records(&gw, "a", 1);
    assert_eq!(
        (
            records[0]["host"].as_str(),
            records[0]["path"].as_str(),
            records[0]["status"].as_u64()
        ),
        (Some(authority.as_str()), Some("/inside"), Some(400)),
        "{records:?}"
    );
}

/// `block` (an HPACK header block) with one more literal header field, not indexed.
fn with_header(mut block: Vec<u8>, name: &str, value: &str) -> Vec<u8> {
    block.push(0);
    block.push(name.len() as u8);
    block.extend_from_slice(name.as_bytes());
    block.push(value.len() as u8);
    block.extend_from_slice(value.as_bytes());
    block
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_the_http2_layer_refuses_are_recorded() {
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "", &[ALLOW_ALL]);
    let authority = format!("localhost:{}", origin.port());
    let mut tls = raw_h2(&gw, &authority).await;
    let get = hpack_get(&authority, "/h2");
    let mut out = frame(SETTINGS, 0x1, 0, &[]);
    // A Host that differs from :authority: pingora answers 400 itself.
    out.extend(frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &with_header(get.clone(), "host", "other.test"),
    ));
    // Two lengths that disagree: pingora resets the stream itself.
    out.extend(frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        3,
        &with_header(
            with_header(get, "content-length", "1"),
            "content-length",
            "2",
        ),
    ));
    tls.write_all(&out).await.expect("streams");
    let mut ended = std::collections::HashMap::new();
    let read = async {
        while ended.len() < 2 {
            let Some((kind, _, id, _)) = read_frame(&mut tls).await else {
                break;
            };
            if matches!(kind, HEADERS | RST_STREAM) && id != 0 {
                ended.insert(id, kind);
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    assert_eq!(
        ended,
        std::collections::HashMap::from([(1, HEADERS), (3, RST_STREAM)]),
        "stream 1 answered, stream 3 reset"
    );
    assert_eq!(origin.requests(), 0);
    // Both are requests of agent a, recorded although no phase of the proxy saw them.
    let records = audit_records(&gw, "a", 2);
    for record in &records {
        assert_eq!(
            (
                record["host"].as_str(),
                record["status"].as_u64(),
                record["error"].as_str()
            ),
            (Some(authority.as_str()), Some(400), Some("bad_request")),
            "{records:?}"
        );
    }
    assert!(
        gw.log_contains("HTTP/2 stream 1 was answered 400"),
        "{}",
        gw.log()
    );
    assert!(gw.log_contains("HTTP/2 stream 3 was reset"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_ping_or_settings_flood_is_cut_off_with_enhance_your_calm() {
    const PING: u8 = 0x6;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    const SENT_AT_MOST: usize = 200_000;
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "", &[ALLOW_ALL]);
    let authority = format!("localhost:{}", origin.port());
    for (name, flood_frame) in [
        ("PING", frame(PING, 0, 0, &[7; 8])),
        ("SETTINGS", frame(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0])),
    ] {
        let tls = raw_h2(&gw, &authority).await;
        let (mut reader, mut writer) = tokio::io::split(tls);
        // Sends the flood in batches until the gateway stops taking it (or SENT_AT_MOST).
        let flood = tokio::spawn(async move {
            let batch: Vec<u8> = flood_frame.repeat(1000);
            let mut sent = 0;
            while sent < SENT_AT_MOST {
                if writer.write_all(&batch).await.is_err() {
                    break;
                }
                sent += 1000;
            }
            sent
        });
        // Reads until the connection ends: answers to the flood, and a GOAWAY's error code.
        let read = async {
            let (mut answered, mut goaway) = (0usize, None);
            while let Some((kind, flags, _, payload)) = read_frame(&mut reader).await {
                match kind {
                    PING | SETTINGS if flags & 0x1 == 0x1 => answered += 1,
                    GOAWAY if payload.len() >= 8 => {
                        goaway = Some(u32::from_be_bytes([
                            payload[4], payload[5], payload[6], payload[7],
                        ]))
                    }
                    _ => {}
                }
            }
            (answered, goaway)
        };
        let (answered, goaway) = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| panic!("{name} flood: the gateway answered for 30 s without end"));
        flood.abort();
        assert_eq!(
            goaway,
            Some(ENHANCE_YOUR_CALM),
            "{name} flood: {answered} answered, no GOAWAY ENHANCE_YOUR_CALM"
        );
        assert!(
            answered < 20_000,
            "{name} flood: {answered} answered before the cut-off"
        );
    }
    let after = second_agent_served(&gw, &origin, true).await;
    assert_eq!(after.status, 200, "the gateway keeps serving: {after:?}");
}
