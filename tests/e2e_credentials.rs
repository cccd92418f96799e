//! Credentials end to end: a real client-credentials token endpoint and a protected origin
//! on loopback, the gateway injecting tokens per agent and tool call, curl as the sandbox.

mod support;

use std::time::Duration;

use support::*;

const CLIENT_ID: &str = "tollgate-test-client";
const CLIENT_SECRET: &str = "client-secret-7f3a9c1e";
const AUDIENCE: &str = "api://protected/.default";
const HOST: &str = "api.protected.test";

/// A gateway with agent `a` (127.0.0.1), provider `entra` for the endpoint, and a rule
/// giving `HOST` a token for `AUDIENCE`.
fn gateway(endpoint: &TokenEndpoint, credentials: &str, env: &[(&str, &str)]) -> Gateway {
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret_file = secret_dir.path().join("secret");
    std::fs::write(&secret_file, format!("{CLIENT_SECRET}\n")).expect("write secret");
    let rest = format!(
        r#"strip_headers = ["x-api-key"]

[credentials]
backoff_initial_ms = 400
{credentials}

[[agents]]
id = "a"
run_mode = "Autonomous"
identity = "entra"
peers = ["127.0.0.1"]
"#
    );
    let config = entra_config(
        endpoint,
        CLIENT_ID,
        &format!("{{ file = {secret_file:?} }}"),
        HOST,
        AUDIENCE,
    ) + &rest;
    let gw = Gateway::start_with_env(&config, &[ALLOW_ALL], "", env);
    // The secret was read at start; the file can go (the test checks it is not copied).
    drop(secret_dir);
    gw
}

async fn call(gw: &Gateway, origin: &Origin, extra: &[&str]) -> CurlResult {
    let url = format!("http://{HOST}:{}/resource", origin.port());
    let mut args = args!["-x", gw.proxy_url(), &url];
    args.extend(extra.iter().map(|s| s.to_string()));
    curl_async(args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_gets_a_token_and_the_sandbox_credential_is_replaced() {
    if no_curl() {
        return;
    }
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::ZERO);
    let origin = Origin::protected(&endpoint, AUDIENCE);
    let gw = gateway(&endpoint, "", &[]);
    let sandbox_auth = [
        "-H",
        "Authorization: Bearer sandbox-held-secret",
        "-H",
        "X-Api-Key: sandbox-key",
    ];

    // Outside a tool call: the sandbox's credential is stripped, none is injected.
    let outside = call(&gw, &origin, &sandbox_auth).await;
    assert_eq!(outside.status, 401, "{outside:?}");
    assert_eq!(endpoint.requests(), 0);

    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc-1"}"#))
            .status,
        201
    );
    let first = call(&gw, &origin, &sandbox_auth).await;
    assert_eq!(first.status, 200, "{first:?}");
    let seen = first.seen();
    let tokens = endpoint.tokens();
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        seen.headers.get("authorization"),
        Some(&format!("Bearer {}", tokens[0]))
    );
    assert!(!seen.headers.contains_key("x-api-key"), "{seen:?}");
    assert!(gw.log_contains("credential=\"entra\""), "{}", gw.log());

    // A cache hit: no second token request.
    assert_eq!(call(&gw, &origin, &[]).await.status, 200);
    assert_eq!(endpoint.requests(), 1);

    // Closing the tool call drops its token: the next request has none.
    assert_eq!(
        gw.admin_call("DELETE", "/v1/agents/a/tool-calls/tc-1", None)
            .status,
        204
    );
    assert_eq!(call(&gw, &origin, &[]).await.status, 401);
    assert_eq!(endpoint.requests(), 1);

    // The same id opened again is a new tool call with a new token.
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc-1"}"#))
            .status,
        201
    );
    assert_eq!(call(&gw, &origin, &[]).await.status, 200);
    assert_eq!(endpoint.requests(), 2);
    assert_eq!(origin.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_before_they_expire() {
    if no_curl() {
        return;
    }
    // Tokens live 2 s; the cache drops them 1 s before expiry.
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 2, Duration::ZERO);
    let origin = Origin::protected(&endpoint, AUDIENCE);
    let gw = gateway(&endpoint, "refresh_margin_secs = 1", &[]);
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc"}"#))
            .status,
        201
    );
    assert_eq!(call(&gw, &origin, &[]).await.status, 200);
    assert_eq!(call(&gw, &origin, &[]).await.status, 200);
    assert_eq!(endpoint.requests(), 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let after = call(&gw, &origin, &[]).await;
    assert_eq!(after.status, 200, "{after:?}");
    assert_eq!(
        endpoint.requests(),
        2,
        "a new token after the old one's refresh point"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_a_cold_cache_fetch_one_token() {
    // The endpoint answers slowly, so all requests arrive while the first fetch is running.
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::from_millis(300));
    let origin = Origin::protected(&endpoint, AUDIENCE);
    let gw = gateway(&endpoint, "", &[]);
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc"}"#))
            .status,
        201
    );
    let request = format!(
        "GET http://{HOST}:{port}/c HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n",
        port = origin.port()
    );
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let request = request.clone();
        let proxy = gw.egress;
        tasks.push(tokio::task::spawn_blocking(move || {
            raw_exchange(proxy, request.as_bytes())
        }));
    }
    let mut ok = 0;
    for task in tasks {
        let answer = task.await.expect("join");
        if answer.starts_with("HTTP/1.1 200") {
            ok += 1;
        }
    }
    assert_eq!(ok, 100);
    assert_eq!(
        endpoint.requests(),
        1,
        "exactly one token request for 100 concurrent misses"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_endpoint_gives_502_and_is_not_hammered() {
    if no_curl() {
        return;
    }
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::ZERO);
    endpoint.set_mode(TokenMode::Failing);
    let origin = Origin::protected(&endpoint, AUDIENCE);
    let gw = gateway(&endpoint, "", &[]);
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc"}"#))
            .status,
        201
    );

    let failed = call(&gw, &origin, &[]).await;
    assert_eq!(failed.status, 502, "{failed:?}");
    assert_eq!(failed.json()["error"], "credential_unavailable");
    let detail = failed.json()["detail"].as_str().unwrap_or("").to_string();
    assert!(detail.contains("HTTP 500"), "{detail}");
    for secret in [CLIENT_SECRET, "endpoint-internal-text"] {
        assert!(
            !failed.body.contains(secret),
            "the error body must not carry {secret}"
        );
    }
    // Right after a failure the gateway backs off instead of asking again.
    let again = call(&gw, &origin, &[]).await;
    assert_eq!(again.status, 502);
    assert!(
        again.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("next attempt"),
        "{again:?}"
    );
    assert_eq!(endpoint.requests(), 1, "not hammered");
    assert_eq!(
        origin.requests(),
        0,
        "nothing is forwarded without the credential"
    );

    // Once the endpoint recovers and the backoff has passed, requests go through.
    endpoint.set_mode(TokenMode::Normal);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recovered = call(&gw, &origin, &[]).await;
    assert_eq!(recovered.status, 200, "{recovered:?}");
    assert_eq!(endpoint.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_down_token_endpoint_gives_502() {
    if no_curl() {
        return;
    }
    let slow = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::from_secs(3));
    let origin = Origin::protected(&slow, AUDIENCE);
    let gw = gateway(&slow, "fetch_timeout_ms = 300", &[]);
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc"}"#))
            .status,
        201
    );
    let r = call(&gw, &origin, &[]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("did not answer in time"),
        "{r:?}"
    );
    assert_eq!(origin.requests(), 0);

    // Down: nothing listens where the token endpoint should be.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let gw = gateway_with_provider(
        &format!(
            "name = \"p\"\nkind = \"client_credentials\"\ntoken_url = \"http://127.0.0.1:{port}/token\"\nclient_id = \"c\"\nclient_secret = {{ env = \"TEST_DOWN_SECRET\" }}"
        ),
        AUDIENCE,
        &[("TEST_DOWN_SECRET", "down-secret-value")],
    );
    let r = call(&gw, &origin, &[]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("cannot be reached"),
        "{r:?}"
    );
    assert!(!r.body.contains("down-secret-value"));
    assert_eq!(origin.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_secret_is_ever_written() {
    if no_curl() {
        return;
    }
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::ZERO);
    let origin = Origin::protected(&endpoint, AUDIENCE);
    let gw = gateway(&endpoint, "", &[("RUST_LOG", "debug")]);
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc"}"#))
            .status,
        201
    );
    for _ in 0..3 {
        assert_eq!(
            call(
                &gw,
                &origin,
                &["-H", "Authorization: Bearer sandbox-held-secret"]
            )
            .await
            .status,
            200
        );
    }
    assert_eq!(
        gw.admin_call("DELETE", "/v1/agents/a/tool-calls/tc", None)
            .status,
        204
    );
    let tokens = endpoint.tokens();
    assert_eq!(tokens.len(), 1);
    assert!(gw.log_contains("tool call closed"));
    let log = gw.log();
    assert!(log.contains("DEBUG"), "the log was written at debug level");
    // Everything the gateway wrote: its log and every file under its data directory.
    let mut written = vec![("gateway.log".to_string(), log)];
    let mut dirs = vec![gw.data_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("data dir")
            .filter_map(Result::ok)
        {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read");
                written.push((
                    path.display().to_string(),
                    String::from_utf8_lossy(&bytes).to_string(),
                ));
            }
        }
    }
    for (name, text) in &written {
        for secret in tokens
            .iter()
            .map(String::as_str)
            .chain([CLIENT_SECRET, "sandbox-held-secret"])
        {
            assert!(!text.contains(secret), "{name} contains a secret");
        }
    }
}

/// A gateway whose only provider is `provider` (TOML lines) and whose rule gives `HOST` a
/// token for `audience`, with agent `a` in tool call `tc`.
fn gateway_with_provider(provider: &str, audience: &str, env: &[(&str, &str)]) -> Gateway {
    let config = format!(
        r#"{EPHEMERAL_LISTENERS}{upstream}resolve = {{ "{HOST}" = "127.0.0.1" }}

[[identity_providers]]
{provider}

[[credential_rules]]
hosts = ["{HOST}"]
audience = "{audience}"
provider = "p"

[[agents]]
id = "a"
run_mode = "Autonomous"
peers = ["127.0.0.1"]
"#,
        upstream = loopback_upstream(None),
    );
    let gw = Gateway::start_with_env(&config, &[ALLOW_ALL], "", env);
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc"}"#))
            .status,
        201
    );
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_managed_identity_protocol_is_spoken_both_ways() {
    if no_curl() {
        return;
    }
    // IMDS: Metadata: true; the v2 scope becomes a v1 resource.
    let imds = ManagedIdentityEndpoint::start(None);
    let origin = Origin::protected_by(imds.issued.clone(), "https://management.azure.com");
    let gw = gateway_with_provider(
        &format!(
            "name = \"p\"\nkind = \"managed_identity\"\nendpoint = \"{}\"",
            imds.url()
        ),
        "https://management.azure.com/.default",
        &[],
    );
    let r = call(&gw, &origin, &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(imds.requests(), 1);

    // The IDENTITY_ENDPOINT variant: the X-IDENTITY-HEADER secret instead of Metadata.
    let app_service = ManagedIdentityEndpoint::start(Some("identity-header-secret"));
    let origin = Origin::protected_by(app_service.issued.clone(), "https://vault.azure.net");
    let gw = gateway_with_provider(
        &format!(
            "name = \"p\"\nkind = \"managed_identity\"\nendpoint = \"{}\"\nidentity_header = {{ env = \"TEST_IDENTITY_HEADER\" }}",
            app_service.url()
        ),
        "https://vault.azure.net",
        &[("TEST_IDENTITY_HEADER", "identity-header-secret")],
    );
    let r = call(&gw, &origin, &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(app_service.requests(), 1);
    assert!(!gw.log().contains("identity-header-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_provider_injects_its_token() {
    if no_curl() {
        return;
    }
    let issued: Issued = Default::default();
    issued
        .lock()
        .expect("issued")
        .insert("static-dev-token".into(), "dev".into());
    let origin = Origin::protected_by(issued, "dev");
    let gw = gateway_with_provider(
        "name = \"p\"\nkind = \"static\"\ntoken = { env = \"TEST_STATIC_TOKEN\" }",
        "dev",
        &[("TEST_STATIC_TOKEN", "static-dev-token")],
    );
    let r = call(&gw, &origin, &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.seen().headers.get("authorization").map(String::as_str),
        Some("Bearer static-dev-token")
    );
}

#[test]
fn a_missing_secret_stops_the_gateway_from_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = start_fails(
        dir.path(),
        &format!(
            "{EPHEMERAL_LISTENERS}\n[[identity_providers]]\nname = \"p\"\nkind = \"static\"\ntoken = {{ env = \"TOLLGATE_TEST_NOT_SET\" }}\n"
        ),
    );
    assert!(err.contains("TOLLGATE_TEST_NOT_SET"), "{err}");
}
