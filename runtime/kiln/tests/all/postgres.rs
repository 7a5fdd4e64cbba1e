//! Kiln on PostgreSQL: the shared-database mode of several nodes (`--database postgres://…`).
//! Each test starts from a fresh database on a throwaway server this process runs
//! (`kiln_testkit::postgres`); without PostgreSQL installed they are skipped, saying so.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_testkit::postgres::Postgres;
use serde_json::Value;

use crate::support::{self, client, expect_error, wait_done, wait_until, wat, Kiln};

/// The shared server, or `None` after recording why this test is skipped.
pub(crate) fn server(test: &str) -> Option<&'static Postgres> {
    match Postgres::shared() {
        Ok(server) => Some(server),
        Err(reason) => {
            kiln_testkit::skip(test, &reason);
            None
        }
    }
}

/// A node on `database` with `data` as its private directory and a given admin token, so that
/// every node of a test answers the same token.
fn node(data: &Path, database: &str, token: &str, args: &[&str]) -> Kiln {
    node_with_env(data, database, token, args, &[])
}

/// [`node`] with extra environment variables.
pub(crate) fn node_with_env(data: &Path, database: &str, token: &str, args: &[&str], env: &[(&str, &str)]) -> Kiln {
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join("admin.token"), token).unwrap();
    let mut all = vec!["--database", database];
    all.extend_from_slice(args);
    Kiln::start_in_with_env(data, &all, env)
}

#[test]
fn a_node_refuses_a_database_migrated_by_a_newer_kiln() {
    let Some(server) = server("a_node_refuses_a_database_migrated_by_a_newer_kiln") else {
        return;
    };
    let url = server.create_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A first start migrates the empty database to this build's schema.
    let mut first = node(&dir.path().join("a"), &url, "t0ken-admin-0123456789", &[]);
    first.must_deploy("echo", wat("echo"));
    first.terminate();
    let name = url.rsplit('/').next().unwrap();
    let version: i64 = server
        .sql(name, "SELECT version FROM kiln_schema")
        .unwrap()
        .parse()
        .unwrap();
    assert!(version >= 8, "schema version {version}");

    server
        .sql(name, &format!("UPDATE kiln_schema SET version = {}", version + 1))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database", &url, "--data"])
        .arg(dir.path().join("b"))
        .env_remove("KILN_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started against a newer schema:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "schema is version {}, newer than this Kiln knows ({version})",
            version + 1
        )),
        "{stderr}"
    );
}

#[test]
fn two_nodes_share_functions_and_tokens_and_a_dead_nodes_invocation_runs_on_the_other() {
    let Some(server) = server("two_nodes_share_functions_and_tokens_and_a_dead_nodes_invocation_runs_on_the_other")
    else {
        return;
    };
    let url = server.create_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = "t0ken-admin-0123456789";
    // A short lease, so that the test waits one second rather than thirty for the dead node's;
    // a blob store both nodes share, as a network file system would be.
    let blobs = format!("file://{}", dir.path().join("blobs").display());
    let args = ["--async-lease-ms", "1000", "--blob-store", &blobs];
    let mut a = node(&dir.path().join("a"), &url, token, &args);
    let b = node(&dir.path().join("b"), &url, token, &args);
    // Deployed on A after B started: B finds it in the database and the shared blob store.
    let published = || -> Vec<std::path::PathBuf> {
        let listing = std::fs::read_dir(dir.path().join("blobs").join("compiled-published")).unwrap();
        listing.map(|entry| entry.unwrap().path()).collect()
    };
    a.must_deploy("sleep", wat("sleep"));
    let on_b = b.invoke("sleep", "1");
    assert_eq!(on_b.status(), 200);
    assert_eq!(on_b.text().unwrap(), "slept");
    // B ran the code A compiled and published (same engine and CPU), after checking its seal.
    assert_eq!(compilations(&b), 0, "B compiled:\n{}", b.log());
    assert!(
        b.log().contains("took compiled code another node published"),
        "{}",
        b.log()
    );
    // Published code that does not match its seal is not run: B compiles the function itself.
    let before = published();
    a.must_deploy("tampered", wat("echo"));
    let tampered: Vec<_> = published().into_iter().filter(|path| !before.contains(path)).collect();
    assert_eq!(tampered.len(), 1, "{tampered:?}");
    let mut bytes = std::fs::read(&tampered[0]).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&tampered[0], &bytes).unwrap();
    assert_eq!(b.invoke("tampered", "still right").text().unwrap(), "still right");
    assert_eq!(compilations(&b), 1);
    assert!(
        b.log().contains("published compiled code does not match its seal"),
        "{}",
        b.log()
    );
    let again = b.must_deploy("sleep", wat("sleep"));
    assert_eq!(
        again["version"], 1,
        "the same code deployed on another node is the same version"
    );

    // Each node's heartbeat lists it on the other.
    wait_until("each node lists both", Duration::from_secs(10), || {
        [&a, &b].iter().all(|node| {
            let listed: Value = node.get("/v1/cluster").json().unwrap();
            let nodes = listed["nodes"].as_array().unwrap();
            nodes.iter().filter(|n| n["alive"] == true).count() == 2
                && nodes.iter().filter(|n| n["this_node"] == true).count() == 1
        })
    });

    // Changes on one node reach the other's caches (LISTEN/NOTIFY): a new version deployed on A
    // is what B runs, a function deleted on A is gone on B, a token created on B works on A, and
    // once revoked on B it is refused on A.
    a.must_deploy("f", wat("echo"));
    assert_eq!(b.invoke("f", "one").text().unwrap(), "one");
    a.must_deploy("f", wat("sleep"));
    wait_until("B runs the version A deployed", Duration::from_secs(5), || {
        b.invoke("f", "1").text().unwrap() == "slept"
    });
    assert!(a.delete("/v1/functions/f").status().is_success());
    wait_until("B forgets the function A deleted", Duration::from_secs(5), || {
        b.invoke("f", "1").status() == 404
    });
    let created: Value = client()
        .post(b.url("/v1/tokens"))
        .bearer_auth(token)
        .json(&serde_json::json!({"functions": ["sleep"]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let secret = created["token"].as_str().unwrap().to_owned();
    wait_until("A accepts the token B created", Duration::from_secs(5), || {
        let on_a = client()
            .post(a.url("/v1/functions/sleep/invoke"))
            .bearer_auth(&secret)
            .body("1");
        on_a.send().unwrap().status() == 200
    });
    let id = created["id"].as_str().unwrap();
    assert_eq!(b.delete(&format!("/v1/tokens/{id}")).status(), 204);
    wait_until("A refuses the token B revoked", Duration::from_secs(5), || {
        let on_a = client()
            .post(a.url("/v1/functions/sleep/invoke"))
            .bearer_auth(&secret)
            .body("1");
        on_a.send().unwrap().status() == 401
    });

    // Submitted on A, which runs it at once (it has free slots) under its lease.
    let response = client()
        .post(a.url("/v1/functions/sleep/invoke-async"))
        .bearer_auth(token)
        .body("3000")
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    wait_until("A runs the invocation", Duration::from_secs(10), || {
        let record: Value = b.get(&format!("/v1/invocations/{id}")).json().unwrap();
        record["state"] == "running"
    });
    a.kill();

    // B sees the lease expire, claims the row again and completes it: the second attempt.
    let record = wait_done(&b, &id, Duration::from_secs(30));
    assert_eq!(record["state"], "succeeded", "{record}\nB's log:\n{}", b.log());
    assert_eq!(record["attempts"], 2, "{record}");
    let result = client()
        .get(b.url(record["result_url"].as_str().unwrap()))
        .send()
        .unwrap();
    assert_eq!(result.text().unwrap(), "slept");
}

/// The node's `kiln_compilations_total`.
pub fn compilations(node: &Kiln) -> u64 {
    let text = node.get("/metrics").text().unwrap();
    let line = text.lines().find(|line| line.starts_with("kiln_compilations_total "));
    line.and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no kiln_compilations_total in\n{text}"))
}

/// Three nodes on one database and one `file://` blob store, each change made on one node and
/// checked on another: a function deployed on A runs on B and C, a token created on B works on C,
/// a function deleted on C is gone on A (whose cache held it). One test, as each start costs.
#[test]
fn three_nodes_deploy_on_one_invoke_on_the_others_and_see_each_others_changes() {
    let Some(server) = server("three_nodes_deploy_on_one_invoke_on_the_others_and_see_each_others_changes") else {
        return;
    };
    let url = server.create_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = "t0ken-admin-0123456789";
    let blobs = format!("file://{}", dir.path().join("blobs").display());
    let args = ["--blob-store", blobs.as_str()];
    let a = node(&dir.path().join("a"), &url, token, &args);
    let b = node(&dir.path().join("b"), &url, token, &args);
    let c = node(&dir.path().join("c"), &url, token, &args);

    // Deployed on A once B and C run: they find it in the database and the shared blob store.
    let deployed = a.must_deploy("echo", wat("echo"));
    assert_eq!(deployed["version"], 1);
    for (node, input) in [(&a, "on A"), (&b, "on B"), (&c, "on C")] {
        let response = node.invoke("echo", input);
        assert_eq!(response.status(), 200, "{}", node.log());
        assert_eq!(response.text().unwrap(), input);
    }
    let version: Value = c.get("/v1/functions/echo").json().unwrap();
    assert_eq!(version["version"], 1, "C sees A's version: {version}");

    // All three list each other.
    wait_until("each node lists all three", Duration::from_secs(10), || {
        [&a, &b, &c].iter().all(|node| {
            let listed: Value = node.get("/v1/cluster").json().unwrap();
            let nodes = listed["nodes"].as_array().unwrap();
            nodes.iter().filter(|n| n["alive"] == true).count() == 3
                && nodes.iter().filter(|n| n["this_node"] == true).count() == 1
        })
    });

    // A token created on B, limited to `echo`, works on C (which started before it existed) and
    // only for `echo`.
    let created: Value = client()
        .post(b.url("/v1/tokens"))
        .bearer_auth(token)
        .json(&serde_json::json!({"functions": ["echo"]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let secret = created["token"].as_str().unwrap().to_owned();
    let with_secret = |node: &Kiln, function: &str| {
        client()
            .post(node.url(&format!("/v1/functions/{function}/invoke")))
            .bearer_auth(&secret)
            .body("scoped")
            .send()
            .unwrap()
    };
    wait_until("C accepts the token B created", Duration::from_secs(5), || {
        with_secret(&c, "echo").status() == 200
    });
    assert_eq!(with_secret(&c, "echo").text().unwrap(), "scoped");
    assert_eq!(
        client()
            .get(c.url("/v1/functions"))
            .bearer_auth(&secret)
            .send()
            .unwrap()
            .status(),
        403,
        "an invoke-only token B created is not an admin token on C"
    );

    // Deleted on C: A, which has the function cached (it just ran it), answers 404 once the
    // notification arrives; B as well.
    assert_eq!(a.invoke("echo", "cached").status(), 200);
    assert!(c.delete("/v1/functions/echo").status().is_success());
    wait_until("A forgets the function C deleted", Duration::from_secs(5), || {
        a.invoke("echo", "gone?").status() == 404
    });
    wait_until("B forgets the function C deleted", Duration::from_secs(5), || {
        b.invoke("echo", "gone?").status() == 404
    });
}

/// A node whose database went away keeps serving what it holds (a loaded function's sync invoke
/// needs no database) and answers what needs the database `503 unavailable`, saying why, rather
/// than a bare `500`.
#[test]
fn a_node_whose_database_is_gone_answers_503_and_keeps_serving_loaded_functions() {
    const TEST: &str = "postgres::a_node_whose_database_is_gone_answers_503_and_keeps_serving_loaded_functions";
    // A server of its own, to stop.
    let server = match Postgres::start() {
        Ok(server) => server,
        Err(reason) => return kiln_testkit::skip(TEST, &reason),
    };
    let url = server.create_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = "t0ken-admin-0123456789";
    let a = node(&dir.path().join("a"), &url, token, &[]);
    a.must_deploy("echo", wat("echo"));
    assert_eq!(a.invoke("echo", "before").text().unwrap(), "before");
    drop(server);

    assert_eq!(a.invoke("echo", "after").text().unwrap(), "after", "{}", a.log());
    let submit = client()
        .post(a.url("/v1/functions/echo/invoke-async"))
        .bearer_auth(token)
        .body("later")
        .send()
        .unwrap();
    for (what, response) in [
        ("list", a.get("/v1/functions")),
        ("get", a.get("/v1/functions/echo")),
        ("deploy", a.deploy("other", wat("echo"))),
        ("submit", submit),
        ("tokens", a.get("/v1/tokens")),
    ] {
        let error = expect_error(response, 503, "unavailable");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("database cannot be reached"), "{what}: {error}");
    }
}

/// A representative part of the single-node suite, each test as it is, on PostgreSQL.
#[test]
fn the_api_suite_runs_on_postgres() {
    let Some(server) = server("the_api_suite_runs_on_postgres") else {
        return;
    };
    let databases = || -> usize {
        let count = server.sql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'kiln_%'",
        );
        count.unwrap().parse().unwrap()
    };
    let before = databases();
    support::on_postgres(|| {
        crate::api::list_get_and_delete();
        crate::api::redeploying_the_same_code_and_config_is_idempotent();
        crate::asynchronous::failures_are_retried_and_counted();
        crate::asynchronous::an_idempotency_key_makes_a_retried_submit_return_the_same_id();
        crate::asynchronous::a_slow_invocation_does_not_hold_back_others_and_large_results_are_files();
        crate::tokens::invoke_only_token_is_limited_to_its_functions_and_revocable();
        crate::tokens::scoped_tokens_survive_a_restart();
        crate::connectors::connectors_are_made_used_and_deleted_only_once_nothing_uses_them();
        crate::lifecycle::restart_keeps_functions_and_does_not_recompile();
        crate::sandboxes::a_sandbox_keeps_its_memory_across_requests_suspend_resume_and_a_restart();
        crate::console::invocations_are_listed_sync_and_async_newest_first();
    });
    // Each of those tests had its servers on a database of its own (restarts find theirs again).
    assert!(databases() >= before + 11, "the tests ran on SQLite");
}

/// The secrets in a node's data directory are the cluster's: a node that joins takes the first
/// node's admin token, result-URL and identity keys and AWS key root, so a result URL signed by
/// one node verifies on another and both publish the same JWKS; a rotation on one node reaches
/// the other; a node given another admin token refuses to join.
#[test]
fn every_node_holds_the_clusters_secrets_and_a_rotation_reaches_them_all() {
    let Some(server) = server("every_node_holds_the_clusters_secrets_and_a_rotation_reaches_them_all") else {
        return;
    };
    let url = server.create_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let blobs = format!("file://{}", dir.path().join("blobs").display());
    let args = ["--database", url.as_str(), "--blob-store", blobs.as_str()];
    // The first node makes the secrets (its admin token too) and publishes them.
    let a = Kiln::start_in(&dir.path().join("a"), &args);

    // A node given another token refuses to join, by either way of giving it, and says why.
    let b_data = dir.path().join("b");
    std::fs::create_dir_all(&b_data).unwrap();
    std::fs::write(b_data.join("admin.token"), "kiln_not-the-clusters-token\n").unwrap();
    let refused = |env: Option<&str>| {
        let mut serve = Command::new(env!("CARGO_BIN_EXE_kiln"));
        serve
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&b_data)
            .args(args);
        match env {
            Some(token) => serve.env("KILN_ADMIN_TOKEN", token),
            None => serve.env_remove("KILN_ADMIN_TOKEN"),
        };
        let out = serve.stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success(), "joined with another admin token");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = refused(None);
    assert!(said.contains("is not this cluster's admin token"), "{said}");
    std::fs::remove_file(b_data.join("admin.token")).unwrap();
    let said = refused(Some("kiln_another-token-from-the-environment"));
    assert!(
        said.contains("KILN_ADMIN_TOKEN is not this cluster's admin token"),
        "{said}"
    );

    // Without a token of its own, the node joins with the cluster's secrets.
    let b = Kiln::start_in(&b_data, &args);
    assert_eq!(b.token, a.token, "B's admin.token is the cluster's");
    for secret in ["aws.key", "keys", "identity"] {
        let files = |node: &Kiln| -> Vec<(String, Vec<u8>)> {
            let path = node.data.join(secret);
            if path.is_file() {
                return vec![(secret.to_owned(), std::fs::read(&path).unwrap())];
            }
            let mut files: Vec<_> = std::fs::read_dir(&path)
                .unwrap()
                .map(|entry| {
                    let entry = entry.unwrap();
                    (
                        entry.file_name().into_string().unwrap(),
                        std::fs::read(entry.path()).unwrap(),
                    )
                })
                .collect();
            files.sort();
            files
        };
        assert!(!files(&a).is_empty(), "{secret}");
        assert_eq!(files(&a), files(&b), "{secret} differs between the nodes");
    }
    let jwks = |node: &Kiln| -> Value { node.get("/.well-known/jwks.json").json().unwrap() };
    assert_eq!(jwks(&a), jwks(&b));

    // A result URL signed by A verifies on B.
    a.must_deploy("echo", wat("echo"));
    let submitted: Value = client()
        .post(a.url("/v1/functions/echo/invoke-async"))
        .bearer_auth(&a.token)
        .body("kept")
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = submitted["id"].as_str().unwrap();
    let signed_by_a = wait_done(&a, id, Duration::from_secs(30))["result_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        client().get(b.url(&signed_by_a)).send().unwrap().text().unwrap(),
        "kept"
    );

    // Rotated on B: A refuses what it signed before, and verifies what B signs now; A publishes
    // B's new identity key.
    let rotated: Value = client()
        .post(b.url("/v1/keys/rotate"))
        .bearer_auth(&b.token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let new_identity_kid = rotated["identity"]["kid"].as_str().unwrap().to_owned();
    wait_until(
        "A refuses the URLs signed before B rotated",
        Duration::from_secs(5),
        || client().get(a.url(&signed_by_a)).send().unwrap().status() == 403,
    );
    let signed_by_b = wait_done(&b, id, Duration::from_secs(5))["result_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(signed_by_b, signed_by_a);
    assert_eq!(
        client().get(a.url(&signed_by_b)).send().unwrap().text().unwrap(),
        "kept"
    );
    wait_until("A publishes B's new identity key", Duration::from_secs(5), || {
        jwks(&a)["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|key| key["kid"] == new_identity_kid.as_str())
    });
    assert_eq!(jwks(&a), jwks(&b));
}
