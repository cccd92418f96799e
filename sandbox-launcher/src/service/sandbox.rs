//! A session's sandbox, started and stopped: its network (two namespaces of its own, see
//! [`crate::network`]), its listener on the gateway, and the guest agent inside it.
//!
//! The netns backend runs the guest agent as root in the sandbox's namespace, in a mount
//! namespace of its own (`ip netns exec` makes one) with a private `/tmp`; its executions run
//! as the session's own user id, which no other session and no host account has, in the
//! session's workspace (0700). The agent listens on a privileged port, so a workload (never
//! root) can neither stop it nor take its place.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::ServiceConfig;
use super::error::ServiceError;
use super::guest::GuestAgent;
use super::session::{io_error, write_private, SandboxProcess, SessionDir, SessionRecord};
use crate::gateway_api::{GatewayApi, Listen};
use crate::network::{SandboxNetwork, HOST_ADDRESS, SANDBOX_ADDRESS};
use crate::sandbox::{stop_process_group, tail_of, write_readable};
use crate::workload::workload_environment;

/// The guest agent's port on the sandbox's address: privileged, so no workload can bind it.
pub const GUEST_PORT: u16 = 999;

/// What every session's sandbox needs from the service.
pub struct SandboxContext {
    /// The settings.
    pub config: ServiceConfig,
    /// The gateway's admin API.
    pub gateway: Arc<GatewayApi>,
    /// The gateway's CA certificate.
    pub ca_pem: Vec<u8>,
}

impl SandboxContext {
    /// Runs a gateway call (blocking I/O) off the async threads; a refusal in the service's
    /// terms.
    pub async fn gateway_call(
        &self,
        agent: &str,
        call: impl FnOnce(&GatewayApi) -> Result<(), crate::gateway_api::ApiError> + Send + 'static,
    ) -> Result<(), ServiceError> {
        let gateway = self.gateway.clone();
        tokio::task::spawn_blocking(move || call(&gateway))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?
            .map_err(|e| ServiceError::from_gateway(agent, e))
    }
}

/// The network of the session with id `id`.
pub fn network(context: &SandboxContext, id: &str) -> Result<SandboxNetwork, ServiceError> {
    SandboxNetwork::for_session(id, context.config.gateway_port, GUEST_PORT)
        .map_err(|e| ServiceError::Internal(e.to_string()))
}

/// The guest agent of a running session, with the secret its directory holds.
pub fn guest_agent(net: &SandboxNetwork, dir: &SessionDir) -> Result<GuestAgent, ServiceError> {
    let secret = std::fs::read_to_string(dir.secret()).map_err(|e| io_error(&dir.secret(), e))?;
    Ok(GuestAgent::new(
        net.gateway_namespace_path(),
        (SANDBOX_ADDRESS, GUEST_PORT).into(),
        secret.trim().to_string(),
    ))
}

/// Starts the session's sandbox (its record says it is stopped) and returns its guest agent,
/// ready. On failure, whatever was made is taken down again.
pub async fn start(
    context: &SandboxContext,
    id: &str,
    dir: &SessionDir,
    record: &mut SessionRecord,
) -> Result<GuestAgent, ServiceError> {
    let started = Instant::now();
    match try_start(context, id, dir, record).await {
        Ok(guest) => {
            tracing::info!(
                agent = %record.agent,
                thread = %record.thread,
                ready_ms = started.elapsed().as_millis() as u64,
                "session sandbox started"
            );
            Ok(guest)
        }
        Err(e) => {
            if let Err(problem) = stop(context, id, dir, record).await {
                tracing::warn!(agent = %record.agent, thread = %record.thread, "{problem}");
            }
            Err(e)
        }
    }
}

async fn try_start(
    context: &SandboxContext,
    id: &str,
    dir: &SessionDir,
    record: &mut SessionRecord,
) -> Result<GuestAgent, ServiceError> {
    let net = network(context, id)?;
    let made = net.clone();
    blocking(move || {
        // A namespace left by a crash is taken down first.
        made.destroy()?;
        made.create()
    })
    .await
    .map_err(|e| ServiceError::Sandbox(e.to_string()))?;

    let listen = Listen {
        address: net.listen_address().to_string(),
        netns: net.gateway_namespace_path().to_string_lossy().to_string(),
    };
    let (agent, thread) = (record.agent.clone(), record.thread.clone());
    context
        .gateway_call(&record.agent, move |api| {
            api.open_session(&agent, &thread, &listen)
        })
        .await?;
    record.gateway_session = true;
    dir.save(record)?;

    // A fresh secret for every start: one a stopped sandbox's workload saw is worth nothing.
    let secret = hex::encode(rand::random::<[u8; 32]>());
    write_private(&dir.secret(), secret.as_bytes())?;
    write_readable(&dir.ca(), &context.ca_pem)
        .map_err(|e| ServiceError::Internal(e.to_string()))?;

    let mut command = guest_command(context, &net, dir, record)?;
    let child = command
        .spawn()
        .map_err(|e| ServiceError::Sandbox(format!("cannot start the guest agent: {e}")))?;
    let pid = child
        .id()
        .ok_or_else(|| ServiceError::Sandbox("the guest agent exited at once".into()))?;
    // Reaped by tokio when it ends; stopped through its process group.
    drop(child);
    let process = SandboxProcess::of(pid);
    record.process = Some(process);
    dir.save(record)?;

    let guest = GuestAgent::new(
        net.gateway_namespace_path(),
        (SANDBOX_ADDRESS, GUEST_PORT).into(),
        secret,
    );
    let deadline = Instant::now() + Duration::from_secs(context.config.ready_timeout_secs);
    loop {
        if guest.healthy().await {
            break;
        }
        if !process.alive() {
            return Err(ServiceError::Sandbox(format!(
                "the guest agent exited{}",
                tail_of(&[&dir.console()])
            )));
        }
        if Instant::now() >= deadline {
            return Err(ServiceError::Sandbox(format!(
                "the guest agent did not answer within {} s{}",
                context.config.ready_timeout_secs,
                tail_of(&[&dir.console()])
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    record.state = super::session::SessionState::Running;
    record.touch();
    dir.save(record)?;
    Ok(guest)
}

/// The guest agent's command line: in the sandbox's namespace, a private `/tmp`, then the
/// agent, with the workload's environment (the gateway as proxy, its CA).
fn guest_command(
    context: &SandboxContext,
    net: &SandboxNetwork,
    dir: &SessionDir,
    record: &SessionRecord,
) -> Result<tokio::process::Command, ServiceError> {
    let config = &context.config;
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.console())
        .map_err(|e| io_error(&dir.console(), e))?;
    let console_err = console
        .try_clone()
        .map_err(|e| io_error(&dir.console(), e))?;
    let proxy = format!("http://{HOST_ADDRESS}:{}", config.gateway_port);
    let mut env = workload_environment(&record.agent, &proxy, &dir.ca().to_string_lossy());
    env.push(("TOLLGATE_THREAD", record.thread.clone()));
    let path = |p: PathBuf| p.to_string_lossy().to_string();
    let mut command = tokio::process::Command::new("ip");
    command
        .args(["netns", "exec", net.sandbox_namespace(), "sh", "-c"])
        .arg(
            "mount -t tmpfs -o mode=1777,nosuid,nodev,size=\"$1\" tollgate-tmp /tmp && shift && exec \"$@\"",
        )
        .arg("tollgate-guest")
        .arg(&config.tmp_size)
        .arg(config.guest_agent_path())
        .arg("--listen")
        .arg(format!("{SANDBOX_ADDRESS}:{GUEST_PORT}"))
        .arg("--secret-file")
        .arg(path(dir.secret()))
        .arg("--workspace")
        .arg(path(dir.workspace()))
        .arg("--state")
        .arg(path(dir.shell_state()))
        .arg("--user")
        .arg(format!("{0}:{0}", record.uid))
        .arg("--max-output-bytes")
        .arg(config.max_output_bytes.to_string())
        .arg("--max-file-bytes")
        .arg(config.max_file_bytes.to_string())
        .arg("--default-timeout-secs")
        .arg(config.default_timeout_secs.to_string())
        .arg("--max-timeout-secs")
        .arg(config.max_timeout_secs.to_string())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(console)
        .stderr(console_err)
        .process_group(0);
    Ok(command)
}

/// Stops the session's sandbox: the guest agent and every process in its namespaces, its
/// listener on the gateway (which ends its open tool calls), its network. Its files stay.
/// Stopping what is already stopped is not an error. The record says what is left if
/// anything could not be undone, so a later stop tries again.
pub async fn stop(
    context: &SandboxContext,
    id: &str,
    dir: &SessionDir,
    record: &mut SessionRecord,
) -> Result<(), ServiceError> {
    if let Some(process) = record.process.filter(SandboxProcess::alive) {
        blocking(move || {
            stop_process_group(process.pid);
            Ok::<(), String>(())
        })
        .await
        .map_err(ServiceError::Sandbox)?;
    }
    let mut problems = Vec::new();
    if record.gateway_session {
        let (agent, thread) = (record.agent.clone(), record.thread.clone());
        match context
            .gateway_call(&record.agent, move |api| api.close_session(&agent, &thread))
            .await
        {
            Ok(()) => record.gateway_session = false,
            Err(e) => problems.push(e.to_string()),
        }
    }
    let net = network(context, id)?;
    if let Err(e) = blocking(move || net.destroy()).await {
        problems.push(e);
    }
    record.process = None;
    record.state = super::session::SessionState::Stopped;
    if dir.path().exists() {
        dir.save(record)?;
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ServiceError::Sandbox(format!(
            "not fully stopped: {}",
            problems.join("; ")
        )))
    }
}

/// Runs blocking `work` (commands, namespaces) off the async threads.
async fn blocking<E: std::fmt::Display>(
    work: impl FnOnce() -> Result<(), E> + Send + 'static,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || work().map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}

/// Makes `path` the directory sessions are kept in: 0711, and every directory above it
/// passable (execute bits added, nothing taken away), so a session's user reaches its
/// workspace and lists nothing on the way.
pub fn prepare_data_dir(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let absolute = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if absolute.starts_with("/tmp") {
        return Err(format!(
            "the data directory {} is under /tmp, which every session's sandbox replaces with a private one: choose another (--data-dir)",
            path.display()
        ));
    }
    std::fs::create_dir_all(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o711)))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let absolute = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for dir in absolute.ancestors().skip(1) {
        crate::workload::allow_traversal(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(())
}
