//! Functions from source: a Ruby, Python or JavaScript handler (one file, or a zip or tar of a
//! directory with its vendored dependencies) becomes a Wasm module at deploy. The language's
//! runtime — the interpreter built as a WASI preview 1 module by `guests/runtimes/build.sh`,
//! exporting `wizer.initialize`, `kiln.restore` and `_start` — is pre-initialised ([`super::preinit`])
//! with the user's files preopened read-only at `/app` and `KILN_HANDLER` naming the entry file:
//! the interpreter boots, the handler's top level runs once, inside the sandbox and under the
//! function's timeout and memory, and the snapshot is what is stored, compiled and pooled. Nothing
//! of the user's runs on the host: the files are only written into a private temporary directory.
//!
//! Invocations get no preopened directory. They must not get a different list from the deploy's:
//! wasi-libc's preopen table is in the snapshot, and the Ruby runtime (wasi-vfs, no name section)
//! cannot reset it, so another list would make `/app` name another directory (measured in
//! `guests/runtimes`' research, see README "Functions from source").

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::function::{FunctionConfig, Runtime};

/// The entry file's name when a single-file upload has none, and in an archive without `handler`.
fn default_entry(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Ruby => "main.rb",
        Runtime::Python => "main.py",
        Runtime::Javascript => "main.js",
    }
}

/// Files an archive may hold, and their bytes once unpacked: a zip's deflate can expand 1000x.
const MAX_FILES: usize = 10_000;
const MAX_UNPACKED_BYTES: u64 = 256 << 20;

/// Where the runtime modules are (`kiln serve --runtimes-dir`): `{ruby,python,javascript}.wasm`,
/// and Python's standard library in `python-lib/python3.11`.
#[derive(Debug, Clone, Default)]
pub struct Runtimes {
    pub dir: Option<PathBuf>,
    /// Each runtime module's SHA-256, by path, with the size and time it was read at.
    digests: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, Hashed>>>,
}

/// A file's size and modification time when it was hashed, and its SHA-256.
type Hashed = (u64, std::time::SystemTime, String);

/// A runtime ready to pre-initialise: its module and the read-only directories its init sees.
pub struct Prepared {
    pub module: Vec<u8>,
    /// `(host directory, guest path)`.
    pub preopens: Vec<(PathBuf, &'static str)>,
    /// `KILN_HANDLER`, the entry file as the guest sees it.
    pub handler: String,
    /// The unpacked upload; removed when dropped.
    _app: tempfile::TempDir,
}

impl Runtimes {
    fn path(&self, runtime: Runtime) -> Result<PathBuf, String> {
        let dir = self.dir.as_ref().ok_or_else(|| {
            "functions from source are not available: this server has no runtimes directory \
             (kiln serve --runtimes-dir, built by guests/runtimes/build.sh install)"
                .to_owned()
        })?;
        let path = dir.join(format!("{}.wasm", runtime.as_str()));
        if !path.is_file() {
            return Err(format!(
                "the {} runtime is not installed on this server ({} is missing; \
                 guests/runtimes/build.sh install builds it)",
                runtime.as_str(),
                path.display()
            ));
        }
        Ok(path)
    }

    /// A runtime on the given directory.
    pub fn new(dir: Option<PathBuf>) -> Runtimes {
        Runtimes {
            dir,
            ..Runtimes::default()
        }
    }

    /// Whether `runtime` can be deployed here; the error says why not.
    pub fn check(&self, runtime: Runtime) -> Result<(), String> {
        self.path(runtime).map(drop)
    }

    /// The SHA-256 of `runtime`'s module (hashed again only when its file changed); the error
    /// says why it cannot be deployed here.
    pub fn digest(&self, runtime: Runtime) -> Result<String, String> {
        let path = self.path(runtime)?;
        let unreadable = |e: std::io::Error| format!("{}: {e}", path.display());
        let meta = std::fs::metadata(&path).map_err(unreadable)?;
        let stamp = (meta.len(), meta.modified().map_err(unreadable)?);
        let mut digests = self.digests.lock().expect("digest cache poisoned");
        if let Some((len, modified, digest)) = digests.get(&path) {
            if (*len, *modified) == stamp {
                return Ok(digest.clone());
            }
        }
        let bytes = std::fs::read(&path).map_err(unreadable)?;
        let digest = crate::digest::Digest::of(&bytes).prefixed();
        digests.insert(path, (stamp.0, stamp.1, digest.clone()));
        Ok(digest)
    }

    /// Unpacks `upload` into a private directory and reads the runtime's module. Blocking.
    pub fn prepare(&self, name: &str, upload: &[u8], config: &FunctionConfig) -> Result<Prepared, PrepareError> {
        let runtime = config.runtime.expect("a function from source has a runtime");
        let path = self.path(runtime).map_err(PrepareError::Unavailable)?;
        let app = tempfile::Builder::new()
            .prefix("kiln-source-")
            .tempdir()
            .map_err(|e| PrepareError::Unavailable(format!("a staging directory: {e}")))?;
        let mut entry = unpack(upload, config, app.path()).map_err(PrepareError::Invalid)?;
        if let Some(lambda) = &config.lambda {
            let defaults = crate::lambda::Defaults {
                function_name: name,
                memory_mb: config.memory_mb,
                timeout_ms: config.timeout_ms,
                env: &config.env,
            };
            entry = crate::lambda::write_entry(app.path(), lambda, &defaults).map_err(PrepareError::Invalid)?;
        }
        let module = std::fs::read(&path).map_err(|e| PrepareError::Unavailable(format!("{}: {e}", path.display())))?;
        let mut preopens = vec![(app.path().to_owned(), "/app")];
        if runtime == Runtime::Python {
            let lib = path.with_file_name("python-lib").join("python3.11");
            preopens.push((lib, "/usr/local/lib/python3.11"));
        }
        Ok(Prepared {
            module,
            preopens,
            handler: format!("/app/{entry}"),
            _app: app,
        })
    }
}

#[derive(Debug)]
pub enum PrepareError {
    /// The upload is not valid source (`invalid_code`).
    Invalid(String),
    /// This server cannot build it (`tier_unavailable`).
    Unavailable(String),
}

/// A relative path inside the upload: no `..`, no root, not empty, at most 1024 bytes.
pub fn check_path(path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && path.len() <= 1024
        && !path.contains('\0')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(())
    } else {
        Err(format!("{path:?} is not a relative path inside the upload"))
    }
}

/// What an upload is.
enum Shape<'a> {
    Zip,
    Tar(Box<dyn Read + 'a>),
    File,
}

fn shape(upload: &[u8]) -> Shape<'_> {
    if upload.starts_with(b"PK\x03\x04") || upload.starts_with(b"PK\x05\x06") {
        Shape::Zip
    } else if upload.starts_with(&[0x1f, 0x8b]) {
        Shape::Tar(Box::new(flate2::read::GzDecoder::new(upload)))
    } else if upload.len() >= 262 && &upload[257..262] == b"ustar" {
        Shape::Tar(Box::new(upload))
    } else {
        Shape::File
    }
}

/// Writes the upload's files under `dir` and returns the entry file's path relative to it.
fn unpack(upload: &[u8], config: &FunctionConfig, dir: &Path) -> Result<String, String> {
    let runtime = config.runtime.expect("a function from source has a runtime");
    let entry = config.handler.clone();
    let mut budget = Budget::default();
    match shape(upload) {
        Shape::File => {
            let entry = match &config.lambda {
                Some(lambda) => crate::lambda::single_file(lambda)?,
                None => entry.unwrap_or_else(|| default_entry(runtime).to_owned()),
            };
            if std::str::from_utf8(upload).is_err() {
                return Err(format!(
                    "the {} source is not UTF-8 text (a zip or tar archive is recognised by its header)",
                    runtime.as_str()
                ));
            }
            budget.write(dir, &entry, &mut &upload[..])?;
            Ok(entry)
        }
        Shape::Zip => {
            let mut archive = zip::ZipArchive::new(std::io::Cursor::new(upload))
                .map_err(|e| format!("the zip archive cannot be read: {e}"))?;
            for i in 0..archive.len() {
                let mut file = archive.by_index(i).map_err(|e| format!("the zip archive: {e}"))?;
                if !file.is_file() {
                    continue;
                }
                let name = file.name().to_owned();
                budget.write(dir, &name, &mut file)?;
            }
            found_entry(dir, config, entry)
        }
        Shape::Tar(reader) => {
            let mut archive = tar::Archive::new(reader);
            let entries = archive.entries().map_err(|e| format!("the tar archive: {e}"))?;
            for file in entries {
                let mut file = file.map_err(|e| format!("the tar archive: {e}"))?;
                // Regular files only: links could point outside the directory.
                if !file.header().entry_type().is_file() {
                    continue;
                }
                let name = file.path().map_err(|e| format!("the tar archive: {e}"))?;
                let name = name.to_string_lossy().into_owned();
                budget.write(dir, &name, &mut file)?;
            }
            found_entry(dir, config, entry)
        }
    }
}

/// The entry file of an unpacked archive. A Lambda handler's entry is written afterwards.
fn found_entry(dir: &Path, config: &FunctionConfig, entry: Option<String>) -> Result<String, String> {
    let runtime = config.runtime.expect("a function from source has a runtime");
    if config.lambda.is_some() {
        return Ok(String::new());
    }
    let named = entry.is_some();
    let entry = entry.unwrap_or_else(|| default_entry(runtime).to_owned());
    let entry = entry.trim_start_matches("./").to_owned();
    if dir.join(&entry).is_file() {
        return Ok(entry);
    }
    Err(if named {
        format!("the archive has no file {entry:?} (the config's handler)")
    } else {
        format!("the archive has no {entry}: name the entry file with the config's \"handler\"")
    })
}

/// Counts what an unpack writes.
#[derive(Default)]
struct Budget {
    files: usize,
    bytes: u64,
}

impl Budget {
    fn write(&mut self, dir: &Path, name: &str, data: &mut dyn Read) -> Result<(), String> {
        let name = name.trim_start_matches("./");
        check_path(name)?;
        self.files += 1;
        if self.files > MAX_FILES {
            return Err(format!("the upload has more than {MAX_FILES} files"));
        }
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("unpacking {name}: {e}"))?;
        }
        let mut out = std::fs::File::create(&path).map_err(|e| format!("unpacking {name}: {e}"))?;
        let left = MAX_UNPACKED_BYTES - self.bytes;
        let copied = std::io::copy(&mut data.take(left + 1), &mut out).map_err(|e| format!("unpacking {name}: {e}"))?;
        if copied > left {
            return Err(format!(
                "the upload unpacks to more than {} MiB",
                MAX_UNPACKED_BYTES >> 20
            ));
        }
        self.bytes += copied;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(runtime: Runtime, handler: Option<&str>) -> FunctionConfig {
        FunctionConfig {
            runtime: Some(runtime),
            handler: handler.map(str::to_owned),
            ..FunctionConfig::default()
        }
    }

    #[test]
    fn a_single_file_is_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let entry = unpack(b"def handler(e) = e\n", &config(Runtime::Ruby, None), dir.path()).unwrap();
        assert_eq!(entry, "main.rb");
        let dir = tempfile::tempdir().unwrap();
        let entry = unpack(b"x = 1\n", &config(Runtime::Python, Some("app.py")), dir.path()).unwrap();
        assert_eq!(entry, "app.py");
        assert_eq!(std::fs::read(dir.path().join("app.py")).unwrap(), b"x = 1\n");
    }

    #[test]
    fn archives_unpack_and_name_their_entry() {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data) in [
            ("src/handler.js", &b"export default e => e"[..]),
            ("node_modules/x/index.js", b""),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, path, data).unwrap();
        }
        let tar = tar.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let js = config(Runtime::Javascript, Some("src/handler.js"));
        assert_eq!(unpack(&tar, &js, dir.path()).unwrap(), "src/handler.js");
        assert!(dir.path().join("node_modules/x/index.js").is_file());
        let dir = tempfile::tempdir().unwrap();
        let err = unpack(&tar, &config(Runtime::Javascript, None), dir.path()).unwrap_err();
        assert!(err.contains("name the entry file"), "{err}");

        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        zip.start_file("main.py", zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, b"def handler(e): return e\n").unwrap();
        let zip = zip.finish().unwrap().into_inner();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            unpack(&zip, &config(Runtime::Python, None), dir.path()).unwrap(),
            "main.py"
        );
    }

    #[test]
    fn paths_stay_inside() {
        for bad in ["", "/etc/passwd", "../x.rb", "a/../../x.rb", "a\0b"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        for good in ["main.rb", "./main.rb", "lib/x/y.rb"] {
            assert!(check_path(good).is_ok(), "{good:?}");
        }
    }
}
