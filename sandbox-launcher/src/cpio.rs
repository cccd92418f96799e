//! The initramfs format: a "newc" cpio archive, written directly (no `cpio` program needed).
//!
//! The kernel unpacks several archives laid end to end, so a VM's own files (its workload,
//! the gateway's CA) are a small archive appended to the image's shared one.

/// An archive being written. Paths are relative (`bin/busybox`), parents first.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_inode: u32,
}

const DIRECTORY: u32 = 0o040_000;
const REGULAR: u32 = 0o100_000;
const SYMLINK: u32 = 0o120_000;
const CHARACTER_DEVICE: u32 = 0o020_000;

impl Archive {
    /// An empty archive.
    pub fn new() -> Archive {
        Archive::default()
    }

    /// A directory (mode 0755).
    pub fn directory(&mut self, path: &str) {
        self.entry(path, DIRECTORY | 0o755, &[], (0, 0));
    }

    /// A regular file with permission bits `mode`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, REGULAR | (mode & 0o7777), data, (0, 0));
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, SYMLINK | 0o777, target.as_bytes(), (0, 0));
    }

    /// A character device node (e.g. `dev/console`, 5:1, which the kernel opens for init
    /// before anything could mount devtmpfs).
    pub fn character_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.entry(
            path,
            CHARACTER_DEVICE | (mode & 0o7777),
            &[],
            (major, minor),
        );
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8], (rmajor, rminor): (u32, u32)) {
        self.next_inode += 1;
        let name_size = path.len() + 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & DIRECTORY == DIRECTORY { 2 } else { 1 },
            0, // mtime: reproducible images
            data.len() as u32,
            0,
            0,
            rmajor,
            rminor,
            name_size as u32,
            0, // checksum (unused by "newc")
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(path.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.bytes.len() & 3 != 0 {
            self.bytes.push(0);
        }
    }

    /// The archive, closed with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back (name, mode, data) of every entry, checking the layout as the kernel does.
    fn entries(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701", "magic at {at}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).expect("hex");
                u32::from_str_radix(s, 16).expect("hex field")
            };
            let (mode, size, name_size) = (field(1), field(6) as usize, field(11) as usize);
            let name_at = at + 110;
            let name =
                String::from_utf8(bytes[name_at..name_at + name_size - 1].to_vec()).expect("name");
            assert_eq!(bytes[name_at + name_size - 1], 0, "name is NUL-terminated");
            let data_at = (name_at + name_size).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            at = (data_at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(at, bytes.len(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn entries_read_back_with_their_kind_mode_and_contents() {
        let mut archive = Archive::new();
        archive.directory("bin");
        archive.file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n");
        archive.file("odd", 0o644, b"12345");
        archive.symlink("bin/sh", "busybox");
        archive.character_device("console", 0o600, 5, 1);
        let bytes = archive.finish();
        assert_eq!(bytes.len() % 4, 0);
        let read = entries(&bytes);
        let names: Vec<&str> = read.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["bin", "bin/hello", "odd", "bin/sh", "console"]);
        assert_eq!(read[0].1, 0o040755);
        assert_eq!(
            read[1],
            (
                "bin/hello".into(),
                0o100755,
                b"#!/bin/sh\necho hi\n".to_vec()
            )
        );
        assert_eq!(read[2].2, b"12345");
        assert_eq!(read[3].1, 0o120777);
        assert_eq!(read[3].2, b"busybox");
        assert_eq!(read[4].1, 0o020600);
    }

    #[test]
    fn the_header_carries_the_device_numbers() {
        let mut archive = Archive::new();
        archive.character_device("dev/console", 0o600, 5, 1);
        let bytes = archive.finish();
        // rdevmajor and rdevminor are the 10th and 11th fields.
        assert_eq!(&bytes[6 + 9 * 8..6 + 11 * 8], b"0000000500000001");
    }
}
