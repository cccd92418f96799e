//! `tollgate-guest-agent`: the control process of one session's sandbox (see the crate's
//! documentation). Started by the sandbox's init (or, for a namespace sandbox, by the
//! service), as root; executions run as `--user`.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tollgate_guest::exec::{RunAs, Shell};
use tollgate_guest::files::Workspace;
use tollgate_guest::python::Python;
use tollgate_guest::server::{serve, Agent};

#[derive(Parser)]
#[command(
    name = "tollgate-guest-agent",
    version,
    about = "Runs a session's executions and serves its files"
)]
struct Cli {
    /// Where the sandbox service reaches the agent (port 0: any; the address is printed).
    #[arg(long)]
    listen: SocketAddr,
    /// Serve only connections from this address (the service's side of the sandbox's
    /// network) and close any other unanswered; every address if left out. Set it inside a
    /// sandbox, where the workload can reach the agent too.
    #[arg(long)]
    allow_from: Option<IpAddr>,
    /// A file holding the session's secret (read once; keep it from the workload).
    #[arg(long)]
    secret_file: PathBuf,
    /// The session's workspace: where files go, and executions' first working directory.
    #[arg(long)]
    workspace: PathBuf,
    /// Where the shell state is kept between executions.
    #[arg(long)]
    state: PathBuf,
    /// The user executions run as: a name, or `UID:GID` (a namespace sandbox's own ids, which
    /// need no account); the agent's own if left out.
    #[arg(long)]
    user: Option<String>,
    /// Most bytes kept of each of stdout and stderr.
    #[arg(long, default_value_t = 1 << 20)]
    max_output_bytes: usize,
    /// Largest file served or written, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_file_bytes: u64,
    /// Timeout of an execution that asks for none, in seconds.
    #[arg(long, default_value_t = 60)]
    default_timeout_secs: u64,
    /// Longest timeout an execution may ask for, in seconds.
    #[arg(long, default_value_t = 3600)]
    max_timeout_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-guest-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The account `user` names: `UID:GID`, or a user name on this system.
fn run_as(user: &str) -> Result<RunAs, String> {
    if let Some((uid, gid)) = user.split_once(':') {
        let id = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("--user {user:?}: use a name or UID:GID"))
        };
        let (uid, gid) = (id(uid)?, id(gid)?);
        if uid == 0 {
            return Err("--user: executions never run as root".into());
        }
        return Ok(RunAs { uid, gid });
    }
    let found = nix::unistd::User::from_name(user)
        .map_err(|e| format!("user {user}: {e}"))?
        .ok_or_else(|| format!("no user {user}"))?;
    Ok(RunAs {
        uid: found.uid.as_raw(),
        gid: found.gid.as_raw(),
    })
}

fn run(cli: Cli) -> Result<(), String> {
    let secret = std::fs::read(&cli.secret_file)
        .map_err(|e| format!("{}: {e}", cli.secret_file.display()))?;
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        return Err("the secret must have at least 16 bytes".into());
    }
    let run_as = cli.user.as_deref().map(run_as).transpose()?;
    for dir in [&cli.workspace, &cli.state] {
        use std::os::unix::fs::PermissionsExt;
        // The session's alone: no other sandbox's user may look in.
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some(user) = run_as {
            nix::unistd::chown(
                dir.as_path(),
                Some(nix::unistd::Uid::from_raw(user.uid)),
                Some(nix::unistd::Gid::from_raw(user.gid)),
            )
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    let shell = Shell {
        workspace: cli.workspace.clone(),
        state: cli.state,
        run_as,
        max_output_bytes: cli.max_output_bytes,
        default_timeout: Duration::from_secs(cli.default_timeout_secs),
        max_timeout: Duration::from_secs(cli.max_timeout_secs),
    };
    let python = Python::new(
        cli.workspace.clone(),
        run_as,
        cli.max_output_bytes,
        (shell.default_timeout, shell.max_timeout),
    );
    let workspace = Workspace::open(&cli.workspace, run_as, cli.max_file_bytes)
        .map_err(|e| format!("{}: {e}", cli.workspace.display()))?;
    let listener = TcpListener::bind(cli.listen).map_err(|e| format!("{}: {e}", cli.listen))?;
    // The address actually bound (a port of 0 picks one), for whoever started the agent.
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {bound}");
    let max_request = usize::try_from(cli.max_file_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(64 << 10);
    let mut agent = Agent::new(secret, (shell, python), workspace, max_request);
    if let Some(peer) = cli.allow_from {
        agent = agent.serving_only(peer);
    }
    let agent = Arc::new(agent);
    serve(listener, agent).map_err(|e| e.to_string())
}
