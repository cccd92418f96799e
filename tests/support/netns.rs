//! Network namespaces for tests that need them (root, `ip`, `nft`): skipping with a reason
//! when they cannot run, and curl inside a namespace.

use std::process::Command;

/// Whether the tests run as root (needed for network namespaces).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Why this machine cannot run a network-namespace test (root, `ip`, and `nft` when
/// `firewall`), or `None` when it can.
pub fn missing_namespace_tools(firewall: bool) -> Option<String> {
    if !is_root() {
        return Some("network namespaces need root".into());
    }
    let mut tools = vec![("ip", "iproute2")];
    if firewall {
        tools.push(("nft", "nftables"));
    }
    for (program, package) in tools {
        if Command::new(program).arg("-V").output().is_err() {
            return Some(format!(
                "{program} is missing (apt-get install -y {package})"
            ));
        }
    }
    None
}

/// Runs curl (silent, 5 s at most) with `args` inside network namespace `ns`.
pub async fn curl_in_netns(ns: &str, args: &[&str]) -> std::process::Output {
    let mut full: Vec<String> = ["netns", "exec", ns, "curl", "-sS", "--max-time", "5"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    full.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        Command::new("ip")
            .args(&full)
            .output()
            .expect("run ip netns exec")
    })
    .await
    .expect("join")
}
