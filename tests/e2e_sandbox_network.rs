//! The gateway as a sandbox's only way out, end to end: the launcher's network (two
//! namespaces, a veth pair, nftables) is created for real, the agent is registered over the
//! admin API with its listener in the gateway's side of it, and a workload in the sandbox's
//! namespace (curl) reaches an origin on loopback only through the gateway. Needs root,
//! iproute2 and nftables; skips with the reason otherwise (CI has them).

mod support;

use support::*;
use tollgate_launcher::network::SandboxNetwork;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_reaches_origins_only_through_its_own_gateway_listener() {
    if no_curl() {
        return;
    }
    if let Some(why) = missing_namespace_tools(true) {
        eprintln!("SKIP: {why}");
        return;
    }
    let agent = format!("e2e{}", std::process::id());
    let net = SandboxNetwork::new(&agent, 3128).expect("plan");
    let _ = net.destroy();
    net.create().expect("sandbox network");
    struct Teardown(SandboxNetwork);
    impl Drop for Teardown {
        fn drop(&mut self) {
            let _ = self.0.destroy();
        }
    }
    let net = Teardown(net);

    let origin = Origin::http();
    let config = format!("{EPHEMERAL_LISTENERS}{}", loopback_upstream(None));
    let gw = Gateway::start_with_policies(&config, &[ALLOW_ALL]);
    let record = serde_json::json!({
        "run_mode": "Review",
        "listen": {
            "address": net.0.listen_address().to_string(),
            "netns": net.0.gateway_namespace_path(),
        }
    });
    let put = gw.admin_call(
        "PUT",
        &format!("/v1/agents/{agent}"),
        Some(&record.to_string()),
    );
    assert_eq!(put.status, 201, "{put:?}");

    let sandbox = net.0.sandbox_namespace().to_string();
    let url = format!("http://127.0.0.1:{}/from-sandbox", origin.port());
    let proxy = format!("http://{}", net.0.listen_address());
    // Through the gateway: identified as the agent, forwarded.
    let through = curl_in_netns(&sandbox, &["-x", &proxy, &url]).await;
    assert!(
        through.status.success(),
        "{}",
        String::from_utf8_lossy(&through.stderr)
    );
    assert!(String::from_utf8_lossy(&through.stdout).contains("/from-sandbox"));
    assert!(
        gw.log_contains(&format!("agent=\"{agent}\"")),
        "{}",
        gw.log()
    );
    assert_eq!(origin.requests(), 1);
    // Around it: the origin's loopback is the sandbox's own, and the gateway's side answers
    // only on the agent's port.
    let direct = curl_in_netns(&sandbox, &[&url]).await;
    assert!(
        !direct.status.success(),
        "the sandbox reached the origin directly"
    );
    let other_port = curl_in_netns(&sandbox, &["http://10.200.1.1:9901/v1/agents"]).await;
    assert!(!other_port.status.success());
    assert_eq!(
        origin.requests(),
        1,
        "nothing but the proxied request arrived"
    );

    // Removing the agent closes its listener: the sandbox has no way out at all.
    assert!(
        gw.admin_call("DELETE", &format!("/v1/agents/{agent}"), None)
            .status
            < 300
    );
    let mut closed = false;
    for _ in 0..50 {
        if !curl_in_netns(&sandbox, &["-x", &proxy, &url])
            .await
            .status
            .success()
        {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(closed);
    assert_eq!(origin.requests(), 1);
}
