//! A session's sandbox, started and stopped: its network (namespaces of its own, see
//! [`crate::network`]), its listener on the gateway, and the guest agent inside it — in a
//! microVM ([`microvm`]) or a namespace ([`netns`]). Either way the service reaches the agent
//! from the session's gateway-side namespace, and the agent listens on a privileged port, so
//! a workload (never root) can neither stop it nor take its place.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::ServiceConfig;
use super::error::ServiceError;
use super::guest::GuestAgent;
use super::session::{io_error, write_private, SandboxProcess, SessionDir, SessionRecord};
use super::{microvm, netns};
use crate::gateway_api::{GatewayApi, Listen};
use crate::guest::FAILED_MARKER;
use crate::network::{SandboxNetwork, HOST_ADDRESS, SANDBOX_ADDRESS};
use crate::sandbox::{stop_process_group, tail_of};
use crate::state::Backend;

/// The guest agent's port on the sandbox's address: privileged, so no workload can bind it.
pub const GUEST_PORT: u16 = 999;

/// How long a readiness probe may take to connect.
const READY_PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a VM may take to write its cache to disk before it is stopped.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// What every session's sandbox needs from the service.
pub struct SandboxContext {
    /// The service's settings (`tollgate-launcher serve`'s options).
    pub config: ServiceConfig,
    /// The gateway's admin API, where sessions' listeners and tool calls are opened and closed.
    pub gateway: Arc<GatewayApi>,
    /// The gateway's CA certificate (PEM), every sandbox's only trust anchor.
    pub ca_pem: Vec<u8>,
    /// The guest agent binary sessions run (the service's own copy).
    pub guest_agent: std::path::PathBuf,
    /// The microVM backend's image and accelerator (`None`: no QEMU here).
    pub vm: Option<microvm::Vm>,
}

impl SandboxContext {
    /// The microVM backend, or why there is none.
    pub fn vm(&self) -> Result<&microvm::Vm, ServiceError> {
        self.vm.as_ref().ok_or_else(|| {
            ServiceError::Sandbox(
                "this session runs in a microVM, and the service runs without QEMU (--backend netns)".into(),
            )
        })
    }

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
    // A namespace left by a crash is taken down first.
    let tap = match record.backend {
        Backend::Netns => {
            blocking(move || {
                made.destroy()?;
                made.create().map(|()| None)
            })
            .await
        }
        Backend::Qemu => {
            context.vm()?;
            blocking(move || {
                made.destroy()?;
                made.create_for_vm().map(Some)
            })
            .await
        }
    }
    .map_err(ServiceError::Sandbox)?;

    open_gateway_session(context, id, &record.agent, &record.thread).await?;
    record.gateway_session = true;
    dir.save(record)?;

    // This start's messages only: an earlier start's failure is not this one's.
    for log in [dir.console(), dir.vmm_log()] {
        if log.exists() {
            std::fs::write(&log, b"").map_err(|e| io_error(&log, e))?;
        }
    }
    // A fresh secret for every start: one a stopped sandbox's workload saw is worth nothing.
    let secret = hex::encode(rand::random::<[u8; 32]>());
    write_private(&dir.secret(), secret.as_bytes())?;
    let pid = match (record.backend, tap) {
        (Backend::Qemu, Some(tap)) => {
            let vm = context.vm()?;
            microvm::spawn(context, vm, &net, dir, record, &secret, tap).await?
        }
        _ => netns::spawn(context, &net, dir, record)?,
    };
    let process = SandboxProcess::of(pid);
    record.process = Some(process);
    dir.save(record)?;

    let guest = GuestAgent::new(
        net.gateway_namespace_path(),
        (SANDBOX_ADDRESS, GUEST_PORT).into(),
        secret,
    );
    let logs = [dir.console(), dir.vmm_log()];
    let tail = || tail_of(&[&logs[0], &logs[1]]);
    let deadline = Instant::now() + Duration::from_secs(context.config.ready_timeout_secs);
    loop {
        if guest.healthy(READY_PROBE_TIMEOUT).await {
            break;
        }
        if !process.alive() {
            return Err(ServiceError::Sandbox(format!(
                "the sandbox exited{}",
                tail()
            )));
        }
        let console = std::fs::read_to_string(&logs[0]).unwrap_or_default();
        if let Some(line) = console.lines().find(|l| l.contains(FAILED_MARKER)) {
            return Err(ServiceError::Sandbox(format!(
                "the guest reported: {line}{}",
                tail()
            )));
        }
        if Instant::now() >= deadline {
            return Err(ServiceError::Sandbox(format!(
                "the guest agent did not answer within {} s{}",
                context.config.ready_timeout_secs,
                tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    record.state = super::session::SessionState::Running;
    record.touch();
    dir.save(record)?;
    Ok(guest)
}

/// Opens (or opens again) the session's listener on the gateway, in its gateway-side
/// namespace: the gateway attributes what arrives there to the agent and this session.
pub async fn open_gateway_session(
    context: &SandboxContext,
    id: &str,
    agent: &str,
    thread: &str,
) -> Result<(), ServiceError> {
    let net = network(context, id)?;
    let listen = Listen {
        address: net.listen_address().to_string(),
        netns: net.gateway_namespace_path().to_string_lossy().to_string(),
    };
    let (agent_id, thread) = (agent.to_string(), thread.to_string());
    context
        .gateway_call(agent, move |api| {
            api.open_session(&agent_id, &thread, &listen)
        })
        .await
}

/// The guest agent's options both backends pass: it serves the service's side of the
/// sandbox's network alone (the workload, which shares the agent's side, is closed on at
/// once), and its limits.
pub fn agent_options(config: &ServiceConfig) -> Vec<String> {
    vec![
        "--allow-from".into(),
        HOST_ADDRESS.to_string(),
        "--max-output-bytes".into(),
        config.max_output_bytes.to_string(),
        "--max-file-bytes".into(),
        config.max_file_bytes.to_string(),
        "--default-timeout-secs".into(),
        config.default_timeout_secs.to_string(),
        "--max-timeout-secs".into(),
        config.max_timeout_secs.to_string(),
    ]
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
        if record.backend == Backend::Qemu {
            // What the guest has cached goes to the workspace disk before the VM ends.
            let guest = network(context, id).and_then(|net| guest_agent(&net, dir));
            if let Ok(guest) = guest {
                let sync = guest.call(http::Method::POST, "/sync", Default::default());
                if !matches!(tokio::time::timeout(SYNC_TIMEOUT, sync).await, Ok(Ok(_))) {
                    tracing::warn!(agent = %record.agent, thread = %record.thread, "the guest did not confirm its disk was synced before the stop");
                }
            }
        }
        blocking(move || {
            stop_process_group(process.pid);
            Ok::<(), String>(())
        })
        .await
        .map_err(ServiceError::Sandbox)?;
    }
    if record.backend == Backend::Netns {
        // Every process of the session's user: one that left the namespaces or the process
        // groups too, before the user id can be anyone else's.
        let uid = record.uid;
        blocking(move || {
            tollgate_guest::procs::kill_user(uid, &Default::default());
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
pub(super) async fn blocking<T: Send + 'static, E: std::fmt::Display>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, String> {
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
        use std::os::unix::fs::PermissionsExt;
        let before = std::fs::metadata(dir)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        crate::workload::allow_traversal(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if before & 0o111 != 0o111 {
            tracing::warn!(dir = %dir.display(), "made passable (execute bits added) so the sessions' users reach their workspaces");
        }
    }
    Ok(())
}
