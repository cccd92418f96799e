//! Credentials end to end: a real client-credentials token endpoint and a protected HTTPS
//! origin on loopback, the gateway injecting tokens per agent and tool call, curl as the
//! sandbox.

mod support;

use std::time::Duration;

use support::*;

const CLIENT_ID: &str = "tollgate-test-client";
const CLIENT_SECRET: &str = "client-secret-7f3a9c1e";
const AUDIENCE: &str = "api://protected/.default";
const HOST: &str = "api.protected.test";

/// A gateway with agent `a` (127.0.0.1), provider `entra` for the endpoint, and a rule
/// giving `HOST` a token for `AUDIENCE` over TLS on `origin`'s port.
fn gateway(
    endpoint: &TokenEndpoint,
    origin: &Origin,
    credentials: &str,
    env: &[(&str, &str)],
) -> Gateway {
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
        origin.port(),
        AUDIENCE,
    ) + &rest;
    let gw = Gateway::start_with_env(&config, &[ALLOW_ALL], "", env);
    // The secret was read at start; the file can go (the test checks it is not copied).
    drop(secret_dir);
    gw
}

async fn call(gw: &Gateway, origin: &Origin, extra: &[&str]) -> CurlResult {
    call_path(gw, origin, "/resource", extra).await
}

async fn call_path(gw: &Gateway, origin: &Origin, path: &str, extra: &[&str]) -> CurlResult {
    let mut args = via(gw, &format!("https://{HOST}:{}{path}", origin.port()));
    args.extend(extra.iter().map(|s| s.to_string()));
    curl_async(args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_gets_a_token_and_the_sandbox_credential_is_replaced() {
    if no_curl() {
        return;
    }
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, 3600, Duration::ZERO);
    let origin = Origin::protected(HOST, &endpoint, AUDIENCE);
    let gw = gateway(&endpoint, &origin, "", &[]);
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
    let seen = origin.last_seen();
    let tokens = endpoint.tokens();
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        seen.authorization(),
        Some(format!("Bearer {}", tokens[0]).as_str())
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
    let origin = Origin::protected(HOST, &endpoint, AUDIENCE);
    let gw = gateway(&endpoint, &origin, "refresh_margin_secs = 1", &[]);
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
    let origin = Origin::protected(HOST, &endpoint, AUDIENCE);
    let gw = gateway(&endpoint, &origin, "", &[]);
    assert_eq!(
        gw.admin_call("POST", "/v1/agents/a/tool-calls", Some(r#"{"id":"tc"}"#))
            .status,
        201
    );
    // 100 transfers at once from one curl, each through its own tunnel.
    let url = format!("https://{HOST}:{}/c", origin.port());
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "100",
        ])
        .args(["--max-time", "20", "-w", "%{http_code}\n"])
        .args(["-x", &gw.proxy_url(), "--cacert"])
        .arg(gw.ca_cert())
        .args((0..100).flat_map(|_| ["-o", "/dev/null", url.as_str()]))
        .output()
        .expect("run curl");
    let codes = String::from_utf8_lossy(&out.stdout).to_string();
    let ok = codes.lines().filter(|l| *l == "200").count();
    assert_eq!(ok, 100, "{codes}");
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
    let origin = Origin::protected(HOST, &endpoint, AUDIENCE);
    let gw = gateway(&endpoint, &origin, "", &[]);
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
    let origin = Origin::protected(HOST, &slow, AUDIENCE);
    let gw = gateway(&slow, &origin, "fetch_timeout_ms = 300", &[]);
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
        &origin,
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
    let origin = Origin::protected(HOST, &endpoint, AUDIENCE);
    let gw = gateway(&endpoint, &origin, "", &[("RUST_LOG", "debug")]);
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
/// token for `audience` over TLS on `origin`'s port, with agent `a` in tool call `tc`.
fn gateway_with_provider(
    provider: &str,
    origin: &Origin,
    audience: &str,
    env: &[(&str, &str)],
) -> Gateway {
    let config = format!(
        r#"{EPHEMERAL_LISTENERS}{upstream}resolve = {{ "{HOST}" = "127.0.0.1" }}

[[identity_providers]]
{provider}

[[credential_rules]]
hosts = ["{HOST}"]
ports = [{port}]
audience = "{audience}"
provider = "p"

[[agents]]
id = "a"
run_mode = "Autonomous"
peers = ["127.0.0.1"]
"#,
        upstream = loopback_upstream(Some(&origin_ca().cert_path())),
        port = origin.port(),
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
    let origin = Origin::protected_by(HOST, imds.issued.clone(), "https://management.azure.com");
    let gw = gateway_with_provider(
        &format!(
            "name = \"p\"\nkind = \"managed_identity\"\nendpoint = \"{}\"",
            imds.url()
        ),
        &origin,
        "https://management.azure.com/.default",
        &[],
    );
    let r = call(&gw, &origin, &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(imds.requests(), 1);

    // The IDENTITY_ENDPOINT variant: the X-IDENTITY-HEADER secret instead of Metadata.
    let app_service = ManagedIdentityEndpoint::start(Some("identity-header-secret"));
    let origin = Origin::protected_by(HOST, app_service.issued.clone(), "https://vault.azure.net");
    let gw = gateway_with_provider(
        &format!(
            "name = \"p\"\nkind = \"managed_identity\"\nendpoint = \"{}\"\nidentity_header = {{ env = \"TEST_IDENTITY_HEADER\" }}",
            app_service.url()
        ),
        &origin,
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
    let origin = Origin::protected_by(HOST, issued("static-dev-token", "dev"), "dev");
    let gw = gateway_with_provider(
        "name = \"p\"\nkind = \"static\"\ntoken = { env = \"TEST_STATIC_TOKEN\" }",
        &origin,
        "dev",
        &[("TEST_STATIC_TOKEN", "static-dev-token")],
    );
    let r = call(&gw, &origin, &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        origin.last_seen().authorization(),
        Some("Bearer static-dev-token")
    );
    assert!(!r.body.contains("static-dev-token"), "{r:?}");
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

/// A static token long enough to be told apart from anything else in a request or answer.
const STATIC_TOKEN: &str = "static-dev-token-4e1f9b27c05d";

/// A gateway with a static provider giving `HOST` (over TLS on `origin`'s port) the token
/// [`STATIC_TOKEN`], agent `a` in tool call `tc`; `credentials` goes in `[credentials]`.
fn static_gateway(origin: &Origin, credentials: &str) -> Gateway {
    gateway_with_provider(
        &format!(
            "name = \"p\"\nkind = \"static\"\ntoken = {{ env = \"TEST_STATIC_TOKEN\" }}\n\n\
             [credentials]\n{credentials}"
        ),
        origin,
        "dev",
        &[("TEST_STATIC_TOKEN", STATIC_TOKEN)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_never_travels_in_clear_text_or_to_another_port() {
    if no_curl() {
        return;
    }
    let origin = Origin::protected_by(HOST, issued(STATIC_TOKEN, "dev"), "dev");
    let gw = static_gateway(&origin, "");
    // Raw TCP recorders where a token must never arrive: another port of the covered host,
    // and its port 80 (needs root to bind; without it, plain HTTP is tried on the other
    // port only).
    let other = Recorder::start().await;
    let port_80 = Recorder::start_on("127.0.0.1:80").await.ok();
    if port_80.is_none() {
        eprintln!("NOTE: cannot listen on port 80 (not root, or taken): plain HTTP is checked on an ephemeral port only");
    }
    let mut urls = vec![
        format!("http://{HOST}:{}/clear", other.addr.port()),
        format!("https://{HOST}:{}/other-port", other.addr.port()),
        // Plain HTTP to the rule's own port.
        format!("http://{HOST}:{}/clear-on-the-tls-port", origin.port()),
    ];
    if port_80.is_some() {
        urls.push(format!("http://{HOST}/clear-on-80"));
    }
    for url in &urls {
        // Also outside the tool call's token: the request is refused whole, not sent bare.
        let r = curl_async(via(&gw, url)).await;
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (403, Some("credential_requires_tls")),
            "{url}: {r:?}"
        );
        assert!(!r.body.contains(STATIC_TOKEN));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for recorder in std::iter::once(&other).chain(port_80.as_ref()) {
        assert_eq!(
            (recorder.connections(), recorder.received()),
            (0, String::new()),
            "nothing reaches {}",
            recorder.addr
        );
    }
    assert_eq!(origin.requests(), 0);
    // Each refusal is audited.
    let records = audit_records(&gw, "a", urls.len());
    assert!(
        records
            .iter()
            .all(|r| r["error"] == "credential_requires_tls" && r["status"] == 403),
        "{records:?}"
    );
    // Over TLS to the rule's port, the token goes.
    let ok = call(&gw, &origin, &[]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        origin.last_seen().authorization(),
        Some(format!("Bearer {STATIC_TOKEN}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_and_track_are_refused_for_every_agent() {
    if no_curl() {
        return;
    }
    let origin = Origin::echoing(HOST);
    let gw = static_gateway(&origin, "");
    for extra in [
        vec!["-X", "TRACE"],
        vec!["-X", "TRACK"],
        vec!["-H", "X-HTTP-Method-Override: TRACE"],
    ] {
        let r = call(&gw, &origin, &extra).await;
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (405, Some("method_not_allowed")),
            "{extra:?}: {r:?}"
        );
    }
    // Plain HTTP to a host no rule covers: refused the same way.
    let plain = Origin::http();
    let r = curl_async(args![
        "-x",
        gw.proxy_url(),
        "-X",
        "TRACE",
        format!("http://127.0.0.1:{}/", plain.port())
    ])
    .await;
    assert_eq!(r.status, 405, "{r:?}");
    assert_eq!((origin.requests(), plain.requests()), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_carries_the_token_back_is_not_relayed() {
    if no_curl() {
        return;
    }
    // An origin that echoes every request, the injected Authorization header included.
    let origin = Origin::echoing(HOST);
    let gw = static_gateway(&origin, "reflection_scan_bytes = 65536");
    let r = call(&gw, &origin, &[]).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (502, Some("credential_reflected")),
        "{r:?}"
    );
    assert!(!r.body.contains(STATIC_TOKEN));
    assert_eq!(
        origin.requests(),
        1,
        "the request went; its answer did not come back"
    );
    assert_eq!(gw.metric("tollgate_credential_reflections_total"), 1);

    // Further on in a long answer (past the scanned window): cut off before the token, the
    // connection closed short of the announced length.
    let r = call_path(&gw, &origin, "/pad/300000", &[]).await;
    assert_ne!(r.exit, 0, "the answer is cut short: {:?}", r.stderr);
    assert!(
        !r.body.contains(STATIC_TOKEN),
        "the token never reaches the sandbox"
    );
    assert!(r.body.len() < 300_000, "{}", r.body.len());
    assert_eq!(gw.metric("tollgate_credential_reflections_total"), 2);
    // A long answer without the token is relayed whole.
    let r = call_path(&gw, &origin, "/bytes/300000", &[]).await;
    assert_eq!((r.status, r.body.len()), (200, 300_000));

    let records = audit_records(&gw, "a", 3);
    let errors: Vec<_> = records.iter().map(|r| r["error"].clone()).collect();
    assert_eq!(
        errors,
        [
            serde_json::json!("credential_reflected"),
            serde_json::json!("credential_reflected"),
            serde_json::Value::Null
        ],
        "{records:?}"
    );
    assert!(!gw.log().contains(STATIC_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokened_answer_is_asked_for_whole_and_opens_no_session_for_the_sandbox() {
    if no_curl() {
        return;
    }
    let origin = Origin::protected_by(HOST, issued(STATIC_TOKEN, "dev"), "dev");
    let gw = static_gateway(&origin, "");
    // No range of it (a slice of an echo could hold part of the token), uncompressed.
    let r = call(
        &gw,
        &origin,
        &["-H", "Range: bytes=10-20", "-H", "Accept-Encoding: gzip"],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = origin.last_seen();
    assert!(!seen.headers.contains_key("range"), "{seen:?}");
    assert_eq!(
        seen.headers.get("accept-encoding").map(String::as_str),
        Some("identity")
    );
    // A session the origin opens on the token's strength does not reach the sandbox.
    let r = call_path(&gw, &origin, "/set-cookie", &["-i"]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let head = r.body.split("\r\n\r\n{").next().unwrap_or_default();
    assert!(
        head.contains("content-type"),
        "the answer's head is shown: {r:?}"
    );
    assert!(!head.to_ascii_lowercase().contains("set-cookie"), "{r:?}");
    // An answer compressed anyway cannot be checked for the token: not relayed.
    let r = call_path(&gw, &origin, "/gzip", &[]).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (502, Some("upstream_bad_response")),
        "{r:?}"
    );
}
