//! Unpacking image uploads into a root file system, in memory: a [`Tree`] the initramfs is built
//! from (`kiln_vmm::initramfs::rootfs_image`). Nothing is ever written to the host's disk, so no
//! entry can land outside the image whatever its path or links say; the checks below keep the
//! tree itself sane and bounded.
//!
//! A layer is a tar archive, plain, gzip or zstd (told by magic bytes, not by media types), read
//! with the `tar` crate. Layers apply in order, as an overlay file system stacks them: a later
//! entry replaces an earlier one; `.wh.<name>` deletes `<name>` (and what is under it) from the
//! lower layers; `.wh..wh..opq` empties its directory of what the lower layers put there. A
//! plain root filesystem tar is one layer.
//!
//! Refused, with the reason (each an `invalid_code`): a malformed or truncated archive; a path
//! that leaves the root (`../x`, `a/../../x`) or a hard link whose target does; a hard link to
//! nothing before it; a path under a symlink or a file (links are never followed while
//! unpacking); device nodes and FIFOs (an image cannot bring devices: the guest's `/dev` is made by
//! its own kernel, and refusing them keeps an image from naming hardware at all); sparse files;
//! non-UTF-8 names; more than [`Limits::max_entries`] entries; more than [`Limits::max_bytes`] of
//! files (the root filesystem lives in the guest's RAM); an image without a single file.

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{self, Read};
use std::sync::Arc;

use kiln_vmm::initramfs::{self, File, Meta, Node, Tree};

const MIB: u64 = 1 << 20;

/// Bounds of one image.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of file content the unpacked tree may hold.
    pub max_bytes: u64,
    /// Archive entries read, over every layer.
    pub max_entries: usize,
}

impl Limits {
    /// Half the guest's memory: the root filesystem is unpacked into the guest's RAM and the
    /// function needs the rest.
    pub fn for_memory_mb(memory_mb: u64) -> Limits {
        Limits {
            max_bytes: memory_mb * MIB / 2,
            max_entries: 100_000,
        }
    }

    /// Bytes that may be decompressed in all (upload and layers together): a bound on the work
    /// an upload can ask for, with room for files replaced by later layers.
    fn max_work(&self) -> u64 {
        4 * self.max_bytes + 64 * MIB
    }

    pub(super) fn too_large(&self) -> String {
        format!(
            "the image unpacks to more than {} MiB, half the function's memory_mb: the root \
             filesystem lives in the guest's RAM (raise memory_mb or make the image smaller)",
            self.max_bytes / MIB
        )
    }
}

/// Decompressed bytes read so far, shared by every reader of one upload.
pub(super) struct Budget {
    limits: Limits,
    used: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Budget {
    pub(super) fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            used: Cell::new(0),
            exceeded: Cell::new(false),
        }
    }

    pub(super) fn limits(&self) -> Limits {
        self.limits
    }

    /// The error for a failed read: the bound, if it was hit, else what the reader said.
    pub(super) fn error(&self, what: &str, e: io::Error) -> String {
        if self.exceeded.get() {
            self.limits.too_large()
        } else {
            format!("{what} is malformed or truncated: {e}")
        }
    }
}

/// How an archive is compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub(super) fn of(bytes: &[u8]) -> Compression {
        if bytes.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip-compressed tar",
            Compression::Zstd => "zstd-compressed tar",
        }
    }
}

/// Whether a (decompressed) archive starts with a POSIX or GNU tar header.
pub(super) fn is_tar(head: &[u8]) -> bool {
    head.get(257..262) == Some(b"ustar")
}

/// `bytes` decompressed (by its magic), counted against `budget`.
pub(super) fn open<'a>(bytes: &'a [u8], budget: &'a Budget) -> Result<Box<dyn Read + 'a>, String> {
    let inner: Box<dyn Read + 'a> = match Compression::of(bytes) {
        Compression::None => Box::new(bytes),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(bytes)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(bytes).map_err(|e| format!("zstd stream: {e}"))?)
        }
    };
    Ok(Box::new(Bounded { inner, budget }))
}

/// The first `n` bytes of `bytes` decompressed (fewer if it is shorter), for telling formats apart.
pub(super) fn head(bytes: &[u8], n: usize, budget: &Budget) -> Result<Vec<u8>, String> {
    let mut head = Vec::with_capacity(n);
    open(bytes, budget)?
        .take(n as u64)
        .read_to_end(&mut head)
        .map_err(|e| budget.error(&format!("the {}", Compression::of(bytes).name()), e))?;
    Ok(head)
}

struct Bounded<'a> {
    inner: Box<dyn Read + 'a>,
    budget: &'a Budget,
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let used = self.budget.used.get() + n as u64;
        self.budget.used.set(used);
        if used > self.budget.limits.max_work() {
            self.budget.exceeded.set(true);
            return Err(io::Error::other("decompression bound reached"));
        }
        Ok(n)
    }
}

/// A path of an archive as a path of the tree (`bin/sh`): `/`, `.` and empty components dropped,
/// `..` applied; `None` for the root itself; an error for a path that leaves the root.
pub(super) fn normalize(raw: &[u8]) -> Result<Option<String>, String> {
    let text =
        std::str::from_utf8(raw).map_err(|_| format!("the path {:?} is not UTF-8", String::from_utf8_lossy(raw)))?;
    let mut parts: Vec<&str> = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("the path {text:?} escapes the root filesystem"));
                }
            }
            part => parts.push(part),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Applies layers, in order, onto a tree.
pub struct Unpacker<'a> {
    budget: &'a Budget,
    tree: Tree,
    /// Bytes of file content in the tree (each hard-linked file once).
    bytes: u64,
    entries: usize,
}

impl<'a> Unpacker<'a> {
    pub(super) fn new(budget: &'a Budget) -> Self {
        Unpacker {
            budget,
            tree: Tree::new(),
            bytes: 0,
            entries: 0,
        }
    }

    /// Applies one layer; `what` names it in errors ("the root filesystem tar", "layer 2 ...").
    pub(super) fn layer(&mut self, bytes: &[u8], what: &str) -> Result<(), String> {
        let what = format!("{what} ({})", Compression::of(bytes).name());
        let mut archive = tar::Archive::new(open(bytes, self.budget)?);
        let mut added = HashSet::new();
        let entries = archive.entries().map_err(|e| self.budget.error(&what, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| self.budget.error(&what, e))?;
            self.entries += 1;
            if self.entries > self.budget.limits.max_entries {
                return Err(format!(
                    "the image has more than {} entries",
                    self.budget.limits.max_entries
                ));
            }
            self.entry(entry, &mut added).map_err(|e| match e {
                Refused::Input(message) => format!("{what}: {message}"),
                Refused::Read(e) => self.budget.error(&what, e),
            })?;
        }
        Ok(())
    }

    /// The tree, if it holds anything to run.
    pub(super) fn finish(self) -> Result<Tree, String> {
        if !self.tree.values().any(|node| matches!(node, Node::File(_))) {
            return Err("the image is empty: it holds no files".into());
        }
        Ok(self.tree)
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>, added: &mut HashSet<String>) -> Result<(), Refused> {
        let header = entry.header();
        let kind = header.entry_type();
        let Some(path) = normalize(&entry.path_bytes())? else {
            return Ok(()); // the root directory itself
        };
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", &path));
        if name == ".wh..wh..opq" {
            self.opaque(parent, added)?;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let hidden = if parent.is_empty() {
                hidden.to_owned()
            } else {
                format!("{parent}/{hidden}")
            };
            self.whiteout(&hidden, added);
            return Ok(());
        }
        let id = |value: io::Result<u64>, what: &str| {
            value
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| Refused::Input(format!("{path}: its {what} is not a 32-bit number")))
        };
        let meta = Meta {
            mode: header.mode().map_err(|_| Refused::Input(format!("{path}: bad mode")))? & 0o7777,
            uid: id(header.uid(), "uid")?,
            gid: id(header.gid(), "gid")?,
        };
        let node = match kind {
            tar::EntryType::Directory => Node::Dir(meta),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                // What this entry replaces is freed (its last name going).
                let freed = match self.tree.get(&path) {
                    Some(Node::File(old)) if Arc::strong_count(old) == 1 => old.data.len() as u64,
                    _ => 0,
                };
                if self.bytes - freed + size > self.budget.limits.max_bytes {
                    return Err(Refused::Input(self.budget.limits.too_large()));
                }
                let mut data = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut data).map_err(Refused::Read)?;
                Node::File(Arc::new(File { meta, data }))
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default();
                let target = String::from_utf8(target.into_owned())
                    .map_err(|_| Refused::Input(format!("the symlink {path} has a target that is not UTF-8")))?;
                if target.is_empty() {
                    return Err(Refused::Input(format!("the symlink {path} has no target")));
                }
                Node::Symlink(meta, target)
            }
            tar::EntryType::Link => {
                let raw = entry.link_name_bytes().unwrap_or_default();
                let target = normalize(&raw)
                    .map_err(|_| {
                        Refused::Input(format!(
                            "the hard link {path} points to {:?}, which escapes the root filesystem",
                            String::from_utf8_lossy(&raw)
                        ))
                    })?
                    .unwrap_or_default();
                match self.tree.get(&target) {
                    Some(node @ (Node::File(_) | Node::Symlink(..))) => node.clone(),
                    _ => {
                        return Err(Refused::Input(format!(
                            "the hard link {path} points to {target:?}, which is not a file before it in the image"
                        )))
                    }
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                return Err(Refused::Input(format!(
                    "{path} is a device node or FIFO: images may not contain special files (the \
                     guest's /dev is made by its own kernel)"
                )))
            }
            tar::EntryType::XGlobalHeader => return Ok(()),
            tar::EntryType::GNUSparse => {
                return Err(Refused::Input(format!(
                    "{path} is a sparse file, which Kiln does not unpack"
                )))
            }
            other => {
                return Err(Refused::Input(format!(
                    "{path} is an entry of a type Kiln does not unpack ({other:?})"
                )))
            }
        };
        self.parents(&path, added)?;
        match (self.tree.get(&path), &node) {
            // A directory entry over a directory changes its metadata, not its content.
            (Some(Node::Dir(_)), Node::Dir(_)) => {}
            (Some(_), _) => self.remove(&path, |_| true),
            (None, _) => {}
        }
        if let Node::File(file) = &node {
            if Arc::strong_count(file) == 1 {
                self.bytes += file.data.len() as u64;
            }
        }
        self.tree.insert(path.clone(), node);
        added.insert(path);
        Ok(())
    }

    /// Makes every parent of `path` a directory: a missing one is created (archives often leave
    /// directories out); a file or symlink in the way is refused, as links are never followed.
    fn parents(&mut self, path: &str, added: &mut HashSet<String>) -> Result<(), Refused> {
        for (at, _) in path.match_indices('/') {
            let parent = &path[..at];
            match self.tree.get(parent) {
                Some(Node::Dir(_)) => {}
                None => {
                    self.tree.insert(parent.to_owned(), Node::Dir(Meta::root(0o755)));
                    added.insert(parent.to_owned());
                }
                Some(_) => {
                    return Err(Refused::Input(format!(
                        "{path} lies under {parent}, which is not a directory (Kiln does not follow \
                         links while unpacking)"
                    )))
                }
            }
        }
        Ok(())
    }

    /// `.wh.<name>`: `path` and what is under it go, as far as lower layers put them there.
    fn whiteout(&mut self, path: &str, added: &HashSet<String>) {
        if !added.contains(path) {
            if let Some(node) = self.tree.remove(path) {
                self.release(node);
            }
        }
        self.remove_below(path, |p| !added.contains(p));
    }

    /// `.wh..wh..opq`: the directory `dir` keeps only what this layer put in it.
    fn opaque(&mut self, dir: &str, added: &mut HashSet<String>) -> Result<(), Refused> {
        self.remove_below(dir, |p| !added.contains(p));
        if !dir.is_empty() {
            self.parents(&format!("{dir}/.wh..wh..opq"), added)?;
        }
        Ok(())
    }

    /// Removes `path` and what is under it, where `which` says so.
    fn remove(&mut self, path: &str, which: impl Fn(&str) -> bool) {
        if which(path) {
            if let Some(node) = self.tree.remove(path) {
                self.release(node);
            }
        }
        self.remove_below(path, which);
    }

    fn remove_below(&mut self, dir: &str, which: impl Fn(&str) -> bool) {
        let below: Vec<String> = if dir.is_empty() {
            self.tree.keys().filter(|p| which(p)).cloned().collect()
        } else {
            initramfs::subtree(&self.tree, dir)
                .map(|(p, _)| p)
                .filter(|p| which(p))
                .cloned()
                .collect()
        };
        for path in below {
            if let Some(node) = self.tree.remove(&path) {
                self.release(node);
            }
        }
    }

    /// Accounts for a node leaving the tree: a file's bytes, once its last name is gone.
    fn release(&mut self, node: Node) {
        if let Node::File(file) = node {
            if Arc::strong_count(&file) == 1 {
                self.bytes -= file.data.len() as u64;
            }
        }
    }
}

enum Refused {
    /// What the archive says is refused.
    Input(String),
    /// The archive could not be read.
    Read(io::Error),
}

impl From<String> for Refused {
    fn from(message: String) -> Self {
        Refused::Input(message)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// What a test archive holds, entry by entry.
    pub enum T<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Symlink(&'a str, &'a str),
        Link(&'a str, &'a str),
        Fifo(&'a str),
    }

    /// A tar archive of `entries`, with raw paths written as given (even `../x`).
    pub fn tar(entries: &[T]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o755);
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            let (path, kind, data, link): (&str, _, &[u8], Option<&str>) = match entry {
                T::Dir(p) => (p, tar::EntryType::Directory, b"", None),
                T::File(p, data) => (p, tar::EntryType::Regular, data, None),
                T::Symlink(p, to) => (p, tar::EntryType::Symlink, b"", Some(to)),
                T::Link(p, to) => (p, tar::EntryType::Link, b"", Some(to)),
                T::Fifo(p) => (p, tar::EntryType::Fifo, b"", None),
            };
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            // Raw name bytes: `set_path` would refuse `..`, which is what these tests send.
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn unpack(layers: &[Vec<u8>]) -> Result<Tree, String> {
        unpack_with(layers, Limits::for_memory_mb(128))
    }

    fn unpack_with(layers: &[Vec<u8>], limits: Limits) -> Result<Tree, String> {
        let budget = Budget::new(limits);
        let mut unpacker = Unpacker::new(&budget);
        for (i, layer) in layers.iter().enumerate() {
            unpacker.layer(layer, &format!("layer {}", i + 1))?;
        }
        unpacker.finish()
    }

    fn data(tree: &Tree, path: &str) -> Option<Vec<u8>> {
        match tree.get(path) {
            Some(Node::File(f)) => Some(f.data.clone()),
            _ => None,
        }
    }

    #[test]
    fn image_paths_are_normalised_and_escapes_refused() {
        assert_eq!(normalize(b"./a//b/./c").unwrap().as_deref(), Some("a/b/c"));
        assert_eq!(normalize(b"/a/../b").unwrap().as_deref(), Some("b"));
        assert_eq!(normalize(b"./").unwrap(), None);
        for bad in [&b"../x"[..], b"a/../../x", b"/.."] {
            let err = normalize(bad).unwrap_err();
            assert!(err.contains("escapes the root"), "{err}");
        }
    }

    #[test]
    fn image_layers_apply_in_order_with_whiteouts_and_opaque_directories() {
        let lower = tar(&[
            T::Dir("etc"),
            T::File("etc/a", b"lower a"),
            T::File("etc/b", b"lower b"),
            T::Dir("var/cache"),
            T::File("var/cache/x", b"x"),
            T::File("var/cache/y", b"y"),
            T::File("keep", b"keep"),
            T::File("gone/deep/file", b"deep"),
        ]);
        let upper = tar(&[
            T::File("etc/a", b"upper a"),
            T::File("etc/.wh.b", b""),
            T::File("var/cache/new", b"new"),
            T::File("var/cache/.wh..wh..opq", b""),
            T::File(".wh.gone", b""),
        ]);
        let tree = unpack(&[lower.clone(), upper]).unwrap();
        assert_eq!(data(&tree, "etc/a").unwrap(), b"upper a", "a later layer replaces");
        assert!(!tree.contains_key("etc/b"), "whited out");
        assert!(!tree.contains_key("etc/.wh.b"), "markers are not files");
        assert_eq!(
            data(&tree, "var/cache/new").unwrap(),
            b"new",
            "this layer's entries survive its opaque marker"
        );
        assert!(!tree.contains_key("var/cache/x") && !tree.contains_key("var/cache/y"));
        assert!(
            !tree.contains_key("gone") && !tree.contains_key("gone/deep/file"),
            "a whiteout takes the subtree"
        );
        assert_eq!(data(&tree, "keep").unwrap(), b"keep");
        assert!(
            matches!(tree.get("var"), Some(Node::Dir(_))),
            "missing parents are created"
        );

        // Order matters: the same layers the other way round.
        let first = tar(&[T::File("f", b"one")]);
        let second = tar(&[T::File("f", b"two")]);
        assert_eq!(
            data(&unpack(&[first.clone(), second.clone()]).unwrap(), "f").unwrap(),
            b"two"
        );
        assert_eq!(data(&unpack(&[second, first]).unwrap(), "f").unwrap(), b"one");
        // A directory replaced by a file loses its content.
        let file_over_dir = tar(&[T::File("etc", b"flat"), T::File("other", b"o")]);
        let tree = unpack(&[lower, file_over_dir]).unwrap();
        assert_eq!(data(&tree, "etc").unwrap(), b"flat");
        assert!(!tree.contains_key("etc/a"));
    }

    #[test]
    fn image_hard_links_share_one_file_and_may_not_escape() {
        let tree = unpack(&[tar(&[
            T::File("bin/busybox", b"bb"),
            T::Link("bin/sh", "bin/busybox"),
            T::Symlink("bin/ls", "busybox"),
        ])])
        .unwrap();
        let (Some(Node::File(a)), Some(Node::File(b))) = (tree.get("bin/busybox"), tree.get("bin/sh")) else {
            panic!("{tree:?}")
        };
        assert!(Arc::ptr_eq(a, b), "one file, two names");
        assert!(matches!(tree.get("bin/ls"), Some(Node::Symlink(_, t)) if t == "busybox"));

        let err = unpack(&[tar(&[T::File("a", b"a"), T::Link("b", "../../etc/shadow")])]).unwrap_err();
        assert!(err.contains("hard link b") && err.contains("escapes the root"), "{err}");
        let err = unpack(&[tar(&[T::File("a", b"a"), T::Link("b", "nothing")])]).unwrap_err();
        assert!(err.contains("not a file before it"), "{err}");
        // A whiteout of one name leaves the other.
        let tree = unpack(&[
            tar(&[T::File("x", b"data"), T::Link("y", "x")]),
            tar(&[T::File(".wh.x", b"")]),
        ])
        .unwrap();
        assert_eq!(data(&tree, "y").unwrap(), b"data");
    }

    #[test]
    fn image_entries_that_could_harm_are_refused_with_the_reason() {
        for (entries, needle) in [
            (vec![T::File("../x", b"x")], "escapes the root"),
            (vec![T::File("a/../../x", b"x")], "escapes the root"),
            (vec![T::Fifo("dev/fifo")], "device node or FIFO"),
            (
                vec![T::Symlink("lib", "/usr/lib"), T::File("lib/x", b"x")],
                "not a directory",
            ),
            (vec![T::Dir("empty")], "empty"),
        ] {
            let err = unpack(&[tar(&entries)]).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
        let limits = Limits {
            max_bytes: 10,
            max_entries: 3,
        };
        let err = unpack_with(&[tar(&[T::File("big", &[0; 11])])], limits).unwrap_err();
        assert!(err.contains("half the function's memory_mb"), "{err}");
        let err = unpack_with(
            &[tar(&[
                T::File("a", b""),
                T::File("b", b""),
                T::File("c", b""),
                T::File("d", b""),
            ])],
            limits,
        )
        .unwrap_err();
        assert!(err.contains("more than 3 entries"), "{err}");
        // Replacing a file frees its bytes: two layers of 8 bytes each fit a bound of 10.
        let eight = tar(&[T::File("f", &[1; 8])]);
        assert!(unpack_with(&[eight.clone(), eight], limits).is_ok());
    }

    #[test]
    fn image_layers_may_be_compressed_and_truncation_is_refused() {
        let layer = tar(&[T::File("hello", b"world")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &layer).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&layer[..], 1).unwrap();
        for compressed in [&gz, &zst] {
            assert_eq!(
                data(&unpack(std::slice::from_ref(compressed)).unwrap(), "hello").unwrap(),
                b"world"
            );
        }
        let err = unpack(&[gz[..gz.len() / 2].to_vec()]).unwrap_err();
        assert!(err.contains("malformed or truncated") && err.contains("gzip"), "{err}");
        let mut corrupt = layer.clone();
        corrupt[0] ^= 0xff; // the header's checksum no longer matches
        let err = unpack(&[corrupt]).unwrap_err();
        assert!(err.contains("malformed or truncated"), "{err}");
    }
}
