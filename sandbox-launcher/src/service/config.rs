//! The sandbox service's settings: every one has a default, so `tollgate-launcher serve`
//! runs as it is; each can be given as an option or an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What runs each session's sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// A QEMU microVM per session, its workspace on a disk image of its own.
    Qemu,
    /// The guest agent in a pair of network namespaces per session (hosts without QEMU):
    /// isolates the network, the session's files (a user id of its own) and `/tmp`.
    Netns,
}

/// How to accelerate the sessions' VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoiceArg {
    /// KVM if a probe boot with it works, else software emulation.
    Auto,
    /// KVM, without a probe boot.
    Kvm,
    /// QEMU's software emulation: slower, but needs no /dev/kvm.
    Tcg,
}

/// `tollgate-launcher serve`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceConfig {
    /// What runs each session's sandbox.
    #[arg(
        long,
        value_enum,
        env = "TOLLGATE_LAUNCHER_BACKEND",
        default_value = "qemu"
    )]
    pub backend: BackendChoice,
    /// The guest image (qemu; `tollgate-launcher image build` makes it).
    #[arg(long, default_value = "/var/lib/tollgate-launcher/image")]
    pub image: PathBuf,
    /// Each session VM's memory in MiB (qemu).
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u32,
    /// KVM or software emulation (qemu).
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelChoiceArg,
    /// Size of each session's workspace disk in MiB (qemu; a sparse file, so only what is
    /// written takes room).
    #[arg(long, default_value_t = 1024)]
    pub disk_mib: u64,
    /// Where the API listens: keep it host-only (loopback or a management network); sandboxes
    /// never reach it.
    #[arg(
        long,
        env = "TOLLGATE_LAUNCHER_LISTEN",
        default_value = "127.0.0.1:9920"
    )]
    pub listen: SocketAddr,
    /// Where sessions keep their records and workspaces (they outlive the service and its
    /// restarts, and are deleted with their session).
    #[arg(
        long,
        env = "TOLLGATE_LAUNCHER_DATA",
        default_value = "/var/lib/tollgate-launcher/sessions"
    )]
    pub data_dir: PathBuf,
    /// The API's bearer token file (created 0600 with a random token on first start).
    /// Default: `service-token` in the data directory.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The gateway's admin API, where sessions' listeners and tool calls are opened.
    #[arg(long, env = "TOLLGATE_ADMIN", default_value = "http://127.0.0.1:9901")]
    pub admin: String,
    /// The gateway's admin token file (or set TOLLGATE_TOKEN and pass --admin-token-file "").
    #[arg(long, default_value = "./tollgate-data/admin-token")]
    pub admin_token_file: PathBuf,
    /// The gateway's CA certificate, each sandbox's only trust anchor.
    #[arg(long, default_value = "./tollgate-data/ca.pem")]
    pub ca: PathBuf,
    /// The guest agent binary (run in each session's sandbox; the VM gets a copy). Default:
    /// `tollgate-guest-agent` beside this program.
    #[arg(long)]
    pub guest_agent: Option<PathBuf>,
    /// The port of each session's gateway listener inside its namespace.
    #[arg(long, default_value_t = 3128)]
    pub gateway_port: u16,
    /// Seconds an idle session runs before it is stopped (its files stay).
    #[arg(long, default_value_t = 15 * 60)]
    pub idle_stop_secs: u64,
    /// Seconds a stopped session's files are kept before the session is deleted (0: kept
    /// until it is deleted).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub retention_secs: u64,
    /// Sessions one agent may have (running or stopped).
    #[arg(long, default_value_t = 16)]
    pub max_sessions_per_agent: usize,
    /// Sessions over all agents (running or stopped); more get 429.
    #[arg(long, default_value_t = 128)]
    pub max_sessions: usize,
    /// Bytes kept of each of an execution's stdout and stderr.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_output_bytes: usize,
    /// Largest file uploaded or downloaded, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_file_bytes: u64,
    /// Timeout of an execution that asks for none, in seconds.
    #[arg(long, default_value_t = 60)]
    pub default_timeout_secs: u64,
    /// Longest timeout an execution may ask for, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub max_timeout_secs: u64,
    /// Seconds past its timeout an execution may take to report its end. Then the service
    /// takes the sandbox for hung: it answers 504 guest_unresponsive (or ends the stream with
    /// that error) and stops the sandbox, files kept. The execution's tool call lives its
    /// timeout plus this on the gateway, so one the service cannot close still ends.
    #[arg(long, default_value_t = 30)]
    pub execution_grace_secs: u64,
    /// The first of the user ids sessions' executions run as, one per session (netns
    /// backend): a range of `max_sessions` ids no account on the host uses.
    #[arg(long, default_value_t = 2_000_000)]
    pub uid_base: u32,
    /// Seconds a session's sandbox may take to become ready.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout_secs: u64,
    /// Size of each session's private /tmp (netns backend).
    #[arg(long, default_value = "256m")]
    pub tmp_size: String,
}

impl ServiceConfig {
    /// The API's bearer token file: `--token-file`, else `service-token` in the data directory.
    pub fn token_path(&self) -> PathBuf {
        self.token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("service-token"))
    }

    /// The guest agent binary: `--guest-agent`, else `tollgate-guest-agent` beside this program.
    pub fn guest_agent_path(&self) -> PathBuf {
        self.guest_agent.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("tollgate-guest-agent")))
                .unwrap_or_else(|| PathBuf::from("tollgate-guest-agent"))
        })
    }

    /// How long an idle session runs before it is stopped (`--idle-stop-secs`).
    pub fn idle_stop(&self) -> Duration {
        Duration::from_secs(self.idle_stop_secs)
    }

    /// How long a stopped session's files are kept.
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_secs > 0).then(|| Duration::from_secs(self.retention_secs))
    }

    /// Checks what the options alone can tell.
    pub fn check(&self) -> Result<(), String> {
        if self.max_sessions == 0 || self.max_sessions_per_agent == 0 {
            return Err("--max-sessions and --max-sessions-per-agent must be at least 1".into());
        }
        if self.uid_base < 1000
            || self
                .uid_base
                .checked_add(self.max_sessions as u32)
                .is_none()
        {
            return Err(
                "--uid-base must be at least 1000 and leave room for --max-sessions ids".into(),
            );
        }
        if self.default_timeout_secs == 0 || self.default_timeout_secs > self.max_timeout_secs {
            return Err(
                "--default-timeout-secs must be at least 1 and at most --max-timeout-secs".into(),
            );
        }
        if self.idle_stop_secs == 0 {
            return Err("--idle-stop-secs must be at least 1".into());
        }
        if self.disk_mib < 16 || self.memory_mib < 64 {
            return Err("--disk-mib must be at least 16 and --memory-mib at least 64".into());
        }
        Ok(())
    }
}
