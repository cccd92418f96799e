//! Requests held for approval: the policies and agent that hold them, a request sent in the
//! background, and waiting for its approval record.

use std::time::Duration;

use super::*;

/// Policies for approval tests: reads are allowed, writes need approval.
pub const APPROVAL_POLICIES: (&str, &str) = (
    "approvals.cedar",
    "@id(\"reads\")\npermit (principal, action == Action::\"read\", resource);\n\n\
     @id(\"approved-writes\")\npermit (principal, action == Action::\"write\", resource) when { context.approved };\n",
);

/// A Review-mode agent `a` for requests from 127.0.0.1.
pub const REVIEW_AGENT: &str =
    "[[agents]]\nid = \"a\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.1\"]\n";

/// POSTs `body` to `url` through `gw` in the background (with more curl `extra` arguments):
/// a request that needs approval is held until someone decides.
pub fn post_in_background(
    gw: &Gateway,
    url: &str,
    body: &str,
    extra: &[&str],
) -> tokio::task::JoinHandle<CurlResult> {
    let mut a = args![
        "-x",
        gw.proxy_url(),
        "-X",
        "POST",
        "--data-binary",
        body,
        url
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    tokio::spawn(curl_async(a))
}

/// Waits (up to 10 s) until exactly `n` approvals match `filter` (a query string, e.g.
/// `state=pending&agent=a`), and returns them.
pub fn wait_for_approvals(gw: &Gateway, filter: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = gw.admin_call("GET", &format!("/v1/approvals?{filter}"), None);
        assert_eq!(listed.status, 200, "{listed:?}");
        let approvals = listed.json()["approvals"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if approvals.len() == n {
            return approvals;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} approvals for {filter}, have {approvals:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Hex SHA-256, as approval records show a body's.
pub fn sha256_hex(data: &[u8]) -> String {
    tollgate_gateway::egress::approval::body_sha256(data)
}
