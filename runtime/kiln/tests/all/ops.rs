//! Operating Kiln: Prometheus metrics, the one structured log line per invocation, kept logs.

use crate::support::{client, wat, Kiln};

fn metrics(kiln: &Kiln) -> String {
    let response = client().get(kiln.url("/metrics")).send().unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    response.text().unwrap()
}

fn assert_line(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "`{line}` missing from\n{text}");
}

#[test]
fn metrics_count_invocations_per_function_and_outcome() {
    let kiln = Kiln::start();
    kiln.must_deploy("hello", wat("hello"));
    kiln.must_deploy("bad", wat("exit3"));
    assert_eq!(kiln.deploy("hello", wat("hello")).status(), 200, "unchanged");
    assert_eq!(kiln.deploy("broken", "not wasm").status(), 422);
    for _ in 0..3 {
        assert_eq!(kiln.invoke("hello", "").status(), 200);
    }
    assert_eq!(kiln.invoke("bad", "").status(), 502);

    let text = metrics(&kiln);
    assert_line(
        &text,
        "kiln_invocations_total{function=\"hello\",outcome=\"success\"} 3",
    );
    assert_line(&text, "kiln_invocations_total{function=\"hello\",outcome=\"failed\"} 0");
    assert_line(&text, "kiln_invocations_total{function=\"bad\",outcome=\"failed\"} 1");
    assert_line(&text, "kiln_invocation_duration_seconds_count{function=\"hello\"} 3");
    assert_line(
        &text,
        "kiln_invocation_duration_seconds_bucket{function=\"hello\",le=\"+Inf\"} 3",
    );
    assert_line(
        &text,
        "kiln_invocation_duration_seconds_bucket{function=\"bad\",le=\"900\"} 1",
    );
    assert_line(&text, "# TYPE kiln_invocation_duration_seconds histogram");
    assert_line(&text, "kiln_deploys_total{outcome=\"created\"} 2");
    assert_line(&text, "kiln_deploys_total{outcome=\"unchanged\"} 1");
    assert_line(&text, "kiln_deploys_total{outcome=\"failed\"} 1");
    assert_line(&text, "kiln_compilations_total 2");
    assert_line(&text, "kiln_pool_instances_in_use 0");
    assert_line(&text, "kiln_async_queue_depth 0");
    // Buckets are cumulative: never decreasing along `le`.
    let buckets: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("kiln_invocation_duration_seconds_bucket{function=\"hello\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 17);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("kiln_invocation_duration_seconds_sum{function=\"hello\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(sum > 0.0 && sum < 10.0, "{sum}");
}

#[test]
fn one_json_log_line_per_invocation_without_body_or_token() {
    let kiln = Kiln::start_with(&["--log-format", "json"]);
    kiln.must_deploy("echo", wat("echo"));
    kiln.must_deploy("bad", wat("exit3"));
    let secret_input = "secret-input-7f3a";
    let response = kiln.invoke("echo", secret_input);
    let id = response.headers()["x-kiln-invocation-id"].to_str().unwrap().to_owned();
    let failed = kiln.invoke("bad", "");
    let failed_id = failed.headers()["x-kiln-invocation-id"].to_str().unwrap().to_owned();
    assert!(kiln.wait_for_log(&failed_id, std::time::Duration::from_secs(10)));

    let log = kiln.log();
    // Every line the server writes is one JSON object, start-up lines included.
    for line in log.lines() {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not one JSON object: {line}"));
        assert!(parsed.is_object() && parsed["level"].is_string(), "{line}");
    }
    assert!(log.contains("kiln listening on"), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains(&id))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    let fields = &lines[0]["fields"];
    assert_eq!(lines[0]["target"], "kiln::invocation");
    assert_eq!(fields["id"], id.as_str());
    assert_eq!(fields["function"], "echo");
    assert_eq!(fields["version"], 1);
    assert_eq!(fields["outcome"], "success");
    assert!(fields["duration_us"].as_u64().is_some(), "{fields}");

    let failed_line: serde_json::Value =
        serde_json::from_str(log.lines().find(|l| l.contains(&failed_id)).unwrap()).unwrap();
    assert_eq!(failed_line["fields"]["outcome"], "failed");
    assert_eq!(failed_line["fields"]["error"], "the function exited with code 3");
    // Neither the request body, nor the guest's stderr, nor the token is ever logged.
    assert!(!log.contains(secret_input), "{log}");
    assert!(!log.contains("bad input"), "{log}");
    assert!(!log.contains(&kiln.token), "{log}");
}

#[test]
fn sync_invocation_logs_are_text_and_need_a_token() {
    let kiln = Kiln::start();
    kiln.must_deploy("logger", wat("logger"));
    let response = kiln.invoke("logger", "x");
    let id = response.headers()["x-kiln-invocation-id"].to_str().unwrap().to_owned();
    let logs = kiln.get(&format!("/v1/invocations/{id}/logs"));
    assert_eq!(logs.status(), 200);
    assert_eq!(logs.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(logs.text().unwrap(), "logger: handling a request\n");

    // A quiet success keeps no log; a quiet timeout or failure does.
    kiln.must_deploy("hello", wat("hello"));
    let quiet = kiln.invoke("hello", "");
    let quiet_id = quiet.headers()["x-kiln-invocation-id"].to_str().unwrap().to_owned();
    crate::support::expect_error(kiln.get(&format!("/v1/invocations/{quiet_id}/logs")), 404, "not_found");

    let unknown = uuid_like();
    crate::support::expect_error(kiln.get(&format!("/v1/invocations/{unknown}/logs")), 404, "not_found");
    crate::support::expect_error(kiln.get("/v1/invocations/nope/logs"), 404, "not_found");
    let no_token = client()
        .get(kiln.url(&format!("/v1/invocations/{id}/logs")))
        .send()
        .unwrap();
    crate::support::expect_error(no_token, 401, "unauthorized");
}

#[test]
fn kept_logs_survive_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut kiln = Kiln::start_in(dir.path(), &[]);
    kiln.must_deploy("logger", wat("logger"));
    let ids: Vec<String> = (0..20)
        .map(|_| {
            let response = kiln.invoke("logger", "x");
            response.headers()["x-kiln-invocation-id"].to_str().unwrap().to_owned()
        })
        .collect();
    assert!(kiln.terminate().success());
    let kiln = Kiln::start_in(dir.path(), &[]);
    for id in ids {
        let logs = kiln.get(&format!("/v1/invocations/{id}/logs"));
        assert_eq!(logs.status(), 200, "{id}");
        assert_eq!(logs.text().unwrap(), "logger: handling a request\n");
    }
}

fn uuid_like() -> &'static str {
    "01890000-0000-7000-8000-000000000000"
}

/// `kiln.toml` < `KILN_*` environment variables < flags, observed through the sync input cap.
#[test]
fn settings_precedence_file_env_flag() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        "max_sync_input_bytes = 100\nmax_kept_logs = 5\n",
    )
    .unwrap();
    let status = |kiln: &Kiln, len: usize| kiln.invoke("echo", vec![b'x'; len]).status().as_u16();

    let kiln = Kiln::start_in(dir.path(), &[]);
    kiln.must_deploy("echo", wat("echo"));
    assert_eq!(status(&kiln, 100), 200);
    assert_eq!(status(&kiln, 150), 413, "<data>/kiln.toml applies");
    drop(kiln);

    let env = [("KILN_MAX_SYNC_INPUT_BYTES", "200")];
    let kiln = Kiln::start_in_with_env(dir.path(), &[], &env);
    assert_eq!(status(&kiln, 150), 200, "the environment beats the file");
    assert_eq!(status(&kiln, 250), 413);
    drop(kiln);

    let kiln = Kiln::start_in_with_env(dir.path(), &["--max-sync-input-bytes", "300"], &env);
    assert_eq!(status(&kiln, 250), 200, "a flag beats the environment");
    assert_eq!(status(&kiln, 350), 413);
    drop(kiln);

    // An explicit --config replaces <data>/kiln.toml; a bad file stops the server with its error.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "max_sync_input_bytes = 50\n").unwrap();
    let kiln = Kiln::start_in(dir.path(), &["--config", other.to_str().unwrap()]);
    assert_eq!(status(&kiln, 60), 413);
    drop(kiln);
    std::fs::write(&other, "max_sync_inputbytes = 50\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            other.to_str().unwrap(),
            "--data",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_sync_inputbytes"), "{stderr}");
}

/// `GET /v1/cluster` on the embedded default: this one node, alive, with what its heartbeat says;
/// admin only.
#[test]
fn the_cluster_lists_this_node_by_its_heartbeat() {
    let kiln = Kiln::start();
    // The first heartbeat is written as the server starts serving.
    let mut listed = serde_json::Value::Null;
    crate::support::wait_until("the first heartbeat", std::time::Duration::from_secs(10), || {
        listed = kiln.get("/v1/cluster").json().unwrap();
        !listed["nodes"].as_array().unwrap().is_empty()
    });
    let nodes = listed["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{listed}");
    let node = &nodes[0];
    assert_eq!(
        (node["alive"].as_bool(), node["this_node"].as_bool()),
        (Some(true), Some(true)),
        "{node}"
    );
    assert_eq!(node["address"], kiln.url(""), "{node}");
    assert!(
        node["cpu"].as_str().unwrap().contains("x86_64") || std::env::consts::ARCH != "x86_64",
        "{node}"
    );
    assert!(
        node["load"].as_f64().is_some() && node["last_seen_ms"].as_u64().unwrap() > 0,
        "{node}"
    );
    let scoped: serde_json::Value = crate::support::client()
        .post(kiln.url("/v1/tokens"))
        .bearer_auth(&kiln.token)
        .json(&serde_json::json!({"functions": ["f"]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let response = crate::support::client()
        .get(kiln.url("/v1/cluster"))
        .bearer_auth(scoped["token"].as_str().unwrap())
        .send()
        .unwrap();
    assert_eq!(response.status(), 403);
}
