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
//! (Unix seconds, of this try) and `tollgate-signature: sha256=<hex>`, the HMAC-SHA256, under
//! the webhook's secret (at least 32 bytes), of `<timestamp>.<event>.<event id>.<body>`: the
//! receiver checks it, that the timestamp is recent, and that it has not seen the event id
//! before, to know the event is the gateway's and not replayed. The secret is never sent or
//! logged. The endpoint's answer is judged by its status alone (2xx: taken).
//!
//! Each try reads the event from the feed again, so an event retried after its approval was
//! settled no longer carries the held body's preview.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::connectors::http::Connector;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tollgate_policy::target::{Scheme, Target};

use crate::client::{self, Request};
use crate::config::WebhookConfig;
use crate::egress::approval::feed::{Feed, Lagged};
use crate::egress::approval::Approvals;

/// Events given up since start, over all webhooks.
static FAILED: AtomicU64 = AtomicU64::new(0);

/// The longest wait between two tries of one event.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The shortest secret a webhook takes (HMAC-SHA256's key is as strong as it is long).
const MIN_SECRET_BYTES: usize = 32;

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
    /// The webhook `config` (the `index`th) describes, with its secret read (an error says
    /// what is wrong, naming the webhook by its place and host, never its path or query).
    pub fn load(index: usize, config: &WebhookConfig) -> Result<Webhook, String> {
        let (target, _) = Target::from_url(&config.url).map_err(|e| {
            format!("webhook {index}: the url is not an absolute http(s) URL ({e})")
        })?;
        let name = format!("webhook {index} ({target})");
        // Events carry what approvers read (body previews): never in the clear off the host.
        if target.scheme == Scheme::Http && !target.host.is_loopback() {
            return Err(format!(
                "{name}: use https (plain http is accepted for loopback only)"
            ));
        }
        let host = target.to_string();
        let secret = crate::egress::credentials::provider::read_secret(&config.secret, &name)?;
        if secret.expose().len() < MIN_SECRET_BYTES {
            return Err(format!(
                "{name}: the secret must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)"
            ));
        }
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
        while last < feed.head() {
            if *shutdown.borrow() {
                return;
            }
            let seq = last + 1;
            match deliver(&hook, feed, seq, &connector, &mut shutdown).await {
                Delivery::Done => last = seq,
                Delivery::Stopping => return,
                Delivery::Gone => {
                    // It left the ring before it was taken, and so may have others after
                    // it: go on from the oldest still kept, and count what is lost.
                    let oldest = match feed.after(last) {
                        Err(Lagged(oldest)) => oldest,
                        Ok(_) => seq + 1,
                    };
                    let lost = oldest.saturating_sub(seq).max(1);
                    FAILED.fetch_add(lost, Ordering::Relaxed);
                    tracing::error!(
                        webhook = hook.host,
                        lost,
                        "approval events left the feed before the webhook took them"
                    );
                    last = (oldest - 1).max(seq);
                }
            }
        }
        tokio::select! {
            changed = published.changed() => if changed.is_err() { return },
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
        }
    }
}

/// How the tries of one event ended.
enum Delivery {
    /// Taken by the endpoint, or given up after its tries (counted).
    Done,
    /// The event left the ring before it was taken.
    Gone,
    /// The gateway is stopping.
    Stopping,
}

/// Tries the event at `seq` until the endpoint takes it or the tries are used up.
async fn deliver(
    hook: &Webhook,
    feed: &Feed,
    seq: u64,
    connector: &Connector,
    shutdown: &mut watch::Receiver<bool>,
) -> Delivery {
    let id = feed.id(seq);
    for attempt in 1..=hook.max_attempts {
        // Read again each try: a settled approval's pending event has lost its preview.
        let Some(event) = feed.at(seq) else {
            return Delivery::Gone;
        };
        let body = event.data();
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
                    signature(&hook.key, &timestamp, event.name, &id, &body),
                ),
                ("tollgate-timestamp".into(), timestamp),
            ],
            body: Some(("application/json".into(), body)),
        };
        // The answer's status is enough: its body is not read.
        let sent = client::send(connector, request, hook.timeout, 0);
        let why = tokio::select! {
            answer = sent => match answer {
                Ok((status, _)) if (200..300).contains(&status) => return Delivery::Done,
                Ok((status, _)) => format!("answered {status}"),
                Err(e) => e.to_string(),
            },
            _ = shutdown.changed() => return Delivery::Stopping,
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
                _ = shutdown.changed() => return Delivery::Stopping,
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
    Delivery::Done
}

/// `sha256=<hex>`: the HMAC-SHA256 of `<timestamp>.<event>.<event id>.<body>` under the
/// webhook's secret.
pub fn signature(
    key: &ring::hmac::Key,
    timestamp: &str,
    event: &str,
    event_id: &str,
    body: &[u8],
) -> String {
    let mut context = ring::hmac::Context::with_key(key);
    for part in [timestamp, event, event_id] {
        context.update(part.as_bytes());
        context.update(b".");
    }
    context.update(body);
    format!("sha256={}", hex::encode(context.sign().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_the_timestamp_the_event_and_the_body() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"whsec");
        let body = b"{\"id\":\"a\"}";
        let signed = signature(&key, "1700000000", "pending", "0a1b2c3d-1", body);
        // HMAC-SHA256("whsec", "1700000000.pending.0a1b2c3d-1.{\"id\":\"a\"}"), computed
        // independently (Python's hmac module).
        assert_eq!(
            signed,
            "sha256=3d38c669804d079c0429271f6bc45144df86cb651fde218df86d0e05536a1762"
        );
        for (timestamp, event, id, body) in [
            ("1700000001", "pending", "0a1b2c3d-1", &body[..]),
            ("1700000000", "denied", "0a1b2c3d-1", &body[..]),
            ("1700000000", "pending", "0a1b2c3d-2", &body[..]),
            ("1700000000", "pending", "0a1b2c3d-1", b"{\"id\":\"b\"}"),
        ] {
            assert_ne!(signed, signature(&key, timestamp, event, id, body));
        }
    }
}
