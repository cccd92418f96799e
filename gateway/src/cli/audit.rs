//! `tollgate audit …`: an agent's audit trail, through the admin API.
//! Exit codes: 0 done (for `verify`: the chain holds), 1 a broken chain or an API failure,
//! 2 bad usage.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::Value;

use super::admin_client::{self, call, ApiArgs, Failure};

/// How often `tail --follow` asks for new records.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// `tollgate audit` subcommands: an agent's audit trail, read through the admin API.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Print the agent's audit records, one line each, oldest first.
    Tail {
        /// The id of the agent whose records to print.
        #[arg(long)]
        agent: String,
        /// Start at this position (default: the last 20 records).
        #[arg(long)]
        since: Option<u64>,
        /// Keep printing new records as they come.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Check the agent's hash chain; report the first broken link.
    Verify {
        /// The id of the agent whose trail to check.
        #[arg(long)]
        agent: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Runs an audit command.
pub fn run(command: AuditCommand) -> ExitCode {
    admin_client::run(execute(command))
}

async fn execute(command: AuditCommand) -> Result<(), Failure> {
    match command {
        AuditCommand::Tail {
            agent,
            since,
            follow,
            api,
        } => {
            let mut next = match since {
                Some(since) => since,
                None => {
                    let report = chain_report(&api, &agent).await?;
                    report["last_seq"]
                        .as_u64()
                        .map_or(0, |last| last.saturating_sub(19))
                }
            };
            loop {
                let page = call(
                    &api,
                    "GET",
                    &format!("/v1/agents/{agent}/audit?since={next}&limit=1000"),
                    None,
                )
                .await?;
                let records = page["records"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                for record in records {
                    println!("{}", line(record));
                }
                next = page["next"].as_u64().unwrap_or(next);
                if records.len() < 1000 {
                    if !follow {
                        return Ok(());
                    }
                    tokio::time::sleep(FOLLOW_INTERVAL).await;
                }
            }
        }
        AuditCommand::Verify { agent, api } => {
            let report = chain_report(&api, &agent).await?;
            let records = report["records"].as_u64().unwrap_or(0);
            let span = match (report["first_seq"].as_u64(), report["last_seq"].as_u64()) {
                (Some(first), Some(last)) => format!(" ({first} to {last})"),
                _ => String::new(),
            };
            match report["broken"].as_object() {
                None => {
                    println!("audit trail of {agent}: {records} records{span}, chain intact");
                    Ok(())
                }
                Some(broken) => Err(Failure::Api(format!(
                    "audit trail of {agent}: broken at record {}: {}",
                    broken.get("seq").and_then(Value::as_u64).unwrap_or(0),
                    broken.get("reason").and_then(Value::as_str).unwrap_or("?")
                ))),
            }
        }
    }
}

/// The gateway's check of the agent's chain (also tells where the trail ends).
async fn chain_report(api: &ApiArgs, agent: &str) -> Result<Value, Failure> {
    call(
        api,
        "GET",
        &format!("/v1/agents/{agent}/audit/verify"),
        None,
    )
    .await
}

/// One record as a line: position, time, request, outcome.
fn line(r: &Value) -> String {
    let text = |key: &str| {
        tollgate_gateway::admin::shown::for_person(r[key].as_str().unwrap_or("-")).into_owned()
    };
    let at = r["at"].as_u64().unwrap_or(0);
    let when = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| at.to_string());
    let policies: Vec<&str> = r["policies"]
        .as_array()
        .map(|p| p.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!(
        "{seq:>6} {when} {method} {host}{path} {status} {decision}{policies} tool_call={tool_call} approval={approval} {latency}us",
        seq = r["seq"].as_u64().unwrap_or(0),
        method = text("method"),
        host = text("host"),
        path = text("path"),
        status = r["status"].as_u64().unwrap_or(0),
        decision = text("decision"),
        policies = if policies.is_empty() {
            String::new()
        } else {
            format!(" [{}]", policies.join(","))
        },
        tool_call = text("tool_call"),
        approval = text("approval"),
        latency = r["latency_us"].as_u64().unwrap_or(0),
    )
}
