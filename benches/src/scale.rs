//! A gateway with a production's worth of state beside the one agent a benchmark sends from:
//! many registered agents, a large policy set, many credential rules and many open tool
//! calls. The end-to-end benchmark runs the same load against a gateway with and without it,
//! side by side, to show that the per-request cost does not grow with the state; the policy
//! crate's decision benchmark uses the same generated policies.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};

use crate::Gateway;

/// How much state: the sizes issue 21 asks the cost to stay flat at.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Agents registered besides the benchmark's own.
    pub agents: usize,
    /// Policies in the set, the default ones included.
    pub policies: usize,
    /// Credential rules besides the benchmark's own.
    pub credential_rules: usize,
    /// Tool calls open, one per agent in turn, besides the benchmark's own.
    pub tool_calls: usize,
}

impl Scale {
    /// 10,000 agents, 1,000 policies, 1,000 credential rules, 10,000 open tool calls.
    pub const LARGE: Scale = Scale {
        agents: 10_000,
        policies: 1_000,
        credential_rules: 1_000,
        tool_calls: 10_000,
    };

    /// One line for a report.
    pub fn describe(&self) -> String {
        format!(
            "{} agents, {} policies, {} credential rules, {} open tool calls",
            self.agents, self.policies, self.credential_rules, self.tool_calls
        )
    }
}

/// The default policies as shipped (`policies/default/`).
const DEFAULT_POLICIES: [(&str, &str); 2] = [
    (
        "allowlist.cedar",
        include_str!("../../policies/default/allowlist.cedar"),
    ),
    (
        "run-modes.cedar",
        include_str!("../../policies/default/run-modes.cedar"),
    ),
];

/// How many policies the default set has (`@id` annotations in its files).
pub fn default_policy_count() -> usize {
    DEFAULT_POLICIES
        .iter()
        .map(|(_, text)| text.matches("@id(").count())
        .sum()
}

/// The id of generated agent `n`.
pub fn agent_id(n: usize) -> String {
    format!("agent-{n}")
}

/// `count` generated policies of the shapes real sets have: a read permit per allowlisted
/// service domain, a write permit per agent (with approval), a forbid per blocked host. None
/// of them applies to the benchmark's requests (to api.github.com and graph.microsoft.com by
/// agent `bench`): they change what the engine has to look through, not what it decides.
pub fn generated_policies(count: usize) -> String {
    let mut text = String::new();
    for i in 0..count {
        let _ = match i % 3 {
            0 => writeln!(
                text,
                "@id(\"svc-{i}\") permit (principal, action == Action::\"read\", resource in Domain::\"svc{i}.example.net\");"
            ),
            1 => writeln!(
                text,
                "@id(\"agent-{i}\") permit (principal == Agent::\"{}\", action == Action::\"write\", resource in Domain::\"github.com\") when {{ context.approved }};",
                agent_id(i)
            ),
            _ => writeln!(
                text,
                "@id(\"block-{i}\") forbid (principal, action, resource == Host::\"blocked{i}.github.com\");"
            ),
        };
    }
    text
}

/// Writes the default policies and enough generated ones for `scale.policies` in all into
/// `dir`, for the gateway's `[policy] dir`.
pub fn write_policies(dir: &Path, scale: &Scale) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in DEFAULT_POLICIES {
        std::fs::write(dir.join(name), text)?;
    }
    let generated = scale.policies.saturating_sub(default_policy_count());
    std::fs::write(dir.join("generated.cedar"), generated_policies(generated))?;
    Ok(())
}

/// The configuration to append to a benchmark gateway's: `[policy]` from `policy_dir`, the
/// generated credential rules and agents ([`credential_rules`], [`agents`]). The benchmark's
/// own rules and agent stay as they are.
pub fn config(scale: &Scale, policy_dir: &Path, provider: &str) -> anyhow::Result<String> {
    let mut text = format!(
        "[policy]\ndir = {:?}\nwatch_interval_ms = 0\n",
        policy_dir.display().to_string()
    );
    text.push_str(&credential_rules(scale.credential_rules, provider));
    text.push_str(&agents(scale.agents, provider)?);
    Ok(text)
}

/// `count` credential rules for hosts of their own (in turn an exact name and a `*.domain`),
/// through `provider`, as `[[credential_rules]]` tables.
pub fn credential_rules(count: usize, provider: &str) -> String {
    let mut text = String::new();
    for i in 0..count {
        let host = if i % 2 == 0 {
            format!("svc{i}.example.net")
        } else {
            format!("*.svc{i}.example.org")
        };
        let _ = write!(
            text,
            "[[credential_rules]]\nhosts = [\"{host}\"]\naudience = \"api://svc{i}/.default\"\nprovider = \"{provider}\"\n"
        );
    }
    text
}

/// `count` agents (`agent-<n>`), each on a loopback address of its own that no load comes
/// from (127.1.0.0/16), in turn ReadOnly, Review and Autonomous, as `[[agents]]` tables.
pub fn agents(count: usize, provider: &str) -> anyhow::Result<String> {
    if count > 1 << 16 {
        bail!("at most 65,536 generated agents (one 127.1.0.0/16 address each)");
    }
    let modes = ["ReadOnly", "Review", "Autonomous"];
    let mut text = String::new();
    for i in 0..count {
        let _ = write!(
            text,
            "[[agents]]\nid = \"{}\"\nrun_mode = \"{}\"\nidentity = \"{provider}\"\npeers = [\"127.1.{}.{}\"]\n",
            agent_id(i),
            modes[i % modes.len()],
            i >> 8,
            i & 0xff
        );
    }
    Ok(text)
}

/// Opens `scale.tool_calls` tool calls on the admin API, one per generated agent in turn.
pub fn open_tool_calls(gateway: &Gateway, scale: &Scale) -> anyhow::Result<()> {
    if scale.tool_calls > 0 && scale.agents == 0 {
        bail!("tool calls need agents to belong to");
    }
    let api = gateway.admin_api()?;
    for n in 0..scale.tool_calls {
        let agent = agent_id(n % scale.agents);
        let answer = api.call(
            "POST",
            &format!("/v1/agents/{agent}/tool-calls"),
            Some(&format!(r#"{{"id":"call-{n}"}}"#)),
        )?;
        if answer.status != 201 {
            bail!("opening tool call {n} of {agent}: {}", answer.status_line);
        }
    }
    Ok(())
}
