//! The sandbox service (`tollgate-launcher serve`): sessions — one sandbox per agent and
//! conversation thread — reached only through a structured API: executions, each one tool
//! call on the gateway, and files confined to the session's workspace.
//!
//! The data path, in module order: [`config`] (the settings), [`api`] (the HTTP API, its
//! token), [`sessions`] (every session's life: created, started, stopped when idle, deleted,
//! adopted after a restart), [`session`] (one session's key, record and directory),
//! [`sandbox`] (a session's sandbox started and stopped: network, gateway listener, guest
//! agent), [`exec`] (an execution as a tool call), [`guest`] (the calls to the guest agent
//! inside the sandbox), [`error`] (what the API answers when it cannot).

pub mod api;
pub mod config;
pub mod error;
pub mod exec;
pub mod guest;
pub mod microvm;
pub mod netns;
pub mod sandbox;
pub mod session;
pub mod sessions;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::gateway_api::GatewayApi;
use crate::sandbox::{read_ca, read_token};
use config::{BackendChoice, ServiceConfig};
use sandbox::SandboxContext;
use sessions::Sessions;

/// How often idle sessions are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Runs the service until SIGINT or SIGTERM. Sessions keep running when it stops; the next
/// start adopts them.
pub async fn serve(config: ServiceConfig) -> Result<(), String> {
    config.check()?;
    sandbox::prepare_data_dir(&config.data_dir)?;
    let token = service_token(&config.token_path())?;
    let admin_token_file = (!config.admin_token_file.as_os_str().is_empty())
        .then_some(config.admin_token_file.as_path());
    let gateway = GatewayApi::new(
        &config.admin,
        read_token(admin_token_file).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let ca_pem = read_ca(&config.ca).map_err(|e| e.to_string())?;
    let guest_agent = install_guest_agent(&config.guest_agent_path(), &config.data_dir)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let token_path = config.token_path();
    let vm = match config.backend {
        BackendChoice::Qemu => {
            let prepare = config.clone();
            Some(
                tokio::task::spawn_blocking(move || microvm::Vm::prepare(&prepare))
                    .await
                    .map_err(|e| e.to_string())??,
            )
        }
        BackendChoice::Netns => None,
    };
    let context = Arc::new(SandboxContext {
        config,
        gateway: Arc::new(gateway),
        ca_pem,
        guest_agent,
        vm,
    });
    let sessions = Arc::new(Sessions::new(context));
    sessions.adopt().await;
    let sweeper = sessions.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tick.tick().await;
            sweeper.sweep().await;
        }
    });
    let api = Arc::new(api::Api { sessions, token });
    println!(
        "tollgate-launcher service listening on http://{bound} (token in {})",
        token_path.display()
    );
    axum::serve(listener, api::router(api))
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(|e| e.to_string())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping; sessions keep running and are adopted at the next start");
}

/// Copies the guest agent binary into the data directory (`bin/tollgate-guest-agent`, root's,
/// 0755) and returns the copy's path: sessions run that copy, which no rebuild changes under
/// them and which no session's private `/tmp` hides (the original may well be under `/tmp`).
fn install_guest_agent(binary: &Path, data: &Path) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    if !binary.is_file() {
        return Err(format!(
            "the guest agent {} is missing: build it (cargo build -p tollgate-guest) or pass --guest-agent",
            binary.display()
        ));
    }
    let dir = data.join("bin");
    let installed = dir.join("tollgate-guest-agent");
    let partial = dir.join(format!(".tollgate-guest-agent.{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::copy(binary, &partial))
        .and_then(|_| std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::rename(&partial, &installed))
        .map_err(|e| format!("cannot install the guest agent into {}: {e}", dir.display()))?;
    Ok(installed)
}

/// The API token in `path`, created (0600, random) if the file does not exist.
pub fn service_token(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => {
            return Err(format!(
                "{} is empty: delete it to have a token made",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    session::write_private(path, format!("{token}\n").as_bytes()).map_err(|e| e.to_string())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_made_once_private_and_then_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sub/service-token");
        let token = service_token(&path).expect("made");
        assert_eq!(token.len(), 64);
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            service_token(&path).expect("read"),
            token,
            "the same token again"
        );
        std::fs::write(&path, "\n").expect("empty");
        assert!(service_token(&path)
            .expect_err("empty")
            .contains("is empty"));
    }
}
