//! Replays every committed corpus input through its fuzz target on stable Rust, so inputs
//! that once crashed a parser stay regression tests and CI sees them without a fuzzer.
//! Inputs named `valid-*` are well-formed examples: they must also get past the parser, so
//! the fuzzer's starting points reach the code behind it.

use std::path::{Path, PathBuf};

/// A fuzz target: bytes in, a panic if something that must hold does not.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 9] = [
    ("request_target", tollgate_fuzz::request_target),
    ("arm_path", tollgate_fuzz::arm_path),
    ("policy_set", tollgate_fuzz::policy_set),
    ("policy_tests", tollgate_fuzz::policy_tests),
    ("config", tollgate_fuzz::config),
    ("agent_json", tollgate_fuzz::agent_json),
    ("approval_record", tollgate_fuzz::approval_record),
    ("audit_chain", tollgate_fuzz::audit_chain),
    ("websocket_frames", tollgate_fuzz::websocket_frames),
];

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_input_passes_its_target() {
    for (target, run) in TARGETS {
        let files = inputs(target);
        assert!(!files.is_empty(), "{target} has no seed corpus");
        for file in files {
            let data = std::fs::read(&file).expect("read corpus input");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} panics", file.display());
        }
    }
}

#[test]
fn the_websocket_seeds_named_cut_are_cut() {
    let cut: Vec<PathBuf> = inputs("websocket_frames")
        .into_iter()
        .filter(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cut-"))
        })
        .collect();
    assert!(!cut.is_empty());
    for file in cut {
        let data = std::fs::read(&file).expect("read");
        let (_, was_cut) = tollgate_fuzz::websocket_scanned(&data[1..], 1);
        assert!(was_cut, "{} was not cut", file.display());
    }
}

#[test]
fn the_valid_seeds_get_past_their_parsers() {
    let valid = |target: &str| -> Vec<Vec<u8>> {
        inputs(target)
            .into_iter()
            .filter(|f| {
                f.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("valid-") || n.ends_with(".cedar") || n.ends_with(".toml")
                })
            })
            .map(|f| std::fs::read(f).expect("read"))
            .collect()
    };
    for data in valid("approval_record") {
        assert!(serde_json::from_slice::<tollgate_storage::ApprovalRecord>(&data).is_ok());
    }
    for data in valid("audit_chain") {
        let records: Vec<tollgate_storage::AuditRecord> =
            serde_json::from_slice(&data).expect("records");
        let last = records.last().expect("a record");
        let head = tollgate_storage::ChainHead {
            next_seq: last.seq + 1,
            hash: last.hash.clone(),
            pruned_before: 0,
        };
        let report = tollgate_storage::verify_chain(records.clone(), &head);
        assert_eq!(report.broken, None);
    }
    for data in valid("config") {
        let text = String::from_utf8(data).expect("utf-8");
        if let Err(e) = tollgate_gateway::config::Config::from_toml(&text, "seed") {
            panic!("{e}");
        }
    }
    // A WebSocket stream (after its read-size byte) without the token passes whole.
    for data in valid("websocket_frames") {
        let stream = &data[1..];
        assert_eq!(
            tollgate_fuzz::websocket_scanned(stream, 3),
            (stream.to_vec(), false)
        );
    }
    for data in valid("policy_set") {
        let sources = tollgate_policy::PolicySources {
            origin: "seed".into(),
            files: vec![("seed.cedar".into(), String::from_utf8(data).expect("utf-8"))],
        };
        if let Err(e) = tollgate_policy::PolicyEngine::load(&sources) {
            panic!("{e}");
        }
    }
}
