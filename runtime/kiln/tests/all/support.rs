//! Test support: the real `kiln` binary on a loopback port with its own data directory, a blocking
//! HTTP client, and the guests under `guests/`.
//!
//! `KILN_TEST_DATABASE=postgres` runs every server on PostgreSQL instead of its SQLite file: one
//! database per data directory (a restart finds its own again) on a throwaway server the test
//! process starts ([`kiln_testkit::postgres`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::blocking::{multipart, Client, Response};

pub struct Kiln {
    child: Child,
    /// `http`, or `https` for a server started with a certificate.
    pub scheme: &'static str,
    pub addr: String,
    pub token: String,
    pub data: PathBuf,
    log: Arc<Mutex<String>>,
    _dir: Option<tempfile::TempDir>,
}

impl Kiln {
    /// A server on a fresh data directory.
    pub fn start() -> Kiln {
        Kiln::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Kiln {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut kiln = Kiln::start_in(dir.path(), args);
        kiln._dir = Some(dir);
        kiln
    }

    /// A server on an existing data directory (restart tests).
    pub fn start_in(data: &Path, args: &[&str]) -> Kiln {
        Kiln::start_in_with_env(data, args, &[])
    }

    /// A server on an existing data directory with extra environment variables.
    pub fn start_in_with_env(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Kiln {
        // A small pool keeps many test servers light; a test may ask for another size.
        let pool: &[&str] = if args.contains(&"--max-instances") {
            &[]
        } else {
            &["--max-instances", "64"]
        };
        let database: Vec<String> = match test_database(data, args) {
            Some(url) => vec!["--database".into(), url],
            None => Vec::new(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(pool)
            .args(&database)
            .args(args)
            .env_remove("KILN_ADMIN_TOKEN")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kiln");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            // Byte lines, read lossily: a line that is not UTF-8 (a guest's output in a log line)
            // must not end the capture.
            let lines = BufReader::new(stderr)
                .split(b'\n')
                .map_while(Result::ok)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
            for line in lines {
                for scheme in ["http", "https"] {
                    if let Some(rest) = line.split(&format!("kiln listening on {scheme}://")).nth(1) {
                        // The address ends at the first character an address cannot have (a
                        // space in text logs, a quote in JSON logs).
                        let addr: String = rest
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
                            .collect();
                        let _ = addr_tx.send((scheme, addr));
                    }
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let (scheme, addr) = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(found) => found,
            Err(_) => {
                let _ = child.kill();
                panic!("kiln did not start; its log:\n{}", log.lock().unwrap());
            }
        };
        let token = std::fs::read_to_string(data.join("admin.token"))
            .expect("admin token file")
            .trim()
            .to_owned();
        Kiln {
            child,
            scheme,
            addr,
            token,
            data: data.to_path_buf(),
            log,
            _dir: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the server's log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn get(&self, path: &str) -> Response {
        client()
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .expect("GET")
    }

    pub fn delete(&self, path: &str) -> Response {
        client()
            .delete(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .expect("DELETE")
    }

    /// Deploys raw code with the default config.
    pub fn deploy(&self, name: &str, code: impl Into<Vec<u8>>) -> Response {
        client()
            .put(self.url(&format!("/v1/functions/{name}")))
            .bearer_auth(&self.token)
            .header("content-type", "application/wasm")
            .body(code.into())
            .send()
            .expect("deploy")
    }

    /// Deploys code with a config, as multipart.
    pub fn deploy_with(&self, name: &str, code: impl Into<Vec<u8>>, config: serde_json::Value) -> Response {
        let form = multipart::Form::new()
            .part("code", multipart::Part::bytes(code.into()))
            .part("config", multipart::Part::text(config.to_string()));
        client()
            .put(self.url(&format!("/v1/functions/{name}")))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .expect("deploy")
    }

    /// Deploys and asserts it worked.
    pub fn must_deploy(&self, name: &str, code: impl Into<Vec<u8>>) -> serde_json::Value {
        let response = self.deploy(name, code);
        let status = response.status();
        let body = response.text().unwrap();
        assert!(status.is_success(), "deploy of {name} failed: {status} {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn invoke(&self, name: &str, input: impl Into<Vec<u8>>) -> Response {
        self.invoke_path(&format!("/v1/functions/{name}/invoke"), input)
    }

    pub fn invoke_path(&self, path: &str, input: impl Into<Vec<u8>>) -> Response {
        client()
            .post(self.url(path))
            .bearer_auth(&self.token)
            .body(input.into())
            .send()
            .expect("invoke")
    }

    pub fn metric(&self, name: &str) -> u64 {
        let text = client().get(self.url("/metrics")).send().unwrap().text().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(40))
    }

    /// SIGTERM, then waits up to `limit` for the process to exit (a stop that suspends VMs in
    /// a nested run takes minutes).
    pub fn terminate_within(&mut self, limit: Duration) -> ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        wait_timeout(&mut self.child, limit).expect("kiln did not exit after SIGTERM")
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what the server said (a helper's death, a refused syscall).
        if std::thread::panicking() {
            let log = self.log();
            let start = log.len().saturating_sub(8000);
            let start = (start..log.len())
                .find(|&i| log.is_char_boundary(i))
                .unwrap_or(log.len());
            eprintln!("--- the last of kiln's log ({}):\n{}", self.addr, &log[start..]);
        }
    }
}

thread_local! {
    static ON_POSTGRES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `tests` with every server this thread starts on PostgreSQL, as `KILN_TEST_DATABASE=postgres`
/// does for the whole process.
pub fn on_postgres(tests: impl FnOnce()) {
    ON_POSTGRES.set(true);
    tests();
    ON_POSTGRES.set(false);
}

/// With `KILN_TEST_DATABASE=postgres` (or inside [`on_postgres`]), the PostgreSQL database of the server on `data`, unless
/// the test names a database itself.
fn test_database(data: &Path, args: &[&str]) -> Option<String> {
    let asked = std::env::var("KILN_TEST_DATABASE").as_deref() == Ok("postgres") || ON_POSTGRES.get();
    if !asked || args.contains(&"--database") {
        return None;
    }
    static DATABASES: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());
    let mut databases = DATABASES.lock().unwrap();
    if let Some((_, url)) = databases.iter().find(|(dir, _)| dir == data) {
        return Some(url.clone());
    }
    // Asked for explicitly: a missing PostgreSQL fails the run rather than testing SQLite.
    let server = kiln_testkit::postgres::Postgres::shared()
        .unwrap_or_else(|reason| panic!("KILN_TEST_DATABASE=postgres, but: {reason}"));
    let url = server.create_database().expect("creating a test database");
    databases.push((data.to_path_buf(), url.clone()));
    Some(url)
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid, sig) };
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub fn client() -> Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| Client::builder().timeout(Duration::from_secs(120)).build().unwrap())
        .clone()
}

/// Asserts an error answer: status, JSON body shape, code; returns the error object.
pub fn expect_error(response: Response, status: u16, code: &str) -> serde_json::Value {
    let got = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.text().unwrap();
    assert_eq!(got, status, "expected {status} {code}, got {got}: {body}");
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    let error = json["error"].clone();
    assert_eq!(error["code"], code, "{body}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    error
}

pub fn guests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests")
}

/// The WAT source of `guests/wat/<name>.wat` (Kiln accepts WAT text as well as binary).
pub fn wat(name: &str) -> Vec<u8> {
    std::fs::read(guests_dir().join(format!("wat/{name}.wat"))).expect("guest WAT")
}

/// A `guests/` Rust crate built as a `wasm32-wasip2` component (once per test process).
pub fn component(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = guests_dir();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&dir)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"])
            .arg(dir.join("target"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .status()
            .expect("running cargo for the guests");
        assert!(
            status.success(),
            "building the guests failed (is the wasm32-wasip2 target installed? run runtime/scripts/setup.sh)"
        );
    });
    std::fs::read(dir.join(format!("target/wasm32-wasip2/release/{name}.wasm"))).expect("built guest")
}

/// The WAT source of `guests/hostile/<name>.wat`.
pub fn hostile(name: &str) -> Vec<u8> {
    std::fs::read(guests_dir().join(format!("hostile/{name}.wat"))).expect("hostile guest WAT")
}

/// Writes `request` on a fresh connection (ignoring a write cut short by the server's answer) and
/// reads the status and body of the answer.
pub fn raw_exchange(addr: &str, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            if length.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Polls an asynchronous invocation until it reaches a terminal state, and returns its record.
pub fn wait_done(kiln: &Kiln, id: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let record: serde_json::Value = kiln.get(&format!("/v1/invocations/{id}")).json().unwrap();
        if record["state"] == "succeeded" || record["state"] == "failed" {
            return record;
        }
        assert!(Instant::now() < deadline, "invocation {id} still {}", record["state"]);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `condition` holds, checking every 10 ms; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One entry of a test image archive.
pub enum TarEntry<'a> {
    Dir(&'a str),
    /// Path, mode, content.
    File(&'a str, u32, &'a [u8]),
    /// Path, target.
    Symlink(&'a str, &'a str),
    /// A character device (path): images may not bring them.
    CharDevice(&'a str),
}

/// A tar archive of `entries`, every timestamp 0 and owner root. Paths are written as given,
/// byte for byte, even the ones a careful archiver would refuse (`../x`).
pub fn tar_of(entries: &[TarEntry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        let (path, kind, mode, data, link): (&str, _, u32, &[u8], Option<&str>) = match entry {
            TarEntry::Dir(p) => (p, tar::EntryType::Directory, 0o755, b"", None),
            TarEntry::File(p, mode, data) => (p, tar::EntryType::Regular, *mode, data, None),
            TarEntry::Symlink(p, to) => (p, tar::EntryType::Symlink, 0o777, b"", Some(to)),
            TarEntry::CharDevice(p) => (p, tar::EntryType::Char, 0o666, b"", None),
        };
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        assert!(path.len() <= 100, "test paths fit the ustar name field");
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// The applets `busybox_rootfs` links to `/bin/busybox`.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "cat", "echo", "stty", "tty", "httpd", "ls", "head", "sleep", "env", "touch", "dd",
];

/// A root filesystem tar: the host's static `/bin/busybox` (Debian's `busybox-static`, installed
/// by `runtime/scripts/setup.sh`) with `/bin/<applet>` symlinks to it, `/etc`, `/www`, `/root`, an
/// `/etc/passwd` with root, and `extra` files (path without a leading slash, mode, content).
pub fn busybox_rootfs(extra: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let busybox =
        std::fs::read("/bin/busybox").expect("/bin/busybox (Debian's busybox-static: run runtime/scripts/setup.sh)");
    let mut entries = vec![
        TarEntry::Dir("bin"),
        TarEntry::File("bin/busybox", 0o755, &busybox),
        TarEntry::Dir("etc"),
        TarEntry::File("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
        TarEntry::Dir("www"),
        TarEntry::Dir("root"),
    ];
    let links: Vec<String> = BUSYBOX_APPLETS.iter().map(|applet| format!("bin/{applet}")).collect();
    entries.extend(links.iter().map(|link| TarEntry::Symlink(link, "busybox")));
    entries.extend(extra.iter().map(|(path, mode, data)| TarEntry::File(path, *mode, data)));
    tar_of(&entries)
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// An image config for `layers` (uncompressed tars): linux/amd64, their diff_ids, and `config`
/// (the run settings: `Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`).
fn image_config(layers: &[Vec<u8>], config: serde_json::Value) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| format!("sha256:{}", sha256_hex(l))).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": config,
    }))
    .unwrap()
}

/// The files of an OCI image layout of `layers` with the run settings `config` (see
/// `image_config`): `oci-layout`, `index.json`, then each blob as `blobs/sha256/<hex>` — config,
/// manifest, layers, in that order — for a test to alter before `tar_of_files`.
pub fn oci_layout_files(layers: &[Vec<u8>], config: serde_json::Value) -> Vec<(String, Vec<u8>)> {
    let config = image_config(layers, config);
    let descriptor = |media: &str, data: &[u8]| serde_json::json!({"mediaType": media, "digest": format!("sha256:{}", sha256_hex(data)), "size": data.len()});
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers
            .iter()
            .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar", l))
            .collect::<Vec<_>>(),
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [descriptor("application/vnd.oci.image.manifest.v1+json", &manifest)],
    }))
    .unwrap();
    let mut files = vec![
        ("oci-layout".to_owned(), br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec()),
        ("index.json".to_owned(), index),
        ("blobs/sha256/".to_owned() + &sha256_hex(&config), config),
        ("blobs/sha256/".to_owned() + &sha256_hex(&manifest), manifest),
    ];
    files.extend(
        layers
            .iter()
            .map(|l| (format!("blobs/sha256/{}", sha256_hex(l)), l.clone())),
    );
    files
}

/// A tar of (path, content) files.
pub fn tar_of_files(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let entries: Vec<TarEntry> = files.iter().map(|(p, d)| TarEntry::File(p, 0o644, d)).collect();
    tar_of(&entries)
}

/// A tarred OCI image layout of `layers` with the run settings `config` (see `oci_layout_files`).
pub fn oci_layout(layers: &[Vec<u8>], config: serde_json::Value) -> Vec<u8> {
    tar_of_files(&oci_layout_files(layers, config))
}

/// A `docker save` archive (the format before Docker 25): `manifest.json`, `<hex>.json` (the
/// config), `<n>/layer.tar`.
pub fn docker_save(layers: &[Vec<u8>], config: serde_json::Value) -> Vec<u8> {
    let config = image_config(layers, config);
    let config_name = format!("{}.json", sha256_hex(&config));
    let layer_names: Vec<String> = (0..layers.len()).map(|i| format!("{i}/layer.tar")).collect();
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": config_name, "RepoTags": ["test:latest"], "Layers": layer_names}
    ]))
    .unwrap();
    let mut files = vec![("manifest.json".to_owned(), manifest), (config_name, config)];
    files.extend(layer_names.into_iter().zip(layers.iter().cloned()));
    tar_of_files(&files)
}

/// `data` gzip-compressed.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A one-shot HTTP server on loopback answering every request with `body`.
pub fn upstream(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    port
}
