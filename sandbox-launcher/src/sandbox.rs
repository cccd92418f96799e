//! A sandbox's life: `up` makes its network, registers the agent with the gateway (its
//! listener inside the sandbox's namespace), starts the VM or process and waits until it is
//! ready; `down` — and every failure on the way up — ends the process, removes the
//! registration, the namespaces with their devices and rules, and the sandbox's state.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::gateway_api::{ApiError, GatewayApi, Listen, Registration};
use crate::guest::vm_files;
use crate::image::{Image, ImageError};
use crate::network::{NetworkError, SandboxNetwork, HOST_ADDRESS};
use crate::state::{
    now_secs, process_stat, Backend, ProcessState, SandboxRecord, StateDir, StateError,
    CONSOLE_FILE, VMM_LOG_FILE,
};
use crate::vmm::{choose_accel, wait_for_boot, Accel, Boot, VmSpec};
use crate::workload::{shell_command, spawn_confined, workload_environment, RunAs};

/// The environment variable that may hold the admin token instead of a file.
pub const TOKEN_VARIABLE: &str = "TOLLGATE_TOKEN";
/// How long `down` lets a process end on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Console lines quoted in a boot failure.
const TAIL_LINES: usize = 20;

/// Why a sandbox could not be started or taken down.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The network could not be made or removed.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// The guest image is missing or unusable.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The state directory could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// The gateway could not be reached or refused.
    #[error(transparent)]
    Gateway(#[from] ApiError),
    /// The agent already has a sandbox.
    #[error("agent {0} already has a sandbox (or one was not taken down): run `tollgate-launcher down {0}` first")]
    AlreadyUp(String),
    /// The agent has no sandbox in the state directory to take down.
    #[error("agent {0} has no sandbox")]
    NotFound(String),
    /// The admin token could not be read.
    #[error("cannot read the admin token from {path}: {source} (pass --token-file or set {TOKEN_VARIABLE})")]
    Token {
        /// The token file, or `$TOLLGATE_TOKEN` when the token was to come from that variable.
        path: PathBuf,
        /// Why it could not be read (for the variable: "not set").
        source: std::io::Error,
    },
    /// The gateway's CA certificate could not be read.
    #[error("cannot use {path} as the gateway's CA certificate: {reason} (pass --ca; the gateway writes it to tollgate-data/ca.pem)")]
    Ca {
        /// The file given as the CA certificate.
        path: PathBuf,
        /// Why it cannot be used (unreadable, or not a PEM certificate).
        reason: String,
    },
    /// The sandbox user is unusable.
    #[error("{0}")]
    User(String),
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What could not be started, as the message names it (QEMU, or the workload).
        what: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The VM did not come up; everything was taken down again.
    #[error("the VM of agent {agent} did not start: {reason}{tail}")]
    Boot {
        /// The agent whose VM did not start.
        agent: String,
        /// What went wrong: the guest's report, QEMU's exit, or no ready marker in time.
        reason: String,
        /// The end of its console and QEMU's messages.
        tail: String,
    },
    /// `down` could not remove everything.
    #[error("agent {agent}'s sandbox was not fully taken down: {}", problems.join("; "))]
    Incomplete {
        /// The agent whose sandbox was only partly taken down.
        agent: String,
        /// What is left, and why.
        problems: Vec<String>,
    },
}

/// How a VM's CPU is run; `Auto` settles it with a probe boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM if a probe boot works, else emulation.
    Auto,
    /// KVM, without probing.
    Kvm,
    /// QEMU's software emulation, without probing.
    Tcg,
}

/// Everything `up` needs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The agent's id on the gateway; it also names the sandbox's namespaces.
    pub agent: String,
    /// What runs the sandbox: a QEMU microVM, or a process in a network namespace.
    pub backend: Backend,
    /// The run mode the agent is registered with (`ReadOnly`, `Review`, `Autonomous`).
    pub run_mode: String,
    /// The Azure RBAC scopes it is registered with (policies compare ARM targets with them).
    pub scopes: Vec<String>,
    /// The gateway identity provider whose tokens its calls get, if any.
    pub identity: Option<String>,
    /// The port of its listener (the same in every sandbox).
    pub port: u16,
    /// The gateway's admin URL (`http://host:port`), where the agent is registered.
    pub admin: String,
    /// The admin token's file (`None`: [`TOKEN_VARIABLE`]).
    pub token_file: Option<PathBuf>,
    /// The gateway's CA certificate, installed as the sandbox's only trust anchor.
    pub ca_file: PathBuf,
    /// The guest image (VMs).
    pub image_dir: PathBuf,
    /// Guest memory (VMs).
    pub memory_mib: u32,
    /// KVM or emulation (VMs).
    pub accel: AccelChoice,
    /// How long a VM may take to report ready.
    pub ready_timeout: Duration,
    /// The unprivileged account the workload (process) or QEMU (VM) runs as.
    pub user: String,
    /// The workload (empty: idle until `down`).
    pub command: Vec<String>,
}

/// What `up` reports of a sandbox it started.
#[derive(Debug)]
pub struct Launched {
    /// Its record, as stored in the state directory.
    pub record: SandboxRecord,
    /// From the start of `up` until it was ready.
    pub ready_after: Duration,
}

/// Starts agent `options.agent`'s sandbox and returns once it is ready. On failure nothing
/// it made is left behind.
pub fn up(options: &UpOptions, state: &StateDir) -> Result<Launched, LaunchError> {
    let started = Instant::now();
    let net = SandboxNetwork::new(&options.agent, options.port)?;
    let user = RunAs::lookup(&options.user).map_err(LaunchError::User)?;
    let api = GatewayApi::new(&options.admin, read_token(options.token_file.as_deref())?)?;
    let ca_pem = read_ca(&options.ca_file)?;
    let image = match options.backend {
        Backend::Qemu => Some(Image::open(&options.image_dir)?),
        Backend::Netns => None,
    };
    if net.exists() {
        return Err(LaunchError::AlreadyUp(options.agent.clone()));
    }
    // The directory is the claim: of two `up`s for one agent, one creates it.
    let dir = state
        .create_sandbox_dir(&options.agent)
        .map_err(|e| match e {
            StateError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
                LaunchError::AlreadyUp(options.agent.clone())
            }
            other => LaunchError::State(other),
        })?;
    let record = SandboxRecord {
        agent: options.agent.clone(),
        backend: options.backend,
        pid: 0,
        pid_start: 0,
        started_at: now_secs(),
        admin: options.admin.clone(),
        token_file: options.token_file.clone(),
        registered: false,
        accel: None,
        command: options.command.clone(),
    };
    let mut launch = Launch {
        options,
        net,
        api,
        user,
        ca_pem,
        dir,
        state,
        record,
    };
    let launched = state
        .save(&launch.record)
        .map_err(LaunchError::from)
        .and_then(|()| match &image {
            Some(image) => launch.start_vm(image),
            None => launch.start_process(),
        });
    match launched {
        Ok(()) => Ok(Launched {
            record: launch.record,
            ready_after: started.elapsed(),
        }),
        Err(e) => {
            let problems = teardown(
                &launch.record,
                &launch.net,
                Some(&launch.api),
                state,
                Vec::new(),
            );
            for problem in problems {
                tracing::warn!(agent = %options.agent, "{problem}");
            }
            Err(e)
        }
    }
}

/// One `up` under way: what it has and what it has made so far (in `record`, saved after
/// every step, so `down` can undo it even if the launcher dies half-way).
struct Launch<'a> {
    options: &'a UpOptions,
    net: SandboxNetwork,
    api: GatewayApi,
    user: RunAs,
    ca_pem: Vec<u8>,
    dir: PathBuf,
    state: &'a StateDir,
    record: SandboxRecord,
}

impl Launch<'_> {
    fn proxy_url(&self) -> String {
        format!("http://{HOST_ADDRESS}:{}", self.options.port)
    }

    /// Registers the agent with its listener in the sandbox's namespace.
    fn register(&mut self) -> Result<(), LaunchError> {
        let options = self.options;
        let registration = Registration {
            run_mode: options.run_mode.clone(),
            scopes: options.scopes.clone(),
            identity: options.identity.clone(),
            listen: Listen {
                address: self.net.listen_address().to_string(),
                netns: self
                    .net
                    .gateway_namespace_path()
                    .to_string_lossy()
                    .to_string(),
            },
        };
        self.api.register(&options.agent, &registration)?;
        self.record.registered = true;
        self.state.save(&self.record)?;
        Ok(())
    }

    fn record_process(&mut self, pid: u32) -> Result<(), LaunchError> {
        self.record.pid = pid;
        self.record.pid_start = process_stat(pid).map(|(_, start)| start).unwrap_or(0);
        self.state.save(&self.record)?;
        Ok(())
    }

    /// The microVM: tap, registration, the VM's initramfs, QEMU, and the wait for ready.
    fn start_vm(&mut self, image: &Image) -> Result<(), LaunchError> {
        let options = self.options;
        let accel = match options.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => {
                choose_accel(image, self.user, &self.state.root().join("accel.json"))
            }
        };
        self.record.accel = Some(accel.to_string());
        let tap = self.net.create_for_vm()?;
        self.register()?;

        let initrd = self.dir.join("initrd");
        let mut bytes = std::fs::read(image.initramfs()).map_err(|source| StateError::Io {
            path: image.initramfs(),
            source,
        })?;
        bytes.extend(vm_files(
            &options.agent,
            &self.proxy_url(),
            &self.ca_pem,
            &options.command,
        ));
        write_readable(&initrd, &bytes)?;

        let spec = VmSpec {
            image,
            initrd: &initrd,
            memory_mib: options.memory_mib,
            accel,
            tap_fd: Some(tap.fd()),
            kernel_parameters: Vec::new(),
            root: None,
            disk: None,
        };
        let console = self.dir.join(CONSOLE_FILE);
        let vmm_log = self.dir.join(VMM_LOG_FILE);
        let mut qemu = spec
            .spawn(
                Some(self.net.gateway_namespace()),
                self.user,
                (&console, &vmm_log),
                Some(&tap),
            )
            .map_err(|source| LaunchError::Spawn {
                what: format!("{} (apt-get install -y qemu-system-x86)", crate::vmm::QEMU),
                source,
            })?;
        // QEMU holds the tap now; the launcher's copy goes.
        drop(tap);
        self.record_process(qemu.id())?;
        let boot_failure = |reason: String| LaunchError::Boot {
            agent: options.agent.clone(),
            reason,
            tail: tail_of(&[&console, &vmm_log]),
        };
        match wait_for_boot(&mut qemu, &console, options.ready_timeout) {
            Boot::Ready => Ok(()),
            Boot::Failed(why) => Err(boot_failure(format!("the guest reported: {why}"))),
            Boot::Exited(status) => Err(boot_failure(format!("QEMU exited ({status})"))),
            Boot::TimedOut => Err(boot_failure(format!(
                "no ready marker on its console within {} s",
                options.ready_timeout.as_secs()
            ))),
        }
    }

    /// The process: veth pair and second namespace, registration, the workload.
    fn start_process(&mut self) -> Result<(), LaunchError> {
        let options = self.options;
        self.net.create()?;
        self.register()?;
        let ca_file = self.dir.join("ca.pem");
        write_readable(&ca_file, &self.ca_pem)?;
        let env = workload_environment(
            &options.agent,
            &self.proxy_url(),
            &ca_file.to_string_lossy(),
        );
        let console = self.dir.join(CONSOLE_FILE);
        let child = spawn_confined(
            Some(self.net.sandbox_namespace()),
            self.user,
            "sh",
            &["-c".into(), shell_command(&options.command)],
            &env,
            (&console, &console),
            |_| {},
        )
        .map_err(|source| LaunchError::Spawn {
            what: "the workload".into(),
            source,
        })?;
        self.record_process(child.id())
    }
}

/// Takes agent `agent`'s sandbox down: everything `up` made goes.
pub fn down(agent: &str, state: &StateDir) -> Result<(), LaunchError> {
    let Some(record) = state.load(agent)? else {
        return Err(LaunchError::NotFound(agent.to_string()));
    };
    let net = SandboxNetwork::new(agent, 0)?;
    let (api, problems) = match read_token(record.token_file.as_deref())
        .and_then(|token| GatewayApi::new(&record.admin, token).map_err(LaunchError::from))
    {
        Ok(api) => (Some(api), Vec::new()),
        Err(_) if !record.registered => (None, Vec::new()),
        Err(e) => (None, vec![format!("the agent stays registered: {e}")]),
    };
    let problems = teardown(&record, &net, api.as_ref(), state, problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LaunchError::Incomplete {
            agent: agent.to_string(),
            problems,
        })
    }
}

/// Ends the process, removes the registration (when there is one and `api` is given), the
/// network and the state; returns `problems` and what else could not be done. The state
/// stays when anything could not, so `down` can be run again.
fn teardown(
    record: &SandboxRecord,
    net: &SandboxNetwork,
    api: Option<&GatewayApi>,
    state: &StateDir,
    mut problems: Vec<String>,
) -> Vec<String> {
    if record.pid != 0 && record.state() == ProcessState::Running {
        stop_process_group(record.pid);
    }
    if let (Some(api), true) = (api, record.registered) {
        if let Err(e) = api.deregister(&record.agent) {
            problems.push(e.to_string());
        }
    }
    if let Err(e) = net.destroy() {
        problems.push(e.to_string());
    }
    if problems.is_empty() {
        if let Err(e) = state.remove(&record.agent) {
            problems.push(e.to_string());
        }
    }
    problems
}

/// SIGTERM to the process group led by `pid`, SIGKILL if it is still there after the grace.
pub(crate) fn stop_process_group(pid: u32) {
    use nix::sys::signal::{killpg, Signal};
    let group = nix::unistd::Pid::from_raw(pid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !matches!(process_stat(pid), Some((s, _)) if s != 'Z') {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(group, Signal::SIGKILL);
}

pub(crate) fn read_token(file: Option<&Path>) -> Result<String, LaunchError> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|source| LaunchError::Token {
            path: path.to_path_buf(),
            source,
        })?,
        None => std::env::var(TOKEN_VARIABLE).map_err(|_| LaunchError::Token {
            path: PathBuf::from(format!("${TOKEN_VARIABLE}")),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not set"),
        })?,
    };
    Ok(token.trim().to_string())
}

pub(crate) fn read_ca(path: &Path) -> Result<Vec<u8>, LaunchError> {
    let bad = |reason: String| LaunchError::Ca {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(bad("it holds no PEM certificate".into()));
    }
    Ok(pem)
}

/// Writes a file the unprivileged VMM or workload may read.
pub(crate) fn write_readable(path: &Path, data: &[u8]) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, data)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)))
        .map_err(|source| StateError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// The last lines of each file that has any, for an error message.
pub(crate) fn tail_of(files: &[&Path]) -> String {
    let mut out = String::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            continue;
        }
        out.push_str(&format!("\n--- {} (last lines) ---\n", file.display()));
        out.push_str(&lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_comes_from_its_file_trimmed_and_a_missing_one_says_how_to_give_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("admin-token");
        std::fs::write(&file, "abc123\n").expect("write");
        assert_eq!(read_token(Some(&file)).expect("token"), "abc123");
        let err = read_token(Some(&dir.path().join("none"))).expect_err("missing");
        assert!(err.to_string().contains("--token-file"), "{err}");
    }

    #[test]
    fn an_unusable_state_directory_is_reported_as_such_not_as_a_sandbox_already_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("admin-token");
        std::fs::write(&token, "t").expect("write");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("write");
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, "").expect("write");
        let options = UpOptions {
            agent: format!("state-test-{}", std::process::id()),
            backend: Backend::Netns,
            run_mode: "ReadOnly".into(),
            scopes: vec![],
            identity: None,
            port: 3128,
            admin: "http://127.0.0.1:9".into(),
            token_file: Some(token),
            ca_file: ca,
            image_dir: dir.path().into(),
            memory_mib: 128,
            accel: AccelChoice::Tcg,
            ready_timeout: Duration::from_secs(1),
            user: "nobody".into(),
            command: vec![],
        };
        let err = up(&options, &StateDir::new(not_a_dir.join("state"))).expect_err("no state");
        assert!(matches!(err, LaunchError::State(_)), "{err}");
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, "not a certificate").expect("write");
        assert!(read_ca(&file)
            .expect_err("bad")
            .to_string()
            .contains("no PEM certificate"));
        assert!(read_ca(&dir.path().join("none")).is_err());
    }
}
