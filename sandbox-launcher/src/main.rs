//! `tollgate-launcher`: start and stop agents' sandboxes (see the crate's documentation).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tollgate_launcher::client::{self, ServiceClient};
use tollgate_launcher::image::root::{parse_packages, Compression, DEFAULT_PACKAGES};
use tollgate_launcher::image::{build, BuildOptions, RootOptions};
use tollgate_launcher::sandbox::{down, up, AccelChoice, UpOptions};
use tollgate_launcher::service::config::ServiceConfig;
use tollgate_launcher::state::{resident_kib, Backend, ProcessState, StateDir, CONSOLE_FILE};

#[derive(Parser)]
#[command(
    name = "tollgate-launcher",
    version,
    about = "One sandbox per agent whose only way out is the Tollgate gateway"
)]
struct Cli {
    /// Where the launcher keeps its sandboxes' state.
    #[arg(
        long,
        env = "TOLLGATE_LAUNCHER_STATE",
        default_value = "/run/tollgate-launcher",
        global = true
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the guest image that VMs and sessions boot.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Start an agent's sandbox; returns once it is ready.
    Up(UpArgs),
    /// Take an agent's sandbox down: process, registration, network, state.
    Down {
        /// The agent whose sandbox to take down.
        agent: String,
    },
    /// The sandboxes: agent, backend, PID, uptime, state, memory.
    List,
    /// A sandbox's console (a VM's serial console, a process's output).
    Logs {
        /// The agent whose sandbox's console to print.
        agent: String,
        /// Keep printing what comes until the sandbox ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run the sandbox service: sessions (one sandbox per agent and thread) behind an HTTP
    /// API; runs until SIGINT or SIGTERM.
    Serve(Box<ServiceConfig>),
    /// Run a command in a session (made if it does not exist), printing its output as it
    /// comes; exits with the command's status.
    Exec(ExecArgs),
    /// Run Python code in a session's persistent interpreter (made if it does not exist),
    /// printing its output as it comes and its result; exits 1 if it raised.
    Python(PythonArgs),
    /// Move files in and out of a session's workspace.
    Files {
        #[command(subcommand)]
        command: FilesCommand,
    },
    /// List, show or delete the sandbox service's sessions.
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
}

/// Where the sandbox service is (for `exec`, `files`, `sessions`).
#[derive(clap::Args)]
struct ServiceArgs {
    /// The sandbox service's base URL (where `serve` listens).
    #[arg(
        long,
        env = "TOLLGATE_LAUNCHER_URL",
        default_value = "http://127.0.0.1:9920"
    )]
    service: String,
    /// Its token file (or set TOLLGATE_LAUNCHER_TOKEN).
    #[arg(
        long,
        default_value = "/var/lib/tollgate-launcher/sessions/service-token"
    )]
    service_token_file: PathBuf,
}

/// Which session: there is one per agent and conversation thread.
#[derive(clap::Args)]
struct SessionArgs {
    /// The agent the session belongs to (its id on the gateway).
    #[arg(long)]
    agent: String,
    /// The conversation thread; each of an agent's threads has a session of its own.
    #[arg(long)]
    thread: String,
}

/// What every execution (a command or Python code) is given: where, in which session, for
/// how long, as which tool call.
#[derive(clap::Args)]
struct CallArgs {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    session: SessionArgs,
    /// Seconds before it is stopped (the service's default otherwise).
    #[arg(long)]
    timeout: Option<u64>,
    /// The tool call's id on the gateway (generated otherwise).
    #[arg(long)]
    tool_call_id: Option<String>,
}

impl CallArgs {
    /// Runs `body` (plus the timeout and tool call id) on `route`; the command line's exit.
    async fn run(self, route: client::Route, mut body: serde_json::Value) -> Result<i32, String> {
        let client = self.service.client()?;
        if let Some(timeout) = self.timeout {
            body["timeout_secs"] = timeout.into();
        }
        if let Some(id) = self.tool_call_id {
            body["tool_call_id"] = id.into();
        }
        let session = (self.session.agent.as_str(), self.session.thread.as_str());
        client::exec(&client, session, route, body).await
    }
}

#[derive(clap::Args)]
struct ExecArgs {
    #[command(flatten)]
    call: CallArgs,
    /// Where to run it (relative to the workspace).
    #[arg(long)]
    cwd: Option<String>,
    /// A variable exported into the session first (repeatable): NAME=VALUE.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// A shell command line instead of a program and its arguments.
    #[arg(long, short = 'c', conflicts_with = "argv")]
    command: Option<String>,
    /// The program and its arguments.
    #[arg(last = true)]
    argv: Vec<String>,
}

#[derive(clap::Args)]
struct PythonArgs {
    #[command(flatten)]
    call: CallArgs,
    /// The code to run, given inline instead of in FILE.
    #[arg(long, short = 'c', conflicts_with = "file")]
    code: Option<String>,
    /// A file holding the code (`-`: standard input).
    file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum FilesCommand {
    /// Upload LOCAL (or standard input, `-`) as PATH in the workspace.
    Put {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        session: SessionArgs,
        /// The local file, or `-`.
        local: PathBuf,
        /// Where to put it, relative to the workspace's root.
        path: String,
    },
    /// Download PATH from the workspace to standard output (or LOCAL).
    Get {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        session: SessionArgs,
        /// The file to download, relative to the workspace's root.
        path: String,
        /// The local file to write (standard output otherwise).
        local: Option<PathBuf>,
    },
    /// List a directory of the workspace.
    Ls {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        session: SessionArgs,
        /// The directory (the workspace's root otherwise).
        #[arg(default_value = "")]
        path: String,
    },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// List the sessions (of every agent, or of one).
    List {
        #[command(flatten)]
        service: ServiceArgs,
        /// Only the sessions of the agent with this id.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Print one session, as JSON.
    Show {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Delete a session: its sandbox and its files.
    Rm {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        session: SessionArgs,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the guest image: Debian's kernel (downloaded with apt-get), an initramfs with
    /// busybox and curl, and the sessions' read-only root file system (Debian packages:
    /// Python, its data libraries, the shell tools; needs root, debootstrap and erofs-utils).
    Build {
        /// Where to write the image (what `serve --image` and `up --image` read).
        #[arg(long, default_value = "/var/lib/tollgate-launcher/image")]
        out: PathBuf,
        /// Where the kernel package is downloaded to.
        #[arg(long, default_value = "/var/cache/tollgate-launcher")]
        cache: PathBuf,
        /// Use only a kernel package already in the cache (with --without-root).
        #[arg(long)]
        offline: bool,
        /// Build no root file system: an image for `up` workloads only, not for sessions.
        #[arg(long)]
        without_root: bool,
        /// The root file system's package list (one Debian package per line; default: the
        /// list built into the launcher, `sandbox-launcher/src/image/packages.txt`).
        #[arg(long)]
        packages: Option<PathBuf>,
        /// How the root file system's files are stored.
        #[arg(long, value_enum, default_value = "lz4hc")]
        compression: CompressionArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressionArg {
    /// Plain blocks: nothing to decompress, about twice the size.
    None,
    /// LZ4 (high compression): about half the size, as fast to read under emulation.
    Lz4hc,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// A QEMU microVM.
    Qemu,
    /// A process in a network namespace (hosts without QEMU).
    Netns,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    /// KVM if a probe boot with it works, else software emulation.
    Auto,
    /// KVM, without a probe boot.
    Kvm,
    /// QEMU's software emulation: slower, but needs no /dev/kvm.
    Tcg,
}

#[derive(clap::Args)]
struct UpArgs {
    /// The agent (1 to 48 of a-z, 0-9, '-').
    #[arg(long)]
    agent: String,
    /// What runs the sandbox.
    #[arg(long, value_enum, default_value = "qemu")]
    backend: BackendArg,
    /// The agent's run mode, registered with the gateway.
    #[arg(long, default_value = "ReadOnly", value_parser = ["ReadOnly", "Review", "Autonomous"])]
    run_mode: String,
    /// An RBAC scope of the agent's identity (repeatable), e.g.
    /// /subscriptions/<id>/resourceGroups/<rg>.
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The identity provider whose tokens the agent's tool calls get.
    #[arg(long)]
    identity: Option<String>,
    /// The port of the agent's gateway listener inside the sandbox's namespace.
    #[arg(long, default_value_t = 3128)]
    port: u16,
    /// The gateway's admin API, where the agent and its listener are registered.
    #[arg(long, default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// The admin token's file (or set TOLLGATE_TOKEN and pass --token-file "").
    #[arg(long, default_value = "./tollgate-data/admin-token")]
    token_file: PathBuf,
    /// The gateway's CA certificate, installed as the sandbox's only trust anchor.
    #[arg(long, default_value = "./tollgate-data/ca.pem")]
    ca: PathBuf,
    /// The guest image (qemu).
    #[arg(long, default_value = "/var/lib/tollgate-launcher/image")]
    image: PathBuf,
    /// Guest memory in MiB (qemu).
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// KVM or software emulation (qemu).
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// Seconds the guest may take to report ready (qemu).
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
    /// The unprivileged user the workload (netns) or QEMU (qemu) runs as.
    #[arg(long, default_value = "nobody")]
    user: String,
    /// The workload: a command run in the sandbox (none: it idles until `down`).
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let state = StateDir::new(&cli.state_dir);
    let outcome = match cli.command {
        Command::Serve(config) => {
            runtime().and_then(|rt| rt.block_on(tollgate_launcher::service::serve(*config)))
        }
        Command::Exec(args) => {
            return match runtime().and_then(|rt| rt.block_on(exec(args))) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(message) => {
                    eprintln!("tollgate-launcher: {message}");
                    ExitCode::from(125)
                }
            }
        }
        Command::Python(args) => {
            return match runtime().and_then(|rt| rt.block_on(python(args))) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(message) => {
                    eprintln!("tollgate-launcher: {message}");
                    ExitCode::from(125)
                }
            }
        }
        Command::Files { command } => runtime().and_then(|rt| rt.block_on(files(command))),
        Command::Sessions { command } => runtime().and_then(|rt| rt.block_on(sessions(command))),
        command => run(command, &state),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tollgate-launcher: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, state: &StateDir) -> Result<(), String> {
    match command {
        Command::Image {
            command:
                ImageCommand::Build {
                    out,
                    cache,
                    offline,
                    without_root,
                    packages,
                    compression,
                },
        } => {
            let root = if without_root {
                None
            } else {
                let list = match &packages {
                    Some(file) => std::fs::read_to_string(file)
                        .map_err(|e| format!("{}: {e}", file.display()))?,
                    None => DEFAULT_PACKAGES.to_string(),
                };
                Some(RootOptions {
                    packages: parse_packages(&list).map_err(|e| e.to_string())?,
                    compression: match compression {
                        CompressionArg::None => Compression::None,
                        CompressionArg::Lz4hc => Compression::Lz4hc,
                    },
                })
            };
            let image = build(&BuildOptions {
                out,
                cache,
                offline,
                root,
            })
            .map_err(|e| e.to_string())?;
            let m = &image.manifest;
            println!(
                "guest image: {} ({} MiB kernel, {} MiB initramfs{}) in {}",
                m.kernel_package,
                m.kernel_bytes >> 20,
                m.initramfs_bytes >> 20,
                m.root
                    .as_ref()
                    .map(|r| format!(
                        ", {} MiB root file system of {} packages from {}",
                        r.bytes >> 20,
                        r.packages.len(),
                        r.suite
                    ))
                    .unwrap_or_default(),
                image
                    .kernel()
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            Ok(())
        }
        Command::Up(args) => {
            let options = up_options(args);
            let launched = up(&options, state).map_err(|e| e.to_string())?;
            let r = &launched.record;
            println!(
                "agent {} up: {}{} pid {}, ready in {:.1} s; its output: tollgate-launcher logs {}",
                r.agent,
                r.backend,
                r.accel
                    .as_deref()
                    .map(|a| format!(" ({a})"))
                    .unwrap_or_default(),
                r.pid,
                launched.ready_after.as_secs_f64(),
                r.agent
            );
            Ok(())
        }
        Command::Down { agent } => {
            down(&agent, state).map_err(|e| e.to_string())?;
            println!("agent {agent} down");
            Ok(())
        }
        Command::List => {
            println!(
                "{:<24} {:<7} {:>8} {:>8} {:<8} {:>9}",
                "AGENT", "BACKEND", "PID", "UPTIME", "STATE", "RSS"
            );
            for record in state.list() {
                match record {
                    Ok(r) => {
                        let running = r.state();
                        let rss = (running == ProcessState::Running)
                            .then(|| resident_kib(r.pid))
                            .flatten()
                            .map(|kib| format!("{} MiB", kib / 1024))
                            .unwrap_or_else(|| "-".into());
                        println!(
                            "{:<24} {:<7} {:>8} {:>7}s {:<8} {:>9}",
                            r.agent,
                            r.backend,
                            r.pid,
                            r.uptime_secs(),
                            running,
                            rss
                        );
                    }
                    Err(e) => eprintln!("tollgate-launcher: {e}"),
                }
            }
            Ok(())
        }
        Command::Logs { agent, follow } => logs(state, &agent, follow),
        Command::Serve(_)
        | Command::Exec(_)
        | Command::Python(_)
        | Command::Files { .. }
        | Command::Sessions { .. } => Err("handled in main".into()),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

impl ServiceArgs {
    fn client(&self) -> Result<ServiceClient, String> {
        let token = match std::env::var("TOLLGATE_LAUNCHER_TOKEN") {
            Ok(token) => token,
            Err(_) => std::fs::read_to_string(&self.service_token_file).map_err(|e| {
                format!(
                    "cannot read the service's token from {}: {e} (pass --service-token-file or set TOLLGATE_LAUNCHER_TOKEN)",
                    self.service_token_file.display()
                )
            })?,
        };
        ServiceClient::new(&self.service, token.trim().to_string())
    }
}

async fn exec(args: ExecArgs) -> Result<i32, String> {
    let mut env = serde_json::Map::new();
    for pair in &args.env {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--env {pair:?}: use NAME=VALUE"))?;
        env.insert(name.to_string(), value.into());
    }
    let mut execution = serde_json::json!({ "env": env });
    match (args.command, args.argv.is_empty()) {
        (Some(command), _) => execution["command"] = command.into(),
        (None, false) => execution["argv"] = args.argv.into(),
        (None, true) => {
            return Err("give the command: -- PROGRAM ARGS… or -c 'command line'".into())
        }
    }
    if let Some(cwd) = args.cwd {
        execution["cwd"] = cwd.into();
    }
    args.call.run(client::Route::Exec, execution).await
}

async fn python(args: PythonArgs) -> Result<i32, String> {
    let code = match (args.code, args.file) {
        (Some(code), _) => code,
        (None, Some(file)) if file.as_os_str() == "-" => {
            let mut code = String::new();
            std::io::stdin()
                .read_to_string(&mut code)
                .map_err(|e| format!("standard input: {e}"))?;
            code
        }
        (None, Some(file)) => {
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?
        }
        (None, None) => {
            return Err("give the code: -c CODE, a FILE, or - for standard input".into())
        }
    };
    let call = serde_json::json!({ "code": code });
    args.call.run(client::Route::Python, call).await
}

impl SessionArgs {
    /// The API path of the session's files `route` (`files`, `files/list`) for `path`.
    fn files(&self, route: &str, path: &str) -> String {
        format!(
            "{}/{route}?path={}",
            client::session_path(&self.agent, &self.thread),
            percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC)
        )
    }
}

async fn files(command: FilesCommand) -> Result<(), String> {
    match command {
        FilesCommand::Put {
            service,
            session,
            local,
            path,
        } => {
            let bytes = if local.as_os_str() == "-" {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut bytes)
                    .map_err(|e| format!("standard input: {e}"))?;
                bytes
            } else {
                std::fs::read(&local).map_err(|e| format!("{}: {e}", local.display()))?
            };
            let target = session.files("files", &path);
            service
                .client()?
                .call(http::Method::PUT, &target, bytes.into())
                .await?;
            Ok(())
        }
        FilesCommand::Get {
            service,
            session,
            path,
            local,
        } => {
            let target = session.files("files", &path);
            let bytes = service
                .client()?
                .call(http::Method::GET, &target, Default::default())
                .await?;
            match local {
                Some(local) => {
                    std::fs::write(&local, &bytes).map_err(|e| format!("{}: {e}", local.display()))
                }
                None => std::io::stdout()
                    .write_all(&bytes)
                    .map_err(|e| e.to_string()),
            }
        }
        FilesCommand::Ls {
            service,
            session,
            path,
        } => {
            let target = session.files("files/list", &path);
            let bytes = service
                .client()?
                .call(http::Method::GET, &target, Default::default())
                .await?;
            let listing: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            for entry in listing["entries"].as_array().into_iter().flatten() {
                println!(
                    "{:<8} {:>12} {}",
                    entry["kind"].as_str().unwrap_or("?"),
                    entry["size"].as_u64().unwrap_or(0),
                    entry["name"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
    }
}

async fn sessions(command: SessionsCommand) -> Result<(), String> {
    match command {
        SessionsCommand::List { service, agent } => {
            let target = match agent {
                Some(agent) => format!(
                    "/v1/sessions?agent={}",
                    percent_encoding::utf8_percent_encode(
                        &agent,
                        percent_encoding::NON_ALPHANUMERIC
                    )
                ),
                None => "/v1/sessions".into(),
            };
            let bytes = service
                .client()?
                .call(http::Method::GET, &target, Default::default())
                .await?;
            let list: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            println!(
                "{:<24} {:<24} {:<8} {:>10} {:>12}",
                "AGENT", "THREAD", "STATE", "EXECUTIONS", "DISK"
            );
            for s in list["sessions"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<24} {:<8} {:>10} {:>12}",
                    s["agent"].as_str().unwrap_or("?"),
                    s["thread"].as_str().unwrap_or("?"),
                    s["state"].as_str().unwrap_or("?"),
                    s["executions"].as_u64().unwrap_or(0),
                    s["disk_bytes"].as_u64().unwrap_or(0)
                );
            }
            Ok(())
        }
        SessionsCommand::Show { service, session } => {
            let bytes = service
                .client()?
                .call(
                    http::Method::GET,
                    &client::session_path(&session.agent, &session.thread),
                    Default::default(),
                )
                .await?;
            println!("{}", String::from_utf8_lossy(&bytes));
            Ok(())
        }
        SessionsCommand::Rm { service, session } => {
            service
                .client()?
                .call(
                    http::Method::DELETE,
                    &client::session_path(&session.agent, &session.thread),
                    Default::default(),
                )
                .await?;
            println!(
                "session {} of agent {} deleted",
                session.thread, session.agent
            );
            Ok(())
        }
    }
}

fn up_options(args: UpArgs) -> UpOptions {
    UpOptions {
        agent: args.agent,
        backend: match args.backend {
            BackendArg::Qemu => Backend::Qemu,
            BackendArg::Netns => Backend::Netns,
        },
        run_mode: args.run_mode,
        scopes: args.scopes,
        identity: args.identity,
        port: args.port,
        admin: args.admin,
        token_file: (!args.token_file.as_os_str().is_empty()).then_some(args.token_file),
        ca_file: args.ca,
        image_dir: args.image,
        memory_mib: args.memory,
        accel: match args.accel {
            AccelArg::Auto => AccelChoice::Auto,
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
        },
        ready_timeout: Duration::from_secs(args.ready_timeout),
        user: args.user,
        command: args.command,
    }
}

/// Prints the sandbox's console; with `follow`, also what comes until it ends.
fn logs(state: &StateDir, agent: &str, follow: bool) -> Result<(), String> {
    let record = state
        .load(agent)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("agent {agent} has no sandbox"))?;
    let path = state.sandbox_dir(agent).join(CONSOLE_FILE);
    let mut file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut offset = 0;
    let mut out = std::io::stdout();
    loop {
        let mut chunk = Vec::new();
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_to_end(&mut chunk))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        offset += chunk.len() as u64;
        out.write_all(&chunk)
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
        if !follow || (chunk.is_empty() && record.state() == ProcessState::Exited) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
