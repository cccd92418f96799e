//! `tollgate approvals …`: the approver's command line, a client of the admin API.
//! Exit codes: 0 done, 1 the API refused or could not be reached, 2 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;
use tollgate_gateway::client::{self, Request};

/// Largest API answer read.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Where the admin API is and who is calling.
#[derive(Args)]
pub struct ApiArgs {
    /// The admin API's base URL.
    #[arg(long, env = "TOLLGATE_ADMIN", default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// A file holding the bearer token (the admin token or an approver's own). Default: the
    /// TOLLGATE_TOKEN environment variable, else ./tollgate-data/admin-token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

/// Approver commands.
#[derive(Subcommand)]
pub enum ApprovalsCommand {
    /// List approvals (pending ones unless --state says otherwise).
    List {
        /// pending, approved, denied, expired, abandoned or all.
        #[arg(long, default_value = "pending")]
        state: String,
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show everything recorded about one approval.
    Show {
        /// The approval id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Approve: the held request is sent, once.
    Approve {
        /// The approval id.
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
        /// The approval id.
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
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(execute(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Api(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Api(String),
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

/// Calls the admin API and returns its JSON answer, or the API's own error as the failure.
async fn call(
    api: &ApiArgs,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Failure> {
    let token = token(api)?;
    let connector = pingora::connectors::http::Connector::new(None);
    let url = format!("{}{path}", api.admin.trim_end_matches('/'));
    let request = Request {
        method,
        url: &url,
        headers: vec![("authorization", format!("Bearer {token}"))],
        body: body.map(|b| ("application/json", b.to_string().into())),
    };
    let (status, answer) = client::send(
        &connector,
        request,
        Duration::from_secs(30),
        MAX_ANSWER_BYTES,
    )
    .await
    .map_err(|e| Failure::Api(format!("admin API at {}: {e}", api.admin)))?;
    let json: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        Ok(json)
    } else {
        Err(Failure::Api(format!(
            "HTTP {status} {}: {}",
            json["error"].as_str().unwrap_or("error"),
            json["detail"].as_str().unwrap_or("(no detail)")
        )))
    }
}

fn token(api: &ApiArgs) -> Result<String, Failure> {
    if let Some(file) = &api.token_file {
        return read_token(file);
    }
    if let Ok(token) = std::env::var("TOLLGATE_TOKEN") {
        return Ok(token.trim().to_string());
    }
    read_token(&PathBuf::from("tollgate-data/admin-token"))
}

fn read_token(file: &PathBuf) -> Result<String, Failure> {
    std::fs::read_to_string(file)
        .map(|t| t.trim().to_string())
        .map_err(|e| {
            Failure::Usage(format!(
                "cannot read the token file {}: {e} (give --token-file or TOLLGATE_TOKEN)",
                file.display()
            ))
        })
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
            a["method"].as_str().unwrap_or("?"),
            waits,
            a["url"].as_str().unwrap_or("?"),
        );
    }
}

fn print_record(record: &Value) {
    let Some(fields) = record.as_object() else {
        println!("{record}");
        return;
    };
    for (key, value) in fields {
        let shown = match value {
            Value::String(s) => s.clone(),
            Value::Null => "-".to_string(),
            other => other.to_string(),
        };
        println!("{key:>16}: {shown}");
    }
}
