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

/// One event of the live feed of approvals.
#[derive(Debug, Clone)]
pub struct FeedEvent {
    /// Its `id:` line (none on `resync`).
    pub id: Option<String>,
    /// Its `event:` line: pending, approved, denied, expired, abandoned or resync.
    pub event: String,
    /// Its `data:` line, parsed.
    pub data: serde_json::Value,
}

/// A listener on the gateway's live feed (`GET /v1/approvals/events`), read with curl.
pub struct FeedListener {
    _curl: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// The answer's status.
    pub status: u16,
}

impl FeedListener {
    /// Connects with `token`, the query string `query` (e.g. `agent=a`, or empty) and a
    /// `Last-Event-ID`, and reads the answer's head.
    pub async fn open(
        gw: &Gateway,
        token: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> FeedListener {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "-N", "-i", "--max-time", "60", "-H"])
            .arg(format!("Authorization: Bearer {token}"));
        if let Some(id) = last_event_id {
            cmd.arg("-H").arg(format!("Last-Event-ID: {id}"));
        }
        cmd.arg(format!("http://{}/v1/approvals/events?{query}", gw.admin))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut curl = cmd.spawn().expect("curl");
        let stdout = curl.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let status_line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("the feed answers within 10 s")
            .expect("read")
            .expect("a status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        // The rest of the head.
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim_end().is_empty() {
                break;
            }
        }
        FeedListener {
            _curl: curl,
            lines,
            status,
        }
    }

    /// The next event within `within` (comments and `retry:` are skipped); `None` if none
    /// came.
    pub async fn next(&mut self, within: Duration) -> Option<FeedEvent> {
        let deadline = tokio::time::Instant::now() + within;
        let (mut id, mut event, mut data) = (None, None, None);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .ok()?
                .ok()??;
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                if let (Some(event), Some(data)) = (event.take(), data.take()) {
                    let data: String = data;
                    return Some(FeedEvent {
                        id: id.take(),
                        event,
                        data: serde_json::from_str(&data).expect("event data is JSON"),
                    });
                }
                continue;
            }
            if let Some(value) = line.strip_prefix("id: ") {
                id = Some(value.to_string());
            } else if let Some(value) = line.strip_prefix("event: ") {
                event = Some(value.to_string());
            } else if let Some(value) = line.strip_prefix("data: ") {
                data = Some(value.to_string());
            }
        }
    }

    /// The next event, which must be `event` for approval `approval` (any approval when
    /// `None`), within 10 s.
    pub async fn expect(&mut self, event: &str, approval: Option<&str>) -> FeedEvent {
        let got = self
            .next(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no {event} event within 10 s"));
        assert_eq!(got.event, event, "{got:?}");
        if let Some(approval) = approval {
            assert_eq!(got.data["id"], approval, "{got:?}");
        }
        got
    }
}
