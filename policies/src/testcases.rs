//! Policy tests: expected outcomes stored beside the policies, run by `tollgate policy test`.
//!
//! A test file is TOML: the agents the cases use, then cases of agent, method and URL with
//! the expected outcome and, optionally, a policy that must be among those that decided it.
//!
//! ```toml
//! [agents.reader]
//! run_mode = "ReadOnly"
//! scopes = ["/subscriptions/s1/resourceGroups/rg1"]
//!
//! [[case]]
//! name = "a ReadOnly agent may read GitHub"
//! agent = "reader"
//! method = "GET"
//! url = "https://api.github.com/repos/octo/hello"
//! expect = "allow"          # allow | deny | needs_approval
//! policy = "reads"          # optional
//! body = false              # optional: true makes a read a write, as the gateway does
//! upgrade = "websocket"     # optional: an upgrade request (action "upgrade")
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::agent::{AgentFacts, RunMode};
use crate::classify::RequestFacts;
use crate::engine::{Decision, Outcome, PolicyEngine};
use crate::target::Target;

/// One agent of a test file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestAgent {
    /// `ReadOnly`, `Review` or `Autonomous`, as in the gateway's config.
    pub run_mode: RunMode,
    /// The Azure RBAC scopes its identity holds, compared with ARM targets' scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Tags, which policies read as the principal's Cedar tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// One `[[case]]`: a request and the decision the policies must make for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    /// What the case checks, in words.
    pub name: String,
    /// An agent of the file's `[agents]`.
    pub agent: String,
    /// The request's HTTP method; anything but GET, HEAD and OPTIONS writes.
    pub method: String,
    /// The request's absolute `http://` or `https://` URL.
    pub url: String,
    /// The outcome the case expects: `allow`, `deny` or `needs_approval`.
    pub expect: Outcome,
    /// A policy that must be among the deciding ones.
    #[serde(default)]
    pub policy: Option<String>,
    /// Whether the request carries a body (a read with one is a write).
    #[serde(default)]
    pub body: bool,
    /// The protocol an upgrade request asks for (its `Upgrade` header).
    #[serde(default)]
    pub upgrade: Option<String>,
}

/// One TOML test file: the agents its cases use, then the cases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// The agents the cases name, by id (`[agents.<id>]`).
    #[serde(default)]
    pub agents: BTreeMap<String, TestAgent>,
    /// The cases, in file order (`[[case]]`).
    #[serde(default, rename = "case")]
    pub cases: Vec<TestCase>,
}

/// Why test files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TestFileError {
    /// A test file, or the directory holding them, could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory that could not be read.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file does not parse as a test file (TOML syntax; unknown, missing or mistyped keys).
    #[error("{path}: {message}")]
    Invalid {
        /// The file that is not valid.
        path: PathBuf,
        /// The TOML parser's message, with line and column.
        message: String,
    },
}

/// One case run: what the engine decided, and whether that was expected.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The path of the test file the case came from.
    pub file: String,
    /// The case as read from the file.
    pub case: TestCase,
    /// What the engine decided (None if the case itself is broken).
    pub decision: Option<Decision>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

/// Reads every `*.toml` test file in `dir` (or the single file `dir`).
pub fn load(path: &Path) -> Result<Vec<(String, TestFile)>, TestFileError> {
    let io = |p: &Path, source| TestFileError::Io {
        path: p.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| io(path, e))? {
            let p = entry.map_err(|e| io(path, e))?.path();
            if p.extension().and_then(|e| e.to_str()) == Some("toml") {
                paths.push(p);
            }
        }
        paths.sort();
    } else {
        paths.push(path.to_path_buf());
    }
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
            let file: TestFile = toml::from_str(&text).map_err(|e| TestFileError::Invalid {
                path: p.clone(),
                message: e.to_string(),
            })?;
            Ok((p.display().to_string(), file))
        })
        .collect()
}

/// Runs every case of `files` against `engine`.
pub fn run(engine: &PolicyEngine, files: &[(String, TestFile)]) -> Vec<CaseResult> {
    let mut results = Vec::new();
    for (name, file) in files {
        for case in &file.cases {
            results.push(run_case(engine, name, file, case));
        }
    }
    results
}

fn run_case(
    engine: &PolicyEngine,
    file_name: &str,
    file: &TestFile,
    case: &TestCase,
) -> CaseResult {
    let broken = |why: String| CaseResult {
        file: file_name.to_string(),
        case: case.clone(),
        decision: None,
        failure: Some(why),
    };
    let Some(agent) = file.agents.get(&case.agent) else {
        return broken(format!(
            "agent {:?} is not in this file's [agents]",
            case.agent
        ));
    };
    let (target, path) = match Target::from_url(&case.url) {
        Ok(parsed) => parsed,
        Err(e) => return broken(format!("bad url: {e}")),
    };
    let facts = AgentFacts {
        revision: 0,
        id: &case.agent,
        run_mode: agent.run_mode,
        scopes: &agent.scopes,
        tags: &agent.tags,
    };
    let mut request = match RequestFacts::new(&case.method, target, &path) {
        Ok(request) => request,
        Err(e) => return broken(format!("bad url: {e}")),
    };
    if case.body {
        request = request.as_write();
    }
    if let Some(protocol) = &case.upgrade {
        request = request.upgrading(protocol);
    }
    let decision = engine.decide(&facts, &request);
    let mut failure = None;
    if decision.outcome != case.expect {
        failure = Some(format!(
            "expected {}, got {} ({})",
            case.expect.as_str(),
            decision.outcome.as_str(),
            decision.reason
        ));
    } else if let Some(policy) = &case.policy {
        if !decision.policies.contains(policy) {
            failure = Some(format!(
                "expected policy {policy:?} among the deciding policies, got {:?}",
                decision.policies
            ));
        }
    }
    CaseResult {
        file: file_name.to_string(),
        case: case.clone(),
        decision: Some(decision),
        failure,
    }
}
