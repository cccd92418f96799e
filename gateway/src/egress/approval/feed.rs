//! The live feed of approval events, for the agent platform and the approvers' page: every
//! approval's `pending`, and how it was settled (`approved`, `denied`, `expired`,
//! `abandoned`), in the order they happened, as Server-Sent Events frames.
//!
//! One ring of the latest events serves every listener: an event is encoded once, when it is
//! published, and a listener only remembers how far it has read (there is no queue per
//! listener, so a slow one costs nothing but its connection). The ring also lets a listener
//! that reconnects with the id of the last event it saw (`Last-Event-ID`) get what it missed,
//! as long as that is still in the ring and the gateway has not restarted since: an id names
//! this process (its `generation`) and the event's place. When a listener cannot resume, it
//! is told so (`resync`) and starts again from the approvals pending now.
//!
//! Events are delivered at least once: one published while a listener is being sent the
//! pending approvals may reach it twice. A listener keys what it shows on the approval's id.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use tollgate_storage::ApprovalState;

/// One published event.
pub struct Event {
    /// Its place in the feed: 1 for this process's first.
    pub seq: u64,
    /// The agent whose approval it is (listeners may ask for one agent's events only).
    pub agent: String,
    /// The approval's id.
    approval: String,
    /// Its name: the approval's state (`pending`, `approved`, …).
    pub name: &'static str,
    /// The whole Server-Sent Events frame (`id`, `event`, `data` lines and the blank line).
    pub frame: Bytes,
    /// Where the data (the approval, JSON) lies in `frame`.
    data: std::ops::Range<usize>,
}

impl Event {
    /// An event with id `id` (its `seq` is set by the caller).
    fn new(id: String, name: &'static str, approval: &str, agent: &str, data: &str) -> Event {
        let frame = frame(Some(&id), name, data);
        // The data line is the frame's last, before its two line feeds.
        let data_end = frame.len() - 2;
        Event {
            seq: 0,
            agent: agent.to_string(),
            approval: approval.to_string(),
            name,
            data: data_end - data.len()..data_end,
            frame,
        }
    }

    /// The event's data: the approval as approvers see it (JSON), shared with `frame`.
    pub fn data(&self) -> Bytes {
        self.frame.slice(self.data.clone())
    }
}

/// Where a listener starts reading, from the `Last-Event-ID` it sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// No id: the approvals pending now, then what happens from here.
    Fresh,
    /// After the event with this place: what was missed, then what happens from here.
    After(u64),
    /// The id cannot be resumed (why): the listener is told, then starts as `Fresh`.
    Resync(&'static str),
}

/// A listener fell so far behind that the events after its place left the ring; the oldest
/// event the ring still keeps is at this place.
#[derive(Debug)]
pub struct Lagged(pub u64);

/// The feed: the latest events, and a signal when there are more.
pub struct Feed {
    /// Names this process in event ids, so that an id from before a restart is not mistaken
    /// for one of this process.
    generation: String,
    /// How many events the ring keeps for listeners that reconnect.
    capacity: usize,
    /// How many bytes of frames the ring keeps at most (a sandbox chooses how long its URLs
    /// and commands are).
    max_bytes: usize,
    ring: Mutex<Ring>,
    /// The place of the latest event; listeners wait for it to change.
    head: watch::Sender<u64>,
    /// How many listeners are connected (the `tollgate_approval_feed_listeners` gauge).
    listeners: AtomicUsize,
}

/// A connected listener, counted while it lives.
pub struct Listening<'a>(&'a Feed);

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        self.0.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Ring {
    events: VecDeque<Arc<Event>>,
    last_seq: u64,
    /// The frames' bytes, together.
    bytes: usize,
}

impl Feed {
    /// A feed that keeps the latest `capacity` events (at least one), within `max_bytes`.
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Feed {
            generation: format!("{:08x}", rand::random::<u32>()),
            capacity: capacity.max(1),
            max_bytes,
            ring: Mutex::default(),
            head: watch::Sender::new(0),
            listeners: AtomicUsize::new(0),
        }
    }

    /// Counts a listener until the guard is dropped; `None` when `max` are listening.
    pub fn listen(&self, max: usize) -> Option<Listening<'_>> {
        self.listeners
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Listening(self))
    }

    /// How many listeners are connected now.
    pub fn listeners(&self) -> usize {
        self.listeners.load(Ordering::Relaxed)
    }

    /// Publishes that approval `approval` of `agent` is now in `state`; `view` is the
    /// approval as approvers see it (the event's data).
    ///
    /// Once an approval is settled, its `pending` event still in the ring loses its body
    /// preview: the preview is shown while the request is held, and a listener resuming
    /// later must not read it.
    pub fn publish(
        &self,
        state: ApprovalState,
        approval: &str,
        agent: &str,
        view: &serde_json::Value,
    ) {
        let data = serde_json::to_string(view).unwrap_or_else(|_| "{}".into());
        let seq = {
            let mut ring = self.ring.lock();
            ring.last_seq += 1;
            let seq = ring.last_seq;
            let event = Event {
                seq,
                ..Event::new(self.id(seq), state.as_str(), approval, agent, &data)
            };
            if state != ApprovalState::Pending {
                self.scrub_preview(&mut ring, approval);
            }
            ring.bytes += event.frame.len();
            ring.events.push_back(Arc::new(event));
            while ring.events.len() > self.capacity
                || (ring.bytes > self.max_bytes && ring.events.len() > 1)
            {
                if let Some(old) = ring.events.pop_front() {
                    ring.bytes -= old.frame.len();
                }
            }
            seq
        };
        self.head.send_replace(seq);
    }

    /// Replaces `approval`'s `pending` event in the ring, if it is there with a body
    /// preview, by one without.
    fn scrub_preview(&self, ring: &mut Ring, approval: &str) {
        let Some(slot) = ring
            .events
            .iter_mut()
            .rev()
            .find(|e| e.approval == approval && e.name == ApprovalState::Pending.as_str())
        else {
            return;
        };
        let Ok(mut data) = serde_json::from_slice::<serde_json::Value>(&slot.data()) else {
            return;
        };
        let removed = data
            .as_object_mut()
            .and_then(|fields| fields.remove("body_preview"));
        if removed.is_none() {
            return;
        }
        let text = serde_json::to_string(&data).unwrap_or_else(|_| "{}".into());
        let scrubbed = Event {
            seq: slot.seq,
            ..Event::new(self.id(slot.seq), slot.name, approval, &slot.agent, &text)
        };
        ring.bytes = ring.bytes - slot.frame.len() + scrubbed.frame.len();
        *slot = Arc::new(scrubbed);
    }

    /// A receiver that wakes when an event is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// The place of the latest event (0 before the first).
    pub fn head(&self) -> u64 {
        self.ring.lock().last_seq
    }

    /// The id of the event at `seq`, as sent in its `id:` line.
    pub fn id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.generation)
    }

    /// Where a listener that sent `last_event_id` starts.
    pub fn start(&self, last_event_id: Option<&str>) -> Start {
        let Some(id) = last_event_id.map(str::trim).filter(|id| !id.is_empty()) else {
            return Start::Fresh;
        };
        let Some((generation, seq)) = id.split_once('-') else {
            return Start::Resync("the Last-Event-ID is not one of this feed's ids");
        };
        let Ok(seq) = seq.parse::<u64>() else {
            return Start::Resync("the Last-Event-ID is not one of this feed's ids");
        };
        if generation != self.generation {
            return Start::Resync(
                "the gateway restarted since that event; events in between are not kept",
            );
        }
        let ring = self.ring.lock();
        let oldest = ring.events.front().map_or(ring.last_seq + 1, |e| e.seq);
        if seq > ring.last_seq {
            Start::Resync("the Last-Event-ID names an event this feed never sent")
        } else if seq + 1 < oldest {
            Start::Resync("the events after that one are no longer kept")
        } else {
            Start::After(seq)
        }
    }

    /// The events after `seq`, oldest first; [`Lagged`] when some of them left the ring.
    pub fn after(&self, seq: u64) -> Result<Vec<Arc<Event>>, Lagged> {
        let ring = self.ring.lock();
        let Some(oldest) = ring.events.front().map(|e| e.seq) else {
            return Ok(Vec::new());
        };
        if seq + 1 < oldest {
            return Err(Lagged(oldest));
        }
        let skip = (seq + 1 - oldest) as usize;
        Ok(ring.events.iter().skip(skip).cloned().collect())
    }

    /// The event at `seq` as the ring holds it now (without its preview once its approval
    /// is settled); `None` once it has left the ring, or before it is published.
    pub fn at(&self, seq: u64) -> Option<Arc<Event>> {
        let ring = self.ring.lock();
        let oldest = ring.events.front()?.seq;
        let index = usize::try_from(seq.checked_sub(oldest)?).ok()?;
        ring.events.get(index).cloned()
    }
}

/// A Server-Sent Events frame: `data` must be one line (compact JSON is).
pub fn frame(id: Option<&str>, event: &str, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 48);
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    out.push_str("event: ");
    out.push_str(event);
    out.push_str("\ndata: ");
    out.push_str(data);
    out.push_str("\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(n: u64) -> serde_json::Value {
        serde_json::json!({ "id": format!("a{n}"), "note": "line\nbreak" })
    }

    #[test]
    fn events_are_framed_once_with_ids_of_this_process() {
        let feed = Feed::new(8, 1 << 20);
        feed.publish(ApprovalState::Pending, "a1", "agent-1", &view(1));
        let events = feed.after(0).expect("kept");
        assert_eq!(events.len(), 1);
        let text = std::str::from_utf8(&events[0].frame).expect("utf-8");
        assert_eq!(
            text,
            format!(
                "id: {}\nevent: pending\ndata: {{\"id\":\"a1\",\"note\":\"line\\nbreak\"}}\n\n",
                feed.id(1)
            )
        );
        assert_eq!(events[0].agent, "agent-1");
        assert_eq!(events[0].name, "pending");
        assert_eq!(
            &events[0].data()[..],
            br#"{"id":"a1","note":"line\nbreak"}"#
        );
    }

    #[test]
    fn a_listener_resumes_after_its_last_event_while_the_ring_holds_what_followed() {
        let feed = Feed::new(3, 1 << 20);
        assert_eq!(feed.start(None), Start::Fresh);
        assert_eq!(feed.start(Some(&feed.id(0))), Start::After(0));
        for n in 1..=5 {
            feed.publish(ApprovalState::Pending, &format!("a{n}"), "a", &view(n));
        }
        // The ring keeps 3..=5: resuming after 2, 3 or 4 misses nothing.
        assert_eq!(feed.start(Some(&feed.id(2))), Start::After(2));
        let seqs: Vec<u64> = feed.after(2).expect("kept").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert!(feed.after(5).expect("kept").is_empty());
        // After 1, event 2 is gone: the listener must start again.
        assert!(matches!(feed.start(Some(&feed.id(1))), Start::Resync(_)));
        assert!(matches!(feed.after(1), Err(Lagged(3))));
        assert_eq!(feed.at(4).map(|e| e.seq), Some(4));
        assert!(feed.at(2).is_none() && feed.at(6).is_none());
    }

    #[test]
    fn ids_of_another_process_or_of_no_event_are_not_resumed() {
        let feed = Feed::new(4, 1 << 20);
        feed.publish(ApprovalState::Approved, "a1", "a", &view(1));
        let other = Feed::new(4, 1 << 20);
        for id in [
            other.id(1),
            feed.id(2),
            "nonsense".into(),
            format!("{}-x", feed.generation),
        ] {
            assert!(
                matches!(feed.start(Some(&id)), Start::Resync(_)),
                "{id} must not resume"
            );
        }
    }

    #[tokio::test]
    async fn a_subscriber_wakes_when_an_event_is_published() {
        let feed = Feed::new(4, 1 << 20);
        let mut head = feed.subscribe();
        feed.publish(ApprovalState::Denied, "a1", "a", &view(1));
        head.changed().await.expect("the feed is alive");
        assert_eq!(*head.borrow(), 1);
        assert_eq!(feed.head(), 1);
    }

    #[test]
    fn a_settled_approvals_pending_event_loses_its_preview_in_the_ring() {
        let feed = Feed::new(8, 1 << 20);
        let pending = serde_json::json!({ "id": "x", "body_preview": { "text": "secret-ish" } });
        feed.publish(ApprovalState::Pending, "x", "a", &pending);
        feed.publish(ApprovalState::Pending, "y", "a", &pending);
        feed.publish(
            ApprovalState::Approved,
            "x",
            "a",
            &serde_json::json!({ "id": "x" }),
        );
        let events = feed.after(0).expect("kept");
        let texts: Vec<String> = events
            .iter()
            .map(|e| String::from_utf8_lossy(&e.frame).into_owned())
            .collect();
        assert!(!texts[0].contains("secret-ish"), "{texts:?}");
        assert!(texts[0].starts_with(&format!("id: {}\nevent: pending\n", feed.id(1))));
        assert!(
            texts[1].contains("secret-ish"),
            "y is still held: {texts:?}"
        );
        assert_eq!(events[0].seq, 1);
    }

    #[test]
    fn the_ring_keeps_within_its_bytes() {
        let feed = Feed::new(100, 1000);
        let big = serde_json::json!({ "url": "u".repeat(300) });
        for n in 0..10 {
            feed.publish(ApprovalState::Pending, &format!("a{n}"), "a", &big);
        }
        let kept = feed.after(feed.head() - 1).expect("the latest is kept");
        assert_eq!(kept.len(), 1);
        let ring = feed.ring.lock();
        assert!(
            ring.bytes <= 1000 && ring.events.len() < 10,
            "{} bytes",
            ring.bytes
        );
        assert_eq!(
            ring.bytes,
            ring.events.iter().map(|e| e.frame.len()).sum::<usize>()
        );
    }
}
