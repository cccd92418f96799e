//! The VMM: QEMU's `microvm` machine, run unprivileged (`-sandbox on`, no devices but a
//! serial console and the tap it is handed open), and the choice between KVM and software
//! emulation.
//!
//! KVM is used only when a short probe boot with it reaches the guest's ready marker: on some
//! hosts `/dev/kvm` opens but is a nested software hypervisor that cannot boot a kernel. The
//! answer is remembered for the host's boot. Under software emulation (TCG) the kernel is
//! told the host's TSC frequency: without a timer to calibrate against, it can hang.

use std::fs::File;
use std::io::Read;
use std::os::fd::RawFd;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::guest::{
    FAILED_MARKER, PROBE_PARAMETER, READY_MARKER, ROOT_DISK_SERIAL, WORKSPACE_DISK_SERIAL,
};
use crate::image::Image;
use crate::workload::{spawn_confined, RunAs};

/// The QEMU program every VM runs in (Debian: `apt-get install qemu-system-x86`).
pub const QEMU: &str = "qemu-system-x86_64";
/// How long the KVM probe boot may take (a KVM boot takes well under a second; on a host
/// whose KVM cannot boot a kernel the probe hangs until this passes, once per host boot).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The KVM device, whose group QEMU is given when it runs with KVM.
const KVM_DEVICE: &str = "/dev/kvm";

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// One VM's QEMU settings.
#[derive(Debug)]
pub struct VmSpec<'a> {
    /// The image whose kernel is booted.
    pub image: &'a Image,
    /// The initramfs to boot with (the image's, or a VM's copy with its files appended).
    pub initrd: &'a Path,
    /// Guest memory in MiB (QEMU's `-m`).
    pub memory_mib: u32,
    /// How the guest's CPU is run; with KVM, QEMU also gets `/dev/kvm`'s group.
    pub accel: Accel,
    /// The open tap the guest's network card is wired to; no network card without one.
    pub tap_fd: Option<RawFd>,
    /// More kernel command-line words.
    pub kernel_parameters: Vec<String>,
    /// The image's root file system, attached read-only (shared by every session's VM).
    pub root: Option<&'a Path>,
    /// A raw disk image the guest writes to (a session's workspace).
    pub disk: Option<&'a Path>,
}

impl VmSpec<'_> {
    /// QEMU's arguments (without the program): one-CPU `microvm`, `-sandbox on`, these settings.
    pub fn qemu_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-M",
            "microvm",
            "-accel",
            match self.accel {
                Accel::Kvm => "kvm",
                Accel::Tcg => "tcg",
            },
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(["-m".into(), format!("{}M", self.memory_mib)]);
        args.extend([
            "-kernel".into(),
            self.image.kernel().to_string_lossy().to_string(),
            "-initrd".into(),
            self.initrd.to_string_lossy().to_string(),
            "-append".into(),
            self.kernel_command_line(),
        ]);
        // The guest finds its disks by serial number, not by the order it probes them in.
        if let Some(root) = self.root {
            args.extend([
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=root,readonly=on",
                    qemu_path(root)
                ),
                "-device".into(),
                format!("virtio-blk-device,drive=root,serial={ROOT_DISK_SERIAL}"),
            ]);
        }
        if let Some(disk) = self.disk {
            args.extend([
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=workspace,cache=writeback,discard=unmap",
                    qemu_path(disk)
                ),
                "-device".into(),
                format!("virtio-blk-device,drive=workspace,serial={WORKSPACE_DISK_SERIAL}"),
            ]);
        }
        if let Some(fd) = self.tap_fd {
            args.extend([
                "-netdev".into(),
                format!("tap,id=net0,fd={fd}"),
                "-device".into(),
                "virtio-net-device,netdev=net0".into(),
            ]);
        }
        args
    }

    /// The kernel's command line: serial console, quiet, power off on panic, the host's
    /// time, and the TSC frequency under emulation.
    pub fn kernel_command_line(&self) -> String {
        let mut words: Vec<String> = ["console=ttyS0", "quiet", "panic=-1"]
            .iter()
            .map(|w| w.to_string())
            .collect();
        if let Ok(epoch) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            words.push(format!("tollgate.epoch={}", epoch.as_secs()));
        }
        if self.accel == Accel::Tcg {
            if let Some(khz) = tsc_khz() {
                words.push(format!("tsc_early_khz={khz}"));
            }
        }
        words.extend(self.kernel_parameters.iter().cloned());
        words.join(" ")
    }

    /// Starts QEMU as `user` (in network namespace `namespace` when given), the serial
    /// console into `console`, QEMU's own messages into `vmm_log`, handed `tap` (whose
    /// number `tap_fd` must be).
    pub fn spawn(
        &self,
        namespace: Option<&str>,
        user: RunAs,
        (console, vmm_log): (&Path, &Path),
        tap: Option<&crate::tap::Tap>,
    ) -> std::io::Result<Child> {
        // /dev/kvm is usually open to its group only: the VMM gets that group, nothing more.
        let user = match (self.accel, kvm_device_group()) {
            (Accel::Kvm, Some(gid)) => user.with_device_group(gid),
            _ => user,
        };
        spawn_confined(
            namespace,
            user,
            QEMU,
            &self.qemu_args(),
            &[],
            (console, vmm_log),
            |command| {
                if let Some(tap) = tap {
                    tap.hand_to(command);
                }
            },
        )
    }
}

/// The group that owns `/dev/kvm`.
fn kvm_device_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(KVM_DEVICE).ok().map(|m| m.gid())
}

/// The host's TSC frequency in kHz: from sysfs where the kernel exports it, else the CPU
/// frequency `/proc/cpuinfo` reports (constant on hosts with an invariant TSC).
pub fn tsc_khz() -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(khz) = text.trim().parse() {
            return Some(khz);
        }
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("cpu MHz")?
            .split(':')
            .nth(1)?
            .trim()
            .parse()
            .ok()
    })?;
    Some((mhz * 1000.0).round() as u64)
}

/// How a boot ended while the launcher waited for it.
#[derive(Debug)]
pub enum Boot {
    /// The guest printed the ready marker.
    Ready,
    /// The guest printed the failure marker with this reason.
    Failed(String),
    /// QEMU exited, with this status, before the guest printed either marker.
    Exited(ExitStatus),
    /// Nothing within the time allowed.
    TimedOut,
}

/// Waits until `console` shows the ready or failure marker, `vmm` exits, or `timeout`
/// passes.
pub fn wait_for_boot(vmm: &mut Child, console: &Path, timeout: Duration) -> Boot {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut offset = 0u64;
    loop {
        if let Ok(mut file) = File::open(console) {
            use std::io::{Seek, SeekFrom};
            if file.seek(SeekFrom::Start(offset)).is_ok() {
                let mut more = Vec::new();
                if file.read_to_end(&mut more).is_ok() {
                    offset += more.len() as u64;
                    seen.extend(more);
                }
            }
        }
        for line in String::from_utf8_lossy(&seen).lines() {
            let line = line.trim();
            if line.starts_with(READY_MARKER) {
                return Boot::Ready;
            }
            if let Some(reason) = line.strip_prefix(FAILED_MARKER) {
                return Boot::Failed(reason.trim().to_string());
            }
        }
        if let Ok(Some(status)) = vmm.try_wait() {
            return Boot::Exited(status);
        }
        if Instant::now() >= deadline {
            return Boot::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the accelerator probe found, remembered per host boot.
#[derive(Debug, Serialize, Deserialize)]
struct ProbeRecord {
    boot_id: String,
    kvm: bool,
}

/// The accelerator to use: KVM if `/dev/kvm` exists and a probe boot of `image` with it
/// works (remembered in `cache_file` until the host reboots), else emulation.
pub fn choose_accel(image: &Image, user: RunAs, cache_file: &Path) -> Accel {
    if !Path::new(KVM_DEVICE).exists() {
        return Accel::Tcg;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string();
    let remembered = std::fs::read_to_string(cache_file)
        .ok()
        .and_then(|t| serde_json::from_str::<ProbeRecord>(&t).ok())
        .filter(|r| r.boot_id == boot_id);
    let kvm = match remembered {
        Some(r) => r.kvm,
        None => {
            let kvm = probe_kvm(image, user);
            let record = ProbeRecord { boot_id, kvm };
            if let Ok(json) = serde_json::to_string(&record) {
                let _ = std::fs::write(cache_file, json);
            }
            kvm
        }
    };
    if kvm {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Boots `image` with KVM just far enough for init to report, and says whether it did.
fn probe_kvm(image: &Image, user: RunAs) -> bool {
    let Ok(scratch) = tempfile::tempdir() else {
        return false;
    };
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755));
    let initrd = image.initramfs();
    let spec = VmSpec {
        image,
        initrd: &initrd,
        memory_mib: 128,
        accel: Accel::Kvm,
        tap_fd: None,
        kernel_parameters: vec![PROBE_PARAMETER.to_string()],
        root: None,
        disk: None,
    };
    let console = scratch.path().join("console.log");
    let Ok(mut qemu) = spec.spawn(
        None,
        user,
        (&console, &scratch.path().join("vmm.log")),
        None,
    ) else {
        return false;
    };
    let outcome = wait_for_boot(&mut qemu, &console, PROBE_TIMEOUT);
    let _ = qemu.kill();
    let _ = qemu.wait();
    let booted = matches!(outcome, Boot::Ready);
    if booted {
        tracing::info!("a probe boot with KVM worked: VMs use KVM");
    } else {
        tracing::warn!(
            probe = ?outcome,
            "{KVM_DEVICE} is there but a probe boot with it did not reach the guest's init: \
             VMs use software emulation (remembered until the host reboots)"
        );
    }
    booted
}

/// `path` as a QEMU option value (a comma doubled).
fn qemu_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_in(dir: &Path) -> Image {
        for f in ["vmlinux", "initramfs.cpio"] {
            std::fs::write(dir.join(f), b"x").expect("write");
        }
        std::fs::write(
            dir.join("image.json"),
            r#"{"kernel_package":"linux-image-6.1.0-56-amd64","kernel_release":"6.1.0-56-amd64","kernel_bytes":1,"initramfs_bytes":1}"#,
        )
        .expect("write");
        Image::open(dir).expect("image")
    }

    #[test]
    fn qemu_gets_no_devices_but_the_console_and_the_tap_it_is_handed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = image_in(dir.path());
        let initrd = dir.path().join("vm-initrd");
        let spec = VmSpec {
            image: &image,
            initrd: &initrd,
            memory_mib: 256,
            accel: Accel::Tcg,
            tap_fd: Some(7),
            kernel_parameters: vec![],
            root: None,
            disk: None,
        };
        let args = spec.qemu_args().join(" ");
        for expected in [
            "-M microvm -accel tcg",
            "-nodefaults -no-user-config -nographic -no-reboot -serial stdio",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-m 256M",
            "-netdev tap,id=net0,fd=7 -device virtio-net-device,netdev=net0",
        ] {
            assert!(args.contains(expected), "{expected} missing from {args}");
        }
        let line = spec.kernel_command_line();
        assert!(
            line.starts_with("console=ttyS0 quiet panic=-1 tollgate.epoch="),
            "{line}"
        );
        if tsc_khz().is_some() {
            assert!(line.contains("tsc_early_khz="), "{line}");
        }
        let kvm = VmSpec {
            accel: Accel::Kvm,
            tap_fd: None,
            ..spec
        };
        assert!(!kvm.kernel_command_line().contains("tsc_early_khz"));
        assert!(!kvm.qemu_args().join(" ").contains("-netdev"));
        assert!(!kvm.qemu_args().join(" ").contains("-drive"));
        let disk = dir.path().join("a,b.img");
        let root = dir.path().join("root.erofs");
        let with_disk = VmSpec {
            root: Some(&root),
            disk: Some(&disk),
            ..kvm
        };
        let args = with_disk.qemu_args().join(" ");
        assert!(
            args.contains(&format!(
                "-drive file={},format=raw,if=none,id=workspace,cache=writeback,discard=unmap -device virtio-blk-device,drive=workspace,serial=tollgate-workspace",
                disk.display().to_string().replace(',', ",,")
            )),
            "a comma in the path is escaped: {args}"
        );
        assert!(
            args.contains(&format!(
                "-drive file={},format=raw,if=none,id=root,readonly=on -device virtio-blk-device,drive=root,serial=tollgate-root",
                root.display()
            )),
            "the root is read-only: {args}"
        );
    }

    #[test]
    fn a_boot_is_ready_failed_or_exited_as_the_console_and_the_process_say() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        std::fs::write(
            &console,
            "booting\nTOLLGATE-FAILED no network device (eth0) appeared\n",
        )
        .expect("write");
        match wait_for_boot(&mut sleeper, &console, Duration::from_secs(5)) {
            Boot::Failed(why) => assert_eq!(why, "no network device (eth0) appeared"),
            other => panic!("{other:?}"),
        }
        std::fs::write(&console, "booting\nTOLLGATE-READY\n").expect("write");
        assert!(matches!(
            wait_for_boot(&mut sleeper, &console, Duration::from_secs(5)),
            Boot::Ready
        ));
        std::fs::write(&console, "booting\n").expect("write");
        assert!(matches!(
            wait_for_boot(&mut sleeper, &console, Duration::from_millis(100)),
            Boot::TimedOut
        ));
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        let mut quits = std::process::Command::new("false").spawn().expect("false");
        assert!(matches!(
            wait_for_boot(&mut quits, &console, Duration::from_secs(5)),
            Boot::Exited(s) if !s.success()
        ));
    }
}
