//! The benchmark harness in seconds, for CI (`cargo test --workspace` builds these binaries in the
//! test profile anyway, so this adds no build): the report writer on fixture data, each server
//! binary under a second of load, and the `scenarios` and `instantiate` binaries against a real
//! Kiln served in process on loopback. It checks that the harness works, never how fast.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use kiln_bench::load::{Conn, Load};
use kiln_bench::record::read_jsonl;

/// A child process killed when dropped, so a failing test leaves no server behind.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a bench server on port 0 and reads the address it prints ("... listening on http://A").
fn start(program: &str, args: &[&str]) -> (Server, SocketAddr) {
    let mut child = Command::new(program)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{program} printed {line:?}"));
    (Server(child), addr)
}

fn load(addr: SocketAddr, token: Option<&str>, paths: Vec<String>, millis: u64) -> Load {
    Load {
        addr,
        token: token.map(Into::into),
        paths: Arc::new(paths),
        body: Bytes::from_static(b"{}"),
        connections: 2,
        duration: Duration::from_millis(millis),
        max_requests: usize::MAX,
    }
}

#[test]
fn report_writes_json_markdown_and_svg_from_records() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture.jsonl");
    let output = Command::new(env!("CARGO_BIN_EXE_report"))
        .args([
            "--raw",
            fixture.to_str().unwrap(),
            "--out-dir",
            dir.path().to_str().unwrap(),
        ])
        .args(["--stamp", "20261126T000000Z", "--started-unix", "0"])
        .args([
            "--meta",
            "mode=full",
            "--meta",
            "git_commit=abc123",
            "--meta",
            "load_at_start=0.00 0.01 0.05",
        ])
        .args(["--meta", "wrk=-t1 -c32"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("20261126T000000Z.json")).unwrap()).unwrap();
    assert_eq!(json["git_commit"], "abc123");
    assert_eq!(json["settings"]["wrk"], "-t1 -c32");
    assert_eq!(json["results"].as_array().unwrap().len(), 18);
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    let ratio = |prefix: &str| {
        json["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no ratio {prefix}"))
            .clone()
    };
    let trigger = ratio("Kiln HTTP trigger / wasmtime serve, req/s");
    assert!((trigger["value"].as_f64().unwrap() - 6187.0 / 4088.0).abs() < 1e-9);
    assert_eq!(trigger["met"], false);
    assert_eq!(ratio("Resident memory per idle")["value"], 10.24);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("latest.json")).unwrap(),
        std::fs::read_to_string(dir.path().join("20261126T000000Z.json")).unwrap()
    );

    let md = std::fs::read_to_string(dir.path().join("latest.md")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout)
            .split("\nwrote ")
            .next()
            .unwrap()
            .trim(),
        md.trim()
    );
    assert!(
        !md.contains("Not a result"),
        "an idle full run carries no caveat:\n{md}"
    );
    assert!(
        md.contains("| bare hyper (fixed body) | 52,314 | 0.570 | 1.56 | 3.10 | 0 |"),
        "{md}"
    );
    assert!(
        md.contains("| Kiln HTTP trigger / wasmtime serve, req/s at c=32 | 1.51× | ≥ 2× | **not met** |"),
        "{md}"
    );
    assert!(
        md.contains("| First invoke after deploy minus warm invoke, p50 | 1.10 ms | ≤ 1 ms | **not met** |"),
        "{md}"
    );
    // The systems appear in a fixed order, whatever the order of the records.
    let at = |s: &str| md.find(s).unwrap_or_else(|| panic!("{s} missing"));
    assert!(at("| fork/exec per request") < at("| wasmtime run per request"));

    let svg = std::fs::read_to_string(dir.path().join("latest.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    for label in ["bare-hyper", "wasmtime-run", "p99.9", "52.3k"] {
        assert!(svg.contains(label), "the plot lacks {label}");
    }
    assert!(
        svg.matches("<rect").count() >= 6 + 2 * 3,
        "a bar per system and percentile"
    );
}

#[test]
fn a_quick_or_busy_run_says_it_is_not_a_result() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.jsonl");
    std::fs::write(&raw, "").unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_report"))
        .args([
            "--raw",
            raw.to_str().unwrap(),
            "--out-dir",
            dir.path().to_str().unwrap(),
        ])
        .args([
            "--stamp",
            "x",
            "--started-unix",
            "0",
            "--meta",
            "mode=quick",
            "--meta",
            "load_at_start=9 9 9",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let md = std::fs::read_to_string(dir.path().join("latest.md")).unwrap();
    assert!(
        md.contains("**Not a result to quote:** a `quick` run (short durations), load average 9 9 9"),
        "{md}"
    );
    let svg = std::fs::read_to_string(dir.path().join("latest.svg")).unwrap();
    assert!(svg.contains("no data in this run"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_hyper_and_fork_exec_serve_under_load() {
    let (_hyper, hyper_addr) = start(env!("CARGO_BIN_EXE_bare-hyper"), &["127.0.0.1:0"]);
    let result = load(hyper_addr, None, vec!["/".into()], 300).run().await.unwrap();
    assert!(result.samples.len() > 10 && result.failures == 0);

    let (_cat, cat_addr) = start(env!("CARGO_BIN_EXE_fork-exec"), &["127.0.0.1:0", "cat"]);
    let mut conn = Conn::open(cat_addr, None).await.unwrap();
    let echoed = conn
        .expect_ok(Method::POST, "/", Bytes::from_static(b"through a process"))
        .await
        .unwrap();
    assert_eq!(&echoed[..], b"through a process");
    let result = load(cat_addr, None, vec!["/".into()], 300).run().await.unwrap();
    assert!(!result.samples.is_empty() && result.failures == 0);

    let (_failing, failing_addr) = start(env!("CARGO_BIN_EXE_fork-exec"), &["127.0.0.1:0", "false"]);
    let mut conn = Conn::open(failing_addr, None).await.unwrap();
    let (status, _) = conn.send(Method::POST, "/", Bytes::new()).await.unwrap();
    assert_eq!(status, 500, "a failing child is an error, not an empty success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_and_instantiate_run_against_a_real_kiln() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = kiln_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
    config.core.admin_token = Some("smoke-token".into());
    let core = config.core.clone();
    let connector = std::sync::Arc::new(kiln_server::outbound::HyperConnector);
    let kiln = tokio::task::spawn_blocking(move || kiln_core::Kiln::open(core, connector))
        .await
        .unwrap()
        .unwrap();
    let app = std::sync::Arc::new(kiln_server::Server::new(kiln, config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kiln_server::listener::run(app, listener, async {
        let _ = stopped.await;
    }));

    let raw = dir.path().join("raw.jsonl");
    let scenarios = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_scenarios"));
        command
            .args(["--addr", &addr.to_string(), "--out", raw.to_str().unwrap()])
            .env("KILN_TOKEN", "smoke-token")
            .args(args);
        command
    };
    let pid = std::process::id().to_string();
    let runs = [
        scenarios(&[
            "functions",
            "--count",
            "30",
            "--duration",
            "0.3",
            "--connections",
            "4",
            "--kiln-pid",
            &pid,
        ]),
        scenarios(&["cold", "--reps", "3", "--warm", "2"]),
        scenarios(&[
            "deploy",
            "--small-reps",
            "2",
            "--large-reps",
            "1",
            "--large-functions",
            "50",
        ]),
    ];
    for mut command in runs {
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/wat/hello.wat");
    let mut instantiate = Command::new(env!("CARGO_BIN_EXE_instantiate"));
    instantiate.args([guest.to_str().unwrap(), "100", "1", "--out", raw.to_str().unwrap()]);
    let output = tokio::task::spawn_blocking(move || instantiate.output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let _ = stop.send(());
    server.await.unwrap();

    let records = read_jsonl(&raw).unwrap();
    let get = |scenario: &str, system: &str| {
        records
            .iter()
            .find(|r| r.scenario == scenario && r.system == system)
            .unwrap_or_else(|| panic!("no {scenario}/{system} record in {records:#?}"))
    };
    for system in ["few", "all"] {
        let r = get("functions", system);
        assert!(r.get("rps").unwrap() > 0.0 && r.get("count").unwrap() > 0.0, "{r:?}");
        assert_eq!(r.get("errors"), Some(0.0), "{r:?}");
    }
    assert_eq!(get("functions", "all").get("functions"), Some(30.0));
    let memory = get("memory", "kiln");
    assert!(memory.get("rss_before_mib").unwrap() > 1.0, "{memory:?}");
    assert!(memory.get("per_function_kib").is_some(), "{memory:?}");
    assert_eq!(get("cold", "kiln-first-invoke").get("count"), Some(3.0));
    assert_eq!(get("cold", "kiln-warm-invoke").get("count"), Some(6.0));
    assert_eq!(get("deploy", "small").get("count"), Some(2.0));
    assert!(get("deploy", "large").get("bytes").unwrap() > get("deploy", "small").get("bytes").unwrap());
    for system in ["raw-wasmtime", "kiln-invoke"] {
        assert!(get("inproc", system).get("median_us").unwrap() > 0.0);
    }
}

/// `guests/http-hello` built for wasm32-wasip2 (the same command and target directory as
/// Kiln's own tests, so whichever runs first builds it for both).
fn http_hello() -> std::path::PathBuf {
    let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&guests)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "http-hello",
            "--target-dir",
        ])
        .arg(guests.join("target"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap();
    assert!(status.success(), "building guests/http-hello failed");
    guests.join("target/wasm32-wasip2/release/http-hello.wasm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_floor_runs_in_process_and_serves_under_load() {
    let component = tokio::task::spawn_blocking(http_hello).await.unwrap();
    let component = component.to_str().unwrap().to_owned();
    let mut in_process = Command::new(env!("CARGO_BIN_EXE_http-floor"));
    in_process.args([component.as_str(), "20"]);
    let output = tokio::task::spawn_blocking(move || in_process.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("µs each"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let (_floor, addr) = start(
        env!("CARGO_BIN_EXE_http-floor"),
        &[&component, "--serve", "127.0.0.1:0"],
    );
    let mut conn = Conn::open(addr, None).await.unwrap();
    let body = conn
        .expect_ok(Method::POST, "/a?b=c", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("hello from wasi:http\nmethod: POST\npath: /a?b=c\n"),
        "{body}"
    );
    let result = load(addr, None, vec!["/".into()], 300).run().await.unwrap();
    assert!(result.samples.len() > 10 && result.failures == 0);
}
