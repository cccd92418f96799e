//! The gateway under test: the `tollgate` binary as a child process on ephemeral loopback
//! ports, in a temporary directory of its own, and a client for its admin API.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::http::Response;
use crate::procfs;

/// A directory removed when dropped (unless [`TempDir::keep`] was called).
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `<system temp dir>/<name>-<this process's id>`.
    pub fn new(name: &str) -> std::io::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path, keep: false })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place when dropped (to read a log after a failure).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The gateway under test, as a child process on ephemeral loopback ports. It is killed when
/// [stopped](Gateway::stop) or dropped.
pub struct Gateway {
    child: Child,
    /// Its egress proxy.
    pub egress: SocketAddr,
    /// Its admin API.
    pub admin: SocketAddr,
    dir: TempDir,
}

impl Gateway {
    /// Starts `binary` (`tollgate serve`) in `dir` and waits until it is ready.
    ///
    /// The configuration it gets is `data_dir = "<dir>/data"`, egress and admin listeners on
    /// ephemeral loopback ports, then `config_body`: the caller's sections (limits, upstream,
    /// policy, approvals, agents, …). The gateway logs to `<dir>/gateway.log`.
    pub fn start(binary: &Path, dir: TempDir, config_body: &str) -> anyhow::Result<Gateway> {
        let mut dir = dir;
        let config = format!(
            "data_dir = {data:?}\n[egress]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{config_body}",
            data = dir.path().join("data")
        );
        let config_path = dir.path().join("tollgate.toml");
        std::fs::write(&config_path, config)?;
        let log_path = dir.path().join("gateway.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        let (mut egress, mut admin) = (None, None);
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(addr) = line.trim().strip_prefix("egress proxy: http://") {
                egress = Some(addr.parse()?);
            }
            if let Some(rest) = line.trim().strip_prefix("admin API: http://") {
                admin = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            }
            if line == "ready" {
                break;
            }
        }
        let (Some(egress), Some(admin)) = (egress, admin) else {
            let _ = child.kill();
            let _ = child.wait();
            dir.keep();
            bail!(
                "the gateway did not report its addresses; see its log, {}",
                log_path.display()
            );
        };
        Ok(Gateway {
            child,
            egress,
            admin,
            dir,
        })
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its directory (configuration, `data/`, `gateway.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its log (its standard error).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    /// Leaves its directory in place after the gateway stops (to read its log).
    pub fn keep_dir(&mut self) {
        self.dir.keep();
    }

    /// When a run `failed`, keeps the gateway's directory and says where its log is.
    pub fn keep_log_if(&mut self, failed: bool) {
        if failed {
            self.keep_dir();
            eprintln!("the gateway's log is kept: {}", self.log_path().display());
        }
    }

    /// User + system CPU time of the gateway process so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        procfs::cpu_time(self.pid())
    }

    /// The gateway's open file descriptors now.
    pub fn open_fds(&self) -> Option<u64> {
        procfs::open_fds(self.pid())
    }

    /// Peak resident set size of the gateway process, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        procfs::status_kib(self.pid(), "VmHWM")
    }

    /// Current resident set size of the gateway process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        procfs::status_kib(self.pid(), "VmRSS")
    }

    /// The gateway's threads now (its workers, and blocking-pool threads while they live).
    pub fn threads(&self) -> Option<u64> {
        procfs::threads(self.pid())
    }

    /// The gateway's soft limit on open files.
    pub fn open_files_limit(&self) -> Option<u64> {
        procfs::open_files_limit(self.pid())
    }

    /// A client for its admin API, with the admin token it created in its data directory.
    pub fn admin_api(&self) -> anyhow::Result<AdminApi> {
        let path = self.dir.path().join("data/admin-token");
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(AdminApi {
            addr: self.admin,
            token: token.trim().to_string(),
        })
    }

    /// Kills the gateway and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The gateway's admin API, with the admin token. Each call is one connection
/// (`Connection: close`).
pub struct AdminApi {
    addr: SocketAddr,
    token: String,
}

impl AdminApi {
    /// One call: `method path` with an optional JSON body; the whole response.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Response> {
        self.connect()?.call(method, path, body)
    }

    /// Approves held request `id` (`POST /v1/approvals/{id}/approve`).
    pub fn approve(&self, id: &str) -> anyhow::Result<()> {
        let answer = self.call("POST", &format!("/v1/approvals/{id}/approve"), None)?;
        if answer.status != 200 {
            bail!("approving {id}: {}", answer.status_line);
        }
        Ok(())
    }

    /// The ids of the approvals pending now (`GET /v1/approvals?state=pending`).
    pub fn pending_ids(&self) -> anyhow::Result<Vec<String>> {
        let answer = self.call("GET", "/v1/approvals?state=pending", None)?;
        if answer.status != 200 {
            bail!("listing pending approvals: {}", answer.status_line);
        }
        let json: serde_json::Value =
            serde_json::from_slice(&answer.body).context("the pending approvals' JSON")?;
        Ok(json
            .get("approvals")
            .and_then(serde_json::Value::as_array)
            .context("no \"approvals\" array in the listing")?
            .iter()
            .filter_map(|a| a.get("id")?.as_str().map(str::to_string))
            .collect())
    }

    /// A connection for one call, opened now (to time the call without the connect).
    pub fn connect(&self) -> anyhow::Result<AdminConnection<'_>> {
        let stream = TcpStream::connect(self.addr)
            .with_context(|| format!("connecting to the admin API at {}", self.addr))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(AdminConnection { api: self, stream })
    }
}

/// An open connection to the admin API, for one call.
pub struct AdminConnection<'a> {
    api: &'a AdminApi,
    stream: TcpStream,
}

impl AdminConnection<'_> {
    /// Sends `method path` (with an optional JSON body) and reads the whole response.
    pub fn call(
        mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<Response> {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n",
            self.api.addr, self.api.token
        );
        match body {
            Some(body) => request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            None if method == "GET" || method == "HEAD" => request.push_str("\r\n"),
            None => request.push_str("Content-Length: 0\r\n\r\n"),
        }
        self.stream.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        self.stream
            .read_to_end(&mut answer)
            .with_context(|| format!("reading the admin API's answer to {method} {path}"))?;
        Response::parse(&answer)
            .with_context(|| format!("the admin API's answer to {method} {path}"))
    }
}
