//! What a microVM sandbox's lifecycle costs through Kiln's API, on whatever host runs microVMs:
//! create-to-first-response (create, then the first request through ingress), suspend, resume,
//! resume-to-first-response (a request to a suspended sandbox: the automatic resume, then the
//! answer), and a request to a running one. Deploys `kiln-webapp` (the test server of
//! `runtime/vmm/agent`) as a microVM function, then runs `--rounds` sandboxes through it.
//!
//! Usage: `microvm-sandbox --webapp PATH [--rounds 5]` and either `--url URL --token T` (a server
//! already running) or `--kiln BIN --kernel VMLINUZ --agent AGENT` (starts `kiln serve` on a fresh
//! data directory, on loopback). `benches/microvm-sandbox.sh` builds everything and runs it
//! (nested in QEMU where the host has no hardware virtualization). Prints a Markdown table naming
//! the host.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, required_unless_present = "kiln")]
    url: Option<String>,
    #[arg(long, env = "KILN_TOKEN", required_unless_present = "kiln")]
    token: Option<String>,
    /// Start this `kiln` binary instead of using `--url`.
    #[arg(long, requires_all = ["kernel", "agent"])]
    kiln: Option<PathBuf>,
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    agent: Option<PathBuf>,
    #[arg(long)]
    webapp: PathBuf,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Guest memory of the function, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mb: u32,
}

fn main() {
    let args = Args::parse();
    let data = tempfile::tempdir().expect("a data directory");
    let (api, _server) = match &args.kiln {
        Some(kiln) => {
            let (api, server) = serve(kiln, &args, data.path());
            (api, Some(Server(server)))
        }
        None => {
            let url = args.url.clone().expect("--url");
            let addr = url.trim_start_matches("http://").trim_end_matches('/').to_owned();
            (
                Api {
                    addr,
                    token: args.token.clone().expect("--token"),
                },
                None,
            )
        }
    };
    let code = std::fs::read(&args.webapp).expect("the webapp executable");
    let config = format!(
        r#"{{"tier": "microvm", "memory_mb": {}, "timeout_ms": 120000}}"#,
        args.memory_mb
    );
    let started = Instant::now();
    let (status, body) = api.deploy("bench-web", &code, &config);
    assert_eq!(status, 201, "deploy: {body}");
    eprintln!("deployed (boot + snapshot) in {:?}", started.elapsed());

    let mut rows: Vec<(&str, Vec<Duration>)> = [
        "create, then the first response",
        "a request to the running sandbox",
        "suspend (through the API)",
        "resume (through the API)",
        "a request to a suspended sandbox: resume, then the response",
    ]
    .into_iter()
    .map(|name| (name, Vec::new()))
    .collect();
    for round in 0..args.rounds {
        let t = Instant::now();
        let (status, body) = api.call("POST", "/v1/sandboxes", br#"{"function": "bench-web"}"#);
        assert_eq!(status, 201, "create: {body}");
        let id = field(&body, "id");
        api.count(&id, 1);
        rows[0].1.push(t.elapsed());
        let t = Instant::now();
        api.count(&id, 2);
        rows[1].1.push(t.elapsed());
        let t = Instant::now();
        let (status, body) = api.call("POST", &format!("/v1/sandboxes/{id}/suspend"), b"");
        assert_eq!(status, 200, "suspend: {body}");
        rows[2].1.push(t.elapsed());
        let t = Instant::now();
        let (status, body) = api.call("POST", &format!("/v1/sandboxes/{id}/resume"), b"");
        assert_eq!(status, 200, "resume: {body}");
        rows[3].1.push(t.elapsed());
        api.count(&id, 3);
        let (status, body) = api.call("POST", &format!("/v1/sandboxes/{id}/suspend"), b"");
        assert_eq!(status, 200, "suspend: {body}");
        let t = Instant::now();
        api.count(&id, 4);
        rows[4].1.push(t.elapsed());
        let (status, body) = api.call("DELETE", &format!("/v1/sandboxes/{id}"), b"");
        assert_eq!(status, 200, "terminate: {body}");
        eprintln!("round {} of {} done", round + 1, args.rounds);
    }
    println!("host: {}", host());
    println!(
        "guest: kiln-webapp, {} MiB of guest memory; {} rounds\n",
        args.memory_mb, args.rounds
    );
    println!("| step | p50 | min | max |");
    println!("| --- | --- | --- | --- |");
    for (name, mut times) in rows {
        times.sort();
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
        println!(
            "| {name} | {} | {} | {} |",
            ms(times[times.len() / 2]),
            ms(times[0]),
            ms(times[times.len() - 1])
        );
    }
}

/// Starts `kiln serve` on `data`, waits until it listens; its API and process.
fn serve(kiln: &PathBuf, args: &Args, data: &std::path::Path) -> (Api, Child) {
    let mut child = Command::new(kiln)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .arg("--microvm-kernel")
        .arg(args.kernel.as_ref().expect("--kernel"))
        .arg("--microvm-agent")
        .arg(args.agent.as_ref().expect("--agent"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln");
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("kiln exited before it listened")
            .expect("kiln's log");
        if let Some(rest) = line.split("kiln listening on http://").nth(1) {
            break rest.split_whitespace().next().expect("an address").to_owned();
        }
    };
    // The rest of the log goes on to our stderr, so a failure shows why.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| eprintln!("kiln: {line}")));
    let token = std::fs::read_to_string(data.join("admin.token")).expect("the admin token");
    (
        Api {
            addr,
            token: token.trim().to_owned(),
        },
        child,
    )
}

/// The server this bench started: killed at the end.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The CPU, and how this host runs KVM (hardware, or nested in an emulated VM).
fn host() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .unwrap_or("unknown CPU")
        .trim()
        .to_owned();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let under = if flags.split_whitespace().any(|f| f == "hypervisor") {
        "in a VM (nested KVM)"
    } else {
        "on hardware KVM"
    };
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    format!("{model}, {cores} CPU(s), {under}")
}

/// The value of a top-level string field of a JSON object (enough for an id).
fn field(json: &str, name: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(json).expect("JSON");
    value[name].as_str().expect("a string field").to_owned()
}

struct Api {
    addr: String,
    token: String,
}

impl Api {
    /// GET `/sbx/{id}/count`, which must answer `expected`.
    fn count(&self, id: &str, expected: u32) {
        let (status, body) = self.call("GET", &format!("/sbx/{id}/count"), b"");
        assert_eq!(
            (status, body.as_str()),
            (200, expected.to_string().as_str()),
            "sandbox {id}"
        );
    }

    fn deploy(&self, name: &str, code: &[u8], config: &str) -> (u16, String) {
        let boundary = "kiln-bench-boundary";
        let mut body = Vec::new();
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"code\"; filename=\"webapp\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .unwrap();
        body.extend_from_slice(code);
        write!(
            body,
            "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n{config}\r\n--{boundary}--\r\n"
        )
        .unwrap();
        self.send(
            "PUT",
            &format!("/v1/functions/{name}"),
            &format!("multipart/form-data; boundary={boundary}"),
            &body,
        )
    }

    fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        self.send(method, path, "application/json", body)
    }

    /// One request on a fresh connection (`Connection: close`): its status and body.
    fn send(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        let mut stream = TcpStream::connect(&self.addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(900))).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            self.token,
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").expect("a response head");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(rest)
        } else {
            rest.to_owned()
        };
        (status, body)
    }
}

/// The body of a chunked response.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&tail[..size]);
        rest = &tail[size + 2..];
    }
    out
}
