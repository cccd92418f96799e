//! The netns backend: a session's guest agent as a process in the session's sandbox
//! namespace (hosts without QEMU).
//!
//! It runs as root in a mount namespace of its own (`ip netns exec` makes one) with a private
//! `/tmp`, `/dev/shm` and `/run`, without the means to gain privileges; its executions run as
//! the session's own user id, which no other session and no host account has, in the
//! session's workspace (0700) on the host. When the session stops, every process of that
//! user is ended. What this backend does not isolate: the host's other files as any
//! unprivileged user sees them, its process list, and its resources (no memory, process or
//! disk limits). Use the microVM backend where the workload is untrusted.

use std::path::PathBuf;

use super::error::ServiceError;
use super::sandbox::{agent_options, SandboxContext, GUEST_PORT};
use super::session::{io_error, SessionDir, SessionRecord};
use crate::network::{SandboxNetwork, HOST_ADDRESS, SANDBOX_ADDRESS};
use crate::sandbox::write_readable;
use crate::workload::workload_environment;

/// The start of the guest agent's shell (`$1`: /tmp's size, then the agent's command line):
/// in the mount namespace `ip netns exec` made, private and empty `/tmp`, `/dev/shm` and
/// `/run` (no host socket under it, no shared memory with other sessions), then the agent
/// without the means to gain privileges (`no_new_privs`, inherited by every execution: the
/// host's set-user-id programs do not work in a session).
const PRIVATE_MOUNTS: &str = "set -e; \
    mount -t tmpfs -o mode=1777,nosuid,nodev,size=\"$1\" tollgate-tmp /tmp; \
    mount -t tmpfs -o mode=1777,nosuid,nodev,noexec,size=64m tollgate-shm /dev/shm; \
    mount -t tmpfs -o mode=755,nosuid,nodev,noexec,size=1m tollgate-run /run; \
    shift; exec \"$@\"";

/// Starts the session's guest agent in its sandbox namespace; returns its pid.
pub fn spawn(
    context: &SandboxContext,
    net: &SandboxNetwork,
    dir: &SessionDir,
    record: &SessionRecord,
) -> Result<u32, ServiceError> {
    write_readable(&dir.ca(), &context.ca_pem)
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let child = guest_command(context, net, dir, record)?
        .spawn()
        .map_err(|e| ServiceError::Sandbox(format!("cannot start the guest agent: {e}")))?;
    // Reaped by tokio when it ends; stopped through its process group.
    child
        .id()
        .ok_or_else(|| ServiceError::Sandbox("the guest agent exited at once".into()))
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
        .arg(PRIVATE_MOUNTS)
        .arg("tollgate-guest")
        .arg(&config.tmp_size)
        .args(["setpriv", "--no-new-privs", "--"])
        .arg(&context.guest_agent)
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
        .args(agent_options(config))
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
