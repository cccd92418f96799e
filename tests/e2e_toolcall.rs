//! Tool calls end to end: opened and closed on the admin API, attributed to requests, and
//! visible to policies as `context.tool_call`.

mod support;

use support::*;

/// Requests outside a tool call are denied; inside one, allowed — and tool call "blocked"
/// is denied by name, to show the id itself reaches the policies.
const POLICIES: [(&str, &str); 2] = [
    ALLOW_ALL,
    (
        "tool-calls.cedar",
        "@id(\"only-in-tool-calls\")\nforbid (principal, action, resource) unless { context has tool_call };\n\n\
         @id(\"not-this-tool-call\")\nforbid (principal, action, resource) when { context has tool_call && context.tool_call == \"blocked\" };\n",
    ),
];

/// A gateway with the tool-call policies and an Autonomous agent `a` on 127.0.0.1, and an
/// origin.
fn autonomous_world() -> (Gateway, Origin) {
    let origin = Origin::http();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n[[agents]]\nid = \"a\"\nrun_mode = \"Autonomous\"\npeers = [\"127.0.0.1\"]\n",
        loopback_upstream(None)
    );
    (Gateway::start_with_policies(&config, &POLICIES), origin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_attributed_to_the_open_tool_call() {
    if no_curl() {
        return;
    }
    let (gw, origin) = autonomous_world();
    let url = format!("http://127.0.0.1:{}/work", origin.port());
    let get = |extra: Vec<String>| {
        let mut a = args!["-x", gw.proxy_url(), &url];
        a.extend(extra);
        curl_async(a)
    };

    let outside = get(vec![]).await;
    assert_eq!(outside.status, 403, "{outside:?}");
    assert_eq!(outside.json()["policies"][0], "only-in-tool-calls");

    let opened = gw.admin_call(
        "POST",
        "/v1/agents/a/tool-calls",
        Some(r#"{"id":"tc-1","ttl_secs":600}"#),
    );
    assert_eq!(opened.status, 201, "{opened:?}");
    assert_eq!(opened.json()["id"], "tc-1");
    let inside = get(vec![]).await;
    assert_eq!(inside.status, 200, "{inside:?}");
    assert!(gw.log_contains("tool_call=\"tc-1\""), "{}", gw.log());

    // Two open: the request must name one; the header never reaches the origin.
    assert_eq!(
        gw.admin_call(
            "POST",
            "/v1/agents/a/tool-calls",
            Some(r#"{"id":"blocked"}"#)
        )
        .status,
        201
    );
    assert_eq!(
        get(vec![]).await.status,
        403,
        "ambiguous: outside any tool call"
    );
    let named = get(args!["-H", "Tollgate-Tool-Call: tc-1"]).await;
    assert_eq!(named.status, 200, "{named:?}");
    assert!(
        !named.seen().headers.contains_key("tollgate-tool-call"),
        "{:?}",
        named.seen()
    );
    let blocked = get(args!["-H", "Tollgate-Tool-Call: blocked"]).await;
    assert_eq!(
        blocked.json()["policies"][0],
        "not-this-tool-call",
        "{blocked:?}"
    );
    let listed = gw.admin_call("GET", "/v1/agents/a/tool-calls", None).json();
    assert_eq!(
        listed["tool_calls"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );

    // Closing: the remaining one is current again; closing it too leaves none.
    assert_eq!(
        gw.admin_call("DELETE", "/v1/agents/a/tool-calls/blocked", None)
            .status,
        204
    );
    assert_eq!(get(vec![]).await.status, 200);
    assert_eq!(
        gw.admin_call("DELETE", "/v1/agents/a/tool-calls/tc-1", None)
            .status,
        204
    );
    assert_eq!(get(vec![]).await.status, 403);
    assert_eq!(
        gw.admin_call("DELETE", "/v1/agents/a/tool-calls/tc-1", None)
            .status,
        404
    );
    assert_eq!(origin.requests(), 3);
}

#[test]
fn bad_tool_call_requests_get_clear_errors() {
    if no_curl() {
        return;
    }
    let config = format!(
        "{EPHEMERAL_LISTENERS}\n[[agents]]\nid = \"a\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n\
         limits = {{ open_tool_calls = 2 }}\n"
    );
    let gw = Gateway::start_with_policies(&config, &[ALLOW_ALL]);
    let cases = [
        ("/v1/agents/nobody/tool-calls", r#"{"id":"x"}"#, 404),
        ("/v1/agents/a/tool-calls", r#"{"id":""}"#, 400),
        ("/v1/agents/a/tool-calls", r#"{"id":"x","ttl_secs":0}"#, 400),
        ("/v1/agents/a/tool-calls", r#"{"nope":1}"#, 400),
        ("/v1/agents/a/tool-calls", r#"{"id":"dup"}"#, 201),
        ("/v1/agents/a/tool-calls", r#"{"id":"dup"}"#, 409),
        // a may have two open (its limits.open_tool_calls): the third is refused.
        ("/v1/agents/a/tool-calls", r#"{"id":"second"}"#, 201),
        ("/v1/agents/a/tool-calls", r#"{"id":"third"}"#, 429),
    ];
    for (path, body, status) in cases {
        let r = gw.admin_call("POST", path, Some(body));
        assert_eq!(r.status, status, "{path} {body}: {r:?}");
        if status >= 400 {
            assert!(
                !r.json()["detail"].as_str().unwrap_or("").is_empty(),
                "{r:?}"
            );
        }
    }
    let third = gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"third"}"#));
    assert_eq!(third.json()["error"], "too_many_tool_calls", "{third:?}");
    // Closing one makes room.
    assert_eq!(
        gw.admin_call("DELETE", "/v1/agents/a/tool-calls/dup", None)
            .status,
        204
    );
    let third = gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"third"}"#));
    assert_eq!(third.status, 201, "{third:?}");
    // Removing the agent closes its tool calls.
    assert_eq!(gw.admin_call("DELETE", "/v1/agents/a", None).status, 204);
    let body = r#"{"run_mode":"Review","peers":["127.0.0.1"]}"#;
    assert_eq!(gw.admin_call("PUT", "/v1/agents/a", Some(body)).status, 201);
    let listed = gw.admin_call("GET", "/v1/agents/a/tool-calls", None).json();
    assert_eq!(
        listed["tool_calls"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
}

const CLIENT_ID: &str = "toolcall-client";
const CLIENT_SECRET: &str = "toolcall-client-secret-91c4";
const AUDIENCE: &str = "api://protected/.default";
const HOST: &str = "api.protected.test";

/// A gateway with a Review agent `r` (127.0.0.1) and an Autonomous one `a` (127.0.0.2), both
/// getting tokens from `endpoint` for `HOST` (over TLS on `origin`'s port); reads are allowed,
/// writes need approval in Review.
fn gateway_with_tokens(endpoint: &TokenEndpoint, origin: &Origin) -> Gateway {
    let config = entra_config(
        endpoint,
        CLIENT_ID,
        r#"{ env = "TOOLCALL_TEST_SECRET" }"#,
        HOST,
        origin.port(),
        AUDIENCE,
    ) + r#"
[[agents]]
id = "r"
run_mode = "Review"
identity = "entra"
peers = ["127.0.0.1"]

[[agents]]
id = "a"
run_mode = "Autonomous"
identity = "entra"
peers = ["127.0.0.2"]
"#;
    Gateway::start_with_env(
        &config,
        &[RUN_MODES],
        "",
        &[("TOOLCALL_TEST_SECRET", CLIENT_SECRET)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_tool_call_refuses_its_held_requests_and_no_token_is_made_for_them() {
    if no_curl() {
        return;
    }
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, std::time::Duration::ZERO);
    let origin = Origin::protected(HOST, &endpoint, AUDIENCE);
    let gw = gateway_with_tokens(&endpoint, &origin);
    // The request comes from a session (conversation thread) of r's, on its own listener.
    let session = gw.admin_call(
        "PUT",
        "/v1/agents/r/sessions/thread-7",
        Some(r#"{"listen":{"address":"127.0.0.1:0"}}"#),
    );
    assert_eq!(session.status, 201, "{session:?}");
    let listener = session.json()["address"]
        .as_str()
        .expect("address")
        .to_string();
    let opened = gw.admin_call(
        "POST",
        "/v1/agents/r/tool-calls",
        Some(r#"{"id":"tc-1","session":"thread-7","command":"curl -X POST https://api.protected.test/items"}"#),
    );
    assert_eq!(opened.status, 201);
    let url = format!("https://{HOST}:{}/items", origin.port());
    let post = args![
        "-x",
        format!("http://{listener}"),
        "--cacert",
        gw.ca_cert().display(),
        &url,
        "-X",
        "POST",
        "--data-binary",
        "{\"n\":1}"
    ];
    let held = tokio::spawn(curl_async(post));
    let approval = tokio::task::block_in_place(|| {
        wait_for_approvals(&gw, "state=pending&agent=r", 1).remove(0)
    });
    // The approver sees whose conversation asked, in which tool call, and the run mode.
    assert_eq!(
        (
            approval["tool_call"].as_str(),
            approval["session"].as_str(),
            approval["run_mode"].as_str()
        ),
        (Some("tc-1"), Some("thread-7"), Some("Review")),
        "{approval}"
    );
    assert_eq!(
        approval["command"], "curl -X POST https://api.protected.test/items",
        "and what the tool call was running: {approval}"
    );
    let id = approval["id"].as_str().expect("id").to_string();

    // The tool call ends while its request waits: the request is refused, never sent.
    let closed = gw.admin_call("DELETE", "/v1/agents/r/tool-calls/tc-1", None);
    assert_eq!(closed.status, 204);
    let refused = held.await.expect("curl");
    assert_eq!(
        (refused.status, refused.json()["error"].as_str()),
        (403, Some("tool_call_closed")),
        "{refused:?}"
    );
    let record = gw
        .admin_call("GET", &format!("/v1/approvals/{id}"), None)
        .json();
    assert_eq!(record["state"], "abandoned", "{record}");
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|r| r.contains("tc-1")),
        "the record says why: {record}"
    );
    // An approval after the end releases nothing.
    let late = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), Some("{}"));
    assert_eq!(late.status, 409, "{late:?}");
    assert_eq!(endpoint.requests(), 0, "no token was made for it");
    assert_eq!(origin.requests(), 0, "nothing was forwarded");
    let records = tokio::task::block_in_place(|| audit_records(&gw, "r", 1));
    assert_eq!(records[0]["error"], "tool_call_closed", "{records:?}");
    assert_eq!(records[0]["approval"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_fetched_while_its_tool_call_closes_is_never_injected() {
    if no_curl() {
        return;
    }
    // The token endpoint takes 1.5 s: the tool call closes while its token is on its way.
    let endpoint = TokenEndpoint::start(
        CLIENT_ID,
        CLIENT_SECRET,
        3600,
        std::time::Duration::from_millis(1500),
    );
    let origin = Origin::protected(HOST, &endpoint, AUDIENCE);
    let gw = gateway_with_tokens(&endpoint, &origin);
    let opened = gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc-2"}"#));
    assert_eq!(opened.status, 201);
    let mut get = args!["--interface", "127.0.0.2"];
    get.extend(via(&gw, &format!("https://{HOST}:{}/items", origin.port())));
    let read = tokio::spawn(curl_async(get));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(endpoint.requests(), 1, "the token is being fetched");
    let closed = gw.admin_call("DELETE", "/v1/agents/a/tool-calls/tc-2", None);
    assert_eq!(closed.status, 204);
    let refused = read.await.expect("curl");
    assert_eq!(
        (refused.status, refused.json()["error"].as_str()),
        (403, Some("tool_call_closed")),
        "{refused:?}"
    );
    assert_eq!(origin.requests(), 0, "the token never left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_has_its_own_listener_tool_calls_and_audit_records() {
    if no_curl() {
        return;
    }
    let (gw, origin) = autonomous_world();
    let url = format!("http://127.0.0.1:{}/work", origin.port());
    // Two sessions (conversation threads) of agent a, each with its listener and a tool call.
    let mut listeners = Vec::new();
    for (session, tool_call) in [("thread-1", "tc-1"), ("thread-2", "tc-2")] {
        let opened = gw.admin_call(
            "PUT",
            &format!("/v1/agents/a/sessions/{session}"),
            Some(r#"{"listen":{"address":"127.0.0.1:0"}}"#),
        );
        assert_eq!(opened.status, 201, "{opened:?}");
        let address = opened.json()["address"]
            .as_str()
            .expect("address")
            .to_string();
        let body = format!(r#"{{"id":"{tool_call}","session":"{session}"}}"#);
        let call = gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(&body));
        assert_eq!(call.status, 201, "{call:?}");
        assert_eq!(call.json()["session"], session);
        listeners.push(address);
    }
    // Opening it again changes nothing.
    let again = gw.admin_call(
        "PUT",
        "/v1/agents/a/sessions/thread-1",
        Some(r#"{"listen":{"address":"127.0.0.1:0"}}"#),
    );
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json()["address"], listeners[0].as_str());
    // A tool call of a session that does not exist is refused.
    let orphan = gw.admin_call(
        "POST",
        "/v1/agents/a/tool-calls",
        Some(r#"{"id":"tc-9","session":"thread-9"}"#),
    );
    assert_eq!(orphan.status, 404, "{orphan:?}");

    // Each session's requests carry its own tool call, and say which session they came from;
    // on the shared listener neither tool call is the agent's current one.
    for address in &listeners {
        let r = curl_async(args!["-x", format!("http://{address}"), &url]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let shared = curl_async(args!["-x", gw.proxy_url(), &url]).await;
    assert_eq!(shared.status, 403, "{shared:?}");
    let records = audit_records(&gw, "a", 3);
    let seen: Vec<(Option<&str>, Option<&str>)> = records
        .iter()
        .map(|r| (r["session"].as_str(), r["tool_call"].as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (Some("thread-1"), Some("tc-1")),
            (Some("thread-2"), Some("tc-2")),
            (None, None)
        ],
        "{records:?}"
    );

    // Ending a session closes its listener and ends its tool calls; the other goes on.
    assert_eq!(
        gw.admin_call("DELETE", "/v1/agents/a/sessions/thread-1", None)
            .status,
        204
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(&listeners[0]).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the ended session's listener still accepts"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let calls = gw.admin_call("GET", "/v1/agents/a/tool-calls", None).json();
    assert_eq!(
        calls["tool_calls"].as_array().map(Vec::len),
        Some(1),
        "{calls}"
    );
    assert_eq!(calls["tool_calls"][0]["id"], "tc-2");
    let listed = gw.admin_call("GET", "/v1/agents/a/sessions", None).json();
    assert_eq!(listed["sessions"][0]["session"], "thread-2", "{listed}");
    let r = curl_async(args!["-x", format!("http://{}", listeners[1]), &url]).await;
    assert_eq!(r.status, 200, "{r:?}");
}
