//! The approvers' page end to end, in a real browser: headless Chromium (driven through
//! chromedriver) opens `/ui/approvals` on the admin listener of the `tollgate` binary while
//! Review-mode writes are held at the gateway.
//!
//! It proves that a person using only the page can decide: a held request appears without a
//! reload, shows its URL as text (markup in it is never interpreted), is released exactly once
//! when its Approve button is clicked, and is refused with the typed reason when Deny is
//! clicked. It also proves the token handling: the `#token=` fragment is removed from the
//! address bar, and a refused token brings back the token form, from which the page recovers.
//! What an approver decides on is shown (an ARM request's operation in a line, a JSON body
//! pretty-printed); approvals are grouped by agent and thread, newest first; the page follows
//! the gateway's event stream (`/v1/approvals/events`), not polling, when the gateway has it;
//! and the keyboard alone is enough (`j`, `k`, `a`, `d`, Enter).
//!
//! Skipped (and passing) when Chromium or chromedriver is not installed.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::webdriver::{Browser, Element, ENTER};
use support::*;

/// How long the page may take to show a change (live, or polling every second without the
/// event stream).
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// Starts the gateway with the approval policies and a Review-mode agent on loopback.
fn start_gateway() -> Gateway {
    start_gateway_with("", REVIEW_AGENT)
}

/// Like [`start_gateway`], with more `[upstream]` lines and other agents.
fn start_gateway_with(upstream: &str, agents: &str) -> Gateway {
    Gateway::start_with_policies(
        &format!(
            "{EPHEMERAL_LISTENERS}{}{upstream}\n{agents}",
            loopback_upstream(None)
        ),
        &[APPROVAL_POLICIES],
    )
}

/// A second Review-mode agent `b`, for requests from 127.0.0.2.
const SECOND_AGENT: &str =
    "[[agents]]\nid = \"b\"\nrun_mode = \"Review\"\npeers = [\"127.0.0.2\"]\n";

/// Starts the gateway in `dir` (fresh, or a stopped gateway's data) with its admin API on
/// `admin_port`: a page open on it reaches the gateway started again there.
fn start_on_admin_port(dir: tempfile::TempDir, admin_port: u16) -> Gateway {
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir).expect("policy dir");
    std::fs::write(policy_dir.join(APPROVAL_POLICIES.0), APPROVAL_POLICIES.1).expect("policy");
    let config = format!(
        "[egress]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{}\n\
         {REVIEW_AGENT}\n[policy]\ndir = {policy_dir:?}\n",
        loopback_upstream(None)
    );
    Gateway::start_in(dir, &config)
}

/// Opens the page with the admin token in its fragment and waits until it shows the list.
fn open_page(browser: &Browser, gw: &Gateway) {
    browser.goto(&format!(
        "http://{}/ui/approvals#token={}",
        gw.admin,
        gw.admin_token()
    ));
    browser.wait_for("#approvals-section:not([hidden])", PAGE_WAIT);
}

/// The approval as the admin API shows it.
fn approval(gw: &Gateway, id: &str) -> Value {
    let got = gw.admin_call("GET", &format!("/v1/approvals/{id}"), None);
    assert_eq!(got.status, 200, "{got:?}");
    got.json()
}

/// Waits until `n` approvals are pending and returns the id of the one not in `known`.
fn new_pending(gw: &Gateway, n: usize, known: &[&str]) -> String {
    wait_for_approvals(gw, "state=pending", n)
        .iter()
        .filter_map(|a| a["id"].as_str())
        .find(|id| !known.contains(id))
        .expect("a new pending approval")
        .to_string()
}

/// The page's groups top to bottom: each agent, its threads ("" for none), and their
/// approvals' ids, as `[{agent, threads: [{thread, ids}]}]`.
fn groups_on_page(browser: &Browser) -> Value {
    browser.execute(
        "return Array.from(document.querySelectorAll('[data-agent-group]'), (agent) => ({
           agent: agent.dataset.agentGroup,
           threads: Array.from(agent.querySelectorAll('[data-session-group]'), (thread) => ({
             thread: thread.dataset.sessionGroup,
             ids: Array.from(thread.querySelectorAll('[data-approval-id]'),
               (card) => card.dataset.approvalId),
           })),
         }));",
    )
}

/// How the page keeps its list up to date: `live` (the event stream) or `polling`.
fn feed_mode(browser: &Browser) -> String {
    browser
        .execute("return document.documentElement.dataset.feed || '';")
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// How many times the page has fetched the list of approvals (what polling does), from the
/// browser's own record of the requests the page made.
fn list_fetches(browser: &Browser) -> u64 {
    browser
        .execute(
            "return performance.getEntriesByType('resource')
               .filter((e) => e.name.includes('/v1/approvals?')).length;",
        )
        .as_u64()
        .expect("a count")
}

/// The `data-approval-id` of the card that has the focus, or of the card the focused
/// element is in.
fn focused_card(browser: &Browser) -> Option<String> {
    browser
        .execute(
            "const card = document.activeElement && document.activeElement.closest('[data-approval-id]');
             return card ? card.dataset.approvalId : null;",
        )
        .as_str()
        .map(str::to_string)
}

/// The approval's state on the admin API.
fn state_of(gw: &Gateway, id: &str) -> String {
    let got = gw.admin_call("GET", &format!("/v1/approvals/{id}"), None);
    assert_eq!(got.status, 200, "{got:?}");
    got.json()["state"].as_str().unwrap_or_default().to_string()
}

/// Headless Chromium, when it and curl are installed (the test is skipped otherwise: both
/// say why).
fn curl_and_browser() -> Option<Browser> {
    if no_curl() {
        return None;
    }
    Browser::start_if_installed()
}

/// The CSS selector of the page's row for approval `id`.
fn row(id: &str) -> String {
    format!("[data-approval-id=\"{id}\"]")
}

/// Waits until the page shows the row for `id`, and returns it.
fn wait_for_row(browser: &Browser, id: &str) -> Element {
    browser.wait_for(&row(id), PAGE_WAIT)
}

/// Waits until the status line contains `needle`.
fn wait_for_status(browser: &Browser, needle: &str) {
    browser.wait_until(
        &format!("the status line says {needle:?}"),
        PAGE_WAIT,
        || {
            browser
                .find("#status")
                .is_some_and(|s| browser.text(&s).contains(needle))
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_approves_and_denies_held_requests_on_the_page() {
    let Some(browser) = curl_and_browser() else {
        return;
    };
    let origin = Origin::http();
    let gw = start_gateway();
    // A URL comes from a sandbox: the page must show it as text. Had it been parsed as HTML,
    // the entity would show as a bare "&" (the request line allows no "<" to probe with).
    let url = format!("http://127.0.0.1:{}/things?x=1&amp;y=2", origin.port());

    // A write is held; the page, opened with the token in its fragment, shows it.
    let held = post_in_background(&gw, &url, "hello, approver", &[]);
    let id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    browser.goto(&format!(
        "http://{}/ui/approvals#token={}",
        gw.admin,
        gw.admin_token()
    ));
    let shown = wait_for_row(&browser, &id);
    let text = browser.text(&shown);
    assert!(
        text.contains(&url),
        "the row must show the URL {url}: {text:?}"
    );
    assert!(
        text.contains("15 bytes") && text.contains(&sha256_hex(b"hello, approver")),
        "the row must show the body's size and SHA-256: {text:?}"
    );
    let run_mode = browser.wait_for(&format!("{} [data-field=run_mode]", row(&id)), PAGE_WAIT);
    assert_eq!(
        browser.text(&run_mode),
        "Review",
        "the row must show the agent's run mode"
    );
    let preview = browser.wait_for(
        &format!("{} [data-field=body_preview]", row(&id)),
        PAGE_WAIT,
    );
    assert_eq!(
        browser.text(&preview),
        "hello, approver",
        "the row must show what the held request would send"
    );
    assert!(
        !browser.current_url().contains("token"),
        "the token must be removed from the address bar: {}",
        browser.current_url()
    );
    assert_eq!(origin.requests(), 0, "a held request must not be sent");

    // Approve: the held request is sent, once.
    let approve = browser.wait_for(&format!("{} [data-action=approve]", row(&id)), PAGE_WAIT);
    browser.click(&approve);
    let released = held.await.expect("curl");
    assert_eq!(
        released.status, 200,
        "clicking Approve must release the request: {released:?}"
    );
    assert_eq!(released.seen().body_len, 15, "{released:?}");
    assert_eq!(
        origin.requests(),
        1,
        "the origin must get the request exactly once"
    );
    assert_eq!(state_of(&gw, &id), "approved");
    browser.wait_for_absence(&row(&id), PAGE_WAIT);
    wait_for_status(&browser, "Approved");
    browser.wait_for("#empty", PAGE_WAIT);

    // A second write appears without a reload; Deny with a reason refuses it.
    let second = post_in_background(&gw, &url, "and again", &[]);
    let second_id = wait_for_approvals(&gw, "state=pending", 1)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_ne!(second_id, id);
    wait_for_row(&browser, &second_id);
    assert!(
        browser.find("#empty").is_none(),
        "the empty state must go when something is pending"
    );
    let deny = browser.wait_for(
        &format!("{} [data-action=deny]", row(&second_id)),
        PAGE_WAIT,
    );
    browser.click(&deny);
    wait_for_status(&browser, "A denial needs a reason");
    assert_eq!(
        state_of(&gw, &second_id),
        "pending",
        "Deny without a reason must not decide"
    );
    let reason = browser.wait_for(
        &format!("{} [data-field=reason]", row(&second_id)),
        PAGE_WAIT,
    );
    browser.send_keys(&reason, "not during the freeze");
    browser.click(&deny);
    let refused = second.await.expect("curl");
    assert_eq!(
        refused.status, 403,
        "clicking Deny must refuse the request: {refused:?}"
    );
    assert_eq!(refused.json()["error"], "approval_denied", "{refused:?}");
    assert!(
        refused.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not during the freeze")),
        "the agent must be told the approver's reason: {refused:?}"
    );
    assert_eq!(state_of(&gw, &second_id), "denied");
    assert_eq!(origin.requests(), 1, "a denied request must not be sent");
    browser.wait_for_absence(&row(&second_id), PAGE_WAIT);
    wait_for_status(&browser, "Denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_brings_back_the_token_form() {
    let Some(browser) = curl_and_browser() else {
        return;
    };
    let gw = start_gateway();

    browser.goto(&format!(
        "http://{}/ui/approvals#token=not-the-token",
        gw.admin
    ));
    wait_for_status(&browser, "401");
    let input = browser.wait_for("#token-form [data-field=token]", PAGE_WAIT);
    assert!(
        browser.is_displayed(&input),
        "a refused token must bring back the token input"
    );

    // The right token, typed into the form, shows the (empty) list.
    browser.send_keys(&input, &gw.admin_token());
    let use_token = browser.wait_for("#token-form button", PAGE_WAIT);
    browser.click(&use_token);
    let empty = browser.wait_for("#empty", PAGE_WAIT);
    assert!(browser.is_displayed(&empty), "the empty state must show");
    assert!(
        !browser.is_displayed(&input),
        "the token form must go once a token works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm_delete_reads_as_its_operation_and_a_json_body_is_pretty_printed() {
    let Some(browser) = curl_and_browser() else {
        return;
    };
    let origin = Origin::http();
    // Azure Resource Manager on loopback: the gateway classifies by the host name.
    let gw = start_gateway_with(
        "resolve = { \"management.azure.com\" = \"127.0.0.1\" }\n",
        REVIEW_AGENT,
    );
    open_page(&browser, &gw);
    let vm = format!(
        "http://management.azure.com:{}/subscriptions/1111/resourceGroups/rg-a/providers/\
         Microsoft.Compute/virtualMachines/vm1?api-version=2024-03-01",
        origin.port()
    );
    let delete = tokio::spawn(curl_async(args!["-x", gw.proxy_url(), "-X", "DELETE", &vm]));
    let delete_id = new_pending(&gw, 1, &[]);
    let json_url = format!("http://127.0.0.1:{}/vms", origin.port());
    let _json = post_in_background(&gw, &json_url, r#"{"name":"vm2","size":3}"#, &[]);
    let json_id = new_pending(&gw, 2, &[&delete_id]);

    // The DELETE reads as what it would do; it has no body to preview.
    let arm = browser.wait_for(&format!("{} [data-field=arm]", row(&delete_id)), PAGE_WAIT);
    let summary =
        "delete microsoft.compute/virtualmachines vm1 in resource group rg-a of subscription 1111";
    let shown = browser.text(&arm);
    assert!(
        shown.starts_with(summary),
        "the row must show the operation {summary:?}: {shown:?}"
    );
    let method = browser.wait_for(
        &format!("{} [data-field=method]", row(&delete_id)),
        PAGE_WAIT,
    );
    assert_eq!(browser.text(&method), "DELETE");
    // The JSON body is shown as the gateway pretty-printed it; it is no ARM request.
    let preview = browser.wait_for(
        &format!("{} [data-field=body_preview]", row(&json_id)),
        PAGE_WAIT,
    );
    assert_eq!(
        browser.text(&preview),
        "{\n  \"name\": \"vm2\",\n  \"size\": 3\n}",
        "the row must show the held JSON body pretty-printed"
    );
    let not_arm = browser.wait_for(&format!("{} [data-field=arm]", row(&json_id)), PAGE_WAIT);
    assert_eq!(browser.text(&not_arm), "none");

    // Approving the DELETE on the page sends that request, once, and nothing else.
    let approve = browser.wait_for(
        &format!("{} [data-action=approve]", row(&delete_id)),
        PAGE_WAIT,
    );
    browser.click(&approve);
    let released = delete.await.expect("curl");
    assert_eq!(released.status, 200, "{released:?}");
    assert_eq!(origin.requests(), 1, "the origin must get the DELETE once");
    let seen = origin.last_seen();
    assert_eq!(seen.method, "DELETE", "{seen:?}");
    assert!(
        seen.target.contains("/virtualMachines/vm1"),
        "the origin must get the approved request: {seen:?}"
    );
    assert_eq!(state_of(&gw, &delete_id), "approved");
    assert_eq!(
        state_of(&gw, &json_id),
        "pending",
        "the other must stay held"
    );
    browser.wait_for_absence(&row(&delete_id), PAGE_WAIT);
    browser.wait_for(&row(&json_id), PAGE_WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_grouped_by_agent_and_thread_newest_first() {
    let Some(browser) = curl_and_browser() else {
        return;
    };
    let origin = Origin::http();
    let gw = start_gateway_with("", &format!("{REVIEW_AGENT}\n{SECOND_AGENT}"));
    let url = format!("http://127.0.0.1:{}/work", origin.port());
    // Agent a's conversation thread-1 has its own listener: its requests name the thread.
    let thread = gw.admin_call(
        "PUT",
        "/v1/agents/a/sessions/thread-1",
        Some(r#"{"listen":{"address":"127.0.0.1:0"}}"#),
    );
    assert_eq!(thread.status, 201, "{thread:?}");
    let thread_proxy = format!(
        "http://{}",
        thread.json()["address"].as_str().expect("address")
    );
    open_page(&browser, &gw);

    // Held one after the other (a few milliseconds apart, so each is newer than the last).
    let mut ids: Vec<String> = Vec::new();
    let mut held = Vec::new();
    let mut hold = |proxy: &str, from: &str, ids: &mut Vec<String>| {
        held.push(tokio::spawn(curl_async(args![
            "-x",
            proxy,
            "--interface",
            from,
            "-X",
            "POST",
            "--data-binary",
            "x",
            &url
        ])));
        let known: Vec<&str> = ids.iter().map(String::as_str).collect();
        let id = new_pending(&gw, ids.len() + 1, &known);
        std::thread::sleep(std::time::Duration::from_millis(20));
        ids.push(id);
    };
    let proxy = gw.proxy_url();
    hold(&proxy, "127.0.0.1", &mut ids); // a, no thread
    hold(&proxy, "127.0.0.2", &mut ids); // b
    hold(&thread_proxy, "127.0.0.1", &mut ids); // a, thread-1
    hold(&proxy, "127.0.0.1", &mut ids); // a, no thread again
    let a_thread = approval(&gw, &ids[2]);
    assert_eq!(
        (a_thread["agent"].as_str(), a_thread["session"].as_str()),
        (Some("a"), Some("thread-1")),
        "{a_thread}"
    );
    let expected = json!([
        {"agent": "a", "threads": [
            {"thread": "", "ids": [ids[3], ids[0]]},
            {"thread": "thread-1", "ids": [ids[2]]},
        ]},
        {"agent": "b", "threads": [{"thread": "", "ids": [ids[1]]}]},
    ]);
    browser.wait_until(
        "the page shows the four approvals grouped",
        PAGE_WAIT,
        || groups_on_page(&browser) == expected,
    );
    let heading = browser.wait_for("[data-agent-group=\"b\"] h3", PAGE_WAIT);
    assert_eq!(browser.text(&heading), "Agent b");
    let heading = browser.wait_for("[data-session-group=\"thread-1\"] h4", PAGE_WAIT);
    assert_eq!(browser.text(&heading), "Thread thread-1");

    // What an approver types survives the list changing around it: a newer request of b's
    // moves b's group to the top.
    let reason = browser.wait_for(&format!("{} [data-field=reason]", row(&ids[0])), PAGE_WAIT);
    browser.send_keys(&reason, "half-typed");
    hold(&proxy, "127.0.0.2", &mut ids); // b again, the newest
    let expected = json!([
        {"agent": "b", "threads": [{"thread": "", "ids": [ids[4], ids[1]]}]},
        {"agent": "a", "threads": [
            {"thread": "", "ids": [ids[3], ids[0]]},
            {"thread": "thread-1", "ids": [ids[2]]},
        ]},
    ]);
    browser.wait_until("b's group moves to the top", PAGE_WAIT, || {
        groups_on_page(&browser) == expected
    });
    assert_eq!(
        browser.execute(&format!(
            "return document.querySelector('{} [data-field=reason]').value;",
            row(&ids[0])
        )),
        "half-typed"
    );
    assert_eq!(
        focused_card(&browser).as_deref(),
        Some(ids[0].as_str()),
        "the focus must stay in the field being typed in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_the_event_stream_not_polling() {
    let Some(browser) = curl_and_browser() else {
        return;
    };
    let origin = Origin::http();
    let gw = start_gateway();
    let url = format!("http://127.0.0.1:{}/things", origin.port());
    open_page(&browser, &gw);
    browser.wait_for("#empty", PAGE_WAIT);
    browser.wait_until("the page reads the event stream", PAGE_WAIT, || {
        feed_mode(&browser) == "live"
    });
    let fetched = list_fetches(&browser);

    // A request held after the page loaded appears, and a decision made elsewhere (here the
    // admin API) takes it off — without the page asking for the list.
    let _held = post_in_background(&gw, &url, "from the stream", &[]);
    let id = new_pending(&gw, 1, &[]);
    wait_for_row(&browser, &id);
    let denied = gw.admin_call(
        "POST",
        &format!("/v1/approvals/{id}/deny"),
        Some(r#"{"reason":"decided elsewhere"}"#),
    );
    assert_eq!(denied.status, 200, "{denied:?}");
    browser.wait_for_absence(&row(&id), PAGE_WAIT);
    wait_for_status(&browser, "was denied");
    browser.wait_for("#empty", PAGE_WAIT);
    assert_eq!(
        list_fetches(&browser),
        fetched,
        "the row must come and go by the stream, not by polling the list"
    );
    assert_eq!(feed_mode(&browser), "live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_decides_with_the_keyboard_alone() {
    let Some(browser) = curl_and_browser() else {
        return;
    };
    let origin = Origin::http();
    let gw = start_gateway();
    let url = format!("http://127.0.0.1:{}/things", origin.port());
    open_page(&browser, &gw);
    let older_held = post_in_background(&gw, &url, "older", &[]);
    let older = new_pending(&gw, 1, &[]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let newer_held = post_in_background(&gw, &url, "newer", &[]);
    let newer = new_pending(&gw, 2, &[&older]);
    wait_for_row(&browser, &older);
    wait_for_row(&browser, &newer);

    // `?` shows and hides the list of shortcuts.
    let help = browser.wait_for("#shortcuts", PAGE_WAIT);
    assert!(!browser.is_displayed(&help));
    browser.press_keys("?");
    assert!(browser.is_displayed(&help), "? must show the shortcuts");
    browser.press_keys("?");
    assert!(!browser.is_displayed(&help), "? again must hide them");

    // The newest is first; j moves to the next, d to its reason, and Enter denies with it.
    // Keys typed in a field are text, not shortcuts.
    browser.execute("document.querySelector('[data-approval-id]').focus();");
    assert_eq!(focused_card(&browser).as_deref(), Some(newer.as_str()));
    browser.press_keys("j");
    assert_eq!(focused_card(&browser).as_deref(), Some(older.as_str()));
    browser.press_keys("d");
    let field = browser.focused();
    assert_eq!(
        browser.attribute(&field, "data-field").as_deref(),
        Some("reason")
    );
    browser.press_keys(&format!("deja vu, ask me later{ENTER}"));
    let refused = older_held.await.expect("curl");
    assert_eq!(refused.status, 403, "{refused:?}");
    let decided = approval(&gw, &older);
    assert_eq!(
        (decided["state"].as_str(), decided["reason"].as_str()),
        (Some("denied"), Some("deja vu, ask me later")),
        "{decided}"
    );
    browser.wait_for_absence(&row(&older), PAGE_WAIT);
    wait_for_status(&browser, "Denied");

    // The focus went to the approval left; a goes to its Approve button, Enter approves.
    assert_eq!(focused_card(&browser).as_deref(), Some(newer.as_str()));
    browser.press_keys("a");
    let button = browser.focused();
    assert_eq!(
        browser.attribute(&button, "data-action").as_deref(),
        Some("approve")
    );
    browser.press_keys(&ENTER.to_string());
    let released = newer_held.await.expect("curl");
    assert_eq!(released.status, 200, "{released:?}");
    assert_eq!(state_of(&gw, &newer), "approved");
    assert_eq!(origin.requests(), 1, "only the approved request is sent");
    browser.wait_for("#empty", PAGE_WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_gateway_restart_the_page_drops_what_was_settled_and_stays_live() {
    let Some(browser) = curl_and_browser() else {
        return;
    };
    // Back-off included, the page is back on the stream within seconds.
    let reconnect_wait = Duration::from_secs(40);
    let origin = Origin::http();
    let url = format!("http://127.0.0.1:{}/things", origin.port());
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let gw = start_on_admin_port(tempfile::tempdir().expect("tempdir"), admin_port);
    open_page(&browser, &gw);
    browser.wait_until("the page reads the event stream", PAGE_WAIT, || {
        feed_mode(&browser) == "live"
    });
    let fetched = list_fetches(&browser);
    let held = post_in_background(&gw, &url, "before the restart", &[]);
    let before = new_pending(&gw, 1, &[]);
    wait_for_row(&browser, &before);

    // Killed and started again: what was held is abandoned, and the new gateway's feed
    // cannot resume from the page's last event. The page reconnects, resyncs, and drops
    // the row no event will ever settle.
    let dir = gw.stop();
    let _ = held.await;
    let gw = start_on_admin_port(dir, admin_port);
    assert_eq!(state_of(&gw, &before), "abandoned");
    browser.wait_for_absence(&row(&before), reconnect_wait);
    browser.wait_until("the page reads the new stream", reconnect_wait, || {
        feed_mode(&browser) == "live"
    });
    browser.wait_for("#empty", PAGE_WAIT);
    // It listed what is pending to resync. (How many times is left open: a slow restart
    // may have had it poll meanwhile; that it follows the stream, not polling, is checked
    // once it is live again, by `the_page_follows_the_event_stream_not_polling`.)
    assert!(
        list_fetches(&browser) > fetched,
        "the page must list what is pending to resync"
    );

    // And it goes on live.
    let _again = post_in_background(&gw, &url, "after the restart", &[]);
    let after = new_pending(&gw, 1, &[]);
    wait_for_row(&browser, &after);
    assert_eq!(feed_mode(&browser), "live");
}
