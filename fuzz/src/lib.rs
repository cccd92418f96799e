//! Fuzz targets for every parser a sandbox or an operator can reach.
//!
//! Each function takes the fuzzer's bytes, feeds them to one parser as the gateway would, and
//! asserts what must hold for any input: no panic, and the properties named in its doc
//! comment. The libFuzzer binaries in `fuzz_targets/` call these; `tests/corpus.rs` replays
//! the committed corpora through them on stable Rust, so every input that once crashed stays
//! a regression test. Run one target (nightly, cargo-fuzz):
//!
//! ```text
//! cargo +nightly fuzz run request_target fuzz/corpus/request_target -- -max_total_time=60
//! ```
//!
//! | target | what a sandbox or operator controls |
//! |---|---|
//! | [`request_target`] | the CONNECT authority and the absolute-form request target |
//! | [`arm_path`] | an Azure Resource Manager request: method and path |
//! | [`policy_set`] | a `.cedar` file in the policy directory |
//! | [`policy_tests`] | a policy test file |
//! | [`config`] | the gateway's TOML configuration |
//! | [`agent_json`] | the admin API's agent registration body |
//! | [`approval_record`] | an approval record read back from storage |
//! | [`audit_chain`] | audit records read back from storage, and their hash chain |
//! | [`websocket_frames`] | what an origin sends inside a WebSocket opened with a token |

use tollgate_gateway::agent::Agent;
use tollgate_gateway::config::Config;
use tollgate_gateway::egress::credentials::reflection::ReflectionScan;
use tollgate_gateway::egress::credentials::upgraded::UpgradeScan;
use tollgate_gateway::egress::credentials::Secret;
use tollgate_gateway::egress::identity::AgentRegistry;
use tollgate_policy::target::{Scheme, Target};
use tollgate_policy::{
    canonical_path, AgentFacts, PolicyEngine, PolicySources, RequestFacts, RunMode,
};
use tollgate_storage::{verify_chain, ApprovalRecord, AuditRecord, ChainHead};

/// Input as text, as every parser here takes it (HTTP heads reach them as UTF-8 already).
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// CONNECT authority and absolute URL: whatever parses prints back to the same target, and
/// the canonical path is stable and free of dot segments.
pub fn request_target(data: &[u8]) {
    let Some(raw) = text(data) else { return };
    if let Ok(target) = Target::from_connect_authority(raw) {
        let again =
            Target::from_connect_authority(&format!("{}:{}", bracketed(&target), target.port));
        assert_eq!(again.as_ref(), Ok(&target), "{raw:?} does not round-trip");
    }
    if let Ok((target, path)) = Target::from_url(raw) {
        let again = Target::from_url(&format!("{target}{path}"));
        assert_eq!(
            again.as_ref().map(|(t, _)| t),
            Ok(&target),
            "{raw:?} does not round-trip"
        );
        if let Ok(canonical) = canonical_path(&path) {
            assert_eq!(canonical_path(&canonical).as_ref(), Ok(&canonical));
            assert!(!canonical.split('/').any(|s| s == "." || s == ".."));
        }
    }
}

/// The host as it appears in an authority: IPv6 literals in brackets.
fn bracketed(target: &Target) -> String {
    match target.host {
        tollgate_policy::target::Host::Ip(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        ref host => host.to_string(),
    }
}

/// An ARM request (first line the method, the rest the path): every scope found is under a
/// subscription, names no dot segment, and an agent holding a scope is inside it.
pub fn arm_path(data: &[u8]) {
    let Some(raw) = text(data) else { return };
    let (method, path) = raw.split_once('\n').unwrap_or(("PUT", raw));
    let Ok(target) = Target::from_url_authority(Scheme::Https, "management.azure.com") else {
        return;
    };
    let Ok(facts) = RequestFacts::new(method, target, path) else {
        return;
    };
    let Some(arm) = &facts.arm else {
        panic!("management.azure.com is an ARM host");
    };
    for scope in &arm.scopes {
        assert!(scope.starts_with("/subscriptions/"), "{scope}");
        assert!(!scope.split('/').any(|s| s == "." || s == ".."), "{scope}");
        assert!(
            !facts.outside_scopes(std::slice::from_ref(scope)),
            "{scope}"
        );
    }
}

/// A policy file: loading never panics, and a set that loads decides a request.
pub fn policy_set(data: &[u8]) {
    let Some(policy) = text(data) else { return };
    let sources = PolicySources {
        origin: "fuzz".into(),
        files: vec![("fuzz.cedar".into(), policy.to_string())],
    };
    let Ok(engine) = PolicyEngine::load(&sources) else {
        return;
    };
    // The index, the first pass without permits gated by approval, the single pass and the
    // context built with only the attributes read must all decide as the whole set does.
    for url in [
        "https://api.example.test/repos?page=1",
        "http://10.0.0.1:8080/",
        "https://management.azure.com/subscriptions/s/resourceGroups/rg/providers/P/t/n",
    ] {
        let Ok((target, path)) = Target::from_url(url) else {
            return;
        };
        for method in ["GET", "POST", "DELETE"] {
            let Ok(request) = RequestFacts::new(method, target.clone(), &path) else {
                return;
            };
            for run_mode in [RunMode::ReadOnly, RunMode::Review, RunMode::Autonomous] {
                let agent = AgentFacts {
                    id: "fuzz",
                    revision: run_mode as u64,
                    run_mode,
                    scopes: &[],
                    tags: &Default::default(),
                };
                let indexed = engine.decide(&agent, &request);
                let plain = engine.decide_without_index(&agent, &request);
                assert_eq!(
                    (
                        indexed.outcome,
                        &indexed.policies,
                        indexed.errors.is_empty()
                    ),
                    (plain.outcome, &plain.policies, plain.errors.is_empty()),
                    "the index changed a decision: {method} {url} {run_mode:?}"
                );
            }
        }
    }
}

/// A policy test file: parsed, then run against the default policies without panicking.
pub fn policy_tests(data: &[u8]) {
    let Some(raw) = text(data) else { return };
    let Ok(file) = toml::from_str::<tollgate_policy::testcases::TestFile>(raw) else {
        return;
    };
    if let Ok(engine) = PolicyEngine::load(&PolicySources::embedded_default()) {
        let _ = tollgate_policy::testcases::run(&engine, &[("fuzz.toml".into(), file)]);
    }
}

/// The configuration file: parsed and validated without panicking.
pub fn config(data: &[u8]) {
    let Some(raw) = text(data) else { return };
    let _ = Config::from_toml(raw, "fuzz.toml");
}

/// An agent registration body: parsed and registered, or refused, without panicking; a
/// registered agent reads back as stored.
pub fn agent_json(data: &[u8]) {
    let Ok(mut agent) = serde_json::from_slice::<Agent>(data) else {
        return;
    };
    if agent.id.is_empty() {
        agent.id = "fuzz".into();
    }
    let Ok(registry) = AgentRegistry::new([]) else {
        return;
    };
    let id = agent.id.clone();
    if registry.put(agent).is_ok() {
        assert!(
            registry.get(&id).is_some(),
            "{id:?} was accepted but is not there"
        );
    }
}

/// An approval record from storage: decoded or refused, and a decoded one encodes back to
/// the same record.
pub fn approval_record(data: &[u8]) {
    let Ok(record) = serde_json::from_slice::<ApprovalRecord>(data) else {
        return;
    };
    let Ok(encoded) = serde_json::to_vec(&record) else {
        panic!("a decoded record must encode");
    };
    let again = serde_json::from_slice::<ApprovalRecord>(&encoded);
    assert_eq!(again.as_ref().ok(), Some(&record));
}

/// Audit records from storage (a JSON array): the chain is verified without panicking, and a
/// chain that verifies is one whose every record carries its expected hash.
pub fn audit_chain(data: &[u8]) {
    let Ok(records) = serde_json::from_slice::<Vec<AuditRecord>>(data) else {
        return;
    };
    let head = match (records.first(), records.last()) {
        (Some(first), Some(last)) => ChainHead {
            next_seq: last.seq.saturating_add(1),
            hash: last.hash.clone(),
            pruned_before: first.seq,
        },
        _ => ChainHead::default(),
    };
    let report = verify_chain(records.clone(), &head);
    if report.broken.is_none() {
        for record in &records {
            assert_eq!(record.hash, record.expected_hash(), "seq {}", record.seq);
        }
    }
}

/// The token the WebSocket target's scans look for (the seeds carry it).
pub const WEBSOCKET_TOKEN: &str = "Bearer fuzz-token-0123456789";

/// What an origin sends inside a tokened WebSocket (the first byte sets the size of the reads
/// the rest arrives in): scanned without panicking; what is relayed is a prefix of what was
/// sent and never holds the whole token, neither in its bytes nor in the messages a client
/// makes of them ([`client_view`]); whether the connection is cut does not depend on
/// how the stream was cut into reads; uncut, small reads relay what one read does and at most
/// 7 bytes more (the start of the token a read ended in, before the run was long enough to
/// hold: [`ReflectionScan::pipe_hold`]).
pub fn websocket_frames(data: &[u8]) {
    let Some((&size, stream)) = data.split_first() else {
        return;
    };
    let in_reads = websocket_scanned(stream, usize::from(size % 31) + 1);
    let whole = websocket_scanned(stream, stream.len().max(1));
    for (relayed, _) in [&in_reads, &whole] {
        assert!(stream.starts_with(relayed), "relayed out of order");
        let token = WEBSOCKET_TOKEN.as_bytes();
        let has_token = |bytes: &[u8]| bytes.windows(token.len()).any(|w| w == token);
        assert!(!has_token(relayed), "the token was relayed");
        assert!(
            !has_token(&client_view(relayed)),
            "the token was relayed in messages"
        );
    }
    assert_eq!(in_reads.1, whole.1, "cut or not depends on the reads");
    if !whole.1 {
        assert!(
            in_reads.0.starts_with(&whole.0) && in_reads.0.len() - whole.0.len() < 8,
            "small reads relayed {} bytes, one read {}",
            in_reads.0.len(),
            whole.0.len()
        );
    }
}

/// What a WebSocket client makes of `relayed`, written apart from the scan as the check on
/// it: the data frames' payloads joined (fragments and messages alike, unmasked if masked),
/// control frames left out, up to where the bytes stop.
pub fn client_view(relayed: &[u8]) -> Vec<u8> {
    let mut view = Vec::new();
    let mut rest = relayed;
    while rest.len() >= 2 {
        let (first, second) = (rest[0], rest[1]);
        let (len, mut at) = match second & 0x7f {
            126 if rest.len() >= 4 => (u64::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => {
                let mut bytes = [0; 8];
                bytes.copy_from_slice(&rest[2..10]);
                (u64::from_be_bytes(bytes), 10)
            }
            126 | 127 => break,
            short => (u64::from(short), 2),
        };
        let key = match second & 0x80 != 0 {
            true if rest.len() >= at + 4 => {
                at += 4;
                Some([rest[at - 4], rest[at - 3], rest[at - 2], rest[at - 1]])
            }
            true => break,
            false => None,
        };
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| at.checked_add(len))
            .map_or(rest.len(), |end| end.min(rest.len()));
        if first & 0x08 == 0 {
            let payload = rest[at..end].iter().enumerate();
            view.extend(payload.map(|(i, b)| key.map_or(*b, |k| b ^ k[i % 4])));
        }
        rest = &rest[end..];
    }
    view
}

/// `stream` through a WebSocket scan for [`WEBSOCKET_TOKEN`] in reads of `size`: what was
/// relayed, and whether the connection was cut.
pub fn websocket_scanned(stream: &[u8], size: usize) -> (Vec<u8>, bool) {
    let Some(mut token) = ReflectionScan::new(&Secret::new(WEBSOCKET_TOKEN.into())) else {
        return (Vec::new(), false);
    };
    let mut scan = UpgradeScan::new(&mut token, "websocket", Some("websocket"));
    let mut relayed = Vec::new();
    let mut out = Vec::new();
    for read in stream.chunks(size) {
        out.clear();
        if scan
            .pass(bytes::Bytes::copy_from_slice(read), &mut out)
            .is_err()
        {
            return (relayed, true);
        }
        out.iter()
            .for_each(|piece| relayed.extend_from_slice(piece));
    }
    (relayed, false)
}
