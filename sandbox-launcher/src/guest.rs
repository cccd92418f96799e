//! Inside a microVM: the guest's init (part of the shared image) and the files each VM gets
//! of its own (its proxy, the gateway's CA, its workload), appended to the image's initramfs.
//!
//! Init speaks to the launcher through the serial console with one-line markers:
//! [`READY_MARKER`] once the network is up and the workload starts, [`FAILED_MARKER`] with a
//! reason when the guest cannot get there, [`EXIT_MARKER`] with the workload's status. The
//! guest then powers off, which ends QEMU.

use crate::cpio::Archive;
use crate::network::{HOST_ADDRESS, SANDBOX_ADDRESS};
use crate::workload::{shell_command, shell_quote, workload_environment};

/// Printed by init when the network is configured and the workload starts.
pub const READY_MARKER: &str = "TOLLGATE-READY";
/// Printed by init, with a reason, when the guest cannot start the workload.
pub const FAILED_MARKER: &str = "TOLLGATE-FAILED";
/// Printed by init, with the workload's exit status, when it ends.
pub const EXIT_MARKER: &str = "TOLLGATE-EXIT";

/// The kernel modules the Debian kernel needs for virtio-mmio networking, in load order (it
/// ships no `modules.dep`, so init loads them one by one).
pub const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The kernel modules a session's VM loads for its workspace disk (virtio-blk with ext4), in
/// load order.
pub const DISK_MODULES: [&str; 6] = [
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
];

/// Where the guest keeps the CA bundle (Debian's default path, which curl and OpenSSL read).
pub const GUEST_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The kernel command-line word that makes init only report ready and power off (the KVM
/// probe boot).
pub const PROBE_PARAMETER: &str = "tollgate.probe=1";

/// The guest's `/init` (busybox sh).
pub fn init_script() -> String {
    let modules = MODULES.join(" ");
    format!(
        r#"#!/bin/busybox sh
# Tollgate guest init, written by `tollgate-launcher image build`.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
fail() {{ echo "{FAILED_MARKER} $*"; poweroff -f; }}
for word in $(cat /proc/cmdline); do
  case "$word" in
    {PROBE_PARAMETER}) echo "{READY_MARKER} probe"; poweroff -f ;;
    tollgate.epoch=*) epoch="${{word#tollgate.epoch=}}" ;;
  esac
done
# No hardware clock under emulation: take the host's time from the command line.
if [ -n "$epoch" ] && [ "$(date +%s)" -lt "$epoch" ]; then date -s "@$epoch" >/dev/null; fi
for m in {modules}; do
  insmod "/lib/modules/$m.ko" || fail "cannot load kernel module $m"
done
n=0
while [ ! -e /sys/class/net/eth0 ]; do
  n=$((n + 1)); [ "$n" -gt 100 ] && fail "no network device (eth0) appeared"
  sleep 0.1
done
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
ip link set lo up
ip addr add {SANDBOX_ADDRESS}/30 dev eth0 || fail "cannot address eth0"
ip link set eth0 up || fail "cannot bring eth0 up"
ip route add default via {HOST_ADDRESS} || fail "cannot add the default route"
[ -r /etc/tollgate/env ] || fail "this VM's files (/etc/tollgate) are missing"
. /etc/tollgate/env
echo "{READY_MARKER}"
cd /root
sh /etc/tollgate/workload
echo "{EXIT_MARKER} $?"
poweroff -f
"#
    )
}

/// One VM's own files, as an archive to append to the image's initramfs: the environment
/// (proxy, CA), the gateway's CA as the guest's only trust anchor, and the workload.
pub fn vm_files(agent: &str, proxy_url: &str, ca_pem: &[u8], command: &[String]) -> Vec<u8> {
    let mut env = String::from("# This VM's environment, written by tollgate-launcher.\n");
    for (name, value) in workload_environment(agent, proxy_url, GUEST_CA_FILE) {
        env.push_str(&format!("export {name}={}\n", shell_quote(&value)));
    }
    let mut archive = Archive::new();
    archive.directory("etc/tollgate");
    archive.file("etc/tollgate/env", 0o644, env.as_bytes());
    archive.file(
        "etc/tollgate/workload",
        0o755,
        format!("{}\n", shell_command(command)).as_bytes(),
    );
    archive.file(GUEST_CA_FILE.trim_start_matches('/'), 0o644, ca_pem);
    archive.finish()
}

/// Where a session's VM mounts its workspace disk.
pub const SESSION_MOUNT: &str = "/session";
/// The guest's user executions run as (no account needed: the guest agent takes ids).
pub const SESSION_USER: &str = "1000:1000";
/// Where the guest agent binary goes in a session's VM.
const GUEST_AGENT: &str = "usr/bin/tollgate-guest-agent";

/// What a session's VM gets of its own.
#[derive(Debug)]
pub struct SessionGuest<'a> {
    /// The agent, named to the workload (`TOLLGATE_AGENT`).
    pub agent: &'a str,
    /// The thread, named to the workload (`TOLLGATE_THREAD`).
    pub thread: &'a str,
    /// The gateway as the proxy.
    pub proxy_url: &'a str,
    /// The gateway's CA.
    pub ca_pem: &'a [u8],
    /// The guest agent's secret (0600, root's, in the guest).
    pub secret: &'a str,
    /// The guest agent binary on the host (added with the libraries it loads).
    pub guest_agent: &'a std::path::Path,
    /// The address the guest agent listens on.
    pub listen: std::net::SocketAddr,
    /// More guest agent options (its limits).
    pub agent_options: Vec<String>,
}

/// A session VM's own files, as an archive to append to the image's initramfs: the
/// environment (proxy, CA, agent, thread), the CA, the guest agent's secret, the guest agent
/// with its libraries, and the workload that mounts the workspace disk and becomes the guest
/// agent (as root; executions run as [`SESSION_USER`]).
pub fn session_files(guest: &SessionGuest<'_>) -> Result<Vec<u8>, crate::image::ImageError> {
    let mut env = String::from("# This session VM's environment, written by tollgate-launcher.\n");
    let mut variables = workload_environment(guest.agent, guest.proxy_url, GUEST_CA_FILE);
    variables.push(("TOLLGATE_THREAD", guest.thread.to_string()));
    for (name, value) in variables {
        env.push_str(&format!("export {name}={}\n", shell_quote(&value)));
    }
    let modules = DISK_MODULES.join(" ");
    let options: Vec<String> = guest.agent_options.iter().map(|o| shell_quote(o)).collect();
    let workload = format!(
        r#"fail() {{ echo "{FAILED_MARKER} $*"; exit 1; }}
for m in {modules}; do
  insmod "/lib/modules/$m.ko" || fail "cannot load kernel module $m (rebuild the image: tollgate-launcher image build)"
done
n=0
while [ ! -b /dev/vda ]; do
  n=$((n + 1)); [ "$n" -gt 100 ] && fail "no workspace disk (/dev/vda) appeared"
  sleep 0.1
done
mkdir -p {SESSION_MOUNT}
mount -t ext4 -o noatime /dev/vda {SESSION_MOUNT} || fail "cannot mount the workspace disk"
exec /{GUEST_AGENT} --listen {listen} --secret-file /etc/tollgate/secret --workspace {SESSION_MOUNT}/workspace --state {SESSION_MOUNT}/shell --user {SESSION_USER} {options}
"#,
        listen = guest.listen,
        options = options.join(" "),
    );
    let mut archive = Archive::new();
    archive.directory("etc/tollgate");
    archive.file("etc/tollgate/env", 0o644, env.as_bytes());
    archive.file("etc/tollgate/workload", 0o755, workload.as_bytes());
    archive.file("etc/tollgate/secret", 0o600, guest.secret.as_bytes());
    archive.file(GUEST_CA_FILE.trim_start_matches('/'), 0o644, guest.ca_pem);
    let mut added = std::collections::BTreeSet::new();
    crate::image::add_host_file(
        &mut archive,
        guest.guest_agent,
        GUEST_AGENT,
        0o755,
        &mut added,
    )?;
    for library in crate::image::shared_libraries(guest.guest_agent)? {
        let name = library
            .to_string_lossy()
            .trim_start_matches('/')
            .to_string();
        crate::image::add_host_file(&mut archive, &library, &name, 0o755, &mut added)?;
    }
    Ok(archive.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_loads_the_modules_in_order_then_reports_ready_before_the_workload() {
        let init = init_script();
        assert!(init.starts_with("#!/bin/busybox sh\n"));
        assert!(init.contains(
            "for m in virtio_ring virtio virtio_mmio failover net_failover virtio_net; do"
        ));
        let ready = init.find("echo \"TOLLGATE-READY\"").expect("ready");
        assert!(
            init.find("ip route add default via 10.200.1.1")
                .expect("route")
                < ready
        );
        assert!(ready < init.find("sh /etc/tollgate/workload").expect("workload"));
    }

    #[test]
    fn a_session_vms_files_mount_its_disk_and_start_the_guest_agent_with_a_private_secret() {
        let binary = std::env::current_exe().expect("a program to stand for the agent");
        let files = session_files(&SessionGuest {
            agent: "a",
            thread: "t 1",
            proxy_url: "http://10.200.1.1:3128",
            ca_pem: b"-----BEGIN CERTIFICATE-----\n",
            secret: "s3cr3t",
            guest_agent: &binary,
            listen: (SANDBOX_ADDRESS, 999).into(),
            agent_options: vec!["--max-output-bytes".into(), "100".into()],
        })
        .expect("files");
        let text = String::from_utf8_lossy(&files);
        assert!(
            text.contains("export TOLLGATE_THREAD='t 1'\n"),
            "the thread, quoted"
        );
        assert!(text.contains("for m in virtio_blk crc16 mbcache jbd2 crc32c_generic ext4; do"));
        let mount = text
            .find("mount -t ext4 -o noatime /dev/vda /session")
            .expect("mount");
        let exec = text
            .find("exec /usr/bin/tollgate-guest-agent --listen 10.200.1.2:999 --secret-file /etc/tollgate/secret --workspace /session/workspace --state /session/shell --user 1000:1000 --max-output-bytes 100")
            .expect("the agent");
        assert!(mount < exec);
        // The secret's cpio entry: newc header, mode 0100600 (a file only root reads).
        let name = text
            .find("etc/tollgate/secret\0")
            .expect("the secret's entry");
        let header = &text[name - 110..name];
        assert!(header.starts_with("070701"), "{header}");
        assert_eq!(&header[14..22], "00008180", "mode 0100600");
        assert!(text.contains("usr/bin/tollgate-guest-agent\0"));
    }

    #[test]
    fn a_vms_files_carry_its_proxy_ca_and_command() {
        let files = vm_files(
            "vm-a",
            "http://10.200.1.1:3128",
            b"-----BEGIN CERTIFICATE-----\n",
            &["curl".into(), "https://x.test/a b".into()],
        );
        let text = String::from_utf8_lossy(&files);
        assert!(text.contains("export https_proxy=http://10.200.1.1:3128\n"));
        assert!(text.contains("export CURL_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt\n"));
        assert!(text.contains("exec curl 'https://x.test/a b'\n"));
        assert!(text.contains("etc/ssl/certs/ca-certificates.crt\0"));
        assert!(text.contains("-----BEGIN CERTIFICATE-----"));
    }
}
