//! A deterministic initramfs builder: the cpio "newc" archive the Linux kernel unpacks into its
//! root file system before running `/init`.
//!
//! Kiln builds one per microvm function: `/init` (the guest agent) and either `/function` (the
//! user's static executable, [`function_image`]) or a whole root file system unpacked from an
//! image upload ([`rootfs_image`]). Deterministic means the same inputs give the same bytes —
//! every timestamp is 0, inode numbers count up from 1 in the order entries are added, a root
//! file system's entries are sorted by path — so the image's digest identifies its content, as
//! Kiln's other artifacts do.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields: inode, mode,
//! uid, gid, nlink, mtime, file size, dev major/minor, rdev major/minor, name size, check 0), the
//! NUL-terminated name, padding to 4 bytes, the data, padding to 4 bytes. The archive ends with
//! an entry named `TRAILER!!!`.
//!
//! Hard links are real ones, as GNU cpio writes them: every name of the file carries the same
//! inode number and `nlink`, and only the last carries the data. The kernel's unpacker
//! (`init/initramfs.c`, `maybe_link`) links each later name to the first and writes the data
//! through the last, so a hard-linked file costs its size once in the guest's memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// An archive being built.
#[derive(Debug, Default)]
pub struct Initramfs {
    bytes: Vec<u8>,
    next_inode: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFCHR: u32 = 0o020000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Permission bits (`0o7777`) and owner of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Meta {
    /// Owned by root.
    pub const fn root(mode: u32) -> Meta {
        Meta { mode, uid: 0, gid: 0 }
    }
}

/// A regular file's content and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub meta: Meta,
    pub data: Vec<u8>,
}

/// One entry of a root file system.
#[derive(Debug, Clone)]
pub enum Node {
    Dir(Meta),
    /// A regular file. Names whose `Arc` is the same are hard links of one file.
    File(Arc<File>),
    Symlink(Meta, String),
    /// Only Kiln's own `/dev/null` and `/dev/console`: images may not bring device nodes.
    CharDevice(Meta, u32, u32),
}

/// A root file system: paths relative to `/` (`bin/sh`, no leading slash), every parent of an
/// entry a [`Node::Dir`] of the tree. Sorted, so archives built from it are deterministic.
pub type Tree = BTreeMap<String, Node>;

/// What the agent runs in a root file system, written as Kiln's contract files under `/kiln`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    /// The argv (entrypoint + cmd): `/kiln/command`, each entry NUL-terminated. `None`: the agent
    /// runs `/function`.
    pub command: Option<Vec<String>>,
    /// The working directory: `/kiln/workdir`, without a trailing newline (absent: `/`).
    pub workdir: Option<String>,
    /// `uid:gid` in decimal: `/kiln/user` (absent: `0:0`).
    pub user: Option<(u32, u32)>,
    /// Seconds each lifecycle hook may run, in decimal: `/kiln/hook_timeout_s` (absent: 10).
    pub hook_timeout_s: Option<u32>,
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (`path` without a leading slash, e.g. `dev`).
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.dir_owned(path, Meta::root(mode))
    }

    /// Adds a directory with its owner.
    pub fn dir_owned(&mut self, path: &str, meta: Meta) -> &mut Self {
        self.entry(path, S_IFDIR, meta, 2, &[])
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.char_device_owned(path, Meta::root(mode), major, minor)
    }

    /// Adds a character device node with its owner.
    pub fn char_device_owned(&mut self, path: &str, meta: Meta, major: u32, minor: u32) -> &mut Self {
        let inode = self.inode();
        self.header(path, S_IFCHR, meta, 1, 0, (major, minor), inode);
        self.pad();
        self
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_owned(path, Meta::root(mode), data)
    }

    /// Adds a regular file with its owner.
    pub fn file_owned(&mut self, path: &str, meta: Meta, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG, meta, 1, data)
    }

    /// Adds a symbolic link to `target` (the kernel stores the target as the entry's data).
    pub fn symlink(&mut self, path: &str, target: &str, meta: Meta) -> &mut Self {
        self.entry(path, S_IFLNK, Meta { mode: 0o777, ..meta }, 1, target.as_bytes())
    }

    /// Adds one regular file under several names (hard links): one inode, `nlink` names, the
    /// data on the last entry (see the module's doc).
    pub fn hard_links(&mut self, paths: &[&str], meta: Meta, data: &[u8]) -> &mut Self {
        let inode = self.inode();
        let nlink = paths.len() as u32;
        for (i, path) in paths.iter().enumerate() {
            let data: &[u8] = if i + 1 == paths.len() { data } else { &[] };
            self.entry_with_inode(path, S_IFREG, meta, nlink, data, inode);
        }
        self
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.next_inode = 0;
        self.entry_with_inode("TRAILER!!!", 0, Meta::root(0), 1, &[], 0);
        self.bytes
    }

    fn inode(&mut self) -> u32 {
        self.next_inode += 1;
        self.next_inode
    }

    fn entry(&mut self, path: &str, kind: u32, meta: Meta, nlink: u32, data: &[u8]) -> &mut Self {
        let inode = self.inode();
        self.entry_with_inode(path, kind, meta, nlink, data, inode);
        self
    }

    fn entry_with_inode(&mut self, path: &str, kind: u32, meta: Meta, nlink: u32, data: &[u8], inode: u32) {
        self.header(path, kind, meta, nlink, data.len() as u32, (0, 0), inode);
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        path: &str,
        kind: u32,
        meta: Meta,
        nlink: u32,
        size: u32,
        (major, minor): (u32, u32),
        inode: u32,
    ) {
        let name_size = path.len() as u32 + 1;
        let mode = kind | (meta.mode & 0o7777);
        let fields = [
            inode, mode, meta.uid, meta.gid, nlink, 0, size, 0, 0, major, minor, name_size, 0,
        ];
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
    image.file("env", 0o444, &env_file(env));
    image.finish()
}

/// Where the agent finds the kernel modules it loads (`tun.ko`: the guest's network).
pub const MODULES_DIR: &str = "kiln/modules";

/// An initramfs of kernel modules only, under [`MODULES_DIR`], to append to a function's: the
/// kernel unpacks concatenated archives in order, so one built module set serves every image.
pub fn modules_image(modules: &[(&str, &[u8])]) -> Vec<u8> {
    let mut image = Initramfs::new();
    image.dir("kiln", 0o755).dir(MODULES_DIR, 0o755);
    for (name, data) in modules {
        image.file(&format!("{MODULES_DIR}/{name}"), 0o444, data);
    }
    image.finish()
}

/// `/env`: `KEY=VALUE` entries, each ending in NUL.
fn env_file(env: &[(&str, &str)]) -> Vec<u8> {
    env.iter()
        .flat_map(|(key, value)| [key.as_bytes(), b"=", value.as_bytes(), b"\0"].concat())
        .collect()
}

/// The contract files the agent reads, under `/kiln` (owned by Kiln: an image's own files of
/// these names are replaced or removed; the image's other `/kiln` files, `/kiln/hooks/*`, stay).
pub const COMMAND_FILE: &str = "kiln/command";
pub const WORKDIR_FILE: &str = "kiln/workdir";
pub const USER_FILE: &str = "kiln/user";
pub const HOOK_TIMEOUT_FILE: &str = "kiln/hook_timeout_s";

/// The initramfs of a microvm function deployed as an image: the image's root file system
/// `tree`, and on top of it what [`function_image`] gives a static executable — the agent as
/// `/init` (replacing any `/init` of the image: Kiln's agent is always PID 1, it starts the
/// image's command), `/dev`, `/proc`, `/tmp`, `/dev/null`, `/dev/console`, `/env` (the merged
/// environment) — and the contract files of `process` ([`Process`]). Every entry sorted by path,
/// hard links as in the module's doc.
pub fn rootfs_image(agent: &[u8], tree: &Tree, env: &[(&str, &str)], process: &Process) -> Vec<u8> {
    let mut tree = tree.clone();
    put(&mut tree, "dev", Node::Dir(Meta::root(0o755)));
    put(&mut tree, "proc", Node::Dir(Meta::root(0o555)));
    put(&mut tree, "tmp", Node::Dir(Meta::root(0o1777)));
    put(&mut tree, "dev/null", Node::CharDevice(Meta::root(0o666), 1, 3));
    put(&mut tree, "dev/console", Node::CharDevice(Meta::root(0o600), 5, 1));
    let file = |mode: u32, data: Vec<u8>| {
        Node::File(Arc::new(File {
            meta: Meta::root(mode),
            data,
        }))
    };
    put(&mut tree, "init", file(0o755, agent.to_vec()));
    put(&mut tree, "env", file(0o444, env_file(env)));
    if !matches!(tree.get("kiln"), Some(Node::Dir(_))) {
        put(&mut tree, "kiln", Node::Dir(Meta::root(0o755)));
    }
    for path in [COMMAND_FILE, WORKDIR_FILE, USER_FILE, HOOK_TIMEOUT_FILE] {
        remove(&mut tree, path);
    }
    if let Some(command) = &process.command {
        let argv: Vec<u8> = command
            .iter()
            .flat_map(|arg| [arg.as_bytes(), b"\0"].concat())
            .collect();
        put(&mut tree, COMMAND_FILE, file(0o444, argv));
    }
    if let Some(workdir) = &process.workdir {
        put(&mut tree, WORKDIR_FILE, file(0o444, workdir.clone().into_bytes()));
    }
    if let Some((uid, gid)) = process.user {
        put(&mut tree, USER_FILE, file(0o444, format!("{uid}:{gid}").into_bytes()));
    }
    if let Some(seconds) = process.hook_timeout_s {
        put(
            &mut tree,
            HOOK_TIMEOUT_FILE,
            file(0o444, seconds.to_string().into_bytes()),
        );
    }

    // The names of each file, in path order: a hard-linked file is written where its last name
    // sorts, when every directory any of its names lives in has been written.
    let mut names: HashMap<*const File, Vec<&str>> = HashMap::new();
    for (path, node) in &tree {
        if let Node::File(file) = node {
            names.entry(Arc::as_ptr(file)).or_default().push(path);
        }
    }
    let mut image = Initramfs::new();
    for (path, node) in &tree {
        match node {
            Node::Dir(meta) => {
                image.dir_owned(path, *meta);
            }
            Node::File(file) => {
                let links = &names[&Arc::as_ptr(file)];
                if links.len() == 1 {
                    image.file_owned(path, file.meta, &file.data);
                } else if links.last() == Some(&path.as_str()) {
                    image.hard_links(links, file.meta, &file.data);
                }
            }
            Node::Symlink(meta, target) => {
                image.symlink(path, target, *meta);
            }
            Node::CharDevice(meta, major, minor) => {
                image.char_device_owned(path, *meta, *major, *minor);
            }
        }
    }
    image.finish()
}

/// Puts `node` at `path`, replacing what was there and, unless both are directories, everything
/// under it. Every parent of `path` must be a directory of the tree (Kiln's own paths: `dev`,
/// `kiln` are put first).
fn put(tree: &mut Tree, path: &str, node: Node) {
    if !(matches!(node, Node::Dir(_)) && matches!(tree.get(path), Some(Node::Dir(_)))) {
        remove(tree, path);
    }
    tree.insert(path.to_owned(), node);
}

/// Removes `path` and everything under it.
pub fn remove(tree: &mut Tree, path: &str) {
    tree.remove(path);
    let below: Vec<String> = subtree(tree, path).map(|(p, _)| p.clone()).collect();
    for p in below {
        tree.remove(&p);
    }
}

/// The entries under the directory `path` (not `path` itself), in order.
pub fn subtree<'a>(tree: &'a Tree, path: &str) -> impl Iterator<Item = (&'a String, &'a Node)> {
    // Every key under `path/` sorts from `path/` up to (excluding) `path0` ('0' follows '/').
    let (from, to) = (format!("{path}/"), format!("{path}0"));
    tree.range(from..to)
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

    /// Every header field of each entry, by name (the full parse for the root file system tests).
    #[derive(Debug)]
    struct Full {
        inode: u32,
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        data: Vec<u8>,
    }

    fn parse_full(mut bytes: &[u8]) -> Vec<(String, Full)> {
        let mut out = Vec::new();
        loop {
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
            };
            assert_eq!(field(5), 0, "mtime");
            let (size, name_size) = (field(6) as usize, field(11) as usize);
            let name = String::from_utf8(bytes[110..110 + name_size - 1].to_vec()).unwrap();
            let data_at = (110 + name_size).next_multiple_of(4);
            let full = Full {
                inode: field(0),
                mode: field(1),
                uid: field(2),
                gid: field(3),
                nlink: field(4),
                data: bytes[data_at..data_at + size].to_vec(),
            };
            bytes = &bytes[(data_at + size).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, full));
        }
    }

    fn sample_tree() -> Tree {
        let shared = Arc::new(File {
            meta: Meta {
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            data: b"busybox".to_vec(),
        });
        let mut tree = Tree::new();
        tree.insert("bin".into(), Node::Dir(Meta::root(0o755)));
        tree.insert("bin/busybox".into(), Node::File(shared.clone()));
        tree.insert("bin/sh".into(), Node::Symlink(Meta::root(0o777), "busybox".into()));
        tree.insert(
            "home".into(),
            Node::Dir(Meta {
                mode: 0o700,
                uid: 1000,
                gid: 100,
            }),
        );
        tree.insert(
            "home/x".into(),
            Node::File(Arc::new(File {
                meta: Meta {
                    mode: 0o600,
                    uid: 1000,
                    gid: 100,
                },
                data: b"mine".to_vec(),
            })),
        );
        // A hard link whose names sort apart, one in a directory that sorts after the first.
        tree.insert("a-link".into(), Node::File(shared));
        tree.insert(
            "init".into(),
            Node::File(Arc::new(File {
                meta: Meta::root(0o755),
                data: b"image init".to_vec(),
            })),
        );
        tree.insert("kiln".into(), Node::Dir(Meta::root(0o755)));
        tree.insert("kiln/hooks".into(), Node::Dir(Meta::root(0o755)));
        tree.insert(
            "kiln/hooks/ready".into(),
            Node::File(Arc::new(File {
                meta: Meta::root(0o755),
                data: b"hook".to_vec(),
            })),
        );
        tree.insert(
            "kiln/command".into(),
            Node::File(Arc::new(File {
                meta: Meta::root(0o644),
                data: b"evil\0".to_vec(),
            })),
        );
        tree.insert("tmp".into(), Node::Symlink(Meta::root(0o777), "/var/tmp".into()));
        tree
    }

    #[test]
    fn a_root_file_system_image_is_sorted_deterministic_and_carries_the_contract_files() {
        let tree = sample_tree();
        let process = Process {
            command: Some(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()]),
            workdir: Some("/home".into()),
            user: Some((1000, 100)),
            hook_timeout_s: Some(30),
        };
        let env = [("PATH", "/bin")];
        let image = rootfs_image(b"agent", &tree, &env, &process);
        assert_eq!(
            image,
            rootfs_image(b"agent", &tree.clone(), &env, &process),
            "deterministic"
        );
        assert_ne!(image, rootfs_image(b"agent", &tree, &env, &Process::default()));
        let entries = parse_full(&image);
        let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        let get = |name: &str| {
            &entries
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{name}"))
                .1
        };
        // Sorted by path, but for the hard-linked file, written where its last name sorts.
        let expected = [
            "bin",
            "a-link",
            "bin/busybox",
            "bin/sh",
            "dev",
            "dev/console",
            "dev/null",
            "env",
            "home",
            "home/x",
            "init",
            "kiln",
            "kiln/command",
            "kiln/hook_timeout_s",
            "kiln/hooks",
            "kiln/hooks/ready",
            "kiln/user",
            "kiln/workdir",
            "proc",
            "tmp",
        ];
        assert_eq!(names, expected);
        let (a, b) = (get("a-link"), get("bin/busybox"));
        assert_eq!((a.inode, a.nlink, b.nlink), (b.inode, 2, 2), "one inode, two names");
        assert_eq!(
            (a.data.as_slice(), b.data.as_slice()),
            (&b""[..], &b"busybox"[..]),
            "data on the last name"
        );
        assert_eq!(get("bin/sh").mode, 0o120777);
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(
            (get("home/x").uid, get("home/x").gid, get("home/x").mode),
            (1000, 100, 0o100600)
        );
        assert_eq!(get("home").mode, 0o040700);
        assert_eq!(get("kiln/hook_timeout_s").data, b"30");
        // Kiln's entries win over the image's.
        assert_eq!(get("init").data, b"agent");
        assert_eq!(
            get("tmp").mode,
            0o041777,
            "the image's /tmp symlink became Kiln's directory"
        );
        assert_eq!(get("kiln/command").data, b"/bin/sh\0-c\0echo hi\0");
        assert_eq!(get("kiln/workdir").data, b"/home");
        assert_eq!(get("kiln/user").data, b"1000:100");
        assert_eq!(get("kiln/hooks/ready").data, b"hook", "the image's hooks stay");
        assert_eq!(get("env").data, b"PATH=/bin\0");
        assert_eq!(get("dev/null").mode, 0o020666);
        let mut inodes: Vec<u32> = entries.iter().map(|(_, e)| e.inode).collect();
        inodes.dedup();
        assert_eq!(inodes.len(), entries.len() - 1, "only the hard link shares an inode");

        // Without a command, the image's own /kiln/command does not survive: Kiln owns it.
        let plain = parse_full(&rootfs_image(b"agent", &tree, &env, &Process::default()));
        assert!(
            plain
                .iter()
                .all(|(n, _)| !n.starts_with("kiln/") || n.starts_with("kiln/hooks")),
            "{plain:?}"
        );
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
