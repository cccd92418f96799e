//! `/metrics` end to end: requests through the real gateway show up in a Prometheus scrape
//! of the admin listener, which parses as the text exposition format.

mod support;

use std::collections::HashMap;

use support::*;

/// One scrape: `name{labels}` → value, every line checked against the text format.
fn scrape(gw: &Gateway) -> HashMap<String, f64> {
    let r = gw.admin_call("GET", "/metrics", None);
    assert_eq!(r.status, 200, "{r:?}");
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in r.body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        let name = series.split('{').next().expect("name");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| typed.contains(*f))
            .unwrap_or(name);
        assert!(typed.contains(family), "no # TYPE before {line:?}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "twice: {line}"
        );
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_approvals_tokens_and_tls_leaves_are_counted() {
    if no_curl() {
        return;
    }
    let plain = Origin::http();
    let tls = Origin::https(origin_ca());
    let protected =
        Origin::protected_by("api.metrics.test", issued("static-agent-token", "m"), "m");
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("static-token");
    std::fs::write(&token, "static-agent-token\n").expect("token");
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}resolve = {{ \"api.metrics.test\" = \"127.0.0.1\" }}\n\
         [[identity_providers]]\nname = \"dev\"\nkind = \"static\"\ntoken = {{ file = {token:?} }}\n\
         [[credential_rules]]\nhosts = [\"api.metrics.test\"]\nports = [{port}]\naudience = \"api://metrics\"\n\
         [[agents]]\nid = \"a\"\nrun_mode = \"Review\"\nidentity = \"dev\"\npeers = [\"127.0.0.1\"]\n",
        loopback_upstream(Some(&origin_ca().cert_path())),
        port = protected.port(),
    );
    let gw = Gateway::start_with_policies(&config, &[APPROVAL_POLICIES]);
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"t"}"#))
            .status,
        201
    );
    let credentialed = format!("https://api.metrics.test:{}/x", protected.port());
    for _ in 0..2 {
        let r = curl_async(via(&gw, &credentialed)).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let secure = format!("https://localhost:{}/", tls.port());
    let r = curl_async(args![
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        &secure
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let stranger = curl_async(args![
        "--interface",
        "127.0.0.2",
        "-x",
        gw.proxy_url(),
        format!("http://127.0.0.1:{}/x", plain.port())
    ])
    .await;
    assert_eq!(stranger.status, 403, "{stranger:?}");
    // Refused at CONNECT, before any HTTP request exists inside a tunnel: counted too.
    let tunnel_stranger = curl_async(args![
        "--interface",
        "127.0.0.2",
        "-x",
        gw.proxy_url(),
        &secure
    ])
    .await;
    assert_ne!(tunnel_stranger.status, 200, "{tunnel_stranger:?}");
    let held = post_in_background(
        &gw,
        &format!("http://127.0.0.1:{}/w", plain.port()),
        "{}",
        &[],
    );
    let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();

    let m = scrape(&gw);
    let get = |series: &str| {
        m.get(series)
            .copied()
            .unwrap_or_else(|| panic!("no {series} in {m:?}"))
    };
    assert_eq!(get("tollgate_held_approvals"), 1.0);
    assert_eq!(
        get(r#"tollgate_requests_total{agent="a",decision="allow",status="200"}"#),
        3.0
    );
    assert_eq!(get("tollgate_token_cache_misses_total"), 1.0);
    assert_eq!(get("tollgate_token_cache_hits_total"), 1.0);
    // api.metrics.test and localhost.
    assert_eq!(get("tollgate_tls_leaf_cache_entries"), 2.0);
    let version = gw.admin_call("GET", "/v1/policies", None).json()["version"]
        .as_str()
        .expect("version")
        .to_string();
    assert_eq!(
        get(&format!("tollgate_policy_info{{version=\"{version}\"}}")),
        1.0
    );
    // Buckets are cumulative and end at the count.
    let count = get(r#"tollgate_request_duration_seconds_count{decision="allow"}"#);
    assert_eq!(count, 3.0);
    assert_eq!(
        get(r#"tollgate_request_duration_seconds_bucket{decision="allow",le="+Inf"}"#),
        count
    );
    assert!(
        get(r#"tollgate_request_duration_seconds_bucket{decision="allow",le="0.0005"}"#) <= count
    );

    gw.admin_call(
        "POST",
        &format!("/v1/approvals/{id}/deny"),
        Some(r#"{"reason":"no"}"#),
    );
    assert_eq!(held.await.expect("curl").status, 403);
    assert!(gw.log_contains("approval_denied"));
    let m = scrape(&gw);
    assert_eq!(m.get("tollgate_held_approvals"), Some(&0.0));
    assert_eq!(
        m.get(r#"tollgate_requests_total{agent="a",decision="needs_approval",status="403"}"#),
        Some(&1.0)
    );
    assert_eq!(
        m.get(r#"tollgate_requests_total{agent="(unknown)",decision="none",status="403"}"#),
        Some(&2.0),
        "one plain request and one CONNECT from an unknown address: {m:?}"
    );
    assert!(!gw
        .admin_call("GET", "/metrics", None)
        .body
        .contains("static-agent-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_request_fields() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n[log]\nformat = \"json\"\n{REVIEW_AGENT}",
        loopback_upstream(None)
    );
    let gw = Gateway::start_with_policies(&config, &[APPROVAL_POLICIES]);
    let url = format!(
        "http://127.0.0.1:{}/logged?token=query-secret",
        origin.port()
    );
    let r = curl_async(args!["-x", gw.proxy_url(), &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(gw.log_contains("\"message\":\"request\""), "{}", gw.log());
    let lines: Vec<serde_json::Value> = gw
        .log()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let request = lines
        .iter()
        .find(|l| l["message"] == "request")
        .expect("a request line");
    assert_eq!(request["level"], "INFO");
    assert_eq!(request["agent"], "a");
    assert_eq!(request["method"], "GET");
    assert_eq!(request["path"], "/logged");
    assert_eq!(request["status"], 200);
    assert!(!gw.log().contains("query-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_line_follows_rust_log_and_can_be_turned_off() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n{REVIEW_AGENT}",
        loopback_upstream(None)
    );
    let url = format!("http://127.0.0.1:{}/quiet", origin.port());
    // The same gateway twice: the line is written unless RUST_LOG turns its target off.
    for (filter, logged) in [
        ("info", true),
        ("info,tollgate_gateway::request=off", false),
    ] {
        let gw =
            Gateway::start_with_env(&config, &[APPROVAL_POLICIES], "", &[("RUST_LOG", filter)]);
        let r = curl_async(args!["-x", gw.proxy_url(), &url]).await;
        assert_eq!(r.status, 200, "{r:?}");
        // The request is recorded either way: its audit record is there.
        let records = audit_records(&gw, "a", 1);
        assert_eq!(records[0]["path"], "/quiet", "{records:?}");
        let line = "INFO tollgate_gateway::request: request agent=\"a\"";
        assert_eq!(
            gw.log().contains(line),
            logged,
            "RUST_LOG={filter}: {}",
            gw.log()
        );
        // The gateway's other lines are still written.
        assert!(gw.log_contains("INFO"), "RUST_LOG={filter}: {}", gw.log());
    }
}
