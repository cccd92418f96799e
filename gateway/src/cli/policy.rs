//! `tollgate policy …`: tools for policy authors. Output is for people; exit codes for CI
//! (0 ok, 1 invalid policies or failed tests, 2 bad usage).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use tollgate_gateway::config::Config;
use tollgate_gateway::target::Target;
use tollgate_policy::entities::domains_of;
use tollgate_policy::{
    testcases, AgentFacts, LoadError, PolicyEngine, PolicySources, RequestFacts, RunMode,
};

/// The directory `policy` commands use when none is given (run from the repository root).
const DEFAULT_DIR: &str = "policies/default";
const DEFAULT_TESTS: &str = "policies/tests";

/// `tollgate policy` subcommands: offline checks of a policy set, no gateway needed.
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Parse and validate a policy directory against the schema; list problems with file,
    /// line and reason.
    Validate {
        /// Directory of *.cedar files.
        #[arg(default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Run policy test cases (TOML: agents, then cases of agent, method, URL → expected
    /// outcome) and print a pass/fail table.
    Test {
        /// Directory of *.cedar files.
        #[arg(default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// A test file, or a directory of *.toml test files.
        #[arg(long, default_value = DEFAULT_TESTS)]
        tests: PathBuf,
    },
    /// Decide one request and show the outcome and the policies that decided it.
    Explain(ExplainArgs),
}

/// `tollgate policy explain` arguments.
#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The id of the agent sending the request (looked up in --config, if given).
    #[arg(long)]
    agent: String,
    /// The request's HTTP method; anything but GET, HEAD and OPTIONS is a write.
    #[arg(long, default_value = "GET")]
    method: String,
    /// The request's absolute http or https URL.
    #[arg(long)]
    url: String,
    /// Take the agent (and the policy directory, if DIR is not given) from this gateway
    /// config.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent's run mode (instead of --config).
    #[arg(long, value_name = "MODE")]
    run_mode: Option<RunModeArg>,
    /// An RBAC scope of the agent (repeatable).
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// A tag of the agent, key=value (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Directory of *.cedar files (default: the config's policy.dir, else policies/default).
    dir: Option<PathBuf>,
}

/// `--run-mode` values, spelled as in the config and in policies.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum RunModeArg {
    /// Reads only.
    #[value(name = "ReadOnly")]
    ReadOnly,
    /// Reads; writes once a person approves them.
    #[value(name = "Review")]
    Review,
    /// Reads, and writes within the agent's RBAC scopes; other writes with approval.
    #[value(name = "Autonomous")]
    Autonomous,
}

impl From<RunModeArg> for RunMode {
    fn from(m: RunModeArg) -> RunMode {
        match m {
            RunModeArg::ReadOnly => RunMode::ReadOnly,
            RunModeArg::Review => RunMode::Review,
            RunModeArg::Autonomous => RunMode::Autonomous,
        }
    }
}

/// Runs a policy command.
pub fn run(command: PolicyCommand) -> ExitCode {
    match command {
        PolicyCommand::Validate { dir } => validate(&dir),
        PolicyCommand::Test { dir, tests } => test(&dir, &tests),
        PolicyCommand::Explain(args) => explain(args),
    }
}

/// Loads a policy directory, printing its problems on failure.
fn load(dir: &Path) -> Option<PolicyEngine> {
    let loaded = PolicySources::from_dir(dir).and_then(|sources| PolicyEngine::load(&sources));
    match loaded {
        Ok(engine) => {
            for warning in engine.warnings() {
                eprintln!("warning: {warning}");
            }
            Some(engine)
        }
        Err(LoadError::Invalid { origin, problems }) => {
            eprintln!("{origin}: {} problem(s)", problems.len());
            for problem in problems {
                eprintln!("  {problem}");
            }
            None
        }
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}

fn validate(dir: &Path) -> ExitCode {
    match load(dir) {
        Some(engine) => {
            println!(
                "ok: {} policies in {} are valid (version {})",
                engine.policies().len(),
                dir.display(),
                engine.version()
            );
            ExitCode::SUCCESS
        }
        None => ExitCode::from(1),
    }
}

fn test(dir: &Path, tests: &Path) -> ExitCode {
    let Some(engine) = load(dir) else {
        return ExitCode::from(1);
    };
    let files = match testcases::load(tests) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let results = testcases::run(&engine, &files);
    let width = results.iter().map(|r| r.case.name.len()).max().unwrap_or(0);
    let mut failed = 0;
    for result in &results {
        match (&result.failure, &result.decision) {
            (None, Some(decision)) => println!(
                "PASS  {:width$}  {:<14}  {}",
                result.case.name,
                decision.outcome.as_str(),
                decision.policies.join(", ")
            ),
            (failure, _) => {
                failed += 1;
                println!(
                    "FAIL  {:width$}  {}  [{}]",
                    result.case.name,
                    failure.as_deref().unwrap_or("no decision"),
                    result.file
                );
            }
        }
    }
    println!("{} passed, {failed} failed", results.len() - failed);
    if results.is_empty() {
        eprintln!("no test cases in {}", tests.display());
        return ExitCode::from(1);
    }
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn explain(args: ExplainArgs) -> ExitCode {
    let usage = |message: String| {
        eprintln!("{message}");
        ExitCode::from(2)
    };
    let config = match &args.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => Some(c),
            Err(e) => return usage(e.to_string()),
        },
        None => None,
    };
    let from_config = config
        .as_ref()
        .and_then(|c| c.agents.iter().find(|a| a.id == args.agent));
    let (run_mode, mut scopes, mut tags) = match (from_config, args.run_mode) {
        (_, Some(mode)) => (RunMode::from(mode), Vec::new(), BTreeMap::new()),
        (Some(agent), None) => (agent.run_mode, agent.scopes.clone(), agent.tags.clone()),
        (None, None) => {
            return usage(format!(
                "agent {:?}: give --run-mode (and --scope/--tag), or --config with that agent",
                args.agent
            ))
        }
    };
    scopes.extend(args.scopes);
    for tag in &args.tags {
        match tag.split_once('=') {
            Some((k, v)) => {
                tags.insert(k.to_string(), v.to_string());
            }
            None => return usage(format!("--tag {tag:?}: expected KEY=VALUE")),
        }
    }
    let dir = args
        .dir
        .or_else(|| config.as_ref().and_then(|c| c.policy.dir.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
    let (target, path) = match Target::from_url(&args.url) {
        Ok(parsed) => parsed,
        Err(e) => return usage(format!("--url: {e}")),
    };
    let Some(engine) = load(&dir) else {
        return ExitCode::from(1);
    };
    let request = match RequestFacts::new(&args.method, target, &path) {
        Ok(request) => request,
        Err(e) => return usage(format!("--url: {e}")),
    };
    let agent = AgentFacts {
        id: &args.agent,
        revision: 0,
        run_mode,
        scopes: &scopes,
        tags: &tags,
    };
    let decision = engine.decide(&agent, &request);
    println!("decision:  {}", decision.outcome.as_str());
    println!("reason:    {}", decision.reason);
    for id in &decision.policies {
        let file = engine.policies().get(id).map(String::as_str).unwrap_or("?");
        println!("policy:    {id} ({file})");
    }
    for error in &decision.errors {
        println!("error:     {error}");
    }
    println!(
        "principal: Agent::{:?} run_mode={} scopes={:?}",
        args.agent,
        run_mode.as_str(),
        scopes
    );
    println!(
        "action:    {} ({})",
        request.action.as_str(),
        request.method
    );
    let domains = domains_of(&request.target.host);
    println!(
        "resource:  Host::\"{}\" in Domain {:?}",
        tollgate_policy::entities::host_id(&request.target.host),
        domains
    );
    if let Some(arm) = &request.arm {
        println!(
            "arm:       scopes={:?} operation={:?}",
            arm.scopes, arm.operation
        );
    }
    println!(
        "policies:  {} (version {})",
        dir.display(),
        engine.version()
    );
    ExitCode::SUCCESS
}
