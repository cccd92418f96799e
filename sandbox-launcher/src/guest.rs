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
