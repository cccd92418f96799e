//! The admin API, agent listeners and start-up, end to end.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use support::*;

fn gateway_with(extra_agents: &str) -> Gateway {
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n[[agents]]\nid = \"local\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n{extra_agents}",
        loopback_upstream(None)
    );
    Gateway::start_with_policies(&config, &[ALLOW_ALL])
}

fn admin(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> CurlResult {
    gw.admin_as(token, method, path, body)
}

#[test]
fn every_route_but_healthz_needs_the_admin_token() {
    if no_curl() {
        return;
    }
    let gw = gateway_with("");
    let token = gw.admin_token();
    assert_eq!(admin(&gw, "GET", "/healthz", None, None).status, 200);
    for path in ["/readyz", "/v1/agents", "/v1/agents/local"] {
        let missing = admin(&gw, "GET", path, None, None);
        assert_eq!(missing.status, 401, "{path}: {missing:?}");
        assert_eq!(missing.json()["error"], "unauthorized");
        let wrong = admin(&gw, "GET", path, Some("not-the-token-at-all"), None);
        assert_eq!(wrong.status, 401, "{path}: {wrong:?}");
        let right = admin(&gw, "GET", path, Some(&token), None);
        assert_eq!(right.status, 200, "{path}: {right:?}");
    }
    // A mutation without the token changes nothing.
    let r = admin(&gw, "DELETE", "/v1/agents/local", None, None);
    assert_eq!(r.status, 401);
    assert_eq!(
        admin(&gw, "GET", "/v1/agents/local", Some(&token), None).status,
        200
    );
}

#[test]
fn agents_are_created_read_replaced_and_deleted() {
    if no_curl() {
        return;
    }
    let gw = gateway_with("");
    let t = gw.admin_token();
    let body = r#"{"run_mode":"Autonomous","scopes":["/subscriptions/s1/resourceGroups/rg1"],"peers":["127.0.0.2"],"tags":{"team":"x"}}"#;
    let created = admin(&gw, "PUT", "/v1/agents/agent-b", Some(&t), Some(body));
    assert_eq!(created.status, 201, "{created:?}");
    let got = admin(&gw, "GET", "/v1/agents/agent-b", Some(&t), None).json();
    assert_eq!(got["id"], "agent-b");
    assert_eq!(got["run_mode"], "Autonomous");
    assert_eq!(got["scopes"][0], "/subscriptions/s1/resourceGroups/rg1");
    assert_eq!(got["peers"][0], "127.0.0.2");

    let replaced = admin(
        &gw,
        "PUT",
        "/v1/agents/agent-b",
        Some(&t),
        Some(r#"{"run_mode":"ReadOnly","peers":["127.0.0.2"]}"#),
    );
    assert_eq!(replaced.status, 200, "{replaced:?}");
    assert_eq!(replaced.json()["run_mode"], "ReadOnly");

    let list = admin(&gw, "GET", "/v1/agents", Some(&t), None).json();
    let ids: Vec<&str> = list["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(ids, ["agent-b", "local"]);

    assert_eq!(
        admin(&gw, "DELETE", "/v1/agents/agent-b", Some(&t), None).status,
        204
    );
    let gone = admin(&gw, "GET", "/v1/agents/agent-b", Some(&t), None);
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error"], "not_found");
    assert_eq!(
        admin(&gw, "DELETE", "/v1/agents/agent-b", Some(&t), None).status,
        404
    );
}

#[test]
fn bad_agent_requests_get_clear_errors_and_change_nothing() {
    if no_curl() {
        return;
    }
    let gw = gateway_with("");
    let t = gw.admin_token();
    let cases = [
        ("/v1/agents/x", "{not json", 400, "bad_request"),
        ("/v1/agents/x", r#"{"run_mode":"Yolo"}"#, 400, "bad_request"),
        (
            "/v1/agents/x",
            r#"{"run_mode":"Review","surprise":1}"#,
            400,
            "bad_request",
        ),
        (
            "/v1/agents/x",
            r#"{"id":"y","run_mode":"Review"}"#,
            400,
            "bad_request",
        ),
        (
            "/v1/agents/bad%20id",
            r#"{"run_mode":"Review"}"#,
            400,
            "bad_request",
        ),
        (
            "/v1/agents/x",
            r#"{"run_mode":"Review","peers":["127.0.0.1"]}"#,
            409,
            "conflict",
        ),
    ];
    for (path, body, status, error) in cases {
        let r = admin(&gw, "PUT", path, Some(&t), Some(body));
        assert_eq!(r.status, status, "{body}: {r:?}");
        assert_eq!(r.json()["error"], error, "{body}");
        assert!(
            !r.json()["detail"].as_str().unwrap_or("").is_empty(),
            "{body}: a detail says why"
        );
    }
    let list = admin(&gw, "GET", "/v1/agents", Some(&t), None).json();
    assert_eq!(list["agents"].as_array().map(Vec::len), Some(1), "{list}");
    let r = admin(&gw, "POST", "/v1/agents/local", Some(&t), Some("{}"));
    assert_eq!(r.status, 405);
    let r = admin(&gw, "GET", "/v2/nothing", Some(&t), None);
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registered_at_run_time_is_recognised_by_its_address() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = gateway_with("");
    let url = format!("http://127.0.0.1:{}/", origin.port());
    let before = curl_async(args![
        "--interface",
        "127.0.0.2",
        "-x",
        gw.proxy_url(),
        &url
    ])
    .await;
    assert_eq!(before.status, 403, "{before:?}");
    let t = gw.admin_token();
    let put = admin(
        &gw,
        "PUT",
        "/v1/agents/agent-b",
        Some(&t),
        Some(r#"{"run_mode":"Review","peers":["127.0.0.2"]}"#),
    );
    assert_eq!(put.status, 201, "{put:?}");
    let after = curl_async(args![
        "--interface",
        "127.0.0.2",
        "-x",
        gw.proxy_url(),
        &url
    ])
    .await;
    assert_eq!(after.status, 200, "{after:?}");
    assert!(
        gw.log_contains("agent=\"agent-b\""),
        "the request is attributed to agent-b:\n{}",
        gw.log()
    );
    assert_eq!(
        admin(&gw, "DELETE", "/v1/agents/agent-b", Some(&t), None).status,
        204
    );
    let removed = curl_async(args![
        "--interface",
        "127.0.0.2",
        "-x",
        gw.proxy_url(),
        &url
    ])
    .await;
    assert_eq!(removed.status, 403, "{removed:?}");
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_listener_attributes_every_connection_to_its_agent() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = gateway_with(
        "[[agents]]\nid = \"bound\"\nrun_mode = \"ReadOnly\"\nlisten = { address = \"127.0.0.1:0\" }\n",
    );
    let listener = gw
        .agent_listeners
        .get("bound")
        .copied()
        .expect("agent listener in banner");
    let url = format!("http://127.0.0.1:{}/", origin.port());
    // 127.0.0.2 is nobody's address, but on bound's own listener it does not matter.
    let r = curl_async(args![
        "--interface",
        "127.0.0.2",
        "-x",
        format!("http://{listener}"),
        &url
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(gw.log_contains("agent=\"bound\""), "{}", gw.log());
    // Once the agent is gone, its listener forwards nothing.
    let t = gw.admin_token();
    assert_eq!(
        admin(&gw, "DELETE", "/v1/agents/bound", Some(&t), None).status,
        204
    );
    let r = curl_async(args!["-x", format!("http://{listener}"), &url]).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.json()["detail"].as_str().unwrap_or("").contains("bound"),
        "{r:?}"
    );
    assert_eq!(origin.requests(), 1);
}

/// Runs `ip` with `args`, panicking with its output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace made for one test and deleted afterwards.
struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// Whether this test can make network namespaces (root and iproute2); prints why not.
fn can_make_namespaces() -> bool {
    if no_curl() {
        return false;
    }
    match missing_namespace_tools(false) {
        Some(why) => {
            eprintln!("SKIP: {why}");
            false
        }
        None => true,
    }
}

/// A fresh network namespace with `lo` up, deleted when dropped.
fn namespace(tag: &str) -> Netns {
    let name = format!("tollgate-{tag}-{}", std::process::id());
    ip(&["netns", "add", &name]);
    let ns = Netns(name);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ns
}

/// curl `url` through the proxy at 127.0.0.1:3128, from inside namespace `ns`.
async fn curl_in(ns: &str, url: &str) -> std::process::Output {
    curl_in_netns(ns, &["-x", "http://127.0.0.1:3128", url]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_listener_can_live_in_a_network_namespace() {
    if !can_make_namespaces() {
        return;
    }
    let ns = namespace("test");
    let origin = Origin::http();
    let gw = gateway_with(&format!(
        "[[agents]]\nid = \"vm\"\nrun_mode = \"Review\"\nlisten = {{ address = \"127.0.0.1:3128\", netns = \"/run/netns/{}\" }}\n",
        ns.0
    ));
    // From inside the namespace the gateway's listener is the only thing there is; the
    // gateway itself reaches the origin from the host's namespace.
    let url = format!("http://127.0.0.1:{}/from-vm", origin.port());
    let out = curl_in(&ns.0, &url).await;
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl in the namespace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(body.contains("/from-vm"), "{body}");
    assert!(gw.log_contains("agent=\"vm\""), "{}", gw.log());
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registered_over_the_api_gets_its_listener_in_its_namespace_until_removed() {
    if !can_make_namespaces() {
        return;
    }
    let ns = namespace("api");
    let origin = Origin::http();
    let gw = gateway_with("");
    let url = format!("http://127.0.0.1:{}/from-api-vm", origin.port());
    // Nothing listens in the namespace before the agent is registered.
    assert!(!curl_in(&ns.0, &url).await.status.success());

    let record = format!(
        r#"{{"run_mode":"Review","listen":{{"address":"127.0.0.1:3128","netns":"/run/netns/{}"}}}}"#,
        ns.0
    );
    let put = gw.admin_call("PUT", "/v1/agents/vm2", Some(&record));
    assert_eq!(put.status, 201, "{put:?}");
    let out = curl_in(&ns.0, &url).await;
    assert!(
        out.status.success(),
        "curl in the namespace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("/from-api-vm"));
    assert!(gw.log_contains("agent=\"vm2\""), "{}", gw.log());
    assert_eq!(origin.requests(), 1);
    // Registering it again the same way keeps the listener.
    assert_eq!(
        gw.admin_call("PUT", "/v1/agents/vm2", Some(&record)).status,
        200
    );
    assert!(curl_in(&ns.0, &url).await.status.success());
    // The registration is stored: after a restart the listener is back in the namespace.
    let dir = gw.stop();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n[policy]\ndir = {:?}\n",
        loopback_upstream(None),
        dir.path().join("policies")
    );
    let gw = Gateway::start_in(dir, &config);
    let out = curl_in(&ns.0, &url).await;
    assert!(
        out.status.success(),
        "after a restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(origin.requests(), 3);

    // A listener in the gateway's own namespace cannot be registered over the API, and a
    // namespace that does not exist is refused with the reason.
    let here = gw.admin_call(
        "PUT",
        "/v1/agents/vm3",
        Some(r#"{"run_mode":"Review","listen":{"address":"127.0.0.1:0"}}"#),
    );
    assert_eq!(here.status, 400, "{here:?}");
    assert!(here.body.contains("listen.netns"), "{here:?}");
    let missing = gw.admin_call(
        "PUT",
        "/v1/agents/vm3",
        Some(r#"{"run_mode":"Review","listen":{"address":"127.0.0.1:3128","netns":"/run/netns/tollgate-no-such-ns"}}"#),
    );
    assert_eq!(missing.status, 400, "{missing:?}");
    assert!(missing.body.contains("tollgate-no-such-ns"), "{missing:?}");
    assert_eq!(gw.admin_call("GET", "/v1/agents/vm3", None).status, 404);

    // Removing the agent closes its listener.
    let removed = gw.admin_call("DELETE", "/v1/agents/vm2", None);
    assert!(removed.status < 300, "{removed:?}");
    let mut closed = false;
    for _ in 0..50 {
        if !curl_in(&ns.0, &url).await.status.success() {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        closed,
        "the listener still answers after the agent was removed"
    );
    assert_eq!(origin.requests(), 3);
}

#[test]
fn the_ca_and_admin_token_are_created_private_once_and_reused() {
    let gw = gateway_with("");
    let data = gw.data_dir();
    for (file, mode) in [("ca-key.pem", 0o600), ("admin-token", 0o600)] {
        let m = std::fs::metadata(data.join(file))
            .expect(file)
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{file} has mode {m:o}");
    }
    assert!(
        gw.banner.iter().any(|l| l.contains("ca.pem (created)")),
        "{:?}",
        gw.banner
    );
    let ca = std::fs::read(data.join("ca.pem")).expect("ca");
    let token = gw.admin_token();
    let dir = gw.stop();
    let config = std::fs::read_to_string(dir.path().join("tollgate.toml")).expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.arg("serve")
        .arg("--config")
        .arg(dir.path().join("tollgate.toml"));
    let again = Gateway::spawn(cmd, dir);
    assert!(config.contains("data_dir"));
    assert_eq!(
        std::fs::read(again.data_dir().join("ca.pem")).expect("ca"),
        ca,
        "the CA is reused"
    );
    assert_eq!(again.admin_token(), token, "the token is reused");
    assert!(
        !again.banner.iter().any(|l| l.contains("(created)")),
        "{:?}",
        again.banner
    );
}

#[test]
fn an_invalid_config_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[egress]\nlisten = \"127.0.0.1:0\"\nlisen = 3\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lisen") && err.contains("bad.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_serves_the_demo_agent_on_port_3128() {
    if no_curl() {
        return;
    }
    if std::net::TcpListener::bind("127.0.0.1:3128").is_err()
        || std::net::TcpListener::bind("127.0.0.1:9901").is_err()
    {
        eprintln!(
            "SKIP: 127.0.0.1:3128 or :9901 is in use, so the embedded default cannot start here"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.arg("serve");
    let gw = Gateway::spawn(cmd, dir);
    assert_eq!(gw.egress.to_string(), "127.0.0.1:3128");
    assert_eq!(gw.admin.to_string(), "127.0.0.1:9901");
    assert!(
        gw.dir.path().join("tollgate-data/ca.pem").exists(),
        "data in ./tollgate-data"
    );
    assert!(
        gw.banner
            .iter()
            .any(|l| l.contains("curl -x http://127.0.0.1:3128")),
        "{:?}",
        gw.banner
    );
    // The demo agent's first request goes through the pipeline and gets a decision: the
    // default policies' allowlist does not include 127.0.0.1.
    let r = curl_async(args!["-x", "http://127.0.0.1:3128", "http://127.0.0.1:9/"]).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"], "denied");
    assert_eq!(r.json()["decision"], "deny");
    assert_eq!(r.json()["policies"][0], "allowlist");
    assert!(gw.log_contains("agent=\"local\""), "{}", gw.log());
}

#[test]
fn the_admin_api_closes_connections_whose_head_is_slow_or_never_comes() {
    use std::io::{Read, Write};
    let config = format!(
        "{EPHEMERAL_LISTENERS}[limits]\nhandshake_timeout_ms = 500\nrequest_head_timeout_ms = 500\n"
    );
    let gw = Gateway::start_with_policies(&config, &[ALLOW_ALL]);
    // How long the admin API keeps a connection that sent `sent` (or nothing) open.
    let kept_open = |sent: &[u8]| {
        let mut s = std::net::TcpStream::connect(gw.admin).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let started = std::time::Instant::now();
        s.write_all(sent).expect("write");
        let mut buf = [0u8; 512];
        let closed = matches!(s.read(&mut buf), Ok(0) | Err(_)) && started.elapsed().as_secs() < 5;
        (closed, started.elapsed())
    };
    for sent in [&b""[..], b"GET /v1/agents HTTP/1.1\r\nHost: x\r\n"] {
        let (closed, after) = kept_open(sent);
        assert!(
            closed,
            "a connection that sent {:?} was still open after {after:?}",
            String::from_utf8_lossy(sent)
        );
    }
    // A whole head is still answered.
    let ok = admin(&gw, "GET", "/healthz", None, None);
    assert_eq!(ok.status, 200, "{ok:?}");
}

/// The allocator's options compiled into the binary (see `gateway/src/allocator.rs`): jemalloc
/// reads them, and the environment still overrides them.
#[test]
fn jemalloc_takes_the_gateways_options_and_the_environment_overrides_them() {
    let tcache_max = |env: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--version")
            .env("_RJEM_MALLOC_CONF", env)
            .output()
            .expect("run");
        // `stats_print` makes jemalloc print its options when the process exits.
        let stats = String::from_utf8_lossy(&out.stderr).into_owned();
        stats
            .lines()
            .find_map(|l| l.trim().strip_prefix("opt.tcache_max: "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no opt.tcache_max in jemalloc's statistics: {stats}"))
    };
    assert_eq!(tcache_max("stats_print:true"), "65536");
    assert_eq!(tcache_max("stats_print:true,tcache_max:32768"), "32768");
}
