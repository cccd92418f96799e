//! A microVM's network device: a tap made inside the sandbox's namespace and handed to the
//! VMM already open, so the VMM needs no access to `/dev/net/tun` and no privilege at all.
//!
//! This is the crate's one use of `unsafe`: the `TUNSETIFF` ioctl has no safe wrapper in
//! the libraries the workspace uses.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// An open tap device. The device exists while this (or a process that inherited it) holds
/// it open.
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Creates tap `name` inside the network namespace at `namespace` (a `/run/netns/…`
    /// path) with virtio-net headers on, and returns it open.
    pub fn open_in(namespace: &Path, name: &str) -> io::Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("device name {name:?} must have 1 to 15 bytes"),
            ));
        }
        // The device is made in the namespace of the thread that opens the file.
        crate::network::in_namespace(namespace, || open_tap(name)).map(|file| Tap { file })
    }

    /// The descriptor's number (the one [`Tap::hand_to`] hands on).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Hands the device to the process `command` starts, under its current number (which it
    /// returns: the VMM is told `fd=<number>`). Only that child's copy of the descriptor
    /// loses close-on-exec (descriptor flags are per process after the fork): a process any
    /// other thread starts meanwhile never inherits it.
    pub fn hand_to(&self, command: &mut std::process::Command) -> RawFd {
        use std::os::unix::process::CommandExt;
        let fd = self.fd();
        // SAFETY: the closure runs in the child between fork and exec, and makes one
        // async-signal-safe call (fcntl) on a descriptor number; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        fd
    }
}

fn open_tap(name: &str) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers and arrays);
    // all zeros is a valid value of it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `request` is, and `file` is an
    // open descriptor of /dev/net/tun for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}
