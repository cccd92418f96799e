//! `GET /v1/approvals/events`: the live feed of approval events, as Server-Sent Events, for
//! the agent platform (to show an "Approve" prompt in the conversation) and the approvers'
//! page. Authenticated like the other approval routes (the admin token or an approver's).
//!
//! A listener first gets the approvals pending now (one `pending` event each), or — when it
//! reconnects with `Last-Event-ID` — the events it missed; then every event as it happens.
//! `?agent=ID` keeps one agent's events. A comment line every 15 s keeps idle connections
//! (and whatever proxies sit between) alive and finds listeners that are gone.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Method;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use tollgate_storage::{ApprovalFilter, ApprovalState};

use crate::egress::approval::feed::{frame, Lagged, Start};
use crate::reply::{ErrorCode, Refusal};

use super::respond::only;
use super::AdminApi;

/// How often an idle stream carries a comment line.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How long one write to a listener may take; a listener that reads nothing for this long
/// is disconnected (it reconnects with `Last-Event-ID` and misses nothing the ring holds).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How many bytes of frames one write carries at most (a backlog is sent in several).
const BATCH_BYTES: usize = 64 * 1024;

/// How long a disconnected client should wait before reconnecting (the `retry:` field).
const RETRY: &[u8] = b"retry: 2000\n\n";

impl AdminApi {
    /// Streams the feed to the caller until they leave or the gateway stops. A refusal
    /// (method, token, query) is returned before anything is sent; once the stream has
    /// started, a failed write just ends it.
    pub(super) async fn stream_events(
        &self,
        session: &mut ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Result<(), Refusal> {
        let caller = self.authorized(session)?;
        only(&session.req_header().method, &[Method::GET])?;
        let agent = agent_filter(session.req_header().uri.query().unwrap_or(""))?;
        let feed = self.approvals.feed();
        let max = self.approvals.feed_listeners();
        let Some(_listening) = feed.listen(max) else {
            return Err(Refusal::new(
                ErrorCode::TooManyListeners,
                format!(
                    "the live feed already has {max} listeners (approvals.feed_listeners);                      close one, or list approvals with GET /v1/approvals"
                ),
            ));
        };
        // Subscribed before anything is read, so nothing published from here on is missed.
        let mut published = feed.subscribe();
        let last_event_id = session
            .req_header()
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok());
        let start = feed.start(last_event_id);
        tracing::info!(
            caller = caller.name, agent = agent.as_deref().unwrap_or("*"), start = ?start,
            "approval feed listener connected"
        );

        let mut head = ResponseHeader::build(200, Some(4)).map_err(internal)?;
        for (name, value) in [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-store"),
            ("transfer-encoding", "chunked"),
            ("x-content-type-options", "nosniff"),
        ] {
            head.insert_header(name, value).map_err(internal)?;
        }
        session.set_keepalive(None);
        session.set_write_timeout(Some(WRITE_TIMEOUT));
        if session.write_response_header(Box::new(head)).await.is_err() {
            return Ok(());
        }

        let mut out = BytesMut::from(RETRY);
        let mut last = match start {
            Start::After(seq) => seq,
            Start::Fresh => self.pending_now(agent.as_deref(), &mut out),
            Start::Resync(why) => {
                out.extend_from_slice(&resync(why));
                self.pending_now(agent.as_deref(), &mut out)
            }
        };
        let mut stopping = shutdown.clone();
        let mut quiet_until = tokio::time::Instant::now() + KEEP_ALIVE;
        'stream: loop {
            published.borrow_and_update();
            let events = match feed.after(last) {
                Ok(events) => events,
                Err(Lagged(_)) => {
                    out.extend_from_slice(&resync(
                        "the events after the last one sent are no longer kept",
                    ));
                    last = self.pending_now(agent.as_deref(), &mut out);
                    Vec::new()
                }
            };
            for event in &events {
                if agent.as_deref().is_none_or(|a| a == event.agent) {
                    out.extend_from_slice(&event.frame);
                }
                last = event.seq;
                // A listener far behind gets its backlog in bounded writes, not one copy.
                if out.len() >= BATCH_BYTES {
                    if !send(session, out.split().freeze()).await {
                        break 'stream;
                    }
                    quiet_until = tokio::time::Instant::now() + KEEP_ALIVE;
                }
            }
            if !out.is_empty() {
                if !send(session, out.split().freeze()).await {
                    break;
                }
                quiet_until = tokio::time::Instant::now() + KEEP_ALIVE;
            }
            if *stopping.borrow() {
                // The gateway is stopping: end the stream properly; the listener reconnects
                // (to whichever gateway comes up) and is told to resync.
                let end = session.write_response_body(Bytes::new(), true);
                let _ = tokio::time::timeout(Duration::from_secs(1), end).await;
                break;
            }
            tokio::select! {
                changed = published.changed() => if changed.is_err() { break },
                // Counted from the last write: a listener whose agent is quiet still gets it
                // while other agents' events wake this loop.
                _ = tokio::time::sleep_until(quiet_until) => out.extend_from_slice(b": keep-alive\n\n"),
                // A GET has no body: this ends when the listener leaves (or sends bytes it
                // should not).
                _ = session.read_body_or_idle(true) => break,
                changed = stopping.changed() => if changed.is_err() { break },
            }
        }
        tracing::info!(caller = caller.name, "approval feed listener left");
        Ok(())
    }

    /// Writes one `pending` event per approval pending now into `out`, then a `synced`
    /// event with the id of the feed's place before they were read; returns that place
    /// (where the listener continues). The `pending` events carry no id, so that a listener
    /// cut off within them resumes before them all (with the previous id, or none) and gets
    /// them again.
    fn pending_now(&self, agent: Option<&str>, out: &mut BytesMut) -> u64 {
        let feed = self.approvals.feed();
        let at = feed.head();
        let filter = ApprovalFilter {
            agent: agent.map(str::to_string),
            state: Some(ApprovalState::Pending),
        };
        match self.approvals.list(&filter) {
            Ok(pending) => {
                for record in &pending {
                    let data = serde_json::to_string(&self.approvals.view(record))
                        .unwrap_or_else(|_| "{}".into());
                    out.extend_from_slice(&frame(None, ApprovalState::Pending.as_str(), &data));
                }
                let data = serde_json::json!({ "pending": pending.len() }).to_string();
                out.extend_from_slice(&frame(Some(&feed.id(at)), "synced", &data));
            }
            Err(e) => {
                // The listener still gets every event from here on; it is told the list of
                // what was already pending is missing.
                tracing::error!(error = %e, "the approval feed could not list pending approvals");
                out.extend_from_slice(&resync(
                    "the approvals pending now could not be read; list them with GET /v1/approvals?state=pending",
                ));
            }
        }
        at
    }
}

/// A `resync` event: the listener may have missed events, and is sent what is pending now.
fn resync(reason: &str) -> Bytes {
    let data = serde_json::json!({ "reason": reason }).to_string();
    frame(None, "resync", &data)
}

/// Writes `bytes` to the listener; false when it is gone (or too slow to read).
async fn send(session: &mut ServerSession, bytes: Bytes) -> bool {
    session.write_response_body(bytes, false).await.is_ok()
}

/// `agent=ID` from the query string (the only filter).
fn agent_filter(query: &str) -> Result<Option<String>, Refusal> {
    let mut agent = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "agent" => {
                agent = Some(
                    percent_encoding::percent_decode_str(value)
                        .decode_utf8_lossy()
                        .to_string(),
                )
            }
            other => {
                return Err(Refusal::bad_request(format!(
                    "unknown filter {other:?}: the feed takes agent"
                )))
            }
        }
    }
    Ok(agent)
}

fn internal(e: Box<pingora::Error>) -> Refusal {
    Refusal::new(
        ErrorCode::InternalError,
        format!("cannot start the stream: {e}"),
    )
}
