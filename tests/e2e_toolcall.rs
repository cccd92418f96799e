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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_attributed_to_the_open_tool_call() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n[[agents]]\nid = \"a\"\nrun_mode = \"Autonomous\"\npeers = [\"127.0.0.1\"]\n",
        loopback_upstream(None)
    );
    let gw = Gateway::start_with_policies(&config, &POLICIES);
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
        "{EPHEMERAL_LISTENERS}\n[[agents]]\nid = \"a\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n"
    );
    let gw = Gateway::start_with_policies(&config, &[ALLOW_ALL]);
    let cases = [
        ("/v1/agents/nobody/tool-calls", r#"{"id":"x"}"#, 404),
        ("/v1/agents/a/tool-calls", r#"{"id":""}"#, 400),
        ("/v1/agents/a/tool-calls", r#"{"id":"x","ttl_secs":0}"#, 400),
        ("/v1/agents/a/tool-calls", r#"{"nope":1}"#, 400),
        ("/v1/agents/a/tool-calls", r#"{"id":"dup"}"#, 201),
        ("/v1/agents/a/tool-calls", r#"{"id":"dup"}"#, 409),
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
