//! The `kiln` CLI as a user runs it: the built binary as a subprocess against a real server.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::support::{guests_dir, Kiln};

/// Runs `kiln ARGS` against `kiln`'s server (URL and data dir by environment, as a user would
/// set them), with `stdin` as its standard input.
fn cli(kiln: &Kiln, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_URL", kiln.url(""))
        .env("KILN_DATA", &kiln.data)
        .env_remove("KILN_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the kiln CLI");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "kiln failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn wat_path(name: &str) -> String {
    guests_dir().join(format!("wat/{name}.wat")).display().to_string()
}

#[test]
fn deploy_invoke_logs_rm_session() {
    let kiln = Kiln::start();
    let logger = wat_path("logger");

    let out = ok(&cli(
        &kiln,
        &["deploy", "logger", &logger, "--memory-mb", "64", "--env", "A=1"],
        b"",
    ));
    assert!(out.starts_with("logger@1\n"), "{out}");
    assert!(out.contains("digest   sha256:"), "{out}");
    let deployed: serde_json::Value =
        serde_json::from_str(&ok(&cli(&kiln, &["--json", "get", "logger"], b""))).unwrap();
    assert_eq!(deployed["config"]["memory_mb"], 64);
    assert_eq!(deployed["config"]["env"]["A"], "1");

    // Input from --data, from stdin, and from a file; the output is the function's, byte for byte.
    assert_eq!(
        ok(&cli(&kiln, &["invoke", "logger", "--data", r#"{"n":1}"#], b"")),
        r#"{"n":1}"#
    );
    assert_eq!(ok(&cli(&kiln, &["invoke", "logger"], b"from stdin")), "from stdin");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    std::fs::write(&input, "from a file").unwrap();
    let at_file = format!("@{}", input.display());
    assert_eq!(
        ok(&cli(&kiln, &["invoke", "logger", "-d", &at_file], b"")),
        "from a file"
    );

    // --json gives the invocation id, which `kiln logs` takes.
    let invoked: serde_json::Value =
        serde_json::from_str(&ok(&cli(&kiln, &["--json", "invoke", "logger", "-d", "[1,2]"], b""))).unwrap();
    assert_eq!(invoked["output"], serde_json::json!([1, 2]));
    assert_eq!(invoked["version"], 1);
    let id = invoked["id"].as_str().unwrap();
    assert_eq!(ok(&cli(&kiln, &["logs", id], b"")), "logger: handling a request\n");

    let listed = ok(&cli(&kiln, &["ls"], b""));
    assert!(
        listed.lines().nth(1).is_some_and(|l| l.starts_with("logger ")),
        "{listed}"
    );

    assert_eq!(ok(&cli(&kiln, &["rm", "logger"], b"")), "removed logger\n");
    let gone = cli(&kiln, &["invoke", "logger"], b"");
    assert_eq!(gone.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&gone.stderr),
        "kiln: no function named `logger`\n"
    );
    // The log outlives the function: it belongs to the invocation.
    assert_eq!(ok(&cli(&kiln, &["logs", id], b"")), "logger: handling a request\n");
}

#[test]
fn function_failure_exits_non_zero_with_the_message_on_stderr() {
    let kiln = Kiln::start();
    ok(&cli(&kiln, &["deploy", "bad", &wat_path("exit3")], b""));
    let failed = cli(&kiln, &["invoke", "bad"], b"");
    assert_eq!(failed.status.code(), Some(1));
    assert!(failed.stdout.is_empty());
    let stderr = String::from_utf8(failed.stderr).unwrap();
    assert!(stderr.starts_with("bad input\ninvocation "), "{stderr}");
    assert!(stderr.ends_with("kiln: the function exited with code 3\n"), "{stderr}");
    // The failed invocation's log is kept too.
    let id = stderr.lines().nth(1).unwrap().strip_prefix("invocation ").unwrap();
    assert_eq!(ok(&cli(&kiln, &["logs", id], b"")), "bad input\n");
}

#[test]
fn async_invoke_waits_for_the_result() {
    let kiln = Kiln::start();
    ok(&cli(&kiln, &["deploy", "logger", &wat_path("logger")], b""));
    assert_eq!(
        ok(&cli(
            &kiln,
            &["invoke", "logger", "--async", "--wait", "-d", "later"],
            b""
        )),
        "later"
    );
    assert_eq!(ok(&cli(&kiln, &["invoke", "logger", "--wait"], b"stdin")), "stdin");
    // A failed asynchronous invocation (no retries) fails the command like a sync one.
    let deployed = kiln.deploy_with("bad", crate::support::wat("exit3"), serde_json::json!({"retries": 0}));
    assert_eq!(deployed.status(), 201);
    let failed = cli(&kiln, &["invoke", "bad", "--wait"], b"");
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.starts_with("bad input\ninvocation "), "{stderr}");
    assert!(stderr.ends_with("kiln: the function exited with code 3\n"), "{stderr}");

    let id = ok(&cli(&kiln, &["invoke", "logger", "--async", "-d", "x"], b""));
    let id = id.trim();
    assert_eq!(id.len(), 36, "{id}");
    let status = loop {
        let status: serde_json::Value = serde_json::from_str(&ok(&cli(&kiln, &["--json", "status", id], b""))).unwrap();
        if status["state"] == "succeeded" {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status["function"], "logger");
    assert_eq!(ok(&cli(&kiln, &["logs", id], b"")), "logger: handling a request\n");
}

#[test]
fn token_and_url_errors_are_one_line_messages() {
    let kiln = Kiln::start();
    let bad = cli(&kiln, &["ls", "--token", "wrong"], b"");
    assert_eq!(bad.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr),
        "kiln: missing or invalid bearer token\n"
    );
    let down = cli(&kiln, &["ls", "--url", "http://127.0.0.1:9"], b"");
    assert_eq!(down.status.code(), Some(3));
    let message = String::from_utf8_lossy(&down.stderr);
    assert!(
        message.starts_with("kiln: cannot reach http://127.0.0.1:9: "),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
    // Completions are generated from the same command definitions.
    let script = ok(&cli(&kiln, &["completions", "bash"], b""));
    assert!(
        script.contains("deploy") && script.contains("--max-concurrency"),
        "{script}"
    );
}

#[test]
fn scoped_token_from_the_cli_invokes_only_its_function() {
    let kiln = Kiln::start();
    ok(&cli(&kiln, &["deploy", "logger", &wat_path("logger")], b""));
    ok(&cli(&kiln, &["deploy", "hello", &wat_path("hello")], b""));
    let secret = ok(&cli(&kiln, &["token", "create", "logger"], b""));
    let secret = secret.trim();
    assert!(secret.starts_with("kiln_"), "{secret}");
    assert_eq!(
        ok(&cli(
            &kiln,
            &["--token", secret, "invoke", "logger", "--wait", "-d", "a"],
            b""
        )),
        "a"
    );
    let refused = cli(&kiln, &["--token", secret, "invoke", "hello"], b"");
    assert_eq!(refused.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        "kiln: this token may not invoke `hello`\n"
    );

    let listed = ok(&cli(&kiln, &["token", "ls"], b""));
    let id = listed.split_whitespace().next().unwrap().to_owned();
    assert!(listed.trim_end().ends_with("logger"), "{listed}");
    assert_eq!(ok(&cli(&kiln, &["token", "rm", &id], b"")), format!("revoked {id}\n"));
    let revoked = cli(&kiln, &["--token", secret, "invoke", "logger"], b"");
    assert_eq!(
        String::from_utf8_lossy(&revoked.stderr),
        "kiln: missing or invalid bearer token\n"
    );
}

#[test]
fn connectors_from_the_cli() {
    let kiln = Kiln::start();
    let made = ok(&cli(
        &kiln,
        &[
            "connector",
            "create",
            "db",
            "--allow-host",
            "http://db.internal:5432",
            "--allow-private",
            "10.1.0.0/16",
        ],
        b"",
    ));
    assert_eq!(made, "db  http://db.internal:5432  10.1.0.0/16  used by 0\n");
    ok(&cli(
        &kiln,
        &["deploy", "hello", &wat_path("hello"), "--connector", "db"],
        b"",
    ));
    let shown = ok(&cli(&kiln, &["connector", "get", "db"], b""));
    assert!(shown.ends_with("  used by hello@1\n"), "{shown}");
    let refused = cli(&kiln, &["connector", "rm", "db"], b"");
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("connector `db` is in use by function `hello` version 1"),
        "{said}"
    );
    let unknown = cli(
        &kiln,
        &["deploy", "other", &wat_path("hello"), "--connector", "nope"],
        b"",
    );
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no connector named `nope`"));
    ok(&cli(&kiln, &["rm", "hello"], b""));
    assert_eq!(ok(&cli(&kiln, &["connector", "rm", "db"], b"")), "deleted db\n");
    assert_eq!(ok(&cli(&kiln, &["connector", "ls"], b"")), "");
}

#[test]
fn the_version_names_the_commit_it_was_built_from() {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--version")
        .output()
        .unwrap();
    let said = String::from_utf8(output.stdout).unwrap();
    let commit = said
        .trim()
        .strip_prefix(concat!("kiln ", env!("CARGO_PKG_VERSION"), " ("))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{said}"));
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned());
    match head {
        // Built from this checkout: its commit (the test binary and `kiln` were built together).
        Some(head) => assert_eq!(commit, head),
        None => assert_eq!(commit, "unknown"),
    }
}
