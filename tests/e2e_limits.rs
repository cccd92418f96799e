//! Per-agent limits through the real listener: an agent over its connections, request rate,
//! body size or held requests gets 429/413 with a clear body, and its neighbour, sending at
//! the same time, is never refused.

mod support;

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// Agent `a` (127.0.0.1) with small limits of its own; agent `b` (127.0.0.2) with the
/// defaults. Reads are allowed, writes wait for approval — but a's writes to `/stream`,
/// which go at once.
fn world() -> (Gateway, Origin) {
    let origin = Origin::http();
    let dir = tempfile::tempdir().expect("tempdir");
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir).expect("policy dir");
    std::fs::write(policy_dir.join(APPROVAL_POLICIES.0), APPROVAL_POLICIES.1).expect("policy");
    std::fs::write(
        policy_dir.join("stream.cedar"),
        "@id(\"streams\")\npermit (principal == Agent::\"a\", action == Action::\"write\", resource) \
         when { context.path == \"/stream\" };\n",
    )
    .expect("policy");
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n\
         [[agents]]\nid = \"a\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n\
         limits = {{ connections = 2, requests_per_second = 5, request_body_bytes = 100, pending_approvals = 1 }}\n\
         [[agents]]\nid = \"b\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.2\"]\n\
         [policy]\ndir = {policy_dir:?}\n",
        loopback_upstream(None)
    );
    (Gateway::start_in(dir, &config), origin)
}

/// Status codes of `n` GETs of `url` from `source`, sent by one curl process (back to back).
fn burst(gw: &Gateway, source: &str, url: &str, n: usize) -> Vec<u16> {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--interface", source, "-x", &gw.proxy_url()]);
    for _ in 0..n {
        cmd.args(["-o", "/dev/null", "-w", "%{http_code}\\n", url]);
    }
    let out = cmd.output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits for refilled rate tokens (a's rate is 5 per second).
fn refill() {
    std::thread::sleep(Duration::from_millis(1200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_over_its_limits_is_refused_and_its_neighbour_is_not() {
    if no_curl() {
        return;
    }
    let (gw, origin) = world();
    let url = format!("http://127.0.0.1:{}/things", origin.port());
    let authority = format!("127.0.0.1:{}", origin.port());
    let get = format!("GET {url} HTTP/1.1\r\nHost: {authority}\r\n\r\n");

    // Connections: a's third is answered 429 and closed; b connects as usual.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(gw.egress).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let third = raw_exchange(gw.egress, get.as_bytes());
    assert!(
        third.starts_with("HTTP/1.1 429") && third.contains("too_many_connections"),
        "{third:?}"
    );
    assert!(third.to_ascii_lowercase().contains("connection: close"));
    assert_eq!(burst(&gw, "127.0.0.2", &url, 3), [200, 200, 200]);
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !raw_exchange(gw.egress, get.as_bytes()).starts_with("HTTP/1.1 200") {
        assert!(
            Instant::now() < deadline,
            "a's closed connections were never given back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Body size: a declared body over a's 100 bytes is refused before the hold; a streamed
    // (chunked) one as it passes the limit; b's larger bodies are held as usual.
    refill();
    let origin_before = origin.requests();
    let declared = format!(
        "POST {url} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 101\r\n\r\n{}",
        "x".repeat(101)
    );
    let answer = raw_exchange(gw.egress, declared.as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("body_too_large"),
        "{answer:?}"
    );
    assert_eq!(
        origin.requests(),
        origin_before,
        "a declared body over the limit is sent"
    );
    // The streamed body is refused as it passes the limit: the origin has its head by then
    // but never the end of the body (docs/operations.md, "Egress behaviour").
    let chunk = "y".repeat(80);
    let streamed = format!(
        "POST http://{authority}/stream HTTP/1.1\r\nHost: {authority}\r\nTransfer-Encoding: chunked\r\n\r\n\
         50\r\n{chunk}\r\n50\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = raw_exchange(gw.egress, streamed.as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("limits.request_body_bytes"),
        "{answer:?}"
    );

    // Held requests: a may have one waiting; b has the default (16).
    refill();
    let held = post_in_background(&gw, &url, "{}", &[]);
    wait_for_approvals(&gw, "state=pending&agent=a", 1);
    let second = post_in_background(&gw, &url, "{}", &[])
        .await
        .expect("curl");
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.json()["error"], "too_many_pending_approvals");
    let big = "z".repeat(1000);
    let b_held: Vec<_> = (0..2)
        .map(|_| post_in_background(&gw, &url, &big, &["--interface", "127.0.0.2"]))
        .collect();
    wait_for_approvals(&gw, "state=pending&agent=b", 2);

    // Rate: of 50 back-to-back requests a gets about five (one second's burst); b, at the
    // same time, gets all of its own.
    refill();
    let (a_codes, b_codes) = std::thread::scope(|s| {
        let a = s.spawn(|| burst(&gw, "127.0.0.1", &url, 50));
        let b = s.spawn(|| burst(&gw, "127.0.0.2", &url, 50));
        (a.join().expect("a"), b.join().expect("b"))
    });
    let a_ok = a_codes.iter().filter(|&&c| c == 200).count();
    assert!(
        a_codes.contains(&429) && a_ok >= 5 && a_codes.len() == 50,
        "a: {a_codes:?}"
    );
    assert!(
        b_codes.len() == 50 && b_codes.iter().all(|&c| c == 200),
        "b: {b_codes:?}"
    );
    // The refusal says when to come back.
    let mut again = Command::new("curl");
    again.args(["-s", "-i", "-x", &gw.proxy_url()]);
    for _ in 0..20 {
        again.arg(&url);
    }
    let limited = again.output().expect("curl");
    let limited = String::from_utf8_lossy(&limited.stdout).to_ascii_lowercase();
    assert!(
        limited.contains("rate_limited") && limited.contains("retry-after: 1"),
        "{limited}"
    );

    drop(gw);
    let _ = held.await;
    for b in b_held {
        let _ = b.await;
    }
}

#[test]
fn limits_that_would_lock_an_agent_out_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = start_fails(
        dir.path(),
        &format!(
            "{EPHEMERAL_LISTENERS}[[agents]]\nid = \"a\"\nrun_mode = \"Review\"\n\
             limits = {{ connections = 0 }}\n"
        ),
    );
    assert!(
        err.contains("limits.connections must be at least 1"),
        "{err}"
    );
    let err = start_fails(dir.path(), "[limits]\nagent_connections = 0\n");
    assert!(err.contains("limits.agent_connections"), "{err}");
}

#[test]
fn an_agent_registered_over_the_api_keeps_its_limits() {
    let gw = Gateway::start(EPHEMERAL_LISTENERS);
    let put = gw.admin_call(
        "PUT",
        "/v1/agents/c",
        Some(r#"{"run_mode":"Review","limits":{"requests_per_second":3}}"#),
    );
    assert_eq!(put.status, 201, "{put:?}");
    assert_eq!(put.json()["limits"]["requests_per_second"], 3);
    let bad = gw.admin_call(
        "PUT",
        "/v1/agents/d",
        Some(r#"{"run_mode":"Review","limits":{"pending_approvals":0}}"#),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.json()["detail"]
        .as_str()
        .unwrap_or("")
        .contains("pending_approvals"));
    let unknown = gw.admin_call(
        "PUT",
        "/v1/agents/d",
        Some(r#"{"run_mode":"Review","limits":{"bandwidth":3}}"#),
    );
    assert_eq!(unknown.status, 400, "{unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_count_against_the_request_rate() {
    let (gw, origin) = world();
    let connect = format!(
        "CONNECT 127.0.0.1:{0} HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\n\r\n",
        origin.port()
    );
    // a's rate is 5 per second: of 12 CONNECTs back to back, about one second's burst opens
    // a tunnel (and would mint a leaf); the rest are refused before any of that.
    let answers: Vec<String> = (0..12)
        .map(|_| {
            use std::io::{Read, Write};
            let mut s = TcpStream::connect(gw.egress).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s.write_all(connect.as_bytes()).expect("write");
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap_or(0);
            // Closed at once: a's limit of 2 connections must not be what refuses the next.
            let _ = s.shutdown(std::net::Shutdown::Both);
            std::thread::sleep(Duration::from_millis(20));
            String::from_utf8_lossy(&buf[..n]).to_string()
        })
        .collect();
    let opened = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .count();
    let limited: Vec<&String> = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 429"))
        .collect();
    assert!((4..=7).contains(&opened), "{answers:?}");
    assert_eq!(opened + limited.len(), 12, "{answers:?}");
    assert!(limited[0].contains("rate_limited"), "{:?}", limited[0]);
    // Each refusal is audited as the agent's.
    let records = audit_records(&gw, "a", 12 - opened);
    assert!(
        records
            .iter()
            .all(|r| r["method"] == "CONNECT" && r["status"] == 429),
        "{records:?}"
    );
}
