//! On-behalf-of end to end: an origin refuses the agent's own token, the gateway holds the
//! request for a person, the approver lends their token, and the very request is sent again
//! with it — and later requests of the same tool call use it, until the tool call closes.
//! Real token endpoint, real protected origin, curl as the sandbox.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

const CLIENT_ID: &str = "tollgate-obo-client";
const CLIENT_SECRET: &str = "client-secret-0b0";
const AUDIENCE: &str = "api://protected/.default";
const HOST: &str = "api.protected.test";
/// The approver's own token: the only one the origin accepts.
const PERSON_TOKEN: &str = "alice-obo-token-5d2e91";

fn gateway(endpoint: &TokenEndpoint, origin: &Origin) -> Gateway {
    let config = entra_config(
        endpoint,
        CLIENT_ID,
        r#"{ env = "OBO_TEST_SECRET" }"#,
        HOST,
        origin.port(),
        AUDIENCE,
    ) + r#"
[[agents]]
id = "a"
run_mode = "Autonomous"
identity = "entra"
peers = ["127.0.0.1"]

[[agents]]
id = "ro"
run_mode = "ReadOnly"
identity = "entra"
peers = ["127.0.0.2"]
"#;
    Gateway::start_with_env(
        &config,
        &[ALLOW_ALL],
        "",
        &[("OBO_TEST_SECRET", CLIENT_SECRET), ("RUST_LOG", "debug")],
    )
}

fn pending(gw: &Gateway, agent: &str) -> Vec<serde_json::Value> {
    let listed = gw.admin_call(
        "GET",
        &format!("/v1/approvals?state=pending&agent={agent}"),
        None,
    );
    assert_eq!(listed.status, 200, "{listed:?}");
    listed.json()["approvals"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_identity_becomes_an_on_behalf_of_approval_for_the_rest_of_the_tool_call() {
    if no_curl() {
        return;
    }
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::ZERO);
    let people = issued(PERSON_TOKEN, AUDIENCE);
    let origin = Origin::protected_by(HOST, people, AUDIENCE);
    let gw = gateway(&endpoint, &origin);
    let url = format!("https://{HOST}:{}/resource", origin.port());
    let open = |id: &str| {
        let r = gw.admin_call(
            "POST",
            "/v1/agents/a/tool-calls",
            Some(&format!(r#"{{"id":"{id}"}}"#)),
        );
        assert_eq!(r.status, 201, "{r:?}");
    };

    // The agent's own token is refused: the request is held, not answered 401.
    open("tc-1");
    let mut post = via(&gw, &url);
    post.extend(args!["-X", "POST", "--data-binary", "payload"]);
    let write = tokio::spawn(curl_async(post));
    let approval = wait_for_approvals(&gw, "state=pending&agent=a", 1).remove(0);
    assert_eq!(approval["kind"], "on_behalf_of");
    assert_eq!(approval["obo_audience"], AUDIENCE);
    assert_eq!(approval["tool_call"], "tc-1");
    assert_eq!(approval["body_bytes"], 7);
    assert_eq!(endpoint.requests(), 1, "the agent's token was tried first");
    assert_eq!(origin.requests(), 1);
    let id = approval["id"].as_str().expect("id").to_string();

    // It needs the approver's token; with it, the same request goes again, with that token.
    let bare = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(bare.status, 400, "{bare:?}");
    let approved = gw.admin_call(
        "POST",
        &format!("/v1/approvals/{id}/approve"),
        Some(&format!(r#"{{"obo_token":"{PERSON_TOKEN}"}}"#)),
    );
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(approved.json()["obo_token_held"], true);
    assert!(!approved.body.contains(PERSON_TOKEN));
    let replayed = write.await.expect("curl");
    assert_eq!(replayed.status, 200, "{replayed:?}");
    let seen = origin.last_seen();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body_len, 7);
    assert_eq!(
        seen.authorization(),
        Some(format!("Bearer {PERSON_TOKEN}").as_str())
    );
    assert_eq!(origin.requests(), 2);

    // The rest of the tool call uses it without asking again.
    let read = curl_async(via(&gw, &url)).await;
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(
        origin.last_seen().authorization(),
        Some(format!("Bearer {PERSON_TOKEN}").as_str())
    );
    assert!(pending(&gw, "a").is_empty());

    // The lent token, like the agent's own, goes only over TLS to the rule's port, and an
    // answer that carries it back is not relayed.
    let recorder = Recorder::start().await;
    for elsewhere in [
        format!("http://{HOST}:{}/resource", origin.port()),
        format!("http://{HOST}:{}/resource", recorder.addr.port()),
        format!("https://{HOST}:{}/resource", recorder.addr.port()),
    ] {
        let r = curl_async(via(&gw, &elsewhere)).await;
        assert_eq!(
            r.json()["error"],
            "credential_requires_tls",
            "{elsewhere}: {r:?}"
        );
    }
    assert_eq!(recorder.connections(), 0);
    let echoed = curl_async(via(
        &gw,
        &format!("https://{HOST}:{}/debug/echo", origin.port()),
    ))
    .await;
    assert_eq!(
        (echoed.status, echoed.json()["error"].as_str()),
        (502, Some("credential_reflected")),
        "{echoed:?}"
    );
    assert!(!echoed.body.contains(PERSON_TOKEN));
    assert_eq!(origin.requests(), 4, "the echo was asked for, and withheld");

    // Stored only sealed: no file of the data directory, and no log line, holds it.
    for (path, bytes) in files_under(&gw.data_dir()) {
        assert!(
            !bytes_contain(&bytes, PERSON_TOKEN),
            "{} holds the token",
            path.display()
        );
    }
    assert!(gw.log().contains("on-behalf-of admin"), "{}", gw.log());
    assert!(!gw.log().contains(PERSON_TOKEN));

    // Closing the tool call deletes it, from memory and from the store.
    let closed = gw.admin_call("DELETE", "/v1/agents/a/tool-calls/tc-1", None);
    assert_eq!(closed.status, 204);
    let record = gw.admin_call("GET", &format!("/v1/approvals/{id}"), None);
    assert_eq!(record.json()["obo_token_held"], false, "{record:?}");
    open("tc-2");
    let next = tokio::spawn(curl_async(via(&gw, &url)));
    let again = wait_for_approvals(&gw, "state=pending&agent=a", 1).remove(0);
    assert_ne!(again["id"], id.as_str(), "a new tool call asks again");
    let again_id = again["id"].as_str().expect("id");
    gw.admin_call(
        "POST",
        &format!("/v1/approvals/{again_id}/deny"),
        Some(r#"{"reason":"not for this task"}"#),
    );
    let denied = next.await.expect("curl");
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied.json()["error"], "approval_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_agent_never_acts_on_a_persons_behalf() {
    if no_curl() {
        return;
    }
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::ZERO);
    let people: Issued = Arc::new(Mutex::new(HashMap::new()));
    let origin = Origin::protected_by(HOST, people, AUDIENCE);
    let gw = gateway(&endpoint, &origin);
    let opened = gw.admin_call("POST", "/v1/agents/ro/tool-calls", Some(r#"{"id":"t"}"#));
    assert_eq!(opened.status, 201);
    let url = format!("https://{HOST}:{}/resource", origin.port());
    let mut args = args!["--interface", "127.0.0.2"];
    args.extend(via(&gw, &url));
    let refused = curl_async(args).await;
    assert_eq!(
        refused.status, 401,
        "the origin's answer, as it was: {refused:?}"
    );
    assert!(pending(&gw, "ro").is_empty());
    assert_eq!(endpoint.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm_write_outside_the_agents_scopes_is_sent_only_with_the_approvers_token() {
    if no_curl() {
        return;
    }
    let tokens: Issued = Arc::new(Mutex::new(HashMap::from([
        ("agent-own-token".to_string(), "arm".to_string()),
        (PERSON_TOKEN.to_string(), "arm".to_string()),
    ])));
    let origin = Origin::protected_by("management.azure.com", tokens, "arm");
    let config = format!(
        r#"{EPHEMERAL_LISTENERS}{upstream}resolve = {{ "management.azure.com" = "127.0.0.1" }}

[[identity_providers]]
name = "dev"
kind = "static"
token = {{ env = "OBO_TEST_AGENT_TOKEN" }}

[[credential_rules]]
hosts = ["management.azure.com"]
ports = [{port}]
audience = "https://management.azure.com/.default"

[[agents]]
id = "auto"
run_mode = "Autonomous"
identity = "dev"
scopes = ["/subscriptions/sub-1/resourceGroups/rg-a"]
peers = ["127.0.0.1"]
"#,
        upstream = loopback_upstream(Some(&origin_ca().cert_path())),
        port = origin.port(),
    );
    let files = default_policies();
    let policies: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let gw = Gateway::start_with_env(
        &config,
        &policies,
        "",
        &[("OBO_TEST_AGENT_TOKEN", "agent-own-token")],
    );
    let opened = gw.admin_call("POST", "/v1/agents/auto/tool-calls", Some(r#"{"id":"t"}"#));
    assert_eq!(opened.status, 201);
    let arm = |rg: &str| {
        format!(
            "https://management.azure.com:{}/subscriptions/sub-1/resourceGroups/{rg}/providers/Microsoft.Storage/storageAccounts/acct?api-version=2023-01-01",
            origin.port()
        )
    };
    let put = |url: String| {
        tokio::spawn(curl_async(args![
            "-x",
            gw.proxy_url(),
            "--cacert",
            gw.ca_cert().display(),
            "-X",
            "PUT",
            "--data-binary",
            "{}",
            url
        ]))
    };

    // Inside its scope the agent writes with its own token.
    let inside = put(arm("rg-a")).await.expect("curl");
    assert_eq!(inside.status, 200, "{inside:?}");
    assert_eq!(
        origin.last_seen().authorization(),
        Some("Bearer agent-own-token")
    );

    // Outside it, nothing is sent until a person lends their identity.
    let outside = put(arm("rg-b"));
    let approval = wait_for_approvals(&gw, "state=pending&agent=auto", 1).remove(0);
    assert_eq!(approval["kind"], "on_behalf_of");
    assert_eq!(approval["policies"][0], "autonomous-approved-writes");
    // The approver reads what it would do, and why their identity is asked for.
    assert_eq!(
        (
            approval["arm"]["summary"].as_str(),
            approval["arm"]["inside_agent_scopes"].as_bool()
        ),
        (
            Some(
                "create or update microsoft.storage/storageaccounts acct in resource group \
                 rg-b of subscription sub-1"
            ),
            Some(false)
        ),
        "{approval}"
    );
    assert_eq!(origin.requests(), 1, "no first try with the agent's token");
    let id = approval["id"].as_str().expect("id");
    let approved = gw.admin_call(
        "POST",
        &format!("/v1/approvals/{id}/approve"),
        Some(&format!(r#"{{"obo_token":"{PERSON_TOKEN}"}}"#)),
    );
    assert_eq!(approved.status, 200, "{approved:?}");
    let sent = outside.await.expect("curl");
    assert_eq!(sent.status, 200, "{sent:?}");
    assert_eq!(
        origin.last_seen().authorization(),
        Some(format!("Bearer {PERSON_TOKEN}").as_str())
    );
    assert_eq!(origin.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_behalf_of_request_is_decided_again_when_its_approval_releases_it() {
    if no_curl() {
        return;
    }
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::ZERO);
    let origin = Origin::protected_by(HOST, issued(PERSON_TOKEN, AUDIENCE), AUDIENCE);
    let gw = gateway(&endpoint, &origin);
    let url = format!("https://{HOST}:{}/resource", origin.port());
    let opened = gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc-1"}"#));
    assert_eq!(opened.status, 201, "{opened:?}");
    let mut post = via(&gw, &url);
    post.extend(args!["-X", "POST", "--data-binary", "payload"]);
    let write = tokio::spawn(curl_async(post));
    let approval = wait_for_approvals(&gw, "state=pending&agent=a", 1).remove(0);
    assert_eq!(approval["kind"], "on_behalf_of");
    let id = approval["id"].as_str().expect("id").to_string();
    assert_eq!(origin.requests(), 1, "the agent's own token was tried");

    // While it waits, the policies are reloaded with a forbid no approval lifts.
    std::fs::write(
        gw.policy_dir().join("closed.cedar"),
        "@id(\"writes-closed\")\nforbid (principal, action == Action::\"write\", resource);\n",
    )
    .expect("policy");
    assert_eq!(
        gw.admin_call("POST", "/v1/policies/reload", None).status,
        200
    );
    let approved = gw.admin_call(
        "POST",
        &format!("/v1/approvals/{id}/approve"),
        Some(&format!(r#"{{"obo_token":"{PERSON_TOKEN}"}}"#)),
    );
    assert_eq!(approved.status, 200, "{approved:?}");
    let answer = write.await.expect("curl");
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.json()["policies"][0], "writes-closed", "{answer:?}");
    assert_eq!(origin.requests(), 1, "sent again with the approver's token");
    let record = gw
        .admin_call("GET", &format!("/v1/approvals/{id}"), None)
        .json();
    assert!(
        record["not_sent"]
            .as_str()
            .is_some_and(|why| why.contains("writes-closed")),
        "{record}"
    );
}
