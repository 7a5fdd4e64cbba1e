//! What the microvm tier runs: the user's upload inside Kiln's Linux guest image — the kernel and
//! the guest agent given at start-up — in an initramfs built per function. The upload is either a
//! static x86_64 Linux ELF executable (checked here), put as `/function`, or an image (a root
//! filesystem tar or an OCI image, `super::oci`), unpacked ([`prepare`]) as the whole root
//! filesystem, with what to run from the function's config over the image's own config.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_vmm::kernel;
use object::elf;
use object::read::elf::{Dyn as _, ElfFile64, FileHeader as _, ProgramHeader as _};
use object::{Endian as _, Endianness, FileKind};

use super::oci;
use super::rootfs::Limits;
use crate::digest::Digest;
use crate::function::{parse_user, FunctionConfig};
use kiln_vmm::initramfs::{self, Meta, Node, Process, Tree};

/// The Linux guest every microvm function boots: kernel, agent and command line.
pub struct GuestImage {
    /// The ELF `vmlinux` (extracted from a bzImage at start-up when given one).
    pub vmlinux: Vec<u8>,
    /// The static guest agent, `/init` of every initramfs.
    pub agent: Vec<u8>,
    /// The kernel modules every guest gets (an initramfs appended to each function's): `tun.ko`,
    /// the guest's network, from `guest-modules/` beside the kernel. Empty without it: guests then
    /// have no network.
    pub modules: Vec<u8>,
    pub cmdline: String,
    /// Identifies kernel, agent and command line together: part of every snapshot's digest, so a
    /// new image never reuses a snapshot of the old one.
    pub identity: Digest,
}

impl GuestImage {
    /// Loads the kernel and agent; the error says which is missing or wrong.
    pub fn load(kernel_path: Option<&Path>, agent_path: Option<&Path>) -> Result<Self, String> {
        let kernel_path = kernel_path.ok_or("no guest kernel was given (--microvm-kernel)")?;
        let agent_path = agent_path.ok_or("no guest agent was given (--microvm-agent)")?;
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| format!("cannot read the guest {what} {}: {e}", path.display()))
        };
        let kernel_file = read(kernel_path, "kernel")?;
        let vmlinux = if kernel_file.starts_with(b"\x7fELF") {
            kernel_file
        } else {
            kernel::extract_vmlinux(&kernel_file)
                .map_err(|e| format!("the guest kernel {} is not usable: {e}", kernel_path.display()))?
        };
        let agent = read(agent_path, "agent")?;
        validate_executable(&agent).map_err(|e| format!("the guest agent {}: {e}", agent_path.display()))?;
        let cmdline = kiln_vmm::linux::DEFAULT_CMDLINE.to_owned();
        let modules = guest_modules(kernel_path)?;
        let identity = Digest::of(
            &[
                Digest::of(&vmlinux).hex().as_bytes(),
                Digest::of(&agent).hex().as_bytes(),
                cmdline.as_bytes(),
                Digest::of(&modules).hex().as_bytes(),
            ]
            .concat(),
        );
        Ok(Self {
            vmlinux,
            agent,
            modules,
            cmdline,
            identity,
        })
    }

    /// The initramfs of one function: the agent as `/init`, `function` as `/function`, and the
    /// function's environment (its config's `env`; nothing of the host's).
    pub fn initramfs(&self, function: &[u8], env: &BTreeMap<String, String>) -> Vec<u8> {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        [
            kiln_vmm::initramfs::function_image(&self.agent, function, &env),
            self.modules.clone(),
        ]
        .concat()
    }

    /// The initramfs of a function deployed as an image: its root filesystem with the agent, the
    /// merged environment and the contract files (`kiln_vmm::initramfs::rootfs_image`).
    pub fn image_initramfs(&self, image: &Prepared) -> Vec<u8> {
        let env: Vec<(&str, &str)> = image.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        [
            initramfs::rootfs_image(&self.agent, &image.tree, &env, &image.process),
            self.modules.clone(),
        ]
        .concat()
    }

    /// The digest a function's snapshot is stored under: what booted (image and initramfs) and the
    /// memory size it booted with, the two things a snapshot depends on.
    pub fn snapshot_digest(&self, initramfs: &[u8], memory_mib: u32) -> Digest {
        let initramfs = Digest::of(initramfs);
        let parts = [
            b"kiln-microvm-snapshot-v1\n".as_slice(),
            self.identity.hex().as_bytes(),
            initramfs.hex().as_bytes(),
            &memory_mib.to_le_bytes(),
        ];
        Digest::of(&parts.concat())
    }
}

/// The modules guests load, from `guest-modules/` beside the kernel, as an initramfs to append
/// (empty when there are none: the tier runs, its guests without a network).
fn guest_modules(kernel_path: &Path) -> Result<Vec<u8>, String> {
    let Some(dir) = kernel_path.parent().map(|dir| dir.join("guest-modules")) else {
        return Ok(Vec::new());
    };
    let tun = dir.join("tun.ko");
    match std::fs::read(&tun) {
        Ok(module) => Ok(kiln_vmm::initramfs::modules_image(&[("tun.ko", &module)])),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(module = %tun.display(), "no tun module for microVM guests: they get no network");
            Ok(Vec::new())
        }
        Err(e) => Err(format!("cannot read {}: {e}", tun.display())),
    }
}

/// Checks that `upload` is something the microvm tier could run: a static x86_64 ELF executable.
/// The error is the reason, for an `invalid_code`.
pub fn validate_executable(upload: &[u8]) -> Result<(), String> {
    if upload.is_empty() {
        return Err("the upload is empty; the microvm tier runs a static x86_64 Linux executable".into());
    }
    if looks_like_wasm(upload) {
        return Err(
            "this is WebAssembly, which runs on the wasm tier; the microvm tier runs a static \
                    x86_64 Linux ELF executable (deploy Wasm with \"tier\": \"wasm\")"
                .into(),
        );
    }
    match FileKind::parse(upload) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => {
            let machine = upload.get(18..20).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
            return Err(format!(
                "this is a 32-bit ELF for {}; the microvm tier runs x86_64 executables",
                machine_name(machine)
            ));
        }
        _ => {
            return Err(
                "not an ELF executable nor an image archive; the microvm tier runs a static x86_64 \
                        Linux executable, a root filesystem tar or an OCI image (tar, gzip or zstd)"
                    .into(),
            )
        }
    }
    let file = ElfFile64::<Endianness>::parse(upload).map_err(|e| format!("malformed ELF: {e}"))?;
    let (header, endian) = (file.elf_header(), file.endian());
    // x86_64 is little-endian: a big-endian header can still name EM_X86_64 (its e_machine read
    // in its own byte order), but no x86_64 CPU runs it (found by the `elf_validate` fuzz target).
    if !endian.is_little_endian() {
        return Err("this is a big-endian ELF; the microvm tier runs x86_64 (little-endian) executables".into());
    }
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(format!(
            "this ELF is built for {}; the microvm tier runs x86_64 executables",
            machine_name(machine)
        ));
    }
    let kind = header.e_type(endian);
    if kind != elf::ET_EXEC && kind != elf::ET_DYN {
        return Err("this ELF is not an executable (an object file or a core dump?)".into());
    }
    for segment in file.elf_program_headers() {
        match segment.p_type(endian) {
            elf::PT_INTERP => {
                let interpreter = segment
                    .interpreter(endian, upload)
                    .ok()
                    .flatten()
                    .map(|i| String::from_utf8_lossy(i).into_owned())
                    .unwrap_or_default();
                return Err(format!(
                    "this executable is dynamically linked (it asks for the loader {interpreter}); \
                     the microvm tier runs static executables (e.g. built for x86_64-unknown-linux-musl)"
                ));
            }
            elf::PT_DYNAMIC => {
                let entries = segment.dynamic(endian, upload).ok().flatten().unwrap_or_default();
                if entries.iter().any(|d| d.d_tag(endian) == elf::DT_NEEDED) {
                    return Err(
                        "this ELF needs shared libraries (DT_NEEDED); the microvm tier runs static \
                                executables (e.g. built for x86_64-unknown-linux-musl)"
                            .into(),
                    );
                }
            }
            _ => {}
        }
    }
    if header.e_entry(endian) == 0 {
        return Err("this ELF has no entry point; is it a shared library?".into());
    }
    Ok(())
}

/// An image upload unpacked, and what the guest runs in it.
#[derive(Debug)]
pub struct Prepared {
    pub tree: Tree,
    /// The image config's `Env`, then the function config's `env` over it.
    pub env: BTreeMap<String, String>,
    pub process: Process,
}

/// Unpacks an image upload (`oci::is_archive`) and decides what runs in it, the function's config
/// over the image's config as Docker does: a config `entrypoint` replaces the image's and drops
/// its `Cmd` unless the config gives `cmd`; `cmd`, `workdir`, `user` replace the image's. With
/// nothing to run, an executable `/function` runs, as for a static executable upload. Blocking
/// (decompression, digests): run it on the blocking pool. The error is the reason, for an
/// `invalid_code`.
pub fn prepare(upload: &[u8], config: &FunctionConfig) -> Result<Prepared, String> {
    let unpacked = oci::unpack(upload, Limits::for_memory_mb(config.memory_mb))?;
    let mut tree = unpacked.tree;
    let image = unpacked.defaults.unwrap_or_default();
    let (entrypoint, cmd) = match &config.entrypoint {
        Some(entrypoint) => (entrypoint.clone(), config.cmd.clone().unwrap_or_default()),
        None => (
            image.entrypoint.clone().unwrap_or_default(),
            config.cmd.clone().or(image.cmd.clone()).unwrap_or_default(),
        ),
    };
    let argv = [entrypoint, cmd].concat();
    if argv.iter().any(|a| a.contains('\0')) {
        return Err("the image config's Entrypoint or Cmd contains a NUL byte".into());
    }
    let command = if !argv.is_empty() {
        Some(argv)
    } else if matches!(tree.get("function"), Some(Node::File(f)) if f.meta.mode & 0o111 != 0) {
        None
    } else {
        return Err(
            "the image says nothing to run: give \"entrypoint\" or \"cmd\" in the config, set \
             Entrypoint or Cmd in the image's config, or put an executable /function in it"
                .into(),
        );
    };

    let mut env = BTreeMap::new();
    for entry in &image.env {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() && !entry.contains('\0') => {
                env.insert(key.to_owned(), value.to_owned());
            }
            _ => return Err(format!("the image config's Env entry {entry:?} is not KEY=VALUE")),
        }
    }
    env.extend(config.env.clone());

    let workdir = match config.workdir.clone().or(image.workdir.clone()) {
        Some(dir) => Some(workdir(&mut tree, &dir)?),
        None => None,
    };
    let user = match (&config.user, &image.user) {
        (Some(user), _) => {
            let (uid, gid) = parse_user(user).ok_or_else(|| format!("user {user:?} is not numeric"))?;
            Some((uid, gid.unwrap_or_else(|| primary_gid(&tree, uid))))
        }
        (None, Some(user)) => Some(image_user(&tree, user)?),
        (None, None) => None,
    };
    Ok(Prepared {
        tree,
        env,
        process: Process {
            command,
            workdir,
            user,
            hook_timeout_s: config.hook_timeout_s,
        },
    })
}

/// The working directory as an absolute, normalised path, created (as Docker does) if the image
/// lacks it.
fn workdir(tree: &mut Tree, dir: &str) -> Result<String, String> {
    let Some(path) = super::rootfs::normalize(dir.as_bytes())? else {
        return Ok("/".into());
    };
    let mut at = 0;
    loop {
        let end = path[at..].find('/').map_or(path.len(), |i| at + i);
        match tree.get(&path[..end]) {
            Some(Node::Dir(_)) => {}
            None => {
                tree.insert(path[..end].to_owned(), Node::Dir(Meta::root(0o755)));
            }
            Some(_) => return Err(format!("the workdir /{path} is not a directory in the image")),
        }
        if end == path.len() {
            return Ok(format!("/{path}"));
        }
        at = end + 1;
    }
}

/// The lines of a text file of the image (`etc/passwd`), split at `:`.
fn table(tree: &Tree, path: &str) -> Vec<Vec<String>> {
    let Some(Node::File(file)) = tree.get(path) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&file.data)
        .lines()
        .map(|line| line.split(':').map(str::to_owned).collect())
        .collect()
}

/// The group of `uid` in the image's `/etc/passwd`, else 0 (Docker's rule).
fn primary_gid(tree: &Tree, uid: u32) -> u32 {
    table(tree, "etc/passwd")
        .iter()
        .find(|fields| fields.get(2).and_then(|f| f.parse().ok()) == Some(uid))
        .and_then(|fields| fields.get(3)?.parse().ok())
        .unwrap_or(0)
}

/// The image config's `User`: numeric, or names the image's `/etc/passwd` and `/etc/group` have.
fn image_user(tree: &Tree, user: &str) -> Result<(u32, u32), String> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str| -> Result<u32, String> {
        if let Ok(id) = name.parse() {
            return Ok(id);
        }
        table(tree, file)
            .iter()
            .find(|fields| fields.first().map(String::as_str) == Some(name))
            .and_then(|fields| fields.get(2)?.parse().ok())
            .ok_or_else(|| {
                format!("the image config's User {user:?} names {name:?}, which the image's /{file} does not have")
            })
    };
    let uid = lookup("etc/passwd", user_part)?;
    let gid = match group_part {
        Some(group) => lookup("etc/group", group)?,
        None => primary_gid(tree, uid),
    };
    Ok((uid, gid))
}

/// Binary Wasm, or WAT text (which Kiln's wasm tier also accepts).
fn looks_like_wasm(upload: &[u8]) -> bool {
    if upload.starts_with(b"\0asm") {
        return true;
    }
    let text = String::from_utf8_lossy(&upload[..upload.len().min(4096)]);
    let mut rest = text.trim_start();
    while let Some(after) = rest.strip_prefix(";;") {
        rest = after.split_once('\n').map_or("", |(_, tail)| tail).trim_start();
    }
    rest.starts_with("(module") || rest.starts_with("(component")
}

fn machine_name(machine: u16) -> String {
    match machine {
        elf::EM_386 => "x86 (32-bit)".into(),
        elf::EM_ARM => "arm".into(),
        elf::EM_AARCH64 => "aarch64".into(),
        elf::EM_RISCV => "riscv".into(),
        elf::EM_PPC64 => "ppc64".into(),
        elf::EM_S390 => "s390x".into(),
        elf::EM_X86_64 => "x86_64 (32-bit ELF: x32)".into(),
        other => format!("machine type {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wat_text_is_recognised_behind_comments() {
        assert!(looks_like_wasm(b";; a guest\n  (module)"));
        assert!(looks_like_wasm(b"\0asm\x01\0\0\0"));
        assert!(!looks_like_wasm(b"\x7fELF"));
    }

    /// The smallest ELF64 header that is an x86_64 executable but for its byte order: big-endian,
    /// ET_EXEC, EM_X86_64 and an entry point, each in big-endian order (the `elf_validate` fuzz
    /// target's crash, minimised; also `fuzz/seeds/elf_validate/big-endian-x86_64.elf`).
    fn big_endian_x86_64_header() -> Vec<u8> {
        let mut h = b"\x7fELF\x02\x02\x01".to_vec();
        h.resize(16, 0);
        h.extend_from_slice(&elf::ET_EXEC.to_be_bytes());
        h.extend_from_slice(&elf::EM_X86_64.to_be_bytes());
        h.extend_from_slice(&1u32.to_be_bytes()); // e_version
        h.extend_from_slice(&0x40_1000u64.to_be_bytes()); // e_entry
        h.extend_from_slice(&[0; 8 + 8 + 4]); // e_phoff, e_shoff, e_flags
        for field in [64u16, 56, 0, 64, 0, 0] {
            // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
            h.extend_from_slice(&field.to_be_bytes());
        }
        assert_eq!(h.len(), 64);
        h
    }

    #[test]
    fn a_big_endian_elf_is_refused_even_when_it_names_x86_64() {
        let header = big_endian_x86_64_header();
        let err = validate_executable(&header).unwrap_err();
        assert!(err.contains("big-endian"), "{err}");
        // The same header in little-endian order is accepted: only the byte order is refused.
        let mut little = header.clone();
        little[5] = 1;
        for (at, len) in [(16, 2), (18, 2), (20, 4), (24, 8), (52, 2), (54, 2), (58, 2)] {
            little[at..at + len].reverse();
        }
        assert_eq!(validate_executable(&little), Ok(()));
    }

    #[test]
    fn the_image_names_what_is_missing_and_keys_snapshots_by_content_and_memory() {
        let dir = tempfile::tempdir().unwrap();
        let err = GuestImage::load(None, None).err().unwrap();
        assert!(err.contains("--microvm-kernel"), "{err}");
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF not really a kernel").unwrap();
        let err = GuestImage::load(Some(&kernel), None).err().unwrap();
        assert!(err.contains("--microvm-agent"), "{err}");
        let missing = dir.path().join("missing");
        let err = GuestImage::load(Some(&missing), Some(&missing)).err().unwrap();
        assert!(err.contains("cannot read the guest kernel"), "{err}");
        let bzimage = dir.path().join("vmlinuz");
        std::fs::write(&bzimage, [0u8; 4096]).unwrap();
        let err = GuestImage::load(Some(&bzimage), Some(&missing)).err().unwrap();
        assert!(err.contains("not usable") && err.contains("bzImage"), "{err}");
        // The agent must itself be a static executable: the host's dynamic `true` is refused.
        let err = GuestImage::load(Some(&kernel), Some(Path::new("/bin/true")))
            .err()
            .unwrap();
        assert!(err.contains("dynamically linked"), "{err}");

        let image = |agent: &[u8]| GuestImage {
            vmlinux: b"kernel".to_vec(),
            agent: agent.to_vec(),
            modules: Vec::new(),
            cmdline: String::new(),
            identity: Digest::of(agent),
        };
        let (a, b) = (image(b"agent a"), image(b"agent b"));
        let env = BTreeMap::from([("K".to_owned(), "v".to_owned())]);
        let initramfs = a.initramfs(b"function", &env);
        assert_eq!(initramfs, a.initramfs(b"function", &env), "deterministic");
        assert_ne!(
            initramfs,
            a.initramfs(b"function", &BTreeMap::new()),
            "env is part of the image"
        );
        assert_ne!(a.snapshot_digest(&initramfs, 128), a.snapshot_digest(&initramfs, 256));
        assert_ne!(a.snapshot_digest(&initramfs, 128), b.snapshot_digest(&initramfs, 128));
        assert_eq!(a.snapshot_digest(&initramfs, 128), a.snapshot_digest(&initramfs, 128));
    }

    fn config(json: serde_json::Value) -> FunctionConfig {
        let mut json = json;
        json["tier"] = "microvm".into();
        FunctionConfig::from_json(json.to_string().as_bytes()).unwrap()
    }

    /// A docker-save-like upload: a root filesystem tar is enough to exercise the rules when the
    /// image config is given by hand, so these go through `merge` by way of a tiny OCI layout.
    fn oci_upload(image_config: serde_json::Value, files: &[super::super::rootfs::tests::T]) -> Vec<u8> {
        use super::super::rootfs::tests::{tar, T};
        let layer = tar(files);
        let sha = |d: &[u8]| Digest::of(d).hex().to_owned();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
            "config": image_config,
        }))
        .unwrap();
        let desc = |d: &[u8]| serde_json::json!({"mediaType": "application/octet-stream", "digest": format!("sha256:{}", sha(d)), "size": d.len()});
        let manifest = serde_json::to_vec(
            &serde_json::json!({"schemaVersion": 2, "config": desc(&config), "layers": [desc(&layer)]}),
        )
        .unwrap();
        let index =
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [desc(&manifest)]})).unwrap();
        let names: Vec<String> = [&config, &manifest, &layer]
            .iter()
            .map(|b| format!("blobs/sha256/{}", sha(b)))
            .collect();
        tar(&[
            T::File("oci-layout", br#"{"imageLayoutVersion": "1.0.0"}"#),
            T::File("index.json", &index),
            T::File(&names[0], &config),
            T::File(&names[1], &manifest),
            T::File(&names[2], &layer),
        ])
    }

    #[test]
    fn image_config_and_function_config_merge_as_docker_does() {
        use super::super::rootfs::tests::{tar, T};
        let passwd: &[u8] = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group: &[u8] = b"root:x:0:\nstaff:x:50:\n";
        let files = [
            T::File("bin/app", b"app"),
            T::File("etc/passwd", passwd),
            T::File("etc/group", group),
        ];
        let upload = oci_upload(
            serde_json::json!({"Entrypoint": ["/bin/app"], "Cmd": ["--default"], "Env": ["PATH=/bin", "A=image"], "WorkingDir": "/srv/app", "User": "app:staff"}),
            &files,
        );
        let run = |json: serde_json::Value| prepare(&upload, &config(json)).unwrap();

        let image = run(serde_json::json!({"env": {"A": "config"}}));
        assert_eq!(image.process.command.as_deref().unwrap(), ["/bin/app", "--default"]);
        assert_eq!(image.process.workdir.as_deref(), Some("/srv/app"));
        assert!(
            matches!(image.tree.get("srv/app"), Some(Node::Dir(_))),
            "the workdir is created"
        );
        assert_eq!(image.process.user, Some((1000, 50)), "names resolved in the image");
        assert_eq!(image.env["A"], "config", "the config's env wins");
        assert_eq!(image.env["PATH"], "/bin");

        // cmd replaces the image's Cmd; entrypoint drops it unless cmd is given.
        let image = run(serde_json::json!({"cmd": ["--other"]}));
        assert_eq!(image.process.command.as_deref().unwrap(), ["/bin/app", "--other"]);
        let image = run(serde_json::json!({"entrypoint": ["/bin/sh", "-c"]}));
        assert_eq!(image.process.command.as_deref().unwrap(), ["/bin/sh", "-c"]);
        let image = run(serde_json::json!({"entrypoint": ["/bin/sh"], "cmd": ["x"], "workdir": "/", "user": "1000"}));
        assert_eq!(image.process.command.as_deref().unwrap(), ["/bin/sh", "x"]);
        assert_eq!(image.process.workdir.as_deref(), Some("/"));
        assert_eq!(
            image.process.user,
            Some((1000, 1001)),
            "a lone uid takes its group from /etc/passwd"
        );

        // A root filesystem tar: nothing to run is refused unless it has an executable /function.
        let bare = tar(&[T::File("etc/hostname", b"x")]);
        let err = prepare(&bare, &config(serde_json::json!({}))).unwrap_err();
        assert!(err.contains("nothing to run"), "{err}");
        let with_function = tar(&[T::File("function", b"\x7fELF")]);
        let image = prepare(&with_function, &config(serde_json::json!({}))).unwrap();
        assert_eq!(image.process, Process::default(), "the agent runs /function");
        let image = prepare(&bare, &config(serde_json::json!({"cmd": ["/bin/true"]}))).unwrap();
        assert_eq!(image.process.command.as_deref().unwrap(), ["/bin/true"]);

        // An image user the image does not know is refused.
        let unknown = oci_upload(serde_json::json!({"Cmd": ["/bin/app"], "User": "ghost"}), &files);
        let err = prepare(&unknown, &config(serde_json::json!({}))).unwrap_err();
        assert!(err.contains("ghost"), "{err}");

        // Same upload and config, same initramfs bytes.
        let guest = GuestImage {
            vmlinux: Vec::new(),
            agent: b"agent".to_vec(),
            modules: Vec::new(),
            cmdline: String::new(),
            identity: Digest::of(b"agent"),
        };
        let a = guest.image_initramfs(&run(serde_json::json!({})));
        assert_eq!(a, guest.image_initramfs(&run(serde_json::json!({}))));
        assert_ne!(a, guest.image_initramfs(&run(serde_json::json!({"cmd": ["y"]}))));
    }
}
