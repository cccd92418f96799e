//! `tollgate approvals …`: the approver's command line, a client of the admin API.
//! Exit codes: 0 done, 1 the API refused or could not be reached, 2 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::Value;

use super::admin_client::{self, call, ApiArgs, Failure};
use tollgate_gateway::admin::shown::for_person;

/// `tollgate approvals` subcommands: held requests, settled through the admin API.
#[derive(Subcommand)]
pub enum ApprovalsCommand {
    /// List approvals (pending ones unless --state says otherwise).
    List {
        /// pending, approved, denied, expired, abandoned or all.
        #[arg(long, default_value = "pending")]
        state: String,
        /// Only approvals of the agent with this id.
        #[arg(long)]
        agent: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show everything recorded about one approval.
    Show {
        /// The approval's id, as `tollgate approvals list` shows it.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Approve: the held request is sent, once.
    Approve {
        /// The approval's id, as `tollgate approvals list` shows it.
        id: String,
        /// For an on-behalf-of approval: a file holding your OBO token, used for this
        /// request and the rest of its tool call.
        #[arg(long, value_name = "FILE")]
        obo_token_file: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Deny: the agent gets 403 with your reason.
    Deny {
        /// The approval's id, as `tollgate approvals list` shows it.
        id: String,
        /// Why (the agent is told).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Runs an approvals command.
pub fn run(command: ApprovalsCommand) -> ExitCode {
    admin_client::run(execute(command))
}

async fn execute(command: ApprovalsCommand) -> Result<(), Failure> {
    match command {
        ApprovalsCommand::List { state, agent, api } => {
            let mut query = Vec::new();
            if state != "all" {
                query.push(format!("state={state}"));
            }
            if let Some(agent) = agent {
                query.push(format!("agent={agent}"));
            }
            let path = format!("/v1/approvals?{}", query.join("&"));
            let answer = call(&api, "GET", &path, None).await?;
            print_table(
                answer["approvals"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or(&[]),
            );
        }
        ApprovalsCommand::Show { id, api } => {
            let answer = call(&api, "GET", &format!("/v1/approvals/{id}"), None).await?;
            print_record(&answer);
        }
        ApprovalsCommand::Approve {
            id,
            obo_token_file,
            api,
        } => {
            let body = match obo_token_file {
                Some(file) => {
                    let token = std::fs::read_to_string(&file).map_err(|e| {
                        Failure::Usage(format!("cannot read {}: {e}", file.display()))
                    })?;
                    Some(serde_json::json!({ "obo_token": token.trim() }))
                }
                None => None,
            };
            let answer = call(&api, "POST", &format!("/v1/approvals/{id}/approve"), body).await?;
            println!(
                "approved {id} as {}: the held request is released",
                answer["approver"].as_str().unwrap_or("?")
            );
        }
        ApprovalsCommand::Deny { id, reason, api } => {
            let body = serde_json::json!({ "reason": reason });
            call(
                &api,
                "POST",
                &format!("/v1/approvals/{id}/deny"),
                Some(body),
            )
            .await?;
            println!("denied {id}");
        }
    }
    Ok(())
}

fn print_table(approvals: &[Value]) {
    if approvals.is_empty() {
        println!("no approvals");
        return;
    }
    println!(
        "{:<32}  {:<10}  {:<12}  {:<7}  {:<6}  URL",
        "ID", "STATE", "AGENT", "METHOD", "WAITS"
    );
    let now = tollgate_storage::now_millis();
    for a in approvals {
        let waits = match a["state"].as_str() {
            Some("pending") => {
                let left = a["expires_at"].as_u64().unwrap_or(0).saturating_sub(now) / 1000;
                format!("{left}s")
            }
            _ => "-".to_string(),
        };
        println!(
            "{:<32}  {:<10}  {:<12}  {:<7}  {:<6}  {}",
            a["id"].as_str().unwrap_or("?"),
            a["state"].as_str().unwrap_or("?"),
            a["agent"].as_str().unwrap_or("?"),
            for_person(a["method"].as_str().unwrap_or("?")),
            waits,
            for_person(a["url"].as_str().unwrap_or("?")),
        );
    }
}

fn print_record(record: &Value) {
    let Some(fields) = record.as_object() else {
        println!("{record}");
        return;
    };
    for (key, value) in fields {
        if key == "body_preview" {
            print_preview(value);
            continue;
        }
        if key == "arm" {
            let summary = value["summary"].as_str().unwrap_or("?");
            let outside = match value["inside_agent_scopes"].as_bool() {
                Some(false) => " (outside the agent's RBAC scopes)",
                _ => "",
            };
            println!("{:>16}: {}{outside}", "operation", for_person(summary));
            continue;
        }
        let shown = match value {
            Value::String(s) => for_person(s).into_owned(),
            Value::Null => "-".to_string(),
            other => other.to_string(),
        };
        println!("{key:>16}: {shown}");
    }
}

/// The held body's preview, line by line, each line escaped for the terminal.
fn print_preview(preview: &Value) {
    let kind = preview["kind"].as_str().unwrap_or("?");
    let Some(text) = preview["text"].as_str() else {
        println!("{:>16}: ({kind}, not shown)", "body_preview");
        return;
    };
    let cut = if preview["truncated"].as_bool() == Some(true) {
        ", cut short"
    } else {
        ""
    };
    println!("{:>16}: ({kind}{cut})", "body_preview");
    for line in text.lines() {
        println!("{:>16}  {}", "", for_person(line));
    }
    if !cut.is_empty() {
        println!("{:>16}  …", "");
    }
}
