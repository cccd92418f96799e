//! The audit trail end to end: every request of an agent leaves a hash-chained record,
//! `tollgate audit tail` prints them, and `tollgate audit verify` finds a record edited on
//! disk while the gateway was down.

mod support;

use std::time::Duration;

use support::*;

fn start_in(dir: tempfile::TempDir) -> Gateway {
    let config = format!(
        "{EPHEMERAL_LISTENERS}{}\n{REVIEW_AGENT}\n",
        loopback_upstream(None)
    );
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir).expect("policy dir");
    std::fs::write(policy_dir.join(APPROVAL_POLICIES.0), APPROVAL_POLICIES.1).expect("policy");
    Gateway::start_in(dir, &format!("{config}[policy]\ndir = {policy_dir:?}\n"))
}

/// Runs `tollgate audit <args> --agent a` against `gw`.
fn audit_cli(gw: &Gateway, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("audit")
        .args(args)
        .args(["--agent", "a", "--admin"])
        .arg(format!("http://{}", gw.admin))
        .arg("--token-file")
        .arg(gw.data_dir().join("admin-token"))
        .output()
        .expect("run tollgate audit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Waits until the agent's trail has `n` records.
fn wait_for_records(gw: &Gateway, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let page = gw.admin_call("GET", "/v1/agents/a/audit", None).json();
        if page["records"].as_array().map_or(0, Vec::len) >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "only {page}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_record_edited_on_disk_is_found_by_verify() {
    if no_curl() {
        return;
    }
    let origin = Origin::http();
    let gw = start_in(tempfile::tempdir().expect("tempdir"));
    for n in 0..3 {
        let url = format!("http://127.0.0.1:{}/item/{n}?secret=q{n}", origin.port());
        let r = curl_async(args!["-x", gw.proxy_url(), &url]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    wait_for_records(&gw, 3);

    let (code, out, err) = audit_cli(&gw, &["verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("3 records") && out.contains("chain intact"),
        "{out}"
    );
    let (code, out, err) = audit_cli(&gw, &["tail"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(
        out.contains("GET 127.0.0.1") && out.contains("/item/2 200 allow"),
        "{out}"
    );
    assert!(
        !out.contains("secret="),
        "queries never reach the audit trail: {out}"
    );
    let first = gw
        .admin_call("GET", "/v1/agents/a/audit?limit=1", None)
        .json();
    assert_eq!(first["records"][0]["prev_hash"], tollgate_storage::GENESIS);

    // Edit record 1 on disk while the gateway is down: the request now looks refused.
    let dir = gw.stop();
    {
        let db = fjall::Database::builder(dir.path().join("data/store"))
            .open()
            .expect("open store");
        let trail = db
            .keyspace("agent.a", fjall::KeyspaceCreateOptions::default)
            .expect("agent keyspace");
        let key = [b"audit/".as_slice(), &1u64.to_be_bytes()].concat();
        let stored = trail.get(&key).expect("read").expect("record 1");
        let mut record: serde_json::Value = serde_json::from_slice(&stored).expect("json");
        record["status"] = 403.into();
        trail
            .insert(key, serde_json::to_vec(&record).expect("json"))
            .expect("write");
        db.persist(fjall::PersistMode::SyncAll).expect("persist");
    }
    let gw = start_in(dir);
    let (code, _, err) = audit_cli(&gw, &["verify"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("broken at record 1") && err.contains("edited"),
        "{err}"
    );
}
