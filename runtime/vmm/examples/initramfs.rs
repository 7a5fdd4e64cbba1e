//! Writes a deterministic initramfs (newc cpio, `kiln_vmm::initramfs`) from host files, for test
//! VMs built by scripts (see `scripts/nested-api-test.sh`).
//!
//! Usage: cargo run -p kiln-vmm --example initramfs -- OUT ENTRY...
//!   PATH=SOURCE      the host file SOURCE as PATH (mode 0755; parent directories are added)
//!   PATH:=TEXT       a file holding TEXT, where each `\0` stands for a NUL byte (mode 0644)
//!   PATH/            a directory
//! `/dev/console` and `/dev/null` are always added.

use std::collections::BTreeSet;

use kiln_vmm::initramfs::Initramfs;

fn main() {
    let mut args = std::env::args().skip(1);
    let out = args.next().expect("usage: initramfs OUT ENTRY...");
    let mut image = Initramfs::new();
    let mut dirs = BTreeSet::new();
    let mut add_parents = |image: &mut Initramfs, path: &str| {
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if dirs.insert(prefix.clone()) {
                image.dir(&prefix, 0o755);
            }
        }
    };
    add_parents(&mut image, "dev");
    image
        .char_device("dev/console", 0o600, 5, 1)
        .char_device("dev/null", 0o666, 1, 3);
    for entry in args {
        if let Some(dir) = entry.strip_suffix('/') {
            add_parents(&mut image, dir.trim_start_matches('/'));
        } else if let Some((path, text)) = entry.split_once(":=") {
            let path = path.trim_start_matches('/');
            add_parents(&mut image, path.rsplit_once('/').map_or("", |(dir, _)| dir));
            image.file(path, 0o644, text.replace("\\0", "\0").as_bytes());
        } else if let Some((path, source)) = entry.split_once('=') {
            let path = path.trim_start_matches('/');
            add_parents(&mut image, path.rsplit_once('/').map_or("", |(dir, _)| dir));
            let data = std::fs::read(source).unwrap_or_else(|e| panic!("{source}: {e}"));
            image.file(path, 0o755, &data);
        } else {
            panic!("not an entry: {entry} (PATH=SOURCE, PATH:=TEXT or PATH/)");
        }
    }
    std::fs::write(&out, image.finish()).unwrap_or_else(|e| panic!("{out}: {e}"));
}
