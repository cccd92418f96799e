//! Approvals end to end: a Review-mode write is held at the gateway until a person decides
//! on the admin API, bound to its exact body, released once, refused when denied or expired,
//! never sent when its client leaves — and every acknowledged decision survives SIGKILL.

mod support;

use std::time::Duration;

use support::*;

/// Starts the gateway in `dir` (fresh or a stopped gateway's) with the approval policies and
/// `extra` config lines.
fn start_in(dir: tempfile::TempDir, extra: &str) -> Gateway {
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir).expect("policy dir");
    std::fs::write(policy_dir.join(APPROVAL_POLICIES.0), APPROVAL_POLICIES.1).expect("policy");
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n{extra}\n{REVIEW_AGENT}\n[policy]\ndir = {policy_dir:?}\n",
        loopback_upstream(None)
    );
    Gateway::start_in(dir, &config)
}

fn start(extra: &str) -> Gateway {
    start_in(tempfile::tempdir().expect("tempdir"), extra)
}

/// Waits (up to 10 s) until approval `id` is in `state`.
fn wait_state(gw: &Gateway, id: &str, state: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = gw.admin_call("GET", &format!("/v1/approvals/{id}"), None);
        if got.status == 200 && got.json()["state"] == state {
            return got.json();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "approval {id} never became {state}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_write_is_released_once_on_approval_and_refused_on_denial() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = start("");
    let url = format!("http://127.0.0.1:{}/things?x=1", origin.port());

    // Reads pass; the write is held and nothing reaches the origin.
    let read = curl_async(args!["-x", gw.proxy_url(), &url]).await;
    assert_eq!(read.status, 200, "{read:?}");
    let before = origin.requests();
    let held = post_in_background(&gw, &url, "hello, approver", &[]);
    let approval = wait_for_approvals(&gw, "state=pending", 1).remove(0);
    assert_eq!(approval["agent"], "a");
    assert_eq!(approval["method"], "POST");
    assert_eq!(approval["url"], url.as_str());
    assert_eq!(approval["kind"], "request");
    assert_eq!(approval["body_bytes"], 15);
    assert_eq!(approval["body_sha256"], sha256_hex(b"hello, approver"));
    assert_eq!(approval["policies"][0], "approved-writes");
    assert!(approval["expires_at"].as_u64() > approval["requested_at"].as_u64());
    assert_eq!(origin.requests(), before, "a held request must not be sent");
    let id = approval["id"].as_str().expect("id").to_string();

    // Approve: the very request is sent, once, with its body.
    let approved = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(approved.json()["approver"], "admin");
    let released = held.await.expect("curl");
    assert_eq!(released.status, 200, "{released:?}");
    let seen = released.seen();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/things?x=1");
    assert_eq!(seen.body_len, 15);
    assert_eq!(origin.requests(), before + 1);
    assert!(
        gw.log_contains(&format!("approval=\"{id}\"")),
        "{}",
        gw.log()
    );

    // A decision is final, and never covers another request.
    let again = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(again.status, 409, "{again:?}");
    let second = post_in_background(&gw, &url, "hello, approver", &[]);
    let second_approval = wait_for_approvals(&gw, "state=pending", 1).remove(0);
    assert_ne!(second_approval["id"], id.as_str());
    assert_eq!(origin.requests(), before + 1);

    // Deny: 403 with the approver's reason, nothing sent.
    let second_id = second_approval["id"].as_str().expect("id");
    let no_reason = gw.admin_call(
        "POST",
        &format!("/v1/approvals/{second_id}/deny"),
        Some(r#"{"reason":" "}"#),
    );
    assert_eq!(no_reason.status, 400, "{no_reason:?}");
    let denied = gw.admin_call(
        "POST",
        &format!("/v1/approvals/{second_id}/deny"),
        Some(r#"{"reason":"not during the freeze"}"#),
    );
    assert_eq!(denied.status, 200, "{denied:?}");
    let refused = second.await.expect("curl");
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.json()["error"], "approval_denied");
    assert!(
        refused.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not during the freeze") && d.contains("admin")),
        "{refused:?}"
    );
    assert_eq!(origin.requests(), before + 1);

    // The history: filters by state and agent; unknown ones are errors.
    let all = gw.admin_call("GET", "/v1/approvals?agent=a", None).json();
    let states: Vec<&str> = all["approvals"]
        .as_array()
        .expect("list")
        .iter()
        .map(|a| a["state"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(states, vec!["approved", "denied"]);
    assert_eq!(
        gw.admin_call("GET", "/v1/approvals?state=maybe", None)
            .status,
        400
    );
    assert_eq!(
        gw.admin_call("POST", "/v1/approvals/nope/approve", None)
            .status,
        404
    );

    // The agent's audit trail: one summary per request, without query or body.
    // (Records are written in the background: wait for all three.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (audit, records) = loop {
        let audit = gw.admin_call("GET", "/v1/agents/a/audit", None);
        assert_eq!(audit.status, 200, "{audit:?}");
        let records = audit.json()["records"]
            .as_array()
            .cloned()
            .expect("records");
        if records.len() >= 3 || std::time::Instant::now() > deadline {
            break (audit, records);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let summary: Vec<(String, u64, String)> = records
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap_or_default().to_string(),
                r["status"].as_u64().unwrap_or_default(),
                r["decision"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("GET".to_string(), 200, "allow".to_string()),
            ("POST".to_string(), 200, "needs_approval".to_string()),
            ("POST".to_string(), 403, "needs_approval".to_string()),
        ]
    );
    assert_eq!(records[1]["approval"], id.as_str());
    assert_eq!(records[1]["bytes_in"], 15);
    assert_eq!(records[1]["path"], "/things");
    assert_eq!(records[2]["error"], "approval_denied");
    assert!(!audit.body.contains("x=1") && !audit.body.contains("hello, approver"));
    let page = gw
        .admin_call("GET", "/v1/agents/a/audit?since=2&limit=1", None)
        .json();
    assert_eq!(page["records"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["records"][0]["seq"], 2);
    assert_eq!(page["next"], 3);
}

/// An approver reads what a held request would send — its JSON body pretty-printed — from
/// the gateway's memory only: the preview is in no file of the data directory, not in the
/// log, and gone once the request is settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_sees_the_held_body_which_is_never_stored_or_logged() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = start("");
    let url = format!("http://127.0.0.1:{}/vms", origin.port());
    let marker = "preview-marker-5d1c9a";
    let body = format!(r#"{{"name":"{marker}","size":3}}"#);
    let held = post_in_background(&gw, &url, &body, &[]);
    let approval = wait_for_approvals(&gw, "state=pending", 1).remove(0);
    let preview = approval["body_preview"].clone();
    assert_eq!(
        (
            preview["kind"].as_str(),
            preview["text"].as_str(),
            preview["truncated"].as_bool()
        ),
        (
            Some("json"),
            Some(format!("{{\n  \"name\": \"{marker}\",\n  \"size\": 3\n}}").as_str()),
            Some(false)
        ),
        "{approval}"
    );
    let id = approval["id"].as_str().expect("id").to_string();
    let one = gw
        .admin_call("GET", &format!("/v1/approvals/{id}"), None)
        .json();
    assert_eq!(one["body_preview"], preview, "{one}");

    let approved = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(held.await.expect("curl").status, 200);
    let settled = gw
        .admin_call("GET", &format!("/v1/approvals/{id}"), None)
        .json();
    assert!(settled.get("body_preview").is_none(), "{settled}");
    assert!(!gw.log_contains(marker), "{}", gw.log());
    for (path, bytes) in files_under(&gw.data_dir()) {
        assert!(
            !bytes_contain(&bytes, marker),
            "the held body reached {}",
            path.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_request_expires_and_a_departed_client_abandons_its_request() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = start("[approvals]\ntimeout_secs = 1\n");
    let url = format!("http://127.0.0.1:{}/things", origin.port());

    let expired = post_in_background(&gw, &url, "{}", &[])
        .await
        .expect("curl");
    assert_eq!(expired.status, 403, "{expired:?}");
    assert_eq!(expired.json()["error"], "approval_expired");
    assert!(expired.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains("approval expired")));
    let id = expired.json()["approval"].as_str().expect("id").to_string();
    wait_state(&gw, &id, "expired");
    assert_eq!(origin.requests(), 0);
    assert_eq!(
        gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None)
            .status,
        409,
        "an expired approval cannot be approved"
    );
    // An agent cannot reach the admin API through the gateway, although this gateway lets
    // sandboxes reach loopback origins.
    let to_admin = curl_async(args![
        "-x",
        gw.proxy_url(),
        format!("http://{}/v1/approvals", gw.admin)
    ])
    .await;
    assert_eq!(to_admin.status, 403, "{to_admin:?}");
    assert_eq!(to_admin.json()["error"], "destination_forbidden");
    drop(gw);

    // The client gives up after 300 ms, long before the timeout: the record is abandoned,
    // and approving it afterwards sends nothing.
    let gw = start("[approvals]\ntimeout_secs = 30\n");
    let gone = post_in_background(&gw, &url, "{}", &["--max-time", "0.3"])
        .await
        .expect("curl");
    assert_eq!(gone.status, 0, "{gone:?}");
    let listed = gw.admin_call("GET", "/v1/approvals", None).json();
    let id = listed["approvals"][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    wait_state(&gw, &id, "abandoned");
    assert_eq!(
        gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None)
            .status,
        409
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        origin.requests(),
        0,
        "an abandoned request must never be sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_are_limited_in_number_and_body_size() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = start("[approvals]\nmax_pending_per_agent = 1\nmax_body_bytes = 64\n");
    let url = format!("http://127.0.0.1:{}/things", origin.port());

    let large = post_in_background(&gw, &url, &"x".repeat(65), &[])
        .await
        .expect("curl");
    assert_eq!(large.status, 413, "{large:?}");
    assert_eq!(large.json()["error"], "body_too_large");

    let first = post_in_background(&gw, &url, "{}", &[]);
    let held = wait_for_approvals(&gw, "state=pending", 1).remove(0);
    let second = post_in_background(&gw, &url, "{}", &[])
        .await
        .expect("curl");
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.json()["error"], "too_many_pending_approvals");

    let id = held["id"].as_str().expect("id");
    gw.admin_call(
        "POST",
        &format!("/v1/approvals/{id}/deny"),
        Some(r#"{"reason":"test"}"#),
    );
    assert_eq!(first.await.expect("curl").status, 403);
    // The slot is free again.
    let third = post_in_background(&gw, &url, "{}", &[]);
    wait_for_approvals(&gw, "state=pending", 1);
    drop(gw);
    assert_eq!(third.await.expect("curl").status, 0);
    assert_eq!(origin.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_approvers_decide_under_their_own_name_and_nothing_else() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("alice.token");
    std::fs::write(&token_file, "alice-secret-token\n").expect("token");
    let gw = start_in(
        dir,
        &format!("[[admin.approvers]]\nname = \"alice\"\ntoken = {{ file = {token_file:?} }}\n"),
    );
    let url = format!("http://127.0.0.1:{}/things", origin.port());
    let alice = Some("alice-secret-token");

    let held = post_in_background(&gw, &url, "{}", &[]);
    let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(gw.admin_as(alice, "GET", "/v1/agents", None).status, 403);
    assert_eq!(
        gw.admin_as(Some("wrong"), "GET", "/v1/approvals", None)
            .status,
        401
    );
    let shown = gw.admin_as(alice, "GET", &format!("/v1/approvals/{id}"), None);
    assert_eq!(shown.status, 200, "{shown:?}");
    let approved = gw.admin_as(alice, "POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(approved.json()["approver"], "alice");
    assert_eq!(held.await.expect("curl").status, 200);
    assert!(!gw.log().contains("alice-secret-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_gateway_is_killed() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = start("");
    let url = format!("http://127.0.0.1:{}/things", origin.port());

    // An agent registered through the API, one approved request, one still pending.
    let put = gw.admin_call(
        "PUT",
        "/v1/agents/b",
        Some(r#"{"run_mode":"Autonomous","peers":["127.0.0.9"]}"#),
    );
    assert_eq!(put.status, 201, "{put:?}");
    let first = post_in_background(&gw, &url, "one", &[]);
    let approved_id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let ack = gw.admin_call(
        "POST",
        &format!("/v1/approvals/{approved_id}/approve"),
        None,
    );
    assert_eq!(ack.status, 200);
    assert_eq!(first.await.expect("curl").status, 200);
    // Its audit record is written after the answer, within the writer's flush interval;
    // once the API shows it, it is in the store and must outlive the kill.
    wait_for_audit(&gw, "a");
    let second = post_in_background(&gw, &url, "two", &[]);
    let pending_id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();

    // SIGKILL, no chance to flush anything, then start again on the same data.
    let dir = gw.stop();
    let _ = second.await;
    let gw = start_in(dir, "");
    let approved = gw.admin_call("GET", &format!("/v1/approvals/{approved_id}"), None);
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(approved.json()["state"], "approved");
    assert_eq!(approved.json()["approver"], "admin");
    let abandoned = gw.admin_call("GET", &format!("/v1/approvals/{pending_id}"), None);
    assert_eq!(abandoned.json()["state"], "abandoned", "{abandoned:?}");
    assert_eq!(abandoned.json()["body_sha256"], sha256_hex(b"two"));
    let agent = gw.admin_call("GET", "/v1/agents/b", None);
    assert_eq!(agent.status, 200, "{agent:?}");
    assert_eq!(agent.json()["run_mode"], "Autonomous");
    assert_eq!(origin.requests(), 1);

    // On disk, each agent's data lives in a keyspace of its own.
    let from_b = curl_async(args![
        "--interface",
        "127.0.0.9",
        "-x",
        gw.proxy_url(),
        &url
    ])
    .await;
    assert_eq!(from_b.status, 200, "{from_b:?}");
    wait_for_audit(&gw, "b");
    let dir = gw.stop();
    let store = tollgate_storage::Store::open(&dir.path().join("data/store")).expect("store");
    assert!(store.has_agent_space("a") && store.has_agent_space("b"));
    let of = |agent: &str| {
        store
            .approvals(&tollgate_storage::ApprovalFilter {
                agent: Some(agent.to_string()),
                state: None,
            })
            .expect("approvals")
            .len()
    };
    assert_eq!((of("a"), of("b")), (2, 0));
    assert_eq!(store.audit("b", 0, 10).expect("audit b").len(), 1);
    let of_a = store.audit("a", 0, 10).expect("audit a");
    assert!(!of_a.is_empty() && of_a.iter().all(|r| r.agent == "a"));
}

/// Waits until `agent` has at least one audit record the admin API can show.
fn wait_for_audit(gw: &Gateway, agent: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gw
        .admin_call("GET", &format!("/v1/agents/{agent}/audit"), None)
        .json()["records"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{agent}'s request was never audited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `tollgate approvals <args>` against `gw`'s admin API with `token_file`.
fn approvals_cli(
    gw: &Gateway,
    token_file: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("approvals")
        .args(args)
        .arg("--admin")
        .arg(format!("http://{}", gw.admin))
        .arg("--token-file")
        .arg(token_file)
        .output()
        .expect("run tollgate approvals");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approvals_command_lists_shows_approves_and_denies() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = start("");
    let token = gw.data_dir().join("admin-token");
    let url = format!("http://127.0.0.1:{}/deploy", origin.port());

    let first = post_in_background(&gw, &url, "v1", &[]);
    let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (code, out, err) = approvals_cli(&gw, &token, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&id) && out.contains(&url) && out.contains("pending"),
        "{out}"
    );
    let (code, out, _) = approvals_cli(&gw, &token, &["show", &id]);
    assert_eq!(code, 0);
    assert!(out.contains(&sha256_hex(b"v1")), "{out}");
    assert!(
        out.contains("body_preview: (text)") && out.lines().any(|line| line.trim() == "v1"),
        "show must print the held body: {out}"
    );
    let (code, out, err) = approvals_cli(&gw, &token, &["approve", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("approved"), "{out}");
    assert_eq!(first.await.expect("curl").status, 200);

    let second = post_in_background(&gw, &url, "v2", &[]);
    let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (code, _, err) = approvals_cli(&gw, &token, &["deny", &id, "--reason", "wrong version"]);
    assert_eq!(code, 0, "{err}");
    let denied = second.await.expect("curl");
    assert_eq!(denied.status, 403);
    assert!(denied.body.contains("wrong version"), "{denied:?}");

    // Settled twice, unknown, or a wrong token: the API's own error, exit code 1.
    let (code, _, err) = approvals_cli(&gw, &token, &["approve", &id]);
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("already denied"),
        "{err}"
    );
    let wrong = gw.dir.path().join("wrong-token");
    std::fs::write(&wrong, "nope").expect("token");
    let (code, _, err) = approvals_cli(&gw, &wrong, &["list"]);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_expecting_100_continue_is_asked_for_its_body_before_the_hold() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = start("");
    let url = format!("http://127.0.0.1:{}/upload", origin.port());
    let body = "b".repeat(2048);
    let held = post_in_background(&gw, &url, &body, &["-v", "-H", "Expect: 100-continue"]);
    let approval = wait_for_approvals(&gw, "state=pending", 1).remove(0);
    assert_eq!(approval["body_bytes"], 2048);
    let id = approval["id"].as_str().expect("id");
    gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    let released = held.await.expect("curl");
    assert_eq!(released.status, 200, "{released:?}");
    assert!(
        released.stderr.contains("HTTP/1.1 100 Continue"),
        "{}",
        released.stderr
    );
    let seen = released.seen();
    assert_eq!(seen.body_len, 2048);
    assert!(!seen.headers.contains_key("expect"), "{:?}", seen.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_answers_before_a_released_requests_answer_are_dropped() {
    if no_curl() {
        return;
    }
    // A raw origin that answers 103 Early Hints and 100 Continue before its answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let origin = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // The head and the 7-byte body.
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") || !seen.ends_with(b"payload") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream
            .write_all(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
                  HTTP/1.1 100 Continue\r\n\r\n\
                  HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
            )
            .await;
        let _ = stream.read(&mut buf).await;
    });
    let gw = start("");
    let held = post_in_background(
        &gw,
        &format!("http://127.0.0.1:{port}/early"),
        "payload",
        &[],
    );
    let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let approved = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), Some("{}"));
    assert_eq!(approved.status, 200, "{approved:?}");
    let released = held.await.expect("curl");
    assert_eq!(
        (released.status, released.body.as_str()),
        (200, "final"),
        "{released:?}"
    );
    // The request reached the origin, so it is on record.
    let records = audit_records(&gw, "a", 1);
    assert_eq!(
        (records[0]["status"].as_u64(), records[0]["path"].as_str()),
        (Some(200), Some("/early")),
        "{records:?}"
    );
    origin.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_is_decided_again_when_it_is_released() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let read_only = (
        "read-only.cedar",
        "@id(\"read-only-no-writes\")\nforbid (principal, action == Action::\"write\", resource) \
         when { principal.run_mode == \"ReadOnly\" };\n",
    );
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n{REVIEW_AGENT}",
        loopback_upstream(None)
    );
    let gw = Gateway::start_with_policies(&config, &[APPROVAL_POLICIES, read_only]);
    let url = format!("http://127.0.0.1:{}/things", origin.port());
    // Holds one write and approves it once `change` has been made: returns its answer and
    // the approval as stored.
    let approve_after = |change: &dyn Fn()| {
        let held = post_in_background(&gw, &url, "{}", &[]);
        let approval = wait_for_approvals(&gw, "state=pending", 1).remove(0);
        let id = approval["id"].as_str().expect("id").to_string();
        change();
        let approved = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
        assert_eq!(approved.status, 200, "{approved:?}");
        (held, id)
    };

    // The agent's run mode changed to ReadOnly while its write waited.
    let (held, id) = approve_after(&|| {
        let put = gw.admin_call(
            "PUT",
            "/v1/agents/a",
            Some(r#"{"run_mode":"ReadOnly","peers":["127.0.0.1"]}"#),
        );
        assert_eq!(put.status, 200, "{put:?}");
    });
    let answer = held.await.expect("curl");
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(
        answer.json()["policies"][0],
        "read-only-no-writes",
        "{answer:?}"
    );
    let record = wait_state(&gw, &id, "approved");
    assert!(
        record["not_sent"]
            .as_str()
            .is_some_and(|why| why.contains("no longer allowed")),
        "{record}"
    );
    assert_eq!(origin.requests(), 0, "a write no longer allowed was sent");

    // The policy set was reloaded with a forbid no approval lifts.
    let put = gw.admin_call(
        "PUT",
        "/v1/agents/a",
        Some(r#"{"run_mode":"Review","peers":["127.0.0.1"]}"#),
    );
    assert_eq!(put.status, 200, "{put:?}");
    let policy_file = gw.policy_dir().join("closed.cedar");
    let (held, id) = approve_after(&|| {
        std::fs::write(
            &policy_file,
            "@id(\"writes-closed\")\nforbid (principal, action == Action::\"write\", resource);\n",
        )
        .expect("policy");
        let reloaded = gw.admin_call("POST", "/v1/policies/reload", None);
        assert_eq!(reloaded.status, 200, "{reloaded:?}");
    });
    let answer = held.await.expect("curl");
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.json()["policies"][0], "writes-closed", "{answer:?}");
    let record = wait_state(&gw, &id, "approved");
    assert!(
        record["not_sent"]
            .as_str()
            .is_some_and(|why| why.contains("writes-closed")),
        "{record}"
    );
    assert_eq!(
        origin.requests(),
        0,
        "a write the policies now forbid was sent"
    );
    std::fs::remove_file(&policy_file).expect("policy");
    assert_eq!(
        gw.admin_call("POST", "/v1/policies/reload", None).status,
        200
    );

    // The agent was removed while its write waited: refused, nothing sent.
    let held = post_in_background(&gw, &url, "{}", &[]);
    wait_for_approvals(&gw, "state=pending", 1);
    assert_eq!(gw.admin_call("DELETE", "/v1/agents/a", None).status, 204);
    let answer = held.await.expect("curl");
    assert_eq!(answer.status, 403, "{answer:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(origin.requests(), 0, "a removed agent's write was sent");
}

/// The live feed: a listener connected before a request sees it `pending` (with what an
/// approver is shown) and then how it was settled; one that reconnects with the id of the
/// last event it saw gets exactly what it missed; a new one first gets what is pending now;
/// an id it cannot resume is said so. Approvers' tokens open it, nothing else does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_streams_approvals_from_pending_to_settled_and_resumes_after_a_reconnect() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("bob.token");
    std::fs::write(&token_file, "bob-feed-token\n").expect("token");
    let gw = start_in(
        dir,
        &format!(
            "[approvals]\nfeed_listeners = 5\n\
             [[admin.approvers]]\nname = \"bob\"\ntoken = {{ file = {token_file:?} }}\n"
        ),
    );
    let url = format!("http://127.0.0.1:{}/orders", origin.port());
    let admin = gw.admin_token();

    // Refused before anything streams: no token, a wrong one, a write, an unknown filter.
    let none = gw.admin_as(None, "GET", "/v1/approvals/events", None);
    assert_eq!(
        (none.status, none.json()["error"].as_str()),
        (401, Some("unauthorized")),
        "{none:?}"
    );
    assert_eq!(
        gw.admin_as(Some("nope"), "GET", "/v1/approvals/events", None)
            .status,
        401
    );
    assert_eq!(
        gw.admin_call("POST", "/v1/approvals/events", None).status,
        405
    );
    let unknown = gw.admin_call("GET", "/v1/approvals/events?state=pending", None);
    assert_eq!(unknown.status, 400, "{unknown:?}");

    let mut platform = FeedListener::open(&gw, &admin, "", None).await;
    assert_eq!(platform.status, 200);
    let synced = platform.expect("synced", None).await;
    assert_eq!(synced.data["pending"], 0, "{synced:?}");
    let mut bob = FeedListener::open(&gw, "bob-feed-token", "agent=a", None).await;
    assert_eq!(bob.status, 200);
    bob.expect("synced", None).await;
    let mut elsewhere = FeedListener::open(&gw, &admin, "agent=someone-else", None).await;
    elsewhere.expect("synced", None).await;
    let metrics = gw.admin_call("GET", "/metrics", None);
    assert!(
        metrics.body.contains("tollgate_approval_feed_listeners 3"),
        "{}",
        metrics.body
    );

    // Pending, with the details an approver decides on; then approved.
    let first = post_in_background(&gw, &url, r#"{"item":"book"}"#, &[]);
    let pending = platform.expect("pending", None).await;
    let id = pending.data["id"].as_str().expect("id").to_string();
    assert_eq!(pending.data["agent"], "a");
    assert_eq!(pending.data["method"], "POST");
    assert_eq!(pending.data["url"], url.as_str());
    assert_eq!(pending.data["run_mode"], "Review");
    assert_eq!(
        pending.data["body_preview"]["text"],
        "{\n  \"item\": \"book\"\n}"
    );
    assert!(
        pending.data.get("sealed_obo_token").is_none(),
        "{pending:?}"
    );
    assert_eq!(bob.expect("pending", Some(&id)).await.id, pending.id);
    let approved = gw.admin_as(
        Some("bob-feed-token"),
        "POST",
        &format!("/v1/approvals/{id}/approve"),
        None,
    );
    assert_eq!(approved.status, 200, "{approved:?}");
    let settled = platform.expect("approved", Some(&id)).await;
    assert_eq!(settled.data["state"], "approved");
    assert_eq!(settled.data["approver"], "bob");
    assert!(
        settled.data.get("body_preview").is_none(),
        "settled: no preview {settled:?}"
    );
    bob.expect("approved", Some(&id)).await;
    assert_eq!(first.await.expect("curl").status, 200);
    let seen = settled.id.clone().expect("an id");

    // The platform is away while a second request is held and denied.
    drop(platform);
    let second = post_in_background(&gw, &url, "{}", &[]);
    let second_id = bob.expect("pending", None).await.data["id"]
        .as_str()
        .expect("id")
        .to_string();
    let denied = gw.admin_call(
        "POST",
        &format!("/v1/approvals/{second_id}/deny"),
        Some(r#"{"reason":"no more books"}"#),
    );
    assert_eq!(denied.status, 200, "{denied:?}");
    assert_eq!(second.await.expect("curl").status, 403);
    let mut back = FeedListener::open(&gw, &admin, "", Some(&seen)).await;
    let replayed = back.expect("pending", Some(&second_id)).await;
    assert!(
        replayed.data.get("body_preview").is_none(),
        "a settled request's preview is not replayed: {replayed:?}"
    );
    let missed = back.expect("denied", Some(&second_id)).await;
    assert_eq!(missed.data["reason"], "no more books");
    assert!(
        back.next(Duration::from_millis(500)).await.is_none(),
        "only what was missed"
    );

    // The client of a third one leaves: abandoned. A new listener first gets what is
    // pending; one with an id it cannot resume is told so, then gets the same.
    let third = post_in_background(&gw, &url, "{}", &["--max-time", "2"]);
    let third_id = back.expect("pending", None).await.data["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut late = FeedListener::open(&gw, &admin, "", None).await;
    let snapshot = late.expect("pending", Some(&third_id)).await;
    assert_eq!(snapshot.id, None, "what is pending comes without ids");
    let synced = late.expect("synced", None).await;
    assert_eq!(synced.data["pending"], 1);
    let mut stale = FeedListener::open(&gw, &admin, "", Some("0badc0de-7")).await;
    let resync = stale.expect("resync", None).await;
    assert!(
        resync.data["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restarted")),
        "{resync:?}"
    );
    stale.expect("pending", Some(&third_id)).await;
    assert_eq!(stale.expect("synced", None).await.id, synced.id);
    // Five listen now (bob, elsewhere, back, late, stale): the limit.
    let sixth = gw.admin_call("GET", "/v1/approvals/events", None);
    assert_eq!(
        (sixth.status, sixth.json()["error"].as_str()),
        (503, Some("too_many_listeners")),
        "{sixth:?}"
    );
    assert_eq!(third.await.expect("curl").status, 0, "curl gave up");
    for listener in [&mut back, &mut late, &mut stale] {
        listener.expect("abandoned", Some(&third_id)).await;
    }

    // Another agent's filter saw none of it.
    assert!(elsewhere.next(Duration::from_millis(200)).await.is_none());
}

/// One `POST` a webhook receiver got: its headers (lower-case names) and body.
#[derive(Debug, Clone)]
struct Delivery {
    headers: std::collections::HashMap<String, String>,
    body: String,
    status: u16,
}

/// A webhook receiver on loopback: answers each `POST` with the next status of `script`
/// (200 once it is used up; 0: no answer, the connection held for 8 s) and records it.
fn webhook_receiver(
    script: Vec<u16>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Delivery>>>,
) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        let mut script = script.into_iter();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let head_end = loop {
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let headers: std::collections::HashMap<String, String> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + length {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
            let status = script.next().unwrap_or(200);
            seen.lock().expect("lock").push(Delivery {
                headers,
                body,
                status,
            });
            if status == 0 {
                // No answer: the connection is held, then closed.
                std::thread::sleep(Duration::from_secs(8));
                continue;
            }
            let _ = stream.write_all(
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (addr, got)
}

/// Webhooks: every approval event is POSTed to the configured URL, in order, signed with
/// HMAC-SHA256 over the timestamp and the body, and retried after a failure; the secret is
/// never sent or logged. A webhook in the clear off the host is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_each_approval_event_signed_and_retried() {
    if no_curl() {
        return;
    }
    let refused_dir = tempfile::tempdir().expect("tempdir");
    let refused = start_fails(
        refused_dir.path(),
        "[[approvals.webhooks]]\nurl = \"http://192.0.2.1/hook\"\nsecret = { env = \"NOPE\" }\n",
    );
    assert!(refused.contains("use https"), "{refused}");
    assert!(
        !refused.contains("/hook"),
        "the URL's path is not shown: {refused}"
    );
    let short_secret = refused_dir.path().join("short.secret");
    std::fs::write(&short_secret, "short\n").expect("secret");
    let short = start_fails(
        refused_dir.path(),
        &format!(
            "[[approvals.webhooks]]\nurl = \"https://platform.test/hook\"\n\
             secret = {{ file = {short_secret:?} }}\n"
        ),
    );
    assert!(short.contains("at least 32 bytes"), "{short}");

    let origin = Origin::http();
    let (receiver, deliveries) = webhook_receiver(vec![500]);
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, "whsec-6a1f-not-for-the-wire-0123456789\n").expect("secret");
    let gw = start_in(
        dir,
        &format!(
            "[[approvals.webhooks]]\nurl = \"http://{receiver}/tollgate?k=v\"\n\
             secret = {{ file = {secret_file:?} }}\n"
        ),
    );
    let url = format!("http://127.0.0.1:{}/orders", origin.port());
    let held = post_in_background(&gw, &url, r#"{"n":1}"#, &[]);
    let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let approved = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(held.await.expect("curl").status, 200);

    // The pending event is refused once (500), tried again a second later, then the
    // approved event follows: three POSTs, in order.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let got = loop {
        let got = deliveries.lock().expect("lock").clone();
        if got.len() >= 3 || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let events: Vec<(&str, u16)> = got
        .iter()
        .map(|d| (d.headers["tollgate-event"].as_str(), d.status))
        .collect();
    assert_eq!(
        events,
        vec![("pending", 500), ("pending", 200), ("approved", 200)],
        "{got:?}"
    );
    // A retry sends the same event, as the feed holds it then: the approval was settled
    // meanwhile (within the first second's back-off), so without the held body's preview.
    let first: serde_json::Value = serde_json::from_str(&got[0].body).expect("JSON");
    let mut retried: serde_json::Value = serde_json::from_str(&got[1].body).expect("JSON");
    assert_eq!(first["body_preview"]["text"], "{\n  \"n\": 1\n}", "{first}");
    let mut first_without = first.clone();
    first_without
        .as_object_mut()
        .map(|f| f.remove("body_preview"));
    retried.as_object_mut().map(|f| f.remove("body_preview"));
    assert_eq!(first_without, retried, "a retry sends the same event");
    assert_eq!(
        got[0].headers["tollgate-event-id"],
        got[1].headers["tollgate-event-id"]
    );
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        b"whsec-6a1f-not-for-the-wire-0123456789",
    );
    for delivery in &got {
        let body: serde_json::Value = serde_json::from_str(&delivery.body).expect("JSON");
        assert_eq!(body["id"], id.as_str());
        let timestamp = &delivery.headers["tollgate-timestamp"];
        let signed = format!(
            "{timestamp}.{}.{}.{}",
            delivery.headers["tollgate-event"],
            delivery.headers["tollgate-event-id"],
            delivery.body
        );
        let expected = hex::encode(ring::hmac::sign(&key, signed.as_bytes()).as_ref());
        assert_eq!(
            delivery.headers["tollgate-signature"],
            format!("sha256={expected}"),
            "{delivery:?}"
        );
        assert!(!delivery.headers.values().any(|v| v.contains("whsec-6a1f")));
        assert!(!delivery.body.contains("whsec-6a1f"));
    }
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&got[2].body).expect("JSON")["state"],
        "approved"
    );
    let metrics = gw.admin_call("GET", "/metrics", None);
    assert!(
        metrics
            .body
            .contains("tollgate_webhook_events_failed_total 0"),
        "{}",
        metrics.body
    );
    assert!(gw.log_contains("a webhook did not take an approval event"));
    assert!(!gw.log().contains("whsec-6a1f"));
    assert!(!gw.log().contains("k=v"), "the URL's query is not logged");
}

/// A webhook that stalls while the feed moves on loses only what left the feed's memory,
/// counts it, and goes on from the oldest event still kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_webhook_goes_on_from_the_oldest_event_still_kept() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    // The first POST gets no answer (the webhook gives up after 6 s, one try).
    let (receiver, deliveries) = webhook_receiver(vec![0]);
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, "0123456789abcdef0123456789abcdef\n").expect("secret");
    let gw = start_in(
        dir,
        &format!(
            "[approvals]\nfeed_events = 2\n\
             [[approvals.webhooks]]\nurl = \"http://{receiver}/hook\"\n\
             secret = {{ file = {secret_file:?} }}\nmax_attempts = 1\ntimeout_ms = 6000\n"
        ),
    );
    let url = format!("http://127.0.0.1:{}/orders", origin.port());
    // Events 1 (pending) and 2 (approved) of the first request, 3 and 4 of the second,
    // all while the webhook waits for its answer to event 1: the feed keeps only 3 and 4.
    let mut ids = Vec::new();
    for (n, decision) in ["approve", "deny"].iter().enumerate() {
        let held = post_in_background(&gw, &url, "{}", &[]);
        let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
            .as_str()
            .expect("id")
            .to_string();
        let body = (*decision == "deny").then_some(r#"{"reason":"no"}"#);
        let decided = gw.admin_call("POST", &format!("/v1/approvals/{id}/{decision}"), body);
        assert_eq!(decided.status, 200, "{n}: {decided:?}");
        held.await.expect("curl");
        ids.push(id);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let got = loop {
        let got = deliveries.lock().expect("lock").clone();
        if got.len() >= 3 || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let seen: Vec<(String, String)> = got
        .iter()
        .map(|d| {
            let body: serde_json::Value = serde_json::from_str(&d.body).expect("JSON");
            (
                d.headers["tollgate-event"].clone(),
                body["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("pending".to_string(), ids[0].clone()),
            ("pending".to_string(), ids[1].clone()),
            ("denied".to_string(), ids[1].clone()),
        ],
        "{got:?}"
    );
    // Event 1 given up, event 2 lost.
    let metrics = gw.admin_call("GET", "/metrics", None);
    assert!(
        metrics
            .body
            .contains("tollgate_webhook_events_failed_total 2"),
        "{}",
        metrics.body
    );
    assert!(gw.log_contains("approval events left the feed before the webhook took them"));
}

/// Reads HTTP/1 answers (with `Content-Length`) one at a time from a raw connection.
struct Answers {
    conn: std::net::TcpStream,
    buf: Vec<u8>,
}

impl Answers {
    /// The next answer's status and body; `None` when the connection closes first.
    fn next(&mut self) -> Option<(u16, String)> {
        use std::io::Read;
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]);
                    let body = body.to_string();
                    self.buf.drain(..end + 4 + len);
                    let status = head.split(' ').nth(1)?.parse().ok()?;
                    return Some((status, body));
                }
            }
            let mut chunk = [0u8; 4096];
            match self.conn.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_keeps_its_connection_and_its_place_before_the_requests_sent_after_it() {
    use std::io::Write;
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = start("");
    let host = format!("127.0.0.1:{}", origin.port());
    let proxy = gw.proxy_url();
    let conn = std::net::TcpStream::connect(proxy.trim_start_matches("http://")).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answers = Answers {
        conn: conn.try_clone().expect("clone"),
        buf: Vec::new(),
    };
    let mut conn = conn;

    // A chunked write is held, its body read whole ("hello world").
    conn.write_all(
        format!(
            "POST http://{host}/held HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    let approval = wait_for_approvals(&gw, "state=pending", 1).remove(0);
    assert_eq!(approval["body_bytes"], 11, "{approval}");
    assert_eq!(approval["body_sha256"], sha256_hex(b"hello world"));
    // A read sent on the same connection while it waits waits its turn: nothing reaches the
    // origin before the held request is answered.
    conn.write_all(format!("GET http://{host}/after HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(origin.requests(), 0);
    let id = approval["id"].as_str().expect("id");
    let approved = gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    assert_eq!(approved.status, 200, "{approved:?}");

    // Answered in order, on the same connection; the held body went whole, re-framed by
    // length.
    let (status, body) = answers.next().expect("the held request's answer");
    assert_eq!(status, 200, "{body}");
    let seen: Seen = serde_json::from_str(&body).expect("echo");
    assert_eq!((seen.target.as_str(), seen.body_len), ("/held", 11));
    assert_eq!(
        seen.headers.get("content-length").map(String::as_str),
        Some("11")
    );
    assert!(!seen.headers.contains_key("transfer-encoding"), "{seen:?}");
    let (status, body) = answers.next().expect("the following read's answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"/after\""), "{body}");

    // The connection is still open. A held request that asks to close it is answered, then
    // the connection closes.
    conn.write_all(
        format!(
            "POST http://{host}/last HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\
             Connection: close\r\n\r\nabc"
        )
        .as_bytes(),
    )
    .expect("write");
    let approval = wait_for_approvals(&gw, "state=pending", 1).remove(0);
    let id = approval["id"].as_str().expect("id");
    gw.admin_call("POST", &format!("/v1/approvals/{id}/approve"), None);
    let (status, body) = answers.next().expect("the last request's answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"/last\""), "{body}");
    assert_eq!(
        answers.next(),
        None,
        "the connection stays open after Connection: close"
    );

    // One record per request, each made once.
    let records = audit_records(&gw, "a", 3);
    let mut paths: Vec<&str> = records.iter().filter_map(|r| r["path"].as_str()).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/after", "/held", "/last"], "{records:?}");
    assert_eq!(origin.requests(), 3);
}
