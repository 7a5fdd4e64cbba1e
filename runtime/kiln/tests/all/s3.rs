//! Blobs in an S3 bucket (`--blob-store s3://…`): nodes of one PostgreSQL database share
//! artifacts and large results through a bucket of a throwaway S3-compatible server the test
//! runs (`kiln_testkit::s3`), each keeping only a cache in its data directory.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_testkit::s3::S3Server;
use serde_json::Value;

use crate::postgres::{node_with_env, server};
use crate::support::{client, wait_done, wat};

/// The names in a directory (none if it does not exist).
fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
        .unwrap_or_default()
}

#[test]
fn two_nodes_share_artifacts_and_large_results_through_an_s3_bucket() {
    let Some(database) = server("two_nodes_share_artifacts_and_large_results_through_an_s3_bucket") else {
        return;
    };
    let s3 = S3Server::start().unwrap();
    let url = database.create_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = "t0ken-admin-0123456789";
    let store = s3.url();
    let credentials = s3.env();
    let env: Vec<(&str, &str)> = credentials.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = node_with_env(&dir.path().join("a"), &url, token, &["--blob-store", &store], &env);
    // B runs no asynchronous invocation: A runs them, and B serves their results from the bucket.
    let b = node_with_env(
        &dir.path().join("b"),
        &url,
        token,
        &["--blob-store", &store, "--async-workers", "0"],
        &env,
    );

    let deployed = a.must_deploy("echo", wat("echo"));
    let hex = deployed["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .to_owned();
    assert_eq!(
        names(&s3.object_path("artifacts")),
        vec![hex.clone()],
        "the bucket holds artifacts/<hex>"
    );
    for node in [&a, &b] {
        assert!(
            names(&node.data.join("artifacts")).is_empty(),
            "no artifact in a data directory"
        );
    }
    assert!(
        names(&b.data.join("blob-cache/artifacts")).is_empty(),
        "B has nothing cached yet"
    );
    let on_b = b.invoke("echo", "from B");
    assert_eq!(on_b.status(), 200, "{}", b.log());
    assert_eq!(on_b.text().unwrap(), "from B");
    // B ran the code A compiled and published to the bucket: no artifact to fetch, nothing compiled.
    assert_eq!(
        names(&s3.object_path("compiled")).len(),
        1,
        "the bucket holds A's compiled code"
    );
    assert!(
        names(&b.data.join("blob-cache/artifacts")).is_empty(),
        "B fetched the artifact"
    );
    assert_eq!(crate::postgres::compilations(&b), 0, "B compiled:\n{}", b.log());

    // Larger than a row keeps inline (64 KiB): a result blob, written by A, read by B.
    let big: String = (0..300_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let response = client()
        .post(a.url("/v1/functions/echo/invoke-async"))
        .bearer_auth(token)
        .body(big.clone())
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let record = wait_done(&b, &id, Duration::from_secs(30));
    assert_eq!(record["state"], "succeeded", "{record}\nA's log:\n{}", a.log());
    use sha2::Digest as _;
    let digest = hex::encode(sha2::Sha256::digest(big.as_bytes()));
    assert_eq!(names(&s3.object_path("results")), vec![digest.clone()]);
    assert!(names(&a.data.join("results")).is_empty(), "not in A's data directory");
    assert!(names(&b.data.join("blob-cache/results")).is_empty());
    let result = client()
        .get(b.url(record["result_url"].as_str().unwrap()))
        .send()
        .unwrap();
    assert_eq!(result.status(), 200, "{}", b.log());
    assert!(
        result.text().unwrap() == big,
        "the result read through B is not the input"
    );
    assert_eq!(names(&b.data.join("blob-cache/results")), vec![digest]);
}

/// `kiln serve` with `args` and `env`, which must fail: its standard error.
fn serve_fails(data: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(args)
        .env_remove("KILN_ADMIN_TOKEN")
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started:\n{stderr}");
    stderr
}

#[test]
fn a_bucket_that_cannot_be_reached_stops_the_start_with_the_reason() {
    let s3 = S3Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = s3.url();

    let wrong_secret = [
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret".to_owned()),
    ];
    let stderr = serve_fails(dir.path(), &["--blob-store", &store], &wrong_secret);
    assert!(
        stderr.contains(&format!("blob store {store}: the bucket cannot be reached")),
        "{stderr}"
    );
    assert!(stderr.contains("kiln-test"), "names the bucket: {stderr}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nowhere = format!("s3://kiln-test?endpoint=http://{closed}");
    let stderr = serve_fails(dir.path(), &["--blob-store", &nowhere], &s3.env());
    assert!(
        stderr.contains(&format!("blob store {nowhere}: the bucket cannot be reached")),
        "{stderr}"
    );

    let typo = format!("{store}&regoin=eu-west-1");
    let stderr = serve_fails(dir.path(), &["--blob-store", &typo], &s3.env());
    assert!(stderr.contains("unknown parameter `regoin`"), "{stderr}");
}
