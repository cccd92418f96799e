//! Step 4 of the data path: the decision.
//!
//! A [`PolicyEngine`] is one validated policy set (one version). It is built once per load or
//! reload — schema, policy set, index — and then only read. A decision evaluates Cedar twice:
//! with `context.approved = false`, and, if that denies, with `approved = true`; allowed the
//! second time means *needs approval*. Evaluation errors deny.
//!
//! Cedar evaluates every policy of the set it is given, about a microsecond or more each. So
//! the engine indexes policies by their scope (action; `principal == Agent::"…"`;
//! `resource in Domain::"…"` or `resource == Host::"…"`) and evaluates only the subset whose
//! scope can match the request. A policy whose scope cannot match could neither permit, forbid
//! nor fail, so the subset decides exactly as the whole set would. Subsets are cached per
//! (action, agent, host).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Authorizer, Decision as CedarDecision, Entities, EntityUid, Policy, PolicyId,
    PolicySet, PrincipalConstraint, Request, ResourceConstraint, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::agent::{AgentFacts, RunMode};
use crate::classify::{Action, ArmTarget, RequestFacts};
use crate::decision_cache::DecisionCache;
use crate::entities::{self, domains_of, host_id, ContextAttributes};
use crate::target::Target;

/// The Cedar schema every policy set is validated against (part of the gateway release).
pub const SCHEMA: &str = include_str!("../tollgate.cedarschema");

/// The default policy set shipped with Tollgate (`policies/default/`), used when the gateway
/// is not configured with a policy directory.
pub const DEFAULT_POLICIES: [(&str, &str); 2] = [
    (
        "allowlist.cedar",
        include_str!("../default/allowlist.cedar"),
    ),
    (
        "run-modes.cedar",
        include_str!("../default/run-modes.cedar"),
    ),
];

/// One problem found while loading policies, located as precisely as Cedar allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The policy file (or the schema).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong, for the policy author.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Why a policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The directory or a file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// What could not be read.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The policies are invalid; every problem is listed.
    #[error("invalid policy set {origin}:\n{}", list(.problems))]
    Invalid {
        /// The directory, or "(embedded default)".
        origin: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text of a policy set: `.cedar` files by name.
#[derive(Debug, Clone)]
pub struct PolicySources {
    /// Where the files came from, for messages.
    pub origin: String,
    /// (file name, contents), sorted by name.
    pub files: Vec<(String, String)>,
}

impl PolicySources {
    /// Reads every `*.cedar` file directly in `dir` (sub-directories are not read).
    pub fn from_dir(dir: &Path) -> Result<PolicySources, LoadError> {
        let io = |path: &Path, source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let path = entry.map_err(|e| io(dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("cedar") || !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            files.push((name, text));
        }
        files.sort();
        Ok(PolicySources {
            origin: dir.display().to_string(),
            files,
        })
    }

    /// The default policy set compiled into this build.
    pub fn embedded_default() -> PolicySources {
        PolicySources {
            origin: "(embedded default)".into(),
            files: DEFAULT_POLICIES
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
        }
    }

    /// The content hash of schema and files: the policy set's version.
    pub fn version(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(SCHEMA.as_bytes());
        for (name, text) in &self.files {
            hash.update((name.len() as u64).to_le_bytes());
            hash.update(name.as_bytes());
            hash.update((text.len() as u64).to_le_bytes());
            hash.update(text.as_bytes());
        }
        hex::encode(&hash.finalize()[..8])
    }
}

/// What a decision says to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Forward it.
    Allow,
    /// Refuse it (the gateway answers 403).
    Deny,
    /// Hold it for a person; allowed once approved.
    NeedsApproval,
}

impl Outcome {
    /// `allow`, `deny` or `needs_approval`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::NeedsApproval => "needs_approval",
        }
    }
}

/// A decision and what determined it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// What to do with the request.
    pub outcome: Outcome,
    /// The policies that determined the outcome (the permits that allow, the forbids that
    /// deny; empty when nothing permits).
    pub policies: Vec<String>,
    /// Evaluation errors (any error denies).
    pub errors: Vec<String>,
    /// One sentence for people: a refusal's `detail`, and what `tollgate policy explain` prints.
    pub reason: String,
}

/// Most decisions an engine keeps (each about a kilobyte at most).
const DECISION_CACHE_ENTRIES: usize = 10_000;

/// What of a request a decision reads: all of its facts, its path only when a policy of the
/// set reads it.
struct DecisionInput<'a> {
    request: &'a RequestFacts,
    with_path: bool,
}

impl DecisionInput<'_> {
    /// Everything but the path, which is compared and hashed apart.
    #[allow(clippy::type_complexity)]
    fn facts(
        &self,
    ) -> (
        Action,
        &str,
        &Target,
        &Option<ArmTarget>,
        &Option<String>,
        &Option<String>,
    ) {
        // Every field named, so a fact added to requests cannot be left out of the key.
        let RequestFacts {
            action,
            method,
            target,
            path: _,
            arm,
            tool_call,
            upgrade,
        } = self.request;
        (*action, method, target, arm, tool_call, upgrade)
    }

    fn path(&self) -> Option<&str> {
        self.with_path.then_some(self.request.path.as_str())
    }
}

impl PartialEq for DecisionInput<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.facts() == other.facts() && self.path() == other.path()
    }
}

impl std::hash::Hash for DecisionInput<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.facts().hash(state);
        self.path().hash(state);
    }
}

/// A decision made, with everything it was made from.
struct MadeDecision {
    agent: String,
    revision: u64,
    request: RequestFacts,
    decision: Decision,
}

/// The policies one (action, agent, host) can be decided by, prepared for both passes.
struct Subset {
    /// The first pass (`approved = false`): every applicable policy but the permits
    /// [gated by approval](gated_by_approval), which are false in it.
    first: PolicySet,
    /// The second pass (`approved = true`) needs only the policies whose result can differ or
    /// still matters: forbids that do not read `context.approved` did not fire in the first
    /// pass (or the decision was settled there) and cannot fire now, so they are left out.
    second: PolicySet,
    /// Whether any applicable policy reads `context.approved` at all; if none does, the second
    /// pass would repeat the first.
    second_can_differ: bool,
    /// Every applicable policy, when one pass with `approved = true` decides exactly what the
    /// two would: the first pass has no permit (each is [gated](gated_by_approval)), so it
    /// can only deny, and no forbid reads `context.approved`, so each forbid fires in this
    /// pass exactly when it would in the first. A forbid that fires denies; otherwise a
    /// permit that fires needs a person's approval.
    one_pass: Option<PolicySet>,
    /// The context attributes any applicable policy reads: the only ones built.
    reads: ContextAttributes,
}

/// Whether a policy's result can depend on `context.approved`: it names `approved`, or uses
/// the context as a whole (anything but `context.<attr>` or `context has <attr>`).
fn reads_approval(policy: &Policy) -> bool {
    let text = policy.to_string();
    if text.contains("approved") {
        return true;
    }
    let mut rest = text.as_str();
    while let Some(at) = rest.find("context") {
        let after = rest[at + "context".len()..].trim_start();
        if !(after.starts_with('.') || after.starts_with("has ") || after.starts_with("has\t")) {
            return true;
        }
        rest = &rest[at + "context".len()..];
    }
    false
}

/// The attributes of `context` a policy reads (`context.x`, `context has x`), or `None` when
/// it uses `context` in any other way (whole, which reads everything) or its JSON form is
/// unavailable. Read from Cedar's JSON form of the policy, so comments and strings cannot
/// fool it.
fn context_reads(policy: &Policy) -> Option<BTreeSet<String>> {
    fn uses(value: &serde_json::Value, total: &mut usize, read: &mut BTreeSet<String>) -> usize {
        let mut attributes = 0;
        match value {
            serde_json::Value::Object(map) => {
                if map.get("Var").and_then(|v| v.as_str()) == Some("context") {
                    *total += 1;
                }
                for op in [".", "has"] {
                    if let Some(access) = map.get(op) {
                        let on_context = access
                            .get("left")
                            .and_then(|l| l.get("Var"))
                            .and_then(|v| v.as_str())
                            == Some("context");
                        if let (true, Some(attr)) =
                            (on_context, access.get("attr").and_then(|a| a.as_str()))
                        {
                            read.insert(attr.to_string());
                            attributes += 1;
                        }
                    }
                }
                for v in map.values() {
                    attributes += uses(v, total, read);
                }
            }
            serde_json::Value::Array(items) => {
                for v in items {
                    attributes += uses(v, total, read);
                }
            }
            _ => {}
        }
        attributes
    }
    let json = policy.to_json().ok()?;
    let (mut total, mut read) = (0, BTreeSet::new());
    let attributes = uses(&json, &mut total, &mut read);
    (attributes == total).then_some(read)
}

/// Whether a policy reads nothing of the request but what a CONNECT shows: every use of
/// `context` is `context.port`, `context.scheme` or `context has` one of them.
fn decidable_for_tunnel(policy: &Policy) -> bool {
    context_reads(policy).is_some_and(|read| read.iter().all(|a| a == "port" || a == "scheme"))
}

/// Whether a policy may read the request's path (`context.path`, or `context` whole).
fn reads_path(policy: &Policy) -> bool {
    context_reads(policy).is_none_or(|read| read.contains("path"))
}

/// The attribute `expr` reads when it is `<var>.<attribute>` in Cedar's JSON form.
fn attribute_of<'a>(expr: &'a serde_json::Value, var: &str) -> Option<&'a str> {
    let access = expr.get(".")?;
    (access.get("left")?.get("Var")?.as_str()? == var)
        .then(|| access.get("attr")?.as_str())
        .flatten()
}

/// A string literal in Cedar's JSON form of an expression.
fn literal(expr: &serde_json::Value) -> Option<&str> {
    expr.get("Value")?.as_str()
}

/// The run modes one test of `principal.run_mode == "<mode>"` (or an `||` of such tests)
/// lets through; `None` when `expr` is anything else.
fn tested_run_modes(expr: &serde_json::Value) -> Option<Vec<RunMode>> {
    if let Some(or) = expr.get("||") {
        let mut modes = tested_run_modes(or.get("left")?)?;
        modes.extend(tested_run_modes(or.get("right")?)?);
        return Some(modes);
    }
    let eq = expr.get("==")?;
    let is_run_mode = |side| attribute_of(side, "principal") == Some("run_mode");
    let (left, right) = (eq.get("left")?, eq.get("right")?);
    let value = match (is_run_mode(left), is_run_mode(right)) {
        (true, false) => literal(right)?,
        (false, true) => literal(left)?,
        _ => return None,
    };
    // A name no run mode has: the policy applies to no agent.
    Some(
        [RunMode::ReadOnly, RunMode::Review, RunMode::Autonomous]
            .into_iter()
            .filter(|m| m.as_str() == value)
            .collect(),
    )
}

/// The run modes a policy can apply to (`None`: any). A policy whose first condition is a
/// `when` that starts — its leftmost `&&` operand — with `principal.run_mode == "<mode>"`, or
/// an `||` of such tests, is false for an agent of any other run mode. That test is the
/// first thing evaluated after the scope, and cannot fail (`run_mode` is a required string),
/// so leaving the policy out for those agents changes no decision — not even an evaluation
/// error, which would deny. Read from Cedar's JSON form of the policy, so comments and
/// strings cannot fool it.
fn run_modes(policy: &Policy) -> Option<Vec<RunMode>> {
    let json = policy.to_json().ok()?;
    tested_run_modes(first_when_conjuncts(&json)?.first()?)
}

/// The `&&` operands of a policy's first condition, in the order Cedar evaluates them, when
/// that condition is a `when` (`None` otherwise). `a && b && c` is `(a && b) && c`: its left
/// spine gives `a`, `b`, `c`; an operand that is itself a parenthesized `&&` on the right
/// stays whole.
fn first_when_conjuncts(json: &serde_json::Value) -> Option<Vec<&serde_json::Value>> {
    let first = json.get("conditions")?.as_array()?.first()?;
    if first.get("kind")?.as_str()? != "when" {
        return None;
    }
    let mut node = first.get("body")?;
    let mut later = Vec::new();
    while let Some(and) = node.get("&&") {
        later.push(and.get("right")?);
        node = and.get("left")?;
    }
    later.push(node);
    later.reverse();
    Some(later)
}

/// Whether a permit can only be satisfied once a person approved: its first condition is a
/// `when` whose first `&&` operand is `context.approved`, or whose first operand tests the
/// run mode (which cannot fail, see [`run_modes`]) and second is `context.approved`. With
/// `approved = false` such a permit is false without any error, so the first pass may leave
/// it out and decide exactly as if it had evaluated it.
fn gated_by_approval(policy: &Policy) -> bool {
    let is_approved = |expr| attribute_of(expr, "context") == Some("approved");
    if policy.effect() != cedar_policy::Effect::Permit {
        return false;
    }
    let Ok(json) = policy.to_json() else {
        return false;
    };
    match first_when_conjuncts(&json).as_deref() {
        Some([first, ..]) if is_approved(first) => true,
        Some([mode, second, ..]) => is_approved(second) && tested_run_modes(mode).is_some(),
        _ => false,
    }
}

/// Which requests a policy's scope can match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PrincipalKey {
    Any,
    Agent(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ResourceKey {
    Any,
    Domain(String),
    Host(String),
}

/// The policies' scopes, by action.
#[derive(Debug, Default)]
struct Index {
    /// For each action (in [`Action::ALL`] order): the policies whose scope names it.
    by_action: [Vec<Indexed>; Action::ALL.len()],
}

/// A policy, with what its scope and the start of its condition say it can apply to.
#[derive(Debug)]
struct Indexed {
    principal: PrincipalKey,
    resource: ResourceKey,
    /// `None`: any run mode.
    run_modes: Option<Vec<RunMode>>,
    /// See [`reads_approval`].
    reads_approval: bool,
    /// See [`gated_by_approval`].
    gated: bool,
    /// The context attributes it reads.
    reads: ContextAttributes,
    policy: Policy,
}

impl Indexed {
    fn permit(&self) -> bool {
        self.policy.effect() == cedar_policy::Effect::Permit
    }
}

fn action_slot(action: Action) -> usize {
    match action {
        Action::Read => 0,
        Action::Write => 1,
        Action::Upgrade => 2,
    }
}

impl Index {
    fn new(set: &PolicySet) -> Index {
        let mut index = Index::default();
        for policy in set.policies() {
            let principal = match policy.principal_constraint() {
                PrincipalConstraint::Eq(uid) if uid.type_name().to_string() == "Agent" => {
                    PrincipalKey::Agent(uid.id().unescaped().to_string())
                }
                _ => PrincipalKey::Any,
            };
            let resource = match policy.resource_constraint() {
                ResourceConstraint::In(uid) | ResourceConstraint::IsIn(_, uid) => {
                    resource_key(&uid)
                }
                ResourceConstraint::Eq(uid) => resource_key(&uid),
                _ => ResourceKey::Any,
            };
            let actions: Vec<Action> = match policy.action_constraint() {
                ActionConstraint::Any => Action::ALL.to_vec(),
                ActionConstraint::Eq(uid) => action_of(&uid).into_iter().collect(),
                ActionConstraint::In(uids) => uids.iter().filter_map(action_of).collect(),
            };
            let run_modes = run_modes(policy);
            let (reads_approval, gated) = (reads_approval(policy), gated_by_approval(policy));
            let reads = context_reads(policy).map_or(ContextAttributes::ALL, |read| {
                read.iter().fold(ContextAttributes::NONE, |all, name| {
                    all.and(ContextAttributes::named(name))
                })
            });
            for action in actions {
                index.by_action[action_slot(action)].push(Indexed {
                    principal: principal.clone(),
                    resource: resource.clone(),
                    run_modes: run_modes.clone(),
                    reads_approval,
                    gated,
                    reads,
                    policy: policy.clone(),
                });
            }
        }
        index
    }

    /// The policies that can apply to `action` by `agent` (of `run_mode`) on `host`.
    fn subset(
        &self,
        action: Action,
        agent: &str,
        run_mode: RunMode,
        host: &crate::target::Host,
    ) -> Subset {
        let host_name = host_id(host);
        let domains = domains_of(host);
        let applicable: Vec<&Indexed> = self.by_action[action_slot(action)]
            .iter()
            .filter(|p| {
                let principal_ok = match &p.principal {
                    PrincipalKey::Any => true,
                    PrincipalKey::Agent(id) => id == agent,
                };
                let resource_ok = match &p.resource {
                    ResourceKey::Any => true,
                    ResourceKey::Domain(d) => domains.contains(&d.as_str()),
                    ResourceKey::Host(h) => *h == host_name,
                };
                let run_mode_ok = p
                    .run_modes
                    .as_ref()
                    .is_none_or(|modes| modes.contains(&run_mode));
                principal_ok && resource_ok && run_mode_ok
            })
            .collect();
        let set = |keep: &dyn Fn(&Indexed) -> bool| {
            let kept = applicable.iter().filter(|p| keep(p));
            // Every policy came from a valid set with unique ids, so adding cannot fail.
            PolicySet::from_policies(kept.map(|p| p.policy.clone())).unwrap_or_default()
        };
        let first_permits = applicable.iter().any(|p| p.permit() && !p.gated);
        let forbid_reads_approval = applicable.iter().any(|p| !p.permit() && p.reads_approval);
        Subset {
            first: set(&|p| !p.gated),
            second: set(&|p| p.permit() || p.reads_approval),
            second_can_differ: applicable.iter().any(|p| p.reads_approval),
            one_pass: (!first_permits && !forbid_reads_approval).then(|| set(&|_| true)),
            reads: applicable
                .iter()
                .fold(ContextAttributes::NONE, |all, p| all.and(p.reads)),
        }
    }
}

fn resource_key(uid: &EntityUid) -> ResourceKey {
    let id = uid.id().unescaped().to_string();
    match uid.type_name().to_string().as_str() {
        "Domain" => ResourceKey::Domain(id),
        "Host" => ResourceKey::Host(id),
        _ => ResourceKey::Any,
    }
}

fn action_of(uid: &EntityUid) -> Option<Action> {
    Action::from_id(uid.id().unescaped())
}

/// A validated policy set, ready to decide.
pub struct PolicyEngine {
    schema: Schema,
    /// The whole set (the index evaluates subsets of it).
    all: PolicySet,
    index: Index,
    subsets: moka::sync::Cache<(Action, String, RunMode, String), Arc<Subset>>,
    /// Entities per (agent, agent revision, host): building and checking them costs more
    /// than evaluating a small policy subset.
    entities: moka::sync::Cache<(String, u64, String), Arc<Entities>>,
    /// Decisions made, under the hash of everything a decision reads besides the set itself:
    /// the agent (id and revision, which changes with its run mode, scopes and tags) and the
    /// request's facts (action, method, host, port, scheme, path, ARM target, tool call,
    /// upgrade). An entry keeps its whole key and is used only when the key is equal, so a
    /// colliding hash is a miss. A new set is a new engine, with a cache of its own.
    decisions: DecisionCache<MadeDecision>,
    /// The hash of [`Self::decisions`]' keys, keyed at random per engine.
    decision_hasher: std::collections::hash_map::RandomState,
    /// Whether any policy reads the request's path. When none does, the path is left out of
    /// the decisions' keys: requests to other paths of a host are decided alike, so one
    /// decision serves them all.
    reads_path: bool,
    /// Decisions evaluated (not taken from [`Self::decisions`]).
    evaluated: AtomicU64,
    /// Forbid policies that do not read `context.approved`: when one of them denies the
    /// first pass, it would deny the second too, so the decision is settled.
    settling_forbids: HashSet<String>,
    /// Forbid policies that read nothing of the request a CONNECT does not show (only
    /// `context.port` and `context.scheme`, or no context at all): what they decide for a
    /// tunnel they decide for every request inside it.
    tunnel_forbids: PolicySet,
    version: String,
    origin: String,
    /// policy id → file.
    files: BTreeMap<String, String>,
    warnings: Vec<Problem>,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("version", &self.version)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// The schema, parsed (it is compiled into the build, so a failure is a build defect that
/// every test would show).
pub fn schema() -> Result<Schema, LoadError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(schema, _warnings)| schema)
        .map_err(|e| LoadError::Invalid {
            origin: "tollgate.cedarschema".into(),
            problems: vec![Problem {
                file: "tollgate.cedarschema".into(),
                line: None,
                column: None,
                message: e.to_string(),
            }],
        })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

fn problem_at(file: &str, text: &str, diagnostic: &dyn Diagnostic, message: String) -> Problem {
    let offset = diagnostic
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    let (line, column) = match offset {
        Some(o) => {
            let (l, c) = line_col(text, o);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    Problem {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

impl PolicyEngine {
    /// Parses, checks and validates (strictly, against [`SCHEMA`]) a policy set. Every
    /// problem is reported, with file, line and reason.
    pub fn load(sources: &PolicySources) -> Result<PolicyEngine, LoadError> {
        let schema = schema()?;
        let mut problems = Vec::new();
        let mut combined = PolicySet::new();
        let mut files = BTreeMap::new();
        let mut texts = HashMap::new();
        if sources.files.is_empty() {
            problems.push(Problem {
                file: sources.origin.clone(),
                line: None,
                column: None,
                message: "no .cedar files: a policy set without policies would deny everything"
                    .into(),
            });
        }
        for (file, text) in &sources.files {
            texts.insert(file.clone(), text.clone());
            let parsed = match PolicySet::from_str(text) {
                Ok(set) => set,
                Err(errors) => {
                    for e in errors.iter() {
                        problems.push(problem_at(file, text, e, e.to_string()));
                    }
                    continue;
                }
            };
            if parsed.templates().next().is_some() {
                problems.push(Problem {
                    file: file.clone(),
                    line: None,
                    column: None,
                    message: "policy templates are not supported; write static policies".into(),
                });
            }
            // Cedar names parsed policies policy0, policy1, … in file order.
            let mut in_order: Vec<&Policy> = parsed.policies().collect();
            in_order.sort_by_key(|p| {
                policy_id(p.id())
                    .trim_start_matches("policy")
                    .parse::<usize>()
                    .unwrap_or(usize::MAX)
            });
            for (n, policy) in in_order.into_iter().enumerate() {
                let Some(id) = policy
                    .annotation("id")
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                else {
                    problems.push(Problem {
                        file: file.clone(),
                        line: None,
                        column: None,
                        message: format!(
                            "policy #{} has no @id(\"…\") annotation: every policy needs a unique id",
                            n + 1
                        ),
                    });
                    continue;
                };
                if let Some(other) = files.get(id) {
                    problems.push(Problem {
                        file: file.clone(),
                        line: None,
                        column: None,
                        message: format!("policy id {id:?} is also used in {other}"),
                    });
                    continue;
                }
                files.insert(id.to_string(), file.clone());
                if let Err(e) = combined.add(policy.new_id(PolicyId::new(id))) {
                    problems.push(Problem {
                        file: file.clone(),
                        line: None,
                        column: None,
                        message: e.to_string(),
                    });
                }
            }
        }
        let mut warnings = Vec::new();
        if problems.is_empty() {
            let result = Validator::new(schema.clone()).validate(&combined, ValidationMode::Strict);
            for e in result.validation_errors() {
                let id = policy_id(e.policy_id());
                let file = files
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| sources.origin.clone());
                let text = texts.get(&file).map(String::as_str).unwrap_or("");
                problems.push(problem_at(&file, text, e, format!("policy {id:?}: {e}")));
            }
            for w in result.validation_warnings() {
                let id = policy_id(w.policy_id());
                let file = files
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| sources.origin.clone());
                let text = texts.get(&file).map(String::as_str).unwrap_or("");
                warnings.push(problem_at(&file, text, w, format!("policy {id:?}: {w}")));
            }
        }
        if !problems.is_empty() {
            return Err(LoadError::Invalid {
                origin: sources.origin.clone(),
                problems,
            });
        }
        let settling_forbids = combined
            .policies()
            .filter(|p| p.effect() == cedar_policy::Effect::Forbid && !reads_approval(p))
            .map(|p| policy_id(p.id()))
            .collect();
        let tunnel_forbids = PolicySet::from_policies(
            combined
                .policies()
                .filter(|p| p.effect() == cedar_policy::Effect::Forbid && decidable_for_tunnel(p))
                .cloned(),
        )
        .unwrap_or_default();
        let path_read = combined.policies().any(reads_path);
        Ok(PolicyEngine {
            reads_path: path_read,
            evaluated: AtomicU64::new(0),
            tunnel_forbids,
            index: Index::new(&combined),
            all: combined,
            entities: moka::sync::Cache::new(10_000),
            decisions: DecisionCache::new(DECISION_CACHE_ENTRIES),
            decision_hasher: std::collections::hash_map::RandomState::new(),
            settling_forbids,
            schema,
            subsets: moka::sync::Cache::new(10_000),
            version: sources.version(),
            origin: sources.origin.clone(),
            files,
            warnings,
        })
    }

    /// The content hash of the set.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Where the set was loaded from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Policy ids and the files they are in.
    pub fn policies(&self) -> &BTreeMap<String, String> {
        &self.files
    }

    /// Validator warnings (not fatal).
    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }

    /// Decides one request. Never fails: anything unexpected denies, with the error listed.
    /// The same agent (same revision) asking the same thing gets the decision made before.
    pub fn decide(&self, agent: &AgentFacts<'_>, request: &RequestFacts) -> Decision {
        use std::hash::BuildHasher;
        let read = DecisionInput {
            request,
            with_path: self.reads_path,
        };
        let key = self
            .decision_hasher
            .hash_one((agent.id, agent.revision, &read));
        let made_before = self.decisions.get(key, |made| {
            let made_from = DecisionInput {
                request: &made.request,
                with_path: self.reads_path,
            };
            (made.revision == agent.revision && made.agent == agent.id && made_from == read)
                .then(|| made.decision.clone())
        });
        if let Some(decision) = made_before {
            return decision;
        }
        let decision = self.decide_uncached(agent, request);
        // An evaluation error is not kept: it may say more about the moment than the input.
        if decision.errors.is_empty() {
            self.decisions.insert(
                key,
                MadeDecision {
                    agent: agent.id.to_string(),
                    revision: agent.revision,
                    request: request.clone(),
                    decision: decision.clone(),
                },
            );
        }
        decision
    }

    /// How many decisions this engine evaluated, rather than took from its cache.
    pub fn evaluated(&self) -> u64 {
        self.evaluated.load(Ordering::Relaxed)
    }

    /// Decides one request without the decision cache.
    pub fn decide_uncached(&self, agent: &AgentFacts<'_>, request: &RequestFacts) -> Decision {
        self.evaluated.fetch_add(1, Ordering::Relaxed);
        let subset = self.applicable(agent, request);
        self.evaluate(agent, request, &subset, true)
            .unwrap_or_else(|error| denied_by_error(vec![error]))
    }

    /// Decides the plain way — every policy of the set, both passes, no shortcuts — as the
    /// reference the indexed decision is checked against. Like it, a first pass denied by a
    /// forbid that does not read `context.approved` is that forbid's deny: that is what a
    /// decision is, not a shortcut.
    pub fn decide_without_index(&self, agent: &AgentFacts<'_>, request: &RequestFacts) -> Decision {
        let everything = Subset {
            first: self.all.clone(),
            second: self.all.clone(),
            second_can_differ: true,
            one_pass: None,
            reads: ContextAttributes::ALL,
        };
        self.evaluate(agent, request, &everything, false)
            .unwrap_or_else(|error| denied_by_error(vec![error]))
    }

    /// Decides a tunnel before anything inside it is seen: `Some` deny when every request
    /// `agent` could send through a CONNECT to `target` is denied whatever its method and
    /// path, so the CONNECT itself can be refused; `None` when the requests inside must be
    /// decided one by one. Only forbids that read nothing a CONNECT does not show are
    /// evaluated (so this never refuses a tunnel a request inside it could use), for every
    /// action (read, write, upgrade); each must be forbidden.
    pub fn decide_tunnel(&self, agent: &AgentFacts<'_>, target: &Target) -> Option<Decision> {
        if self.tunnel_forbids.is_empty() {
            return None;
        }
        let entities = self
            .entities
            .try_get_with(
                (agent.id.to_string(), agent.revision, host_id(&target.host)),
                || entities::entities(agent, &target.host, &self.schema).map(Arc::new),
            )
            .ok()?;
        let authorizer = Authorizer::new();
        // What fired for each action: the policies named are those that deny every action,
        // or (when no one policy does) all that fired.
        let mut every: Option<Vec<String>> = None;
        let mut any = Vec::new();
        for action in Action::ALL {
            // The method, path and protocol are placeholders: the policies evaluated here do
            // not read them.
            let facts = RequestFacts::new("GET", target.clone(), "/").ok()?;
            let facts = match action {
                Action::Read => facts,
                Action::Write => facts.as_write(),
                Action::Upgrade => facts.upgrading("websocket"),
            };
            let context = entities::context(&facts, false, ContextAttributes::ALL).ok()?;
            let request = Request::new(
                entities::agent_uid(agent.id),
                entities::action_uid(facts.action),
                entities::host_uid(&target.host),
                context,
                None,
            )
            .ok()?;
            let response = authorizer.is_authorized(&request, &self.tunnel_forbids, &entities);
            let fired = ids(&response);
            if fired.is_empty() {
                return None;
            }
            every = Some(match every {
                None => fired.clone(),
                Some(before) => before.into_iter().filter(|id| fired.contains(id)).collect(),
            });
            any.extend(fired);
        }
        let mut forbids = every.filter(|e| !e.is_empty()).unwrap_or(any);
        forbids.sort();
        forbids.dedup();
        Some(Decision {
            outcome: Outcome::Deny,
            reason: format!(
                "denied by {} for every request to {}:{}",
                forbids.join(", "),
                target.host,
                target.port
            ),
            policies: forbids,
            errors: Vec::new(),
        })
    }

    fn applicable(&self, agent: &AgentFacts<'_>, request: &RequestFacts) -> Arc<Subset> {
        let host = &request.target.host;
        let key = (
            request.action,
            agent.id.to_string(),
            agent.run_mode,
            host_id(host),
        );
        self.subsets.get_with(key, || {
            Arc::new(
                self.index
                    .subset(request.action, agent.id, agent.run_mode, host),
            )
        })
    }

    /// The two passes. A first-pass deny by a forbid that does not read `context.approved`
    /// settles the decision. With `shortcuts`, the second pass runs only when it can change
    /// the outcome, on the policies that matter to it, and a decision the first pass could
    /// only deny is made in one.
    fn evaluate(
        &self,
        agent: &AgentFacts<'_>,
        request: &RequestFacts,
        subset: &Subset,
        shortcuts: bool,
    ) -> Result<Decision, String> {
        let host = &request.target.host;
        let entities = self
            .entities
            .try_get_with(
                (agent.id.to_string(), agent.revision, host_id(host)),
                || entities::entities(agent, host, &self.schema).map(Arc::new),
            )
            .map_err(|e| e.to_string())?;
        let principal = entities::agent_uid(agent.id);
        let action = entities::action_uid(request.action);
        let resource = entities::host_uid(host);
        let authorizer = Authorizer::new();
        // The context is built by `entities::context` in one fixed shape, which a unit test
        // checks against the schema; checking every request again would cost about 2 µs per
        // pass. A value of the wrong type would still be an evaluation error, and deny.
        let pass =
            |approved: bool, policies: &PolicySet| -> Result<cedar_policy::Response, String> {
                let context = entities::context(request, approved, subset.reads)?;
                let schema = (!shortcuts).then_some(&self.schema);
                let cedar_request = Request::new(
                    principal.clone(),
                    action.clone(),
                    resource.clone(),
                    context,
                    schema,
                )
                .map_err(|e| format!("request: {e}"))?;
                Ok(authorizer.is_authorized(&cedar_request, policies, entities.as_ref()))
            };

        if let (true, Some(whole)) = (shortcuts, &subset.one_pass) {
            let response = pass(true, whole)?;
            // An error is rare; the two passes below report it as they always do.
            if errors(&response).is_empty() {
                let fired = ids(&response);
                return Ok(match response.decision() {
                    CedarDecision::Allow => needs_approval(fired),
                    CedarDecision::Deny => denied(agent, request, fired),
                });
            }
        }
        let first = pass(false, &subset.first)?;
        let first_errors = errors(&first);
        if !first_errors.is_empty() {
            return Ok(denied_by_error(first_errors));
        }
        let first_ids = ids(&first);
        if first.decision() == CedarDecision::Allow {
            return Ok(Decision {
                outcome: Outcome::Allow,
                reason: format!("allowed by {}", first_ids.join(", ")),
                policies: first_ids,
                errors: Vec::new(),
            });
        }
        let settled = first_ids
            .iter()
            .any(|id| self.settling_forbids.contains(id));
        // A forbid that fired without reading `approved` would fire again: the request is
        // denied by it, whatever an approval would permit (or fail to evaluate).
        if settled || (shortcuts && !subset.second_can_differ) {
            return Ok(denied(agent, request, first_ids));
        }
        let second = pass(true, &subset.second)?;
        let second_errors = errors(&second);
        if !second_errors.is_empty() {
            return Ok(denied_by_error(second_errors));
        }
        let second_ids = ids(&second);
        if second.decision() == CedarDecision::Allow {
            return Ok(needs_approval(second_ids));
        }
        Ok(denied(
            agent,
            request,
            if first_ids.is_empty() {
                second_ids
            } else {
                first_ids
            },
        ))
    }
}

/// A policy's id as its `@id` annotation gave it. (`PolicyId`'s `Display` escapes it, so it
/// would not match the annotation for an id with a quote or a backslash, and costs more.)
fn policy_id(id: &PolicyId) -> String {
    AsRef::<str>::as_ref(id).to_string()
}

/// The deciding policy ids of a response, sorted.
fn ids(response: &cedar_policy::Response) -> Vec<String> {
    let mut ids: Vec<String> = response.diagnostics().reason().map(policy_id).collect();
    ids.sort();
    ids
}

fn errors(response: &cedar_policy::Response) -> Vec<String> {
    response
        .diagnostics()
        .errors()
        .map(|e| e.to_string())
        .collect()
}

fn denied_by_error(errors: Vec<String>) -> Decision {
    Decision {
        outcome: Outcome::Deny,
        policies: Vec::new(),
        reason: format!(
            "denied: a policy failed to evaluate, and errors deny ({})",
            errors.join("; ")
        ),
        errors,
    }
}

fn needs_approval(permits: Vec<String>) -> Decision {
    Decision {
        outcome: Outcome::NeedsApproval,
        reason: format!(
            "needs a person's approval: {} permit(s) it once approved",
            permits.join(", ")
        ),
        policies: permits,
        errors: Vec::new(),
    }
}

fn denied(agent: &AgentFacts<'_>, request: &RequestFacts, forbids: Vec<String>) -> Decision {
    let reason = if forbids.is_empty() {
        format!(
            "denied: no policy permits a {} by {} agent {:?} to {}",
            request.action.as_str(),
            agent.run_mode.as_str(),
            agent.id,
            request.target.host
        )
    } else {
        format!("denied by {}", forbids.join(", "))
    };
    Decision {
        outcome: Outcome::Deny,
        policies: forbids,
        errors: Vec::new(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::RunMode;
    use crate::target::Target;

    fn sources(files: &[(&str, &str)]) -> PolicySources {
        PolicySources {
            origin: "test".into(),
            files: files
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
        }
    }

    fn problems(files: &[(&str, &str)]) -> Vec<Problem> {
        match PolicyEngine::load(&sources(files)) {
            Err(LoadError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn request(method: &str, url: &str) -> RequestFacts {
        let (target, path) = Target::from_url(url).unwrap();
        RequestFacts::new(method, target, &path).unwrap()
    }

    #[test]
    fn a_tunnel_is_refused_only_when_every_request_inside_it_would_be() {
        let engine = PolicyEngine::load(&sources(&[(
            "t.cedar",
            "@id(\"allow-all\")\npermit (principal, action, resource);\n\
             @id(\"only-example\")\nforbid (principal, action, resource) unless { resource in Domain::\"example.com\" };\n\
             @id(\"no-port-9\")\nforbid (principal, action, resource) when { context.port == 9 };\n\
             @id(\"no-admin\")\nforbid (principal, action, resource) when { context.path == \"/admin\" };\n\
             @id(\"no-writes-to-ro\")\nforbid (principal, action == Action::\"write\", resource == Host::\"ro.example.com\");\n\
             @id(\"sneaky\")\nforbid (principal, action, resource) when { context.port == 8 && context.method == \"GET\" };\n\
             @id(\"no-http-but-upgrades\")\nforbid (principal, action in [Action::\"read\", Action::\"write\"], resource == Host::\"ws.example.com\");\n\
             @id(\"no-upgrades-to-evil\")\nforbid (principal, action == Action::\"upgrade\", resource == Host::\"evil.test\");\n",
        )]))
        .unwrap();
        let agent = AgentFacts {
            id: "a",
            revision: 1,
            run_mode: RunMode::Autonomous,
            scopes: &[],
            tags: &Default::default(),
        };
        let tunnel = |authority: &str| {
            engine
                .decide_tunnel(&agent, &Target::from_connect_authority(authority).unwrap())
                .map(|d| d.policies)
        };
        // The policy that denies every action is named, not one that denies only some.
        assert_eq!(tunnel("evil.test:443"), Some(vec!["only-example".into()]));
        assert_eq!(tunnel("example.com:9"), Some(vec!["no-port-9".into()]));
        // Decided inside the tunnel: the path, a write-only forbid, the method.
        assert_eq!(tunnel("example.com:443"), None);
        assert_eq!(tunnel("ro.example.com:443"), None);
        assert_eq!(tunnel("example.com:8"), None);
        // Reads and writes are forbidden there, but an upgrade is not.
        assert_eq!(tunnel("ws.example.com:443"), None);
    }

    #[test]
    fn the_default_set_passes_its_own_test_file() {
        let engine = PolicyEngine::load(&PolicySources::embedded_default()).unwrap();
        let files =
            crate::testcases::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests")))
                .unwrap();
        let results = crate::testcases::run(&engine, &files);
        assert!(
            results.len() >= 20,
            "the default test file covers the model"
        );
        let failures: Vec<String> = results
            .iter()
            .filter_map(|r| r.failure.as_ref().map(|f| format!("{}: {f}", r.case.name)))
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn embedded_default_matches_the_policy_directory() {
        let dir =
            PolicySources::from_dir(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/default")))
                .unwrap();
        assert_eq!(
            dir.files,
            PolicySources::embedded_default().files,
            "DEFAULT_POLICIES lists every file of policies/default"
        );
        assert_eq!(dir.version(), PolicySources::embedded_default().version());
    }

    #[test]
    fn a_syntax_error_is_reported_with_file_and_line() {
        let p = problems(&[("a.cedar", "@id(\"ok\")\npermit (principal, action, resource);\n\n@id(\"bad\")\npermit (principal, action, resource) when { ;\n")]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].file, "a.cedar");
        assert_eq!(p[0].line, Some(5), "{p:?}");
    }

    #[test]
    fn a_type_error_is_reported_with_file_line_and_policy() {
        let p = problems(&[
            ("ok.cedar", "@id(\"fine\")\npermit (principal, action, resource);\n"),
            ("typo.cedar", "\n\n@id(\"typo\")\npermit (principal, action, resource)\nwhen { principal.run_mod == \"Review\" };\n"),
        ]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].file, "typo.cedar");
        assert_eq!(p[0].line, Some(5), "{p:?}");
        assert!(
            p[0].message.contains("typo") && p[0].message.contains("run_mod"),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn ids_are_required_and_unique_and_every_problem_is_listed() {
        let p = problems(&[
            ("a.cedar", "permit (principal, action, resource);\n"),
            (
                "b.cedar",
                "@id(\"x\") permit (principal, action, resource);\n",
            ),
            (
                "c.cedar",
                "@id(\"x\") forbid (principal, action, resource);\n",
            ),
        ]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].message.contains("no @id"), "{}", p[0]);
        assert!(p[1].message.contains("also used in b.cedar"), "{}", p[1]);
        let unknown = problems(&[(
            "u.cedar",
            "@id(\"u\") permit (principal == User::\"x\", action, resource);",
        )]);
        assert!(unknown[0].message.contains("User"), "{}", unknown[0]);
        assert!(!problems(&[]).is_empty(), "an empty set is refused");
    }

    #[test]
    fn a_policy_is_named_by_its_id_as_written() {
        let text = r#"@id("say \"hi\" \\ there") permit (principal, action, resource);"#;
        let engine = PolicyEngine::load(&sources(&[("p.cedar", text)])).unwrap();
        let tags = BTreeMap::new();
        let agent = AgentFacts {
            revision: 1,
            id: "a",
            run_mode: RunMode::Review,
            scopes: &[],
            tags: &tags,
        };
        let d = engine.decide(&agent, &request("GET", "https://example.com/"));
        assert_eq!(d.policies, [r#"say "hi" \ there"#]);
        assert!(engine.files.contains_key(r#"say "hi" \ there"#));
    }

    #[test]
    fn errors_deny() {
        // Strict validation rules out most runtime errors; an integer overflow remains. The
        // erroring permit must not allow, and the decision lists the error.
        let engine = PolicyEngine::load(&sources(&[(
            "t.cedar",
            "@id(\"overflow\") permit (principal, action, resource) when { context.port * 9223372036854775807 > 0 };\n\
             @id(\"fine\") permit (principal, action, resource);",
        )]))
        .unwrap();
        let tags = BTreeMap::new();
        let agent = AgentFacts {
            revision: 0,
            id: "a",
            run_mode: RunMode::Autonomous,
            scopes: &[],
            tags: &tags,
        };
        let d = engine.decide(&agent, &request("GET", "https://example.com/"));
        assert_eq!(
            d.outcome,
            Outcome::Deny,
            "an error denies even when another policy permits: {d:?}"
        );
        assert!(d.errors.iter().any(|e| e.contains("overflow")), "{d:?}");
    }

    #[test]
    fn the_index_decides_exactly_like_the_whole_set() {
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(&format!(
                "@id(\"d{i}\") permit (principal, action == Action::\"read\", resource in Domain::\"svc{i}.test\");\n\
                 @id(\"a{i}\") permit (principal == Agent::\"agent{i}\", action == Action::\"write\", resource) when {{ context.approved }};\n\
                 @id(\"h{i}\") forbid (principal, action, resource == Host::\"blocked{i}.svc{i}.test\");\n"
            ));
        }
        text.push_str("@id(\"any\") permit (principal, action in [Action::\"read\", Action::\"write\"], resource in Domain::\"open.test\") when { principal.run_mode == \"Autonomous\" };\n");
        text.push_str("@id(\"ws\") permit (principal, action == Action::\"upgrade\", resource in Domain::\"svc7.test\") when { context has upgrade && context.upgrade == \"websocket\" };\n");
        // Run-mode tests where the index can use them (leftmost in the first `when`) and
        // where it must not: after a test that fails (an overflow, which denies), in a later
        // condition, in `unless`.
        text.push_str("@id(\"rm-first\") permit (principal, action == Action::\"write\", resource in Domain::\"svc7.test\") when { principal.run_mode == \"Review\" && context.approved };\n");
        text.push_str("@id(\"rm-or\") forbid (principal, action, resource in Domain::\"svc39.test\") when { (\"ReadOnly\" == principal.run_mode || principal.run_mode == \"Review\") && context.path == \"/\" };\n");
        text.push_str("@id(\"rm-none\") permit (principal, action, resource in Domain::\"svc0.test\") when { principal.run_mode == \"Nobody\" };\n");
        text.push_str("@id(\"rm-after-error\") permit (principal, action == Action::\"write\", resource in Domain::\"svc0.test\") when { context.port * 9223372036854775807 > 0 && principal.run_mode == \"Autonomous\" };\n");
        text.push_str("@id(\"rm-second\") permit (principal, action == Action::\"read\", resource in Domain::\"svc39.test\") when { context.port * 9223372036854775807 > 0 } when { principal.run_mode == \"Review\" };\n");
        text.push_str("@id(\"rm-unless\") forbid (principal, action == Action::\"read\", resource in Domain::\"svc99.test\") unless { principal.run_mode == \"Review\" };\n");
        // Permits gated by approval (left out of the first pass) and ones that are not: the
        // gate after a test that fails; an error after the gate (only the second pass sees
        // it); a forbid that reads `approved` (no single pass then).
        text.push_str("@id(\"gate-after-error\") permit (principal, action == Action::\"write\", resource in Domain::\"svc99.test\") when { context.port * 9223372036854775807 > 0 && context.approved };\n");
        text.push_str("@id(\"svc99-writes\") permit (principal, action == Action::\"write\", resource in Domain::\"svc99.test\") when { principal.run_mode == \"Autonomous\" };\n");
        text.push_str("@id(\"error-after-gate\") permit (principal, action == Action::\"write\", resource in Domain::\"svc0.test\") when { context.approved && context.port * 9223372036854775807 > 0 };\n");
        // A forbid that settles a request an approval would permit, had the permit not failed.
        text.push_str("@id(\"error-after-gate-39\") permit (principal, action == Action::\"write\", resource in Domain::\"svc39.test\") when { context.approved && context.port * 9223372036854775807 > 0 };\n");
        text.push_str("@id(\"no-deletes-39\") forbid (principal, action == Action::\"write\", resource in Domain::\"svc39.test\") when { context.method == \"DELETE\" };\n");
        // The same where one pass would decide (Review and ReadOnly agents on open.test): its
        // error sends the decision back to the two passes.
        text.push_str("@id(\"error-after-gate-open\") permit (principal, action == Action::\"write\", resource in Domain::\"open.test\") when { context.approved && context.port * 9223372036854775807 > 0 };\n");
        text.push_str("@id(\"no-open-deletes\") forbid (principal, action == Action::\"write\", resource in Domain::\"open.test\") when { context.method == \"DELETE\" };\n");
        text.push_str("@id(\"approved-deletes\") forbid (principal, action == Action::\"write\", resource in Domain::\"svc39.test\") when { context.approved && context.method == \"DELETE\" };\n");
        let engine = PolicyEngine::load(&sources(&[("gen.cedar", &text)])).unwrap();
        let tags = BTreeMap::new();
        for agent_n in [0, 7, 39, 99] {
            let id = format!("agent{agent_n}");
            for (revision, mode) in [
                (1, RunMode::ReadOnly),
                (2, RunMode::Autonomous),
                (3, RunMode::Review),
            ] {
                let agent = AgentFacts {
                    revision,
                    id: &id,
                    run_mode: mode,
                    scopes: &[],
                    tags: &tags,
                };
                for host_n in [0, 7, 39, 99] {
                    for url in [
                        format!("https://svc{host_n}.test/"),
                        format!("https://x.svc{host_n}.test/"),
                        format!("https://blocked{host_n}.svc{host_n}.test/"),
                        "https://a.open.test/".to_string(),
                        "https://svc7.test.evil/".to_string(),
                    ] {
                        for method in ["GET", "POST", "DELETE", "UPGRADE"] {
                            let r = match method {
                                "UPGRADE" => request("GET", &url).upgrading("websocket"),
                                _ => request(method, &url),
                            };
                            let indexed = engine.decide(&agent, &r);
                            let whole = engine.decide_without_index(&agent, &r);
                            assert_eq!(
                                (
                                    indexed.outcome,
                                    &indexed.policies,
                                    indexed.errors.is_empty()
                                ),
                                (whole.outcome, &whole.policies, whole.errors.is_empty()),
                                "{id} {mode:?} {method} {url}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_run_modes_a_policy_can_apply_to_are_read_only_from_the_start_of_its_first_when() {
        let modes = |text: &str| {
            let set = PolicySet::from_str(text).unwrap();
            let policy = set.policies().next().unwrap();
            run_modes(policy)
        };
        let scope = "permit (principal, action, resource)";
        assert_eq!(
            modes(&format!(
                "{scope} when {{ principal.run_mode == \"Review\" && context.approved }};"
            )),
            Some(vec![RunMode::Review])
        );
        assert_eq!(
            modes(&format!("{scope} when {{ (principal.run_mode == \"ReadOnly\" || \"Autonomous\" == principal.run_mode) && true }};")),
            Some(vec![RunMode::ReadOnly, RunMode::Autonomous])
        );
        assert_eq!(
            modes(&format!(
                "{scope} when {{ principal.run_mode == \"Nobody\" }};"
            )),
            Some(vec![])
        );
        for any in [
            format!("{scope};"),
            format!("{scope} when {{ context.approved && principal.run_mode == \"Review\" }};"),
            format!("{scope} when {{ principal.run_mode == \"Review\" || context.approved }};"),
            format!("{scope} when {{ principal.run_mode != \"Review\" }};"),
            format!("{scope} unless {{ principal.run_mode == \"Review\" }};"),
            format!(
                "{scope} when {{ context.approved }} when {{ principal.run_mode == \"Review\" }};"
            ),
            format!("{scope} when {{ principal.tags.run_mode == \"Review\" }};"),
        ] {
            assert_eq!(modes(&any), None, "{any}");
        }
    }

    #[test]
    fn only_a_permit_that_tests_approval_before_anything_that_can_fail_is_gated() {
        let gated = |text: &str| {
            let set = PolicySet::from_str(text).unwrap();
            let gated = gated_by_approval(set.policies().next().unwrap());
            gated
        };
        let scope = "permit (principal, action, resource)";
        for yes in [
            format!("{scope} when {{ context.approved }};"),
            format!("{scope} when {{ context.approved && context.port > 1 }};"),
            format!("{scope} when {{ principal.run_mode == \"Review\" && context.approved }};"),
            format!("{scope} when {{ principal.run_mode == \"Review\" && context.approved && context.path == \"/\" }};"),
            format!("{scope} when {{ context.approved }} unless {{ context.port == 1 }};"),
        ] {
            assert!(gated(&yes), "{yes}");
        }
        for no in [
            format!("{scope};"),
            format!(
                "{scope} when {{ context.port * 9223372036854775807 > 0 && context.approved }};"
            ),
            format!("{scope} when {{ principal.scopes.contains(\"x\") && context.approved }};"),
            format!("{scope} when {{ context.approved || context.port == 1 }};"),
            format!("{scope} when {{ !context.approved }};"),
            format!("{scope} when {{ context.port == 1 }} when {{ context.approved }};"),
            format!("{scope} unless {{ context.approved }};"),
            "forbid (principal, action, resource) when { context.approved };".to_string(),
        ] {
            assert!(!gated(&no), "{no}");
        }
    }

    #[test]
    fn a_write_that_needs_approval_is_decided_in_one_pass_by_the_default_set() {
        let engine = PolicyEngine::load(&PolicySources::embedded_default()).unwrap();
        let host = crate::target::Host::parse("api.github.com").unwrap();
        let subset = engine
            .index
            .subset(Action::Write, "a", RunMode::Review, &host);
        assert!(subset.one_pass.is_some());
        // An Autonomous agent's write may be allowed without approval: two passes.
        let subset = engine
            .index
            .subset(Action::Write, "a", RunMode::Autonomous, &host);
        assert!(subset.one_pass.is_none());
    }

    #[test]
    fn a_decision_made_before_is_reused_only_for_the_same_agent_revision_and_request() {
        let text = "@id(\"reads\") permit (principal, action == Action::\"read\", resource) when { principal.run_mode == \"Autonomous\" };\n\
                    @id(\"no-secret\") forbid (principal, action, resource) when { context.path == \"/secret\" };\n\
                    @id(\"no-tc\") forbid (principal, action, resource) when { context has tool_call && context.tool_call == \"tc-bad\" };\n";
        let engine = PolicyEngine::load(&sources(&[("p.cedar", text)])).unwrap();
        let tags = BTreeMap::new();
        let agent = |revision, run_mode| AgentFacts {
            id: "a",
            revision,
            run_mode,
            scopes: &[],
            tags: &tags,
        };
        let decide = |agent: AgentFacts<'_>, request: &RequestFacts| {
            let made = engine.decide(&agent, request);
            // Whatever the cache holds, it is what the policies say.
            let fresh = engine.decide_uncached(&agent, request);
            assert_eq!(made, fresh, "{request:?}");
            (made.outcome, made.policies)
        };
        let read = request("GET", "https://x.test/ok");
        let allowed = (Outcome::Allow, vec!["reads".to_string()]);
        assert_eq!(decide(agent(1, RunMode::Autonomous), &read), allowed);
        assert_eq!(decide(agent(1, RunMode::Autonomous), &read), allowed);
        // The agent's next revision (now ReadOnly) is decided anew.
        assert_eq!(decide(agent(2, RunMode::ReadOnly), &read).0, Outcome::Deny);
        // So is another path, and another tool call.
        let secret = request("GET", "https://x.test/secret");
        assert_eq!(
            decide(agent(1, RunMode::Autonomous), &secret),
            (Outcome::Deny, vec!["no-secret".to_string()])
        );
        let mut good = read.clone();
        good.tool_call = Some("tc-good".into());
        let mut bad = read.clone();
        bad.tool_call = Some("tc-bad".into());
        assert_eq!(decide(agent(1, RunMode::Autonomous), &good), allowed);
        assert_eq!(
            decide(agent(1, RunMode::Autonomous), &bad),
            (Outcome::Deny, vec!["no-tc".to_string()])
        );
        assert_eq!(decide(agent(1, RunMode::Autonomous), &good), allowed);
        // Another agent with the same revision number is another key.
        let other = AgentFacts {
            id: "b",
            ..agent(1, RunMode::ReadOnly)
        };
        assert_eq!(decide(other, &read).0, Outcome::Deny);
        assert_eq!(decide(agent(1, RunMode::Autonomous), &read), allowed);
    }

    #[test]
    fn the_path_is_in_a_decisions_key_only_when_a_policy_reads_it() {
        let tags = BTreeMap::new();
        let agent = AgentFacts {
            id: "a",
            revision: 1,
            run_mode: RunMode::Autonomous,
            scopes: &[],
            tags: &tags,
        };
        let reads = "@id(\"reads\") permit (principal, action == Action::\"read\", resource);\n";
        let (a, b) = (
            request("GET", "https://x.test/a"),
            request("GET", "https://x.test/b"),
        );
        for (extra, path_read) in [
            ("", false),
            ("@id(\"ports\") forbid (principal, action, resource) when { context.port == 8 && context has upgrade };", false),
            ("@id(\"p\") forbid (principal, action, resource) when { context.path == \"/b\" };", true),
            ("@id(\"has\") forbid (principal, action, resource) when { context has path && context.method == \"X\" };", true),
            ("@id(\"whole\") forbid (principal, action, resource) when { context == context && context.method == \"X\" };", true),
        ] {
            let text = format!("{reads}{extra}");
            let engine = PolicyEngine::load(&sources(&[("p.cedar", &text)])).unwrap();
            assert_eq!(engine.reads_path, path_read, "{extra}");
            for r in [&a, &b, &a] {
                assert_eq!(engine.decide(&agent, r), engine.decide_uncached(&agent, r), "{extra}");
            }
            // Three cached decisions and three uncached ones: the cache evaluated /a only, or
            // /a and /b.
            let cached = engine.evaluated() - 3;
            assert_eq!(cached, if path_read { 2 } else { 1 }, "{extra}");
        }
    }

    #[test]
    fn the_version_is_a_content_hash() {
        let a = sources(&[(
            "a.cedar",
            "@id(\"a\") permit (principal, action, resource);",
        )]);
        let mut b = a.clone();
        assert_eq!(a.version(), b.version());
        b.files[0].1.push(' ');
        assert_ne!(a.version(), b.version());
    }
}
