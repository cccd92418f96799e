//! Hostile HTTP from a sandbox, through the real egress listener with raw sockets: request
//! smuggling (ambiguous message framing), malformed heads, and heads too large. Each must get
//! a 4xx or a closed connection, nothing may reach the origin, and the gateway keeps serving.
//!
//! A malformed chunk size inside a body cannot be refused before the origin has the head: the
//! body streams. What matters is that the origin never gets a complete request, nor any byte
//! of the sandbox's framing: pingora decodes the chunks and writes its own.

mod support;

use std::time::Duration;

use support::*;

/// A gateway with an Autonomous agent on 127.0.0.1 that may do anything, and an origin.
fn world() -> (Gateway, Origin) {
    world_with("")
}

/// [`world`], with `extra` config lines.
fn world_with(extra: &str) -> (Gateway, Origin) {
    let origin = Origin::http();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}{extra}[[agents]]\nid = \"a\"\nrun_mode = \"Autonomous\"\npeers = [\"127.0.0.1\"]\n",
        loopback_upstream(None)
    );
    (Gateway::start_with_policies(&config, &[ALLOW_ALL]), origin)
}

/// The status code of a raw answer, or `None` if the connection closed without one.
fn status(answer: &str) -> Option<u16> {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

fn refused(answer: &str) -> bool {
    match status(answer) {
        None => true,
        Some(code) => (400..500).contains(&code),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_and_nothing_reaches_the_origin() {
    let (gw, origin) = world();
    let authority = format!("127.0.0.1:{}", origin.port());
    let smuggled = format!("GET http://{authority}/smuggled HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length with Transfer-Encoding",
            format!("POST http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "two different Content-Lengths",
            format!("POST http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nContent-Length: 80\r\n\r\n{smuggled}"),
        ),
        (
            "a Content-Length list",
            format!("POST http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0, 80\r\n\r\n{smuggled}"),
        ),
        (
            "a Content-Length list of equal values",
            format!("POST http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 5, 5\r\n\r\nhello"),
        ),
        (
            "the same Content-Length twice",
            format!("POST http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "Transfer-Encoding not ending in chunked",
            format!("POST http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "a header folded onto the next line (obs-fold)",
            format!("GET http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nX-Folded: a\r\n b\r\n\r\n"),
        ),
        (
            "bare LF line endings",
            format!("GET http://{authority}/a HTTP/1.1\nHost: {authority}\n\n"),
        ),
        (
            "a space before the colon",
            format!("GET http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nContent-Length : 80\r\n\r\n{smuggled}"),
        ),
    ];
    let mut failures = Vec::new();
    for (name, request) in &cases {
        let before = origin.requests();
        let answer = raw_exchange(gw.egress, request.as_bytes());
        // A request smuggled after the first would arrive after its answer: give it time.
        std::thread::sleep(Duration::from_millis(300));
        let reached = origin.requests() - before;
        if !refused(&answer) || reached > 0 {
            failures.push(format!(
                "{name}: answered {:?}, {reached} request(s) reached the origin",
                answer.lines().next()
            ));
        }
    }
    // The gateway still serves.
    let ok = curl(&["-x", &gw.proxy_url(), &format!("http://{authority}/after")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_too_large_are_refused() {
    let (gw, origin) = world();
    let authority = format!("127.0.0.1:{}", origin.port());
    let long_path = "a".repeat(128 * 1024);
    let long_value = "v".repeat(128 * 1024);
    let many: String = (0..1000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, String)> = vec![
        (
            "a 128 KiB request line",
            format!("GET http://{authority}/{long_path} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        ),
        (
            "a 128 KiB header",
            format!("GET http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nX-Big: {long_value}\r\n\r\n"),
        ),
        (
            "1,000 headers",
            format!("GET http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\n{many}\r\n"),
        ),
    ];
    let mut failures = Vec::new();
    for (name, request) in &cases {
        let answer = raw_exchange(gw.egress, request.as_bytes());
        if !refused(&answer) || origin.requests() > 0 {
            failures.push(format!(
                "{name}: answered {:?}, {} request(s) reached the origin",
                answer.lines().next(),
                origin.requests()
            ));
        }
    }
    let ok = curl(&["-x", &gw.proxy_url(), &format!("http://{authority}/after")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_an_origin_could_read_differently_are_refused() {
    let (gw, origin) = world();
    let authority = format!("127.0.0.1:{}", origin.port());
    let mut failures = Vec::new();
    for path in [
        "/subscriptions/a/../b",
        "/a/./b",
        "/a/%2e%2E/b",
        "/a%2Fb",
        "/a%5cb",
        "/a%zz",
        "/a%00b",
    ] {
        let request = format!("GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        let answer = raw_exchange(gw.egress, request.as_bytes());
        if status(&answer) != Some(400)
            || !answer.contains("ambiguous_path")
            || origin.requests() > 0
        {
            failures.push(format!(
                "{path}: answered {:?}, {} request(s) reached the origin",
                answer.lines().next(),
                origin.requests()
            ));
        }
    }
    // Raw bytes outside ASCII (RFC 3986 has none): UTF-8 as text, a Unicode direction
    // override that would show an approver another path, bytes that are not UTF-8 at all.
    for raw in [
        &b"/caf\xc3\xa9"[..],
        b"/a/\xe2\x80\xaetxt.exe",
        b"/a?q=\xc3\xa9",
        b"/\xff\xfe",
    ] {
        let mut request = format!("GET http://{authority}").into_bytes();
        request.extend_from_slice(raw);
        request.extend_from_slice(format!(" HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes());
        let answer = raw_exchange(gw.egress, &request);
        if status(&answer) != Some(400) || origin.requests() > 0 {
            failures.push(format!(
                "{}: answered {:?}, {} request(s) reached the origin",
                String::from_utf8_lossy(raw),
                answer.lines().next(),
                origin.requests()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Escapes of unreserved characters are the same path: allowed, and sent as written.
    let ok = curl(&["-x", &gw.proxy_url(), &format!("http://{authority}/%61b")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.seen().target, "/%61b");
}

/// Writes `parts` one after another with `pause` between them, then reads until the peer
/// closes or 3 s pass. Returns whether every part could be written and what was read.
fn dribble(addr: std::net::SocketAddr, parts: &[&[u8]], pause: Duration) -> (bool, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut all_written = true;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(pause);
        }
        if s.write_all(part).and_then(|()| s.flush()).is_err() {
            all_written = false;
            break;
        }
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (all_written, String::from_utf8_lossy(&out).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_too_slowly_is_cut_off_but_slow_bodies_and_idle_keep_alive_are_not() {
    let (gw, origin) = world_with("[limits]\nrequest_head_timeout_ms = 600\n");
    let authority = format!("127.0.0.1:{}", origin.port());
    let egress = gw.egress;
    let line = format!("GET http://{authority}/slow HTTP/1.1\r\nHost: {authority}\r\n");
    let start = std::time::Instant::now();
    // Slowloris: a header line every 200 ms, each read well inside pingora's 60 s per read,
    // for 3 s in all. The head deadline closes the connection after 600 ms.
    let slow = tokio::task::spawn_blocking(move || {
        let mut parts: Vec<&[u8]> = vec![line.as_bytes()];
        parts.extend(std::iter::repeat_n(&b"X-Slow: 1\r\n"[..], 15));
        parts.push(b"\r\n");
        dribble(egress, &parts, Duration::from_millis(200))
    })
    .await
    .expect("slow client");
    let (written, answer) = slow;
    assert!(
        status(&answer).is_none() && origin.requests() == 0,
        "the slow head was served: {answer:?} after {:?} ({} at the origin)",
        start.elapsed(),
        origin.requests()
    );
    assert!(
        !written || answer.is_empty(),
        "the connection must be closed before the head completes: {answer:?}"
    );

    // A slow body after a complete head, and a second request after an idle pause longer than
    // the head deadline, on one keep-alive connection: both served.
    let head = format!(
        "POST http://{authority}/body HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 4\r\n\r\n"
    );
    let second = format!("GET http://{authority}/after-idle HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    let (written, answer) = tokio::task::spawn_blocking(move || {
        let parts: Vec<&[u8]> = vec![head.as_bytes(), b"a", b"b", b"c", b"d", second.as_bytes()];
        dribble(egress, &parts, Duration::from_millis(300))
    })
    .await
    .expect("keep-alive client");
    assert!(written, "{answer:?}");
    assert_eq!(
        answer.matches("HTTP/1.1 200").count(),
        2,
        "a slow body and an idle pause are not a slow head: {answer:?}"
    );
    assert_eq!(origin.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunk_never_reaches_the_origin_as_a_request() {
    let (gw, _origin) = world();
    let recorder = Recorder::start().await;
    let authority = recorder.addr.to_string();
    let smuggled = format!("GET http://{authority}/smuggled HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let mut failures = Vec::new();
    for (name, chunks) in [
        ("a size that is not hex", "zz\r\nhello\r\n0\r\n\r\n"),
        (
            "a size that overflows",
            "FFFFFFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n",
        ),
        ("a negative size", "-5\r\nhello\r\n0\r\n\r\n"),
        ("data longer than its size", "2\r\nhello\r\n0\r\n\r\n"),
    ] {
        let request = format!(
            "POST http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}{smuggled}"
        );
        let answer = tokio::task::spawn_blocking({
            let egress = gw.egress;
            move || raw_exchange(egress, request.as_bytes())
        })
        .await
        .expect("client");
        if !refused(&answer) {
            failures.push(format!("{name}: answered {:?}", answer.lines().next()));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = recorder.received();
    eprintln!("the origin received {} bytes: {received:?}", received.len());
    for marker in [
        "smuggled",
        "zz\r\n",
        "FFFFFFFF",
        "-5\r\n",
        "hello",
        "0\r\n\r\n",
    ] {
        if received.contains(marker) {
            failures.push(format!("the origin received {marker:?}: {received:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let ok = curl(&[
        "-x",
        &gw.proxy_url(),
        &format!("http://127.0.0.1:{}/after", _origin.port()),
    ]);
    assert_eq!(ok.status, 200, "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_pingora_would_refuse_get_a_reason_a_log_line_and_an_audit_record() {
    let (gw, origin) = world();
    let authority = format!("127.0.0.1:{}", origin.port());
    let cases = [
        (
            "a Host that names another origin than the URL",
            format!("GET http://{authority}/host HTTP/1.1\r\nHost: other.test\r\n\r\n"),
            "Host",
        ),
        (
            "a NUL in a header",
            format!("GET http://{authority}/nul HTTP/1.1\r\nHost: {authority}\r\nX-A: a\0b\r\n\r\n"),
            "not valid",
        ),
        (
            "two different lengths",
            format!("POST http://{authority}/lengths HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            "Content-Length",
        ),
        (
            "user information in the URL",
            format!("GET http://user@{authority}/userinfo HTTP/1.1\r\nHost: user@{authority}\r\n\r\n"),
            "userinfo",
        ),
    ];
    for (name, request, why) in &cases {
        let answer = raw_exchange(gw.egress, request.as_bytes());
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(head.starts_with("HTTP/1.1 400"), "{name}: {answer:?}");
        let json: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}: {body:?}"));
        assert_eq!(json["error"], "bad_request", "{name}");
        assert!(
            json["detail"].as_str().is_some_and(|d| d.contains(why)),
            "{name}: {json}"
        );
    }
    assert_eq!(origin.requests(), 0);
    // Each is a request of agent a: audited (path without query), logged, counted.
    let records = audit_records(&gw, "a", cases.len());
    let paths: Vec<&str> = records.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(
        paths,
        ["/host", "/nul", "/lengths", "/userinfo"],
        "{records:?}"
    );
    assert!(records
        .iter()
        .all(|r| r["status"] == 400 && r["error"] == "bad_request"));
    assert!(gw.log_contains("request refused"), "{}", gw.log());
    let metrics = gw.admin_call("GET", "/metrics", None).body;
    assert!(
        metrics.contains(r#"tollgate_requests_total{agent="a",decision="none",status="400"} 4"#),
        "{metrics}"
    );
}

/// Sends `request` and reads until the gateway closes the connection (or 5 s pass): the
/// whole answer, and whether it closed by itself.
fn exchange_until_closed(addr: std::net::SocketAddr, parts: &[&[u8]]) -> (String, bool) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        s.write_all(part).expect("write");
    }
    let mut out = Vec::new();
    let closed = loop {
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).to_string(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (gw, origin) = world();
    let authority = format!("127.0.0.1:{}", origin.port());
    let request = |method: &str, path: &str, extra: &str| {
        let body = if method == "POST" {
            "Content-Length: 5\r\n\r\nhello"
        } else {
            "\r\n"
        };
        format!("{method} http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n{extra}{body}")
    };
    let chunked = format!(
        "POST http://{authority}/chunked HTTP/1.1\r\nHost: {authority}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
    );
    // The last request asks to close, so the gateway closes after answering it.
    let last = request("GET", "/second", "Connection: close\r\n");
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "two GETs in one write",
            vec![request("GET", "/first", "") + &last],
        ),
        (
            "a POST and its body, then a GET, in one write",
            vec![request("POST", "/first", "") + &last],
        ),
        (
            "a chunked POST, then a GET, in one write",
            vec![chunked.clone() + &last],
        ),
        (
            "a GET sent while the first is with the origin",
            vec![request("GET", "/sleep/300", ""), last.clone()],
        ),
        (
            "a GET sent after a POST's body, before its answer",
            vec![request("POST", "/sleep/300", ""), last.clone()],
        ),
        ("a head split across the two writes", {
            let both = request("GET", "/sleep/300", "") + &last;
            let cut = both.len() - last.len() + 10;
            vec![both[..cut].to_string(), both[cut..].to_string()]
        }),
    ];
    for (name, parts) in cases {
        let before = origin.requests();
        let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        let (answer, closed) = exchange_until_closed(gw.egress, &parts);
        assert!(closed, "{name}: the connection hung after {answer:?}");
        let statuses: Vec<&str> = answer
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &answer[i + 9..i + 12])
            .collect();
        assert_eq!(statuses, ["200", "200"], "{name}: {answer:?}");
        let second = answer.rfind("HTTP/1.1 ").unwrap_or_default();
        assert!(
            !answer[..second].contains("/second")
                && answer[second..].contains("\"target\":\"/second\""),
            "{name}: the answers are out of order: {answer:?}"
        );
        assert_eq!(origin.requests() - before, 2, "{name}");
    }
    // More sent ahead than the gateway keeps (32 KiB): the first is answered, then the
    // connection closes (the client would send the rest again); it never hangs.
    let flood = request("GET", "/flood", "").repeat(1000);
    let slow = request("GET", "/sleep/300", "");
    let (answer, closed) = exchange_until_closed(gw.egress, &[slow.as_bytes(), flood.as_bytes()]);
    assert!(
        closed,
        "the connection hung after {:?}",
        answer.lines().next()
    );
    assert_eq!(status(&answer), Some(200), "{:?}", answer.lines().next());
    assert!(
        answer.matches("HTTP/1.1 ").count() < 1000,
        "all were answered"
    );
    // A pipelined head is checked like any other: one the gateway refuses is answered as
    // such after the first, and never reaches the origin.
    let before = origin.requests();
    let smuggling = format!(
        "POST http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let both = request("GET", "/first", "") + &smuggling;
    let (answer, closed) = exchange_until_closed(gw.egress, &[both.as_bytes()]);
    assert!(closed, "the connection hung after {answer:?}");
    let second = answer.rfind("HTTP/1.1 ").unwrap_or_default();
    assert!(
        status(&answer) == Some(200) && answer[second..].starts_with("HTTP/1.1 400"),
        "{answer:?}"
    );
    assert_eq!(origin.requests() - before, 1);
}
