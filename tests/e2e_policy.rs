//! Cedar policies deciding real requests through the gateway: the shipped default set, run
//! modes, the domain allowlist, reload and the directory watch.

mod support;

use support::*;

/// Names the tests reach, all pinned to the loopback origins via `upstream.resolve`.
const NAMES: [&str; 4] = [
    "api.github.com",
    "management.azure.com",
    "github.com.evil.test",
    "notgithub.com",
];

const AGENTS: &str = r#"
[[agents]]
id = "reader"
run_mode = "ReadOnly"
peers = ["127.0.0.1"]

[[agents]]
id = "reviewer"
run_mode = "Review"
peers = ["127.0.0.2"]

[[agents]]
id = "auto"
run_mode = "Autonomous"
scopes = ["/subscriptions/sub-1/resourceGroups/rg-a"]
peers = ["127.0.0.3"]
"#;

/// A gateway on the repository's default policies, reaching NAMES on loopback, with
/// `policy_settings` lines in [policy]. Requests needing approval expire after 1 s.
fn gateway(ca: &TestCa, policy_settings: &str) -> Gateway {
    let resolve: Vec<String> = NAMES
        .iter()
        .map(|n| format!("{n:?} = \"127.0.0.1\""))
        .collect();
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}resolve = {{ {} }}\n[approvals]\ntimeout_secs = 1\n{AGENTS}",
        loopback_upstream(Some(&ca.cert_path())),
        resolve.join(", ")
    );
    let files = default_policies();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    Gateway::start_with_policy_settings(&config, &refs, policy_settings)
}

/// curl from `source` through the gateway, trusting its CA.
async fn via(gw: &Gateway, source: &str, method: &str, url: &str) -> CurlResult {
    curl_async(args![
        "--interface",
        source,
        "-x",
        gw.proxy_url(),
        "--cacert",
        gw.ca_cert().display(),
        "-X",
        method,
        url
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_modes_decide_reads_writes_and_arm_scopes() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::https_for(&ca, &NAMES);
    let gw = gateway(&ca, "");
    let github = format!("https://api.github.com:{}/repos/octo/hello", origin.port());
    let arm = |rg: &str, tail: &str| {
        format!(
            "https://management.azure.com:{}/subscriptions/sub-1/resourceGroups/{rg}/providers/Microsoft.Storage/storageAccounts/acct{tail}?api-version=2023-01-01",
            origin.port()
        )
    };
    let (reader, reviewer, auto) = ("127.0.0.1", "127.0.0.2", "127.0.0.3");

    // (source, method, url, expected status, expected error, expected policy)
    type Case<'a> = (
        &'a str,
        &'a str,
        String,
        u16,
        Option<&'a str>,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (reader, "GET", github.clone(), 200, None, None),
        (reader, "POST", github.clone(), 403, Some("denied"), None),
        (
            reader,
            "POST",
            arm("rg-a", "/listKeys"),
            403,
            Some("denied"),
            None,
        ),
        (reviewer, "GET", github.clone(), 200, None, None),
        (
            reviewer,
            "POST",
            github.clone(),
            403,
            Some("approval_expired"),
            Some("review-approved-writes"),
        ),
        (auto, "PUT", arm("rg-a", ""), 200, None, None),
        (auto, "POST", arm("rg-a", "/listKeys"), 200, None, None),
        (
            auto,
            "PUT",
            arm("rg-b", ""),
            403,
            Some("approval_expired"),
            Some("autonomous-approved-writes"),
        ),
    ];
    let mut forwarded = 0;
    for (source, method, url, status, error, policy) in cases {
        let r = via(&gw, source, method, &url).await;
        assert_eq!(r.status, status, "{source} {method} {url}: {r:?}");
        if status == 200 {
            forwarded += 1;
            assert_eq!(r.seen().method, method);
            continue;
        }
        let body = r.json();
        assert_eq!(
            body["error"].as_str(),
            error,
            "{source} {method} {url}: {body}"
        );
        let decision = if error == Some("denied") {
            "deny"
        } else {
            "needs_approval"
        };
        assert_eq!(body["decision"], decision, "{body}");
        assert!(
            body["policy_version"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "{body}"
        );
        if let Some(policy) = policy {
            let policies: Vec<&str> = body["policies"]
                .as_array()
                .expect("policies")
                .iter()
                .filter_map(|p| p.as_str())
                .collect();
            assert!(policies.contains(&policy), "{policy} in {body}");
        }
    }
    assert_eq!(
        origin.requests(),
        forwarded,
        "only allowed requests reach the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_covers_sub_domains_but_not_look_alikes() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let plain = Origin::http();
    let tls = Origin::https_for(&ca, &NAMES);
    let gw = gateway(&ca, "");
    let ok = via(
        &gw,
        "127.0.0.1",
        "GET",
        &format!("http://api.github.com:{}/x", plain.port()),
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    for host in ["github.com.evil.test", "notgithub.com"] {
        for url in [
            format!("http://{host}:{}/", plain.port()),
            format!("https://{host}:{}/", tls.port()),
        ] {
            let r = via(&gw, "127.0.0.1", "GET", &url).await;
            if url.starts_with("https") {
                // The allowlist reads only the host: the CONNECT itself is refused.
                assert!(
                    r.stderr.contains("CONNECT tunnel failed, response 403"),
                    "{url}: {r:?}"
                );
            } else {
                assert_eq!(r.status, 403, "{url}: {r:?}");
                assert_eq!(r.json()["policies"][0], "allowlist", "{url}");
            }
        }
    }
    assert!(gw.log_contains("denied by allowlist for every request to notgithub.com"));
    assert_eq!(plain.requests() + tls.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_valid_set_and_keeps_the_old_one_when_invalid() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::http();
    // No watch: this test reloads explicitly.
    let gw = gateway(&ca, "watch_interval_ms = 0\n");
    let url = format!("http://api.github.com:{}/", origin.port());
    let token = gw.admin_token();
    let admin = |method: &str, path: &str| {
        curl(&[
            "-X",
            method,
            "-H",
            &format!("Authorization: Bearer {token}"),
            &format!("http://{}{path}", gw.admin),
        ])
    };
    let before = admin("GET", "/v1/policies").json();
    let version = before["version"].as_str().expect("version").to_string();
    assert_eq!(
        before["policies"]["allowlist"], "allowlist.cedar",
        "{before}"
    );
    assert_eq!(via(&gw, "127.0.0.1", "GET", &url).await.status, 200);

    // An invalid file: rejected with file, line and reason; the old set stays in force.
    std::fs::write(
        gw.policy_dir().join("broken.cedar"),
        "@id(\"broken\")\npermit (principal, action, resource)\nwhen { principal.run_mod == \"Review\" };\n",
    )
    .expect("write");
    let rejected = admin("POST", "/v1/policies/reload");
    assert_eq!(rejected.status, 422, "{rejected:?}");
    let problem = &rejected.json()["problems"][0];
    assert_eq!(problem["file"], "broken.cedar", "{problem}");
    assert_eq!(problem["line"], 3, "{problem}");
    assert!(
        problem["message"]
            .as_str()
            .unwrap_or("")
            .contains("run_mod"),
        "{problem}"
    );
    let status = admin("GET", "/v1/policies").json();
    assert_eq!(
        status["version"],
        version.as_str(),
        "the old set stays in force"
    );
    assert_eq!(status["rejected"][0]["file"], "broken.cedar", "{status}");
    assert_eq!(
        via(&gw, "127.0.0.1", "GET", &url).await.status,
        200,
        "still allowed by the old set"
    );

    // A valid change: github leaves the allowlist.
    std::fs::remove_file(gw.policy_dir().join("broken.cedar")).expect("rm");
    let allowlist = std::fs::read_to_string(gw.policy_dir().join("allowlist.cedar")).expect("read");
    let narrowed = allowlist.replace("resource in Domain::\"github.com\" ||", "");
    assert_ne!(allowlist, narrowed);
    std::fs::write(gw.policy_dir().join("allowlist.cedar"), narrowed).expect("write");
    let reloaded = admin("POST", "/v1/policies/reload");
    assert_eq!(reloaded.status, 200, "{reloaded:?}");
    assert_eq!(reloaded.json()["changed"], true);
    assert_ne!(reloaded.json()["version"], version.as_str());
    let denied = via(&gw, "127.0.0.1", "GET", &url).await;
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied.json()["policy_version"], reloaded.json()["version"]);
    assert_eq!(origin.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_directory_is_watched() {
    if no_curl() {
        return;
    }
    let ca = TestCa::new("origin");
    let origin = Origin::http();
    let gw = gateway(&ca, "watch_interval_ms = 200\n");
    let url = format!("http://api.github.com:{}/", origin.port());
    assert_eq!(via(&gw, "127.0.0.1", "GET", &url).await.status, 200);
    std::fs::write(
        gw.policy_dir().join("freeze.cedar"),
        "@id(\"freeze\")\nforbid (principal, action, resource in Domain::\"github.com\");\n",
    )
    .expect("write");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        let r = via(&gw, "127.0.0.1", "GET", &url).await;
        if r.status == 403 {
            assert_eq!(r.json()["policies"][0], "freeze", "{r:?}");
            assert!(gw.log_contains("policy set reloaded"), "{}", gw.log());
            return;
        }
        last = Some(r);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("the new policy was not picked up: {last:?}");
}

#[test]
fn an_invalid_policy_directory_stops_the_gateway_from_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir");
    std::fs::write(
        policies.join("bad.cedar"),
        "@id(\"x\")\npermit (principal, action, resource)\nwhen { nonsense };\n",
    )
    .expect("write");
    let err = start_fails(
        dir.path(),
        &format!("{EPHEMERAL_LISTENERS}[policy]\ndir = {policies:?}\n"),
    );
    assert!(err.contains("bad.cedar:3"), "file and line: {err}");
}

#[test]
fn the_policy_cli_validates_tests_and_explains() {
    let bin = env!("CARGO_BIN_EXE_tollgate");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .current_dir(&root)
            .output()
            .expect("run")
    };
    let validate = run(&["policy", "validate"]);
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );
    let test = run(&["policy", "test"]);
    let stdout = String::from_utf8_lossy(&test.stdout);
    assert!(test.status.success(), "{stdout}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");

    // A failing expectation makes `policy test` fail.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("wrong.toml"),
        "[agents.r]\nrun_mode = \"ReadOnly\"\n[[case]]\nname = \"wrong on purpose\"\nagent = \"r\"\nmethod = \"POST\"\nurl = \"https://github.com/\"\nexpect = \"allow\"\n",
    )
    .expect("write");
    let failing = run(&[
        "policy",
        "test",
        "--tests",
        dir.path().to_str().expect("utf8"),
    ]);
    assert_eq!(failing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failing.stdout).contains("FAIL  wrong on purpose"));

    let explain = run(&[
        "policy", "explain", "--agent", "a", "--run-mode", "Autonomous",
        "--scope", "/subscriptions/s/resourceGroups/rg", "--method", "DELETE",
        "--url", "https://management.azure.com/subscriptions/s/resourceGroups/rg/providers/Microsoft.Web/sites/x",
    ]);
    let out = String::from_utf8_lossy(&explain.stdout);
    assert!(explain.status.success(), "{out}");
    assert!(
        out.contains("decision:  allow") && out.contains("autonomous-writes (run-modes.cedar)"),
        "{out}"
    );

    let invalid = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        invalid.path().join("x.cedar"),
        "@id(\"x\") permit (principal, action, resource) when { context.nope };",
    )
    .expect("write");
    let bad = run(&["policy", "validate", invalid.path().to_str().expect("utf8")]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("x.cedar:1:"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
