//! The egress data path end to end: the `tollgate` binary, origins on loopback, curl.

mod support;

use std::sync::Arc;

use support::*;

/// A gateway with agent `local` on 127.0.0.1, loopback origins allowed, trusting `ca`.
fn gateway(ca: &TestCa, extra: &str) -> Gateway {
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}{extra}\n[[agents]]\nid = \"local\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n",
        loopback_upstream(Some(&ca.cert_path()))
    );
    Gateway::start_with_policies(&config, &[ALLOW_ALL])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_forwarded_in_origin_form_without_proxy_headers() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::http();
    let gw = gateway(&ca, "");
    let url = format!("http://127.0.0.1:{}/echo?q=1", origin.port());
    let r = curl_async(args![
        "-x",
        gw.proxy_url(),
        &url,
        "-H",
        "Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==",
        "-H",
        "Connection: keep-alive, X-Hop",
        "-H",
        "X-Hop: drop-me",
        "-H",
        "X-Kept: yes",
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = r.seen();
    assert_eq!(seen.target, "/echo?q=1", "origin-form request target");
    assert_eq!(
        seen.headers.get("host").map(String::as_str),
        Some(format!("127.0.0.1:{}", origin.port()).as_str())
    );
    assert_eq!(seen.headers.get("x-kept").map(String::as_str), Some("yes"));
    for hop in [
        "proxy-authorization",
        "proxy-connection",
        "x-hop",
        "connection",
    ] {
        assert!(
            !seen.headers.contains_key(hop),
            "{hop} reached the origin: {seen:?}"
        );
    }
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_do_not_reach_the_sandbox() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::http();
    let gw = gateway(&ca, "");
    let url = format!("http://127.0.0.1:{}/hop-by-hop", origin.port());
    let r = curl_async(args!["-v", "-x", gw.proxy_url(), &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let headers: Vec<String> = r
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("< "))
        .map(|l| l.to_ascii_lowercase())
        .collect();
    assert!(
        headers.iter().any(|h| h.starts_with("x-origin-kept:")),
        "{headers:?}"
    );
    // (Connection-nominated response headers are covered by the unit test of
    // hop_by_hop_headers: the test origin's HTTP server rewrites Connection itself.)
    for hop in ["proxy-authenticate:", "keep-alive:"] {
        assert!(
            !headers.iter().any(|h| h.starts_with(hop)),
            "{hop} reached the sandbox: {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_intercepted_with_a_leaf_from_the_gateway_ca() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "");
    let url = format!("https://localhost:{}/secure/path?x=1", origin.port());
    let gw_ca = gw.ca_cert().display().to_string();
    let r = curl_async(args!["-v", "-x", gw.proxy_url(), "--cacert", gw_ca, &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.seen().target, "/secure/path?x=1");
    assert!(
        r.stderr.contains("Tollgate gateway CA"),
        "curl must see a certificate issued by the gateway CA:\n{}",
        r.stderr
    );
    // Trusting only the origin's own CA fails: what curl is shown is the gateway's leaf.
    let origin_ca = ca.cert_path().display().to_string();
    let r = curl_async(args!["-x", gw.proxy_url(), "--cacert", origin_ca, &url]).await;
    assert_eq!(
        r.exit, 60,
        "curl must reject the leaf without the gateway CA: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_literal_https_origin_gets_a_leaf_for_its_address() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "");
    // Clients send no SNI for an IP address: the leaf is minted for the CONNECT address, and
    // the origin's certificate is verified against that address.
    let url = format!("https://127.0.0.1:{}/by-ip", origin.port());
    let r = curl_async(args![
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        &url
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.seen().target, "/by-ip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_works_inside_the_tunnel() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "");
    let url = format!("https://localhost:{}/h2", origin.port());
    let gw_ca = gw.ca_cert().display().to_string();
    let r = curl_async(args![
        "--http2",
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw_ca,
        &url
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.http_version, "2",
        "ALPN must negotiate h2 with the gateway: {r:?}"
    );
    assert_eq!(r.seen().target, "/h2");
    let r = curl_async(args![
        "--http1.1",
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        &url
    ])
    .await;
    assert_eq!(r.http_version, "1.1", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_source_address_is_refused_and_nothing_is_forwarded() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let http_origin = Origin::http();
    let https_origin = Origin::https(&ca);
    let gw = gateway(&ca, "");
    let plain = format!("http://127.0.0.1:{}/", http_origin.port());
    let r = curl_async(args![
        "--interface",
        "127.0.0.2",
        "-x",
        gw.proxy_url(),
        &plain
    ])
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"], "unknown_agent");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("127.0.0.2"),
        "{r:?}"
    );

    let tls = format!("https://localhost:{}/", https_origin.port());
    let r = curl_async(args![
        "--interface",
        "127.0.0.2",
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        &tls
    ])
    .await;
    assert_ne!(r.exit, 0, "the CONNECT must be refused: {r:?}");
    assert!(
        r.stderr.contains("403"),
        "curl reports the 403 to CONNECT: {}",
        r.stderr
    );
    assert_eq!(http_origin.requests() + https_origin.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_networks_are_refused_unless_allowed() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::http();
    let gw = gateway(&ca, "");
    // 127.0.0.1/32 is allowed; the rest of loopback and the metadata endpoint are not.
    for url in [
        format!("http://127.0.0.3:{}/", origin.port()),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[::1]/".to_string(),
        "http://10.0.0.1/".to_string(),
    ] {
        let r = curl_async(args!["-x", gw.proxy_url(), &url]).await;
        assert_eq!(r.status, 403, "{url}: {r:?}");
        assert_eq!(r.json()["error"], "destination_forbidden", "{url}");
    }
    // Through a tunnel too: the CONNECT is answered, the request inside is refused.
    let r = curl_async(args![
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        "https://10.0.0.1:8443/"
    ])
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(origin.requests(), 0);
}

/// One host name per special-purpose range the SSRF issue named, each resolving (by the
/// resolver override, never DNS) to an address in that range, and what the 403 must name.
/// None of them is public: were the guard to let one through, the connection would go
/// nowhere reachable, and the test would fail on the 502/504 instead of the 403.
const SPECIAL_PURPOSE_ORIGINS: &[(&str, &str, &[&str])] = &[
    (
        "bench.test",
        "198.18.0.1",
        &["benchmarking", "Benchmarking", "RFC 2544"],
    ),
    (
        "dummy.test",
        "192.0.0.8",
        &["IPv4 dummy address", "RFC 7600"],
    ),
    (
        "compat.test",
        "::10.0.0.1",
        &["IPv4-compatible IPv6", "RFC 4291"],
    ),
    (
        "nat64-local.test",
        "64:ff9b:1::a00:1",
        &["NAT64 local-use", "IPv4-IPv6 Translat.", "RFC 8215"],
    ),
    ("teredo.test", "2001::1", &["Teredo", "TEREDO", "RFC 4380"]),
    (
        "sixtofour.test",
        "2002:a00:1::1",
        &["6to4 address embedding 10.0.0.1", "Private-Use", "RFC 1918"],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_in_special_purpose_ranges_are_refused_before_any_connection() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let resolve = SPECIAL_PURPOSE_ORIGINS
        .iter()
        .map(|(host, ip, _)| format!("{host:?} = {ip:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let gw = gateway(
        &ca,
        &format!("connect_timeout_ms = 1000\nresolve = {{ {resolve} }}\n"),
    );
    let mut failures = Vec::new();
    for (host, ip, names) in SPECIAL_PURPOSE_ORIGINS {
        let r = curl_async(args!["-x", gw.proxy_url(), format!("http://{host}/")]).await;
        let detail = r.json()["detail"].as_str().unwrap_or("").to_string();
        // destination_forbidden comes from resolution, before the gateway picks a peer:
        // a connection attempt would have ended in 502 or 504 (upstream_*) instead.
        if r.status != 403 || r.json()["error"] != "destination_forbidden" {
            failures.push(format!("{host} ({ip}): {} {:?}", r.status, r.body));
            continue;
        }
        let shown: std::net::IpAddr = ip.parse().expect("an address");
        let expected = format!("{host} resolves to {shown}, ");
        for part in std::iter::once(expected.as_str()).chain(names.iter().copied()) {
            if !detail.contains(part) {
                failures.push(format!("{host}: {detail:?} lacks {part:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_failures_get_clear_gateway_errors() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let other_ca = TestCa::new("untrusted");
    let plain = Origin::http();
    let untrusted = Origin::https(&other_ca);
    let gw = gateway(&ca, "read_timeout_ms = 500\n");
    let gw_ca = gw.ca_cert().display().to_string();

    // Refused: nothing listens on the port of a dropped listener.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let r = curl_async(args![
        "-x",
        gw.proxy_url(),
        format!("http://127.0.0.1:{closed_port}/")
    ])
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (502, Some("upstream_refused")),
        "{r:?}"
    );

    // Too slow: 504.
    let r = curl_async(args![
        "-x",
        gw.proxy_url(),
        format!("http://127.0.0.1:{}/sleep/3000", plain.port())
    ])
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (504, Some("upstream_timeout")),
        "{r:?}"
    );

    // TLS to an origin that speaks plain HTTP, and to one whose CA is not trusted: 502.
    for port in [plain.port(), untrusted.port()] {
        let url = format!("https://localhost:{port}/");
        let r = curl_async(args!["-x", gw.proxy_url(), "--cacert", &gw_ca, &url]).await;
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (502, Some("upstream_tls_failed")),
            "{url}: {r:?}"
        );
    }
    assert_eq!(
        untrusted.requests(),
        0,
        "nothing is sent to an origin that failed verification"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_header_naming_another_origin_inside_a_tunnel_is_misdirected() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "");
    let url = format!("https://localhost:{}/", origin.port());
    let r = curl_async(args![
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        "-H",
        "Host: evil.test",
        &url
    ])
    .await;
    assert_eq!(r.status, 421, "{r:?}");
    assert_eq!(r.json()["error"], "misdirected_request");
    assert_eq!(origin.requests(), 0);
}

/// A TLS client that sends CONNECT for one host and a ClientHello for another.
async fn tls_after_connect(
    proxy: std::net::SocketAddr,
    authority: &str,
    sni: &str,
    gw_ca: &std::path::Path,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 39];
    tcp.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("CONNECT answered {head:?}"));
    }
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read_to_string(gw_ca).map_err(|e| e.to_string())?;
    let der = pem::parse(pem).map_err(|e| e.to_string())?;
    roots
        .add(der.contents().to_vec().into())
        .map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = pingora::tls::TlsConnector::from(Arc::new(config));
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    connector
        .connect(name, tcp)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_name_that_disagrees_with_the_connect_is_refused() {
    let ca = TestCa::new("origin");
    let origin = Origin::https(&ca);
    let gw = gateway(&ca, "");
    let authority = format!("localhost:{}", origin.port());
    tls_after_connect(gw.egress, &authority, "localhost", &gw.ca_cert())
        .await
        .expect("a matching server name is intercepted");
    let refused = tls_after_connect(gw.egress, &authority, "evil.test", &gw.ca_cert()).await;
    assert!(
        refused.is_err(),
        "SNI evil.test inside CONNECT localhost must fail"
    );
    assert!(
        gw.log_contains("does not match the CONNECT authority"),
        "{}",
        gw.log()
    );
    assert_eq!(origin.requests(), 0);
}

#[test]
fn malformed_proxy_requests_get_400() {
    let ca = TestCa::new("origin");
    let gw = gateway(&ca, "");
    let cases: [&[u8]; 4] = [
        b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT example.com HTTP/1.1\r\n\r\n",
        b"CONNECT user@example.com:443 HTTP/1.1\r\n\r\n",
        b"GET ftp://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    ];
    for request in cases {
        let answer = raw_exchange(gw.egress, request);
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{:?} got {answer:?}",
            String::from_utf8_lossy(request)
        );
        assert!(answer.contains("\"error\":\"bad_request\""), "{answer}");
    }
    // Garbage is answered or dropped, and the gateway keeps serving.
    let _ = raw_exchange(gw.egress, b"\x16\x03\x01garbage\r\n\r\n");
    let again = raw_exchange(gw.egress, b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(again.starts_with("HTTP/1.1 400"), "{again}");
}

/// Headers with which a client speaks for another address or hop.
const FORWARDING: [(&str, &str); 8] = [
    ("Forwarded", "for=10.1.2.3;proto=https"),
    ("X-Forwarded-For", "10.1.2.3"),
    ("X-Forwarded-Host", "admin.internal"),
    ("X-Real-IP", "10.1.2.3"),
    ("True-Client-IP", "10.1.2.3"),
    ("Via", "1.1 trusted-proxy"),
    // Path overrides.
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_cannot_speak_for_another_address_to_origins() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let plain = Origin::http();
    let tls = Origin::https(&ca);
    let with_forwarding = |gw: &Gateway, url: String| {
        let mut a = via(gw, &url);
        for (name, value) in FORWARDING {
            a.extend(args!["-H", format!("{name}: {value}")]);
        }
        curl_async(a)
    };
    let gw = gateway(&ca, "");
    for (origin, url) in [
        (&plain, format!("http://127.0.0.1:{}/plain", plain.port())),
        (&tls, format!("https://localhost:{}/tunnel", tls.port())),
    ] {
        let r = with_forwarding(&gw, url.clone()).await;
        assert_eq!(r.status, 200, "{r:?}");
        let seen = origin.last_seen();
        for (name, _) in FORWARDING {
            assert!(
                !seen.headers.contains_key(&name.to_ascii_lowercase()),
                "{url}: {name} reached the origin: {seen:?}"
            );
        }
    }
    // An operator who trusts them can pass them on.
    let passing = gateway(&ca, "strip_request_headers = []\n");
    let r = with_forwarding(&passing, format!("http://127.0.0.1:{}/kept", plain.port())).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = plain.last_seen();
    assert_eq!(
        seen.headers.get("x-forwarded-for").map(String::as_str),
        Some("10.1.2.3"),
        "{seen:?}"
    );
}
