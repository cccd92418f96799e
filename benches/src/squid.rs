//! Squid, the forward proxy users would otherwise run, set up for the comparison: a domain
//! allowlist equivalent to Tollgate's, no caching, no access log, host names pinned to the
//! origin (`hosts_file`), and `ssl_bump` interception with a CA of the benchmark's for
//! HTTPS (Debian's `squid-openssl` build; the plain `squid` package cannot bump).
//!
//! It runs in the foreground (`-N`: one process, Squid's default of one worker) as the
//! `proxy` user, plus its certificate helpers; CPU time and memory are summed over them.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procfs;
use crate::tls::BenchCa;
use crate::TempDir;

/// Where Debian's Squid keeps its certificate generator.
const CERTGEN: &str = "/usr/lib/squid/security_file_certgen";

/// A running Squid.
pub struct Squid {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The CA it signs bumped certificates with (clients trust it).
    pub bump_ca: BenchCa,
    dir: TempDir,
}

/// Why Squid cannot be part of this run, or `None` if it can.
pub fn unavailable(binary: &Path) -> Option<String> {
    let version = Command::new(binary).arg("-v").output();
    match version {
        Err(_) => Some(format!(
            "{} not found (apt-get install -y squid-openssl)",
            binary.display()
        )),
        Ok(out) if !String::from_utf8_lossy(&out.stdout).contains("--with-openssl") => Some(
            "this Squid is built without OpenSSL, so it cannot ssl_bump (apt-get install -y squid-openssl)"
                .into(),
        ),
        Ok(_) if !Path::new(CERTGEN).exists() => Some(format!("{CERTGEN} is missing")),
        Ok(_) => None,
    }
}

impl Squid {
    /// Starts Squid allowing exactly `names` (pinned to 127.0.0.1), verifying origins
    /// against `origin_ca`.
    pub fn start(binary: &Path, names: &[&str], origin_ca: &Path) -> anyhow::Result<Squid> {
        let dir = TempDir::new("tollgate-bench-squid")?;
        let d = dir.path();
        let bump_ca = BenchCa::new("Squid bench bump CA")?;
        let (ca_cert, ca_key) = bump_ca.write(d, "bump-ca")?;
        let origin_ca_copy = d.join("origin-ca.pem");
        std::fs::copy(origin_ca, &origin_ca_copy)?;
        std::fs::write(d.join("hosts"), format!("127.0.0.1 {}\n", names.join(" ")))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let ssl_db = d.join("ssl_db");
        let config = format!(
            "http_port {addr} ssl-bump tls-cert={cert} tls-key={key} generate-host-certificates=on dynamic_cert_mem_cache_size=16MB\n\
             sslcrtd_program {CERTGEN} -s {db} -M 16MB\n\
             sslcrtd_children 4 startup=1 idle=1\n\
             acl step1 at_step SslBump1\n\
             ssl_bump peek step1\n\
             ssl_bump bump all\n\
             acl allowlist dstdomain {names}\n\
             http_access allow allowlist\n\
             http_access deny all\n\
             tls_outgoing_options cafile={origin}\n\
             hosts_file {hosts}\n\
             dns_nameservers 127.0.0.1\n\
             cache deny all\n\
             cache_mem 8 MB\n\
             access_log none\n\
             cache_store_log none\n\
             cache_log {log}\n\
             pid_filename {pid}\n\
             coredump_dir {d}\n\
             visible_hostname tollgate-bench\n\
             cache_effective_user proxy\n\
             shutdown_lifetime 0 seconds\n",
            cert = ca_cert.display(),
            key = ca_key.display(),
            db = ssl_db.display(),
            names = names.join(" "),
            origin = origin_ca_copy.display(),
            hosts = d.join("hosts").display(),
            log = d.join("cache.log").display(),
            pid = d.join("squid.pid").display(),
            d = d.display(),
        );
        let config_path = d.join("squid.conf");
        std::fs::write(&config_path, config)?;
        let init = Command::new(CERTGEN)
            .arg("-c")
            .arg("-s")
            .arg(&ssl_db)
            .args(["-M", "16MB"])
            .output()
            .context("initialising Squid's certificate database")?;
        if !init.status.success() {
            bail!("{CERTGEN} -c: {}", String::from_utf8_lossy(&init.stderr));
        }
        let chown = Command::new("chown")
            .args(["-R", "proxy:proxy"])
            .arg(d)
            .status()?;
        if !chown.success() {
            bail!("chown proxy {} failed", d.display());
        }
        let child = Command::new(binary)
            .args(["-N", "-f"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut squid = Squid {
            child,
            addr,
            bump_ca,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline || squid.child.try_wait()?.is_some() {
                let log =
                    std::fs::read_to_string(squid.dir.path().join("cache.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                squid.dir.keep();
                bail!(
                    "Squid did not start listening on {addr}: {}",
                    tail.join(" | ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(squid)
    }

    /// Squid's process and its helpers.
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.child.id()];
        pids.extend(procfs::children(self.child.id()));
        pids
    }

    /// CPU time of Squid and its helpers so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        self.pids().into_iter().map(procfs::cpu_time).sum()
    }

    /// Resident memory of Squid and its helpers now, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.pids()
            .into_iter()
            .map(|p| procfs::status_kib(p, "VmRSS"))
            .sum()
    }

    /// Peak resident memory of Squid and its helpers (each one's peak, summed), KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.pids()
            .into_iter()
            .map(|p| procfs::status_kib(p, "VmHWM"))
            .sum()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
