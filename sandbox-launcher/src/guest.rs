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

/// The kernel modules a session's VM loads for the image's root file system (erofs, whose
/// checksums need `crc32c_generic` from [`DISK_MODULES`]), in load order.
pub const ROOT_MODULES: [&str; 2] = ["libcrc32c", "erofs"];

/// Where the guest keeps the CA bundle (Debian's default path, which curl and OpenSSL read).
pub const GUEST_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where a session's VM puts the gateway's CA in its root file system (a tmpfs): the root
/// image's [`GUEST_CA_FILE`] is a link to it.
pub const SESSION_RUN_CA: &str = "/run/tollgate/ca.pem";

/// The serial number of the image's root disk, by which a session's init finds it.
pub const ROOT_DISK_SERIAL: &str = "tollgate-root";
/// The serial number of a session's workspace disk.
pub const WORKSPACE_DISK_SERIAL: &str = "tollgate-workspace";

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
/// The guest's user executions run as (`sandbox` in the root image's accounts; the guest
/// agent takes ids, so none is needed).
pub const SESSION_USER: &str = "1000:1000";

/// What a session's VM gets of its own.
#[derive(Debug)]
pub struct SessionGuest<'a> {
    /// The agent, named to the workload (`TOLLGATE_AGENT`).
    pub agent: &'a str,
    /// The thread, named to the workload (`TOLLGATE_THREAD`).
    pub thread: &'a str,
    /// The gateway listener's URL, set as the workload's `http_proxy` and `https_proxy`.
    pub proxy_url: &'a str,
    /// The gateway's CA certificate (PEM), the workload's only trust anchor.
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

/// Where the guest agent and its libraries are in the initramfs, and, bound there, in the
/// session's root.
const AGENT_DIR: &str = "tollgate/agent";
/// Where init mounts the session's root before switching into it.
const NEW_ROOT: &str = "/sysroot";

/// A session VM's own files, as an archive to append to the image's initramfs: the
/// environment (proxy, CA, agent, thread), the CA, the guest agent's secret, the guest agent
/// with its libraries, and the workload. The workload mounts the image's root file system
/// (read-only) with the workspace disk at [`SESSION_MOUNT`] and fresh tmpfs on `/tmp` and
/// `/run`, puts the CA and secret in `/run/tollgate`, and becomes the guest agent (as root,
/// chrooted there; executions run as [`SESSION_USER`]).
///
/// The guest agent runs through the loader it was linked with, from its own library
/// directory: it was built on the host, whose C library may be newer than the image's.
pub fn session_files(guest: &SessionGuest<'_>) -> Result<Vec<u8>, crate::image::ImageError> {
    let mut env = String::from("# This session VM's environment, written by tollgate-launcher.\n");
    let mut variables = workload_environment(guest.agent, guest.proxy_url, GUEST_CA_FILE);
    variables.push(("TOLLGATE_THREAD", guest.thread.to_string()));
    for (name, value) in variables {
        env.push_str(&format!("export {name}={}\n", shell_quote(&value)));
    }
    let libraries = crate::image::shared_libraries(guest.guest_agent)?;
    let loader = libraries
        .iter()
        .filter_map(|l| l.file_name())
        .map(|n| n.to_string_lossy().to_string())
        .find(|n| n.starts_with("ld-linux"));
    let bound = "/run/tollgate/agent";
    let agent = match loader {
        Some(loader) => {
            format!("{bound}/lib/{loader} --library-path {bound}/lib {bound}/tollgate-guest-agent")
        }
        None => format!("{bound}/tollgate-guest-agent"),
    };
    let modules = DISK_MODULES
        .iter()
        .chain(ROOT_MODULES.iter())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let options: Vec<String> = guest.agent_options.iter().map(|o| shell_quote(o)).collect();
    let workload = format!(
        r#"fail() {{ echo "{FAILED_MARKER} $*"; exit 1; }}
for m in {modules}; do
  insmod "/lib/modules/$m.ko" || fail "cannot load kernel module $m (rebuild the image: tollgate-launcher image build)"
done
# The disks by serial number: the image's root file system and the session's workspace.
disk() {{
  for d in /sys/block/vd*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && echo "/dev/${{d##*/}}" && return 0
  done
  return 1
}}
n=0
until root_disk=$(disk {ROOT_DISK_SERIAL}) && workspace_disk=$(disk {WORKSPACE_DISK_SERIAL}); do
  n=$((n + 1)); [ "$n" -gt 100 ] && fail "the root or the workspace disk did not appear"
  sleep 0.1
done
new={NEW_ROOT}
mkdir -p $new
mount -t erofs -o ro,nosuid,nodev $root_disk $new || fail "cannot mount the root file system"
mount -t ext4 -o noatime,nosuid,nodev $workspace_disk $new{SESSION_MOUNT} || fail "cannot mount the workspace disk"
# Executions see their own processes only, and read /sys.
mount -t proc -o nosuid,nodev,noexec,hidepid=invisible proc $new/proc || fail "cannot mount /proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs $new/sys || fail "cannot mount /sys"
mount -t devtmpfs -o nosuid,noexec devtmpfs $new/dev || fail "cannot mount /dev"
mkdir -p $new/dev/shm $new/dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs $new/dev/shm || fail "cannot mount /dev/shm"
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620 devpts $new/dev/pts || fail "cannot mount /dev/pts"
ln -sf pts/ptmx $new/dev/ptmx
ln -sf /proc/self/fd $new/dev/fd
ln -sf /proc/self/fd/0 $new/dev/stdin
ln -sf /proc/self/fd/1 $new/dev/stdout
ln -sf /proc/self/fd/2 $new/dev/stderr
# What a Debian system sets at boot: links and files in shared directories are followed only
# as their owners intend, kernel addresses and messages are root's, no user namespaces.
for setting in fs/protected_symlinks=1 fs/protected_hardlinks=1 fs/protected_fifos=2 \
    fs/protected_regular=2 kernel/kptr_restrict=2 kernel/dmesg_restrict=1 user/max_user_namespaces=0; do
  echo "${{setting#*=}}" > "/proc/sys/${{setting%=*}}" || fail "cannot set ${{setting%=*}}"
done
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs $new/tmp || fail "cannot mount /tmp"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs $new/run || fail "cannot mount /run"
mkdir -p $new/run/tollgate/agent
cp /etc/tollgate/ca.pem $new{SESSION_RUN_CA} && chmod 644 $new{SESSION_RUN_CA} || fail "cannot install the CA"
(umask 077; cp /etc/tollgate/secret $new/run/tollgate/secret) || fail "cannot install the secret"
rm -f /etc/tollgate/secret
mount -o bind /{AGENT_DIR} $new{bound} || fail "cannot bind the guest agent"
exec chroot $new {agent} --listen {listen} --secret-file /run/tollgate/secret --workspace {SESSION_MOUNT}/workspace --state {SESSION_MOUNT}/shell --user {SESSION_USER} {options}
"#,
        listen = guest.listen,
        options = options.join(" "),
    );
    let mut archive = Archive::new();
    archive.directory("etc/tollgate");
    archive.file("etc/tollgate/env", 0o644, env.as_bytes());
    archive.file("etc/tollgate/workload", 0o755, workload.as_bytes());
    archive.file("etc/tollgate/secret", 0o600, guest.secret.as_bytes());
    archive.file("etc/tollgate/ca.pem", 0o644, guest.ca_pem);
    let mut added = std::collections::BTreeSet::new();
    crate::image::add_host_file(
        &mut archive,
        guest.guest_agent,
        &format!("{AGENT_DIR}/tollgate-guest-agent"),
        0o755,
        &mut added,
    )?;
    for library in &libraries {
        let Some(name) = library.file_name() else {
            continue;
        };
        let name = format!("{AGENT_DIR}/lib/{}", name.to_string_lossy());
        crate::image::add_host_file(&mut archive, library, &name, 0o755, &mut added)?;
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
    fn a_session_vms_files_mount_its_root_and_disk_and_start_the_guest_agent_there_with_a_private_secret(
    ) {
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
        // The agent comes last; the test binary standing for it holds this test's strings.
        let agent = text
            .find("tollgate/agent/tollgate-guest-agent\0")
            .expect("the agent's entry");
        let (text, agent_files) = text.split_at(agent);
        assert!(
            text.contains("export TOLLGATE_THREAD='t 1'\n"),
            "the thread, quoted"
        );
        assert!(text.contains(
            "for m in virtio_blk crc16 mbcache jbd2 crc32c_generic ext4 libcrc32c erofs; do"
        ));
        let root = text
            .find("mount -t erofs -o ro,nosuid,nodev $root_disk $new ")
            .expect("the root");
        let mount = text
            .find("mount -t ext4 -o noatime,nosuid,nodev $workspace_disk $new/session ")
            .expect("mount");
        let ca = text
            .find("cp /etc/tollgate/ca.pem $new/run/tollgate/ca.pem")
            .expect("the CA");
        // The test binary stands for the agent: it is dynamically linked, so it runs through
        // its own loader.
        let exec = text
            .find("exec chroot $new /run/tollgate/agent/lib/ld-linux-x86-64.so.2 --library-path /run/tollgate/agent/lib /run/tollgate/agent/tollgate-guest-agent --listen 10.200.1.2:999 --secret-file /run/tollgate/secret --workspace /session/workspace --state /session/shell --user 1000:1000 --max-output-bytes 100")
            .expect("the agent");
        assert!(root < mount && mount < ca && ca < exec);
        assert!(agent_files.contains("tollgate/agent/lib/libc.so.6\0"));
        // The secret's cpio entry: newc header, mode 0100600 (a file only root reads).
        let name = text
            .find("etc/tollgate/secret\0")
            .expect("the secret's entry");
        let header = &text[name - 110..name];
        assert!(header.starts_with("070701"), "{header}");
        assert_eq!(&header[14..22], "00008180", "mode 0100600");
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
