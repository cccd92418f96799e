//! Audit records: what an agent's request was and what became of it, summarized — and
//! chained, so that editing or deleting a stored record is detectable.
//!
//! Each record carries the hash of the agent's previous record (`prev_hash`) and its own
//! (`hash`): SHA-256 over the previous hash and the record's JSON with `hash` empty. A record
//! edited in place no longer matches its hash; a record deleted from the middle breaks the
//! sequence and the next record's link; records deleted from the end are caught by the head
//! (the last sequence number and hash), which the store keeps beside the trail. Retention
//! deletes the oldest records on purpose: verification starts at the oldest one kept.

use serde::{Deserialize, Serialize};

/// The `prev_hash` of an agent's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The summary of one request. It deliberately has no field for a body, a query string or a
/// header value: the audit trail says what happened without copying what was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the agent's trail (assigned by the store, increasing).
    #[serde(default)]
    pub seq: u64,
    /// When the request arrived (ms since the epoch).
    pub at: u64,
    /// The agent that sent it.
    pub agent: String,
    /// Its tool call, if one was open.
    pub tool_call: Option<String>,
    /// The session (conversation thread) it came from, when it came on a session's own
    /// listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The HTTP method; with an override header, both (`GET (X-HTTP-Method-Override: DELETE)`).
    pub method: String,
    /// Destination host (and port when not the default).
    pub host: String,
    /// Path without the query, which often carries tokens.
    pub path: String,
    /// allow / deny / needs_approval; empty if the request never reached a decision, `none`
    /// for a CONNECT refused before any policy was asked (the agent's request rate).
    pub decision: String,
    /// Ids of the policies that determined the decision; empty when none did.
    pub policies: Vec<String>,
    /// The approval that held it, if any.
    pub approval: Option<String>,
    /// How long it was held, in milliseconds (set when it was held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_wait_ms: Option<u64>,
    /// The credential provider used (never the token).
    pub credential: Option<String>,
    /// The status sent to the agent (0 if none was).
    pub status: u16,
    /// Why the gateway refused or failed, as a short error code.
    pub error: Option<String>,
    /// Request body bytes received.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Time from arrival to the end of the response, in microseconds: for an upgraded
    /// connection, its whole life (the record is written when it closes).
    pub latency_us: u64,
    /// The protocol the connection switched to (`websocket`), when the origin accepted an
    /// upgrade: `bytes_in` and `bytes_out` then count what flowed each way inside it,
    /// uninspected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    /// The request's OpenTelemetry trace id (32 hex digits), also in its log line and span.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
    /// The hash of the agent's previous record (set by the store).
    #[serde(default)]
    pub prev_hash: String,
    /// This record's hash (set by the store).
    #[serde(default)]
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record must have: SHA-256 of `prev_hash`, a zero byte, and the record's
    /// JSON with `hash` empty.
    pub fn expected_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        // Serializing a plain struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&unhashed).unwrap_or_default();
        chain_hash(&self.prev_hash, &json)
    }

    /// Links the record after `prev_hash` and returns it as stored (its JSON, `hash` set).
    /// The JSON is made once: the hash is taken over it with `hash` empty, and since `hash`
    /// is the last field, the stored form is that JSON with the hash put into its last value.
    pub fn seal(&mut self, prev_hash: String) -> Vec<u8> {
        self.prev_hash = prev_hash;
        self.hash.clear();
        // Sized for a whole record, so it is not grown (copied) three times on the way.
        let mut json = Vec::with_capacity(RECORD_CAPACITY);
        if serde_json::to_writer(&mut json, &*self).is_err() {
            json.clear();
        }
        self.hash = chain_hash(&self.prev_hash, &json);
        if json.ends_with(EMPTY_HASH_END) {
            json.truncate(json.len() - 2);
            json.extend_from_slice(self.hash.as_bytes());
            json.extend_from_slice(b"\"}");
            json
        } else {
            // Not reached while `hash` is the last field (a unit test checks it).
            serde_json::to_vec(&*self).unwrap_or_default()
        }
    }
}

/// Room for a sealed record's JSON: its two hashes and trace id alone are 160 bytes, a
/// typical record about 500.
const RECORD_CAPACITY: usize = 1024;

/// How a record's JSON ends while its `hash` is empty.
const EMPTY_HASH_END: &[u8] = b"\"hash\":\"\"}";

/// SHA-256 of the previous hash, a zero byte and the record's JSON (with `hash` empty), in hex.
fn chain_hash(prev_hash: &str, json: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev_hash.as_bytes());
    ctx.update(&[0]);
    ctx.update(json);
    // Written into a buffer: `hex::encode` collects its digits a `char` at a time, which
    // took as long as the hash itself.
    let mut digits = [0u8; 64];
    // 32 bytes always fit 64 digits.
    let _ = hex::encode_to_slice(ctx.finish(), &mut digits);
    // Hex digits are ASCII: checked as such, not converted a character at a time.
    std::str::from_utf8(&digits)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Where an agent's audit chain ends: the next position and the last hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// The position the next record gets.
    pub next_seq: u64,
    /// The hash of the last record written (or [`GENESIS`]).
    pub hash: String,
    /// Records before this position were deleted by retention, on purpose.
    #[serde(default)]
    pub pruned_before: u64,
}

impl Default for ChainHead {
    fn default() -> Self {
        ChainHead {
            next_seq: 0,
            hash: GENESIS.to_string(),
            pruned_before: 0,
        }
    }
}

/// What verifying an agent's audit chain found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainReport {
    /// How many records were checked (those retention kept).
    pub records: u64,
    /// The oldest record kept (retention deletes older ones).
    pub first_seq: Option<u64>,
    /// The newest record's position (`seq`); `None` for an empty trail.
    pub last_seq: Option<u64>,
    /// The first broken link, if any.
    pub broken: Option<BrokenLink>,
}

/// A place where the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokenLink {
    /// The position of the first record (or missing record) that does not fit.
    pub seq: u64,
    /// What does not fit, for people: records missing, a link or a hash that does not match.
    pub reason: String,
}

/// Walks records in order and reports the first broken link; `head` is where the chain
/// should end.
pub fn verify_chain(
    records: impl IntoIterator<Item = AuditRecord>,
    head: &ChainHead,
) -> ChainReport {
    let mut report = ChainReport {
        records: 0,
        first_seq: None,
        last_seq: None,
        broken: None,
    };
    let missing = |from: u64, to: u64| BrokenLink {
        seq: from,
        reason: format!("records {from} to {to} are missing"),
    };
    let mut previous: Option<AuditRecord> = None;
    for record in records {
        report.records += 1;
        report.first_seq.get_or_insert(record.seq);
        report.last_seq = Some(record.seq);
        if report.broken.is_some() {
            continue;
        }
        let expected_seq = previous.as_ref().map_or(head.pruned_before, |p| p.seq + 1);
        let expected_prev = match &previous {
            Some(prev) => Some(prev.hash.as_str()),
            // The oldest record kept: its link can be checked only if nothing was pruned.
            None if record.seq == 0 => Some(GENESIS),
            None => None,
        };
        report.broken = if record.seq != expected_seq {
            Some(missing(expected_seq, record.seq.saturating_sub(1)))
        } else if expected_prev.is_some_and(|h| h != record.prev_hash) {
            Some(BrokenLink {
                seq: record.seq,
                reason: "its prev_hash does not match the previous record's hash".into(),
            })
        } else if record.hash != record.expected_hash() {
            Some(BrokenLink {
                seq: record.seq,
                reason: "its content does not match its hash (edited)".into(),
            })
        } else {
            None
        };
        previous = Some(record);
    }
    if report.broken.is_none() {
        let (end, hash) = match &previous {
            Some(last) => (last.seq + 1, last.hash.as_str()),
            None => (head.pruned_before, GENESIS),
        };
        if end != head.next_seq || (previous.is_some() && hash != head.hash) {
            report.broken = Some(missing(end, head.next_seq.saturating_sub(1)));
        }
    }
    report
}

/// A plain record of `agent`'s, for tests.
#[cfg(test)]
pub(crate) fn example(agent: &str, at: u64) -> AuditRecord {
    AuditRecord {
        seq: 0,
        at,
        agent: agent.into(),
        tool_call: None,
        session: None,
        method: "GET".into(),
        host: "example.com".into(),
        path: "/".into(),
        decision: "allow".into(),
        policies: vec![],
        approval: None,
        approval_wait_ms: None,
        credential: None,
        status: 200,
        error: None,
        bytes_in: 0,
        bytes_out: 10,
        latency_us: 100,
        upgrade: None,
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        prev_hash: String::new(),
        hash: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_is_stored_as_its_json_with_the_hash_it_must_have() {
        let mut record = example("a\"gent", 1);
        record.seq = 7;
        record.tool_call = Some("tc".into());
        record.path = "/\u{202e}x".into();
        record.policies = vec!["p1".into()];
        record.hash = "stale".into();
        let stored = record.seal(GENESIS.to_string());
        assert_eq!(record.prev_hash, GENESIS);
        assert_eq!(record.hash, record.expected_hash());
        assert_eq!(stored, serde_json::to_vec(&record).unwrap());
        let read: AuditRecord = serde_json::from_slice(&stored).unwrap();
        assert_eq!(read, record);
    }

    #[test]
    fn the_chain_hash_is_sha256_of_the_link_in_lowercase_hex() {
        let json = br#"{"seq":1}"#;
        let linked = [GENESIS.as_bytes(), &[0], json].concat();
        let digest = ring::digest::digest(&ring::digest::SHA256, &linked);
        let expected: String = digest
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        assert_eq!(chain_hash(GENESIS, json), expected);
        assert_eq!(expected.len(), 64);
    }
}
