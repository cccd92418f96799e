//! The CLI's side of the admin API: where it is, who is calling, and one call.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::Value;
use tollgate_gateway::client::{self, Request};

/// Largest API answer read.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Where the admin API is and who is calling.
#[derive(Args)]
pub struct ApiArgs {
    /// The admin API's base URL (the gateway's `[admin] listen` address).
    #[arg(long, env = "TOLLGATE_ADMIN", default_value = "http://127.0.0.1:9901")]
    pub admin: String,
    /// A file holding the bearer token (the admin token or an approver's own). Default: the
    /// TOLLGATE_TOKEN environment variable, else ./tollgate-data/admin-token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

/// Why a command failed, and so its exit code.
pub enum Failure {
    /// Bad usage (exit code 2).
    Usage(String),
    /// The API refused or could not be reached (exit code 1).
    Api(String),
}

/// Runs a command's future on a small runtime and maps its outcome to an exit code.
pub fn run(command: impl std::future::Future<Output = Result<(), Failure>>) -> ExitCode {
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
    match runtime.block_on(command) {
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

/// Calls the admin API and returns its JSON answer, or the API's own error as the failure.
pub async fn call(
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
        headers: vec![("authorization".into(), format!("Bearer {token}"))],
        body: body.map(|b| ("application/json".into(), b.to_string().into())),
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
