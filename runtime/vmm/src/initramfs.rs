//! A deterministic initramfs builder: the cpio "newc" archive the Linux kernel unpacks into its
//! root file system before running `/init`.
//!
//! Kiln builds one per microvm function: `/init` (the guest agent) and `/function` (the user's
//! static executable). Deterministic means the same inputs give the same bytes — every timestamp
//! is 0, owners are root, inode numbers count up from 1 in the order entries are added — so the
//! image's digest identifies its content, as Kiln's other artifacts do.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields: inode, mode,
//! uid, gid, nlink, mtime, file size, dev major/minor, rdev major/minor, name size, check 0), the
//! NUL-terminated name, padding to 4 bytes, the data, padding to 4 bytes. The archive ends with
//! an entry named `TRAILER!!!`.

/// An archive being built.
#[derive(Debug, Default)]
pub struct Initramfs {
    bytes: Vec<u8>,
    next_inode: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFCHR: u32 = 0o020000;
const S_IFREG: u32 = 0o100000;

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (`path` without a leading slash, e.g. `dev`).
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.entry(path, S_IFDIR | (mode & 0o7777), 2, &[])
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.next_inode += 1;
        let inode = self.next_inode;
        self.header(path, S_IFCHR | (mode & 0o7777), 1, 0, (major, minor), inode);
        self.pad();
        self
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (mode & 0o7777), 1, data)
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.next_inode = 0;
        self.entry_with_inode("TRAILER!!!", 0, 1, &[], 0);
        self.bytes
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, data: &[u8]) -> &mut Self {
        self.next_inode += 1;
        let inode = self.next_inode;
        self.entry_with_inode(path, mode, nlink, data, inode);
        self
    }

    fn entry_with_inode(&mut self, path: &str, mode: u32, nlink: u32, data: &[u8], inode: u32) {
        self.header(path, mode, nlink, data.len() as u32, (0, 0), inode);
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn header(&mut self, path: &str, mode: u32, nlink: u32, size: u32, (major, minor): (u32, u32), inode: u32) {
        let name_size = path.len() as u32 + 1;
        let fields = [inode, mode, 0, 0, nlink, 0, size, 0, 0, major, minor, name_size, 0];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(path.as_bytes());
        self.bytes.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

/// The initramfs of a microvm function: the agent as `/init`, the function as `/function`, its
/// environment as `/env` (`KEY=VALUE` entries, each ending in NUL; the agent passes exactly these
/// to the function), and the mount points the agent uses. `/dev/null` and `/dev/console` exist before the agent mounts
/// devtmpfs: the kernel opens the console for PID 1's stdio, and a Rust program whose stdio is
/// closed (no console, as on Kiln's VMM) reopens it on `/dev/null` before `main`, or aborts.
pub fn function_image(agent: &[u8], function: &[u8], env: &[(&str, &str)]) -> Vec<u8> {
    let mut image = Initramfs::new();
    image.dir("dev", 0o755).dir("proc", 0o555).dir("tmp", 0o1777);
    image
        .char_device("dev/null", 0o666, 1, 3)
        .char_device("dev/console", 0o600, 5, 1);
    image.file("init", 0o755, agent).file("function", 0o755, function);
    let env: Vec<u8> = env
        .iter()
        .flat_map(|(key, value)| [key.as_bytes(), b"=", value.as_bytes(), b"\0"].concat())
        .collect();
    image.file("env", 0o444, &env);
    image.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data, (rdev major, rdev minor)) of one archive entry.
    type Entry = (String, u32, Vec<u8>, (u32, u32));

    /// Parses a newc archive back into entries: the inverse the kernel applies.
    fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&bytes[..6], b"070701", "bad magic at {offset}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
            };
            let (mode, size, name_size) = (field(1), field(6) as usize, field(11) as usize);
            let name = String::from_utf8(bytes[110..110 + name_size - 1].to_vec()).unwrap();
            let data_at = (110 + name_size).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            offset += next;
            bytes = &bytes[next..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty());
                return out;
            }
            out.push((name, mode, data, (field(9), field(10))));
        }
    }

    #[test]
    fn the_archive_holds_what_was_added_and_is_deterministic() {
        let env = [("A", "1"), ("PATH", "/x=y")];
        let image = function_image(b"agent bytes", b"\x7fELF function", &env);
        assert_eq!(image, function_image(b"agent bytes", b"\x7fELF function", &env));
        assert_ne!(image, function_image(b"agent bytes", b"\x7fELF other", &env));
        assert_ne!(image, function_image(b"agent bytes", b"\x7fELF function", &[]));
        assert_eq!(image.len() % 4, 0);
        let entries = parse(&image);
        let names: Vec<&str> = entries.iter().map(|(n, ..)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "tmp",
                "dev/null",
                "dev/console",
                "init",
                "function",
                "env"
            ]
        );
        assert_eq!(entries[7].2, b"A=1\0PATH=/x=y\0");
        assert_eq!(entries[5].1, 0o100755);
        assert_eq!(entries[5].2, b"agent bytes");
        assert_eq!(entries[6].2, b"\x7fELF function");
        assert_eq!(entries[2].1, 0o041777);
        assert_eq!(entries[3].1, 0o020666);
        assert_eq!((entries[3].3, entries[4].3), ((1, 3), (5, 1)), "device numbers");
    }

    /// FNV-1a, 64-bit: a stable fingerprint of bytes for a golden test (no hashing crate here).
    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
            (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// The static-executable image is byte-identical to what earlier versions built: snapshot
    /// digests depend on it, so a change here would re-boot every deployed microvm function.
    #[test]
    fn the_function_image_is_byte_identical_to_earlier_versions() {
        let image = function_image(b"agent", b"\x7fELF function", &[("A", "1"), ("B", "two")]);
        assert_eq!((image.len(), fnv1a(&image)), (1104, 0x3017_dca6_5fa9_a678));
    }
}
