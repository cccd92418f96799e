//! Approval events pushed to the agent platform, for platforms that prefer a push to reading
//! the live feed: each event of the [feed](crate::egress::approval::feed) is `POST`ed to every
//! `[[approvals.webhooks]]` URL, in order, signed, and retried with back-off.
//!
//! A webhook reads the feed's ring like any listener, on a task of its own: a slow or failing
//! endpoint delays only its own deliveries, never a request or another webhook. An event is
//! tried `max_attempts` times (waiting 1 s, 2 s, 4 s, … at most 60 s between tries), then
//! given up, logged and counted (`tollgate_webhook_events_failed_total`); so are events that
//! left the ring before a stalled endpoint could take them.
//!
//! Each `POST`'s body is the event's data (the approval, JSON), with the headers
//! `tollgate-event` (its name), `tollgate-event-id` (as on the feed), `tollgate-timestamp`
//! (Unix seconds) and `tollgate-signature: sha256=<hex>`, the HMAC-SHA256, under the
//! webhook's secret, of `<timestamp>.<body>`: the receiver checks it (and that the timestamp
//! is recent) to know the event is the gateway's and not replayed. The secret is never sent
//! or logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::connectors::http::Connector;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tollgate_policy::target::{Host, Scheme, Target};

use crate::client::{self, Request};
use crate::config::WebhookConfig;
use crate::egress::approval::feed::{Event, Feed};
use crate::egress::approval::Approvals;

/// Events given up since start, over all webhooks.
static FAILED: AtomicU64 = AtomicU64::new(0);

/// The longest wait between two tries of one event.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How much of an endpoint's answer is read (and ignored).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Approval events given up since start (the `tollgate_webhook_events_failed_total` counter).
pub fn failed() -> u64 {
    FAILED.load(Ordering::Relaxed)
}

/// One configured webhook, its secret read.
pub struct Webhook {
    url: String,
    /// Where it is, for the log (the URL's query may hold a secret of the platform's).
    host: String,
    key: ring::hmac::Key,
    max_attempts: u32,
    timeout: Duration,
}

impl Webhook {
    /// The webhook `config` describes, with its secret read (an error says which is missing).
    pub fn load(config: &WebhookConfig) -> Result<Webhook, String> {
        let (target, _) =
            Target::from_url(&config.url).map_err(|e| format!("webhook {:?}: {e}", config.url))?;
        let loopback = match &target.host {
            Host::Ip(ip) => ip.is_loopback(),
            Host::Name(name) => name == "localhost",
        };
        // Events carry what approvers read (body previews): never in the clear off the host.
        if target.scheme == Scheme::Http && !loopback {
            return Err(format!(
                "webhook {:?}: use https (plain http is accepted for loopback only)",
                config.url
            ));
        }
        let host = target.to_string();
        let secret = crate::egress::credentials::provider::read_secret(
            &config.secret,
            &format!("webhook {:?}", config.url),
        )?;
        Ok(Webhook {
            url: config.url.clone(),
            host,
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.expose().as_bytes()),
            max_attempts: config.max_attempts.max(1),
            timeout: Duration::from_millis(config.timeout_ms),
        })
    }
}

/// Starts one delivery task per webhook; they end when the gateway stops.
pub fn spawn(
    webhooks: Vec<Webhook>,
    approvals: Arc<Approvals>,
    connector: Arc<Connector>,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    webhooks
        .into_iter()
        .map(|hook| {
            tokio::spawn(run(
                hook,
                approvals.clone(),
                connector.clone(),
                shutdown.clone(),
            ))
        })
        .collect()
}

/// Delivers every event published from now on, in order.
async fn run(
    hook: Webhook,
    approvals: Arc<Approvals>,
    connector: Arc<Connector>,
    mut shutdown: watch::Receiver<bool>,
) {
    let feed = approvals.feed();
    let mut published = feed.subscribe();
    let mut last = feed.head();
    loop {
        published.borrow_and_update();
        match feed.after(last) {
            Ok(events) => {
                for event in events {
                    if !deliver(&hook, feed, &event, &connector, &mut shutdown).await {
                        return;
                    }
                    last = event.seq;
                }
            }
            Err(_lagged) => {
                let head = feed.head();
                let lost = head.saturating_sub(last);
                FAILED.fetch_add(lost, Ordering::Relaxed);
                tracing::error!(
                    webhook = hook.host,
                    lost,
                    "approval events left the feed before the webhook could take them"
                );
                last = head;
            }
        }
        tokio::select! {
            changed = published.changed() => if changed.is_err() { return },
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
        }
    }
}

/// Tries `event` until the endpoint takes it or the tries are used up; false when the
/// gateway is stopping.
async fn deliver(
    hook: &Webhook,
    feed: &Feed,
    event: &Event,
    connector: &Connector,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let body = event.data();
    let id = feed.id(event.seq);
    for attempt in 1..=hook.max_attempts {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string();
        let request = Request {
            method: "POST",
            url: &hook.url,
            headers: vec![
                ("tollgate-event".into(), event.name.to_string()),
                ("tollgate-event-id".into(), id.clone()),
                (
                    "tollgate-signature".into(),
                    signature(&hook.key, &timestamp, &body),
                ),
                ("tollgate-timestamp".into(), timestamp),
            ],
            body: Some(("application/json".into(), body.clone())),
        };
        let why = match client::send(connector, request, hook.timeout, MAX_ANSWER_BYTES).await {
            Ok((status, _)) if (200..300).contains(&status) => return true,
            Ok((status, _)) => format!("answered {status}"),
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            webhook = hook.host,
            event = id,
            attempt,
            why,
            "a webhook did not take an approval event"
        );
        if attempt < hook.max_attempts {
            let wait = Duration::from_secs(1 << (attempt - 1).min(6)).min(MAX_BACKOFF);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return false,
            }
        }
    }
    FAILED.fetch_add(1, Ordering::Relaxed);
    tracing::error!(
        webhook = hook.host,
        event = id,
        attempts = hook.max_attempts,
        "gave up delivering an approval event to a webhook"
    );
    true
}

/// `sha256=<hex>`: the HMAC-SHA256 of `<timestamp>.<body>` under the webhook's secret.
pub fn signature(key: &ring::hmac::Key, timestamp: &str, body: &[u8]) -> String {
    let mut context = ring::hmac::Context::with_key(key);
    context.update(timestamp.as_bytes());
    context.update(b".");
    context.update(body);
    format!("sha256={}", hex::encode(context.sign().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_the_timestamp_and_the_body() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"whsec");
        let signed = signature(&key, "1700000000", b"{\"id\":\"a\"}");
        // HMAC-SHA256("whsec", "1700000000.{\"id\":\"a\"}"), computed independently
        // (Python's hmac module).
        assert_eq!(
            signed,
            "sha256=fdd6a42ef3a01f0fe29b825302049edc22e364780cd7db03489febf14ce4b734"
        );
        assert_ne!(signed, signature(&key, "1700000001", b"{\"id\":\"a\"}"));
        assert_ne!(signed, signature(&key, "1700000000", b"{\"id\":\"b\"}"));
    }
}
