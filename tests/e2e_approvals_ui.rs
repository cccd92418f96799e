//! The approvers' page end to end, in a real browser: headless Chromium (driven through
//! chromedriver) opens `/ui/approvals` on the admin listener of the `tollgate` binary while
//! Review-mode writes are held at the gateway.
//!
//! It proves that a person using only the page can decide: a held request appears without a
//! reload, shows its URL as text (markup in it is never interpreted), is released exactly once
//! when its Approve button is clicked, and is refused with the typed reason when Deny is
//! clicked. It also proves the token handling: the `#token=` fragment is removed from the
//! address bar, and a refused token brings back the token form, from which the page recovers.
//!
//! Skipped (and passing) when Chromium or chromedriver is not installed.

mod support;

use std::time::Duration;

use support::webdriver::{Browser, Element};
use support::*;

/// How long the page may take to show a change (it polls every second).
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// Starts the gateway with the approval policies and a Review-mode agent on loopback.
fn start_gateway() -> Gateway {
    Gateway::start_with_policies(
        &format!(
            "{EPHEMERAL_LISTENERS}{}\n{REVIEW_AGENT}",
            loopback_upstream(None)
        ),
        &[APPROVAL_POLICIES],
    )
}

/// The approval's state on the admin API.
fn state_of(gw: &Gateway, id: &str) -> String {
    let got = gw.admin_call("GET", &format!("/v1/approvals/{id}"), None);
    assert_eq!(got.status, 200, "{got:?}");
    got.json()["state"].as_str().unwrap_or_default().to_string()
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
    if no_curl() {
        return;
    }
    let Some(browser) = Browser::start_if_installed() else {
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
    if no_curl() {
        return;
    }
    let Some(browser) = Browser::start_if_installed() else {
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
