//! Scoped tokens: invoke-only, limited to named functions, revocable.

use serde_json::json;

use crate::support::{client, expect_error, wat, Kiln};

fn create(kiln: &Kiln, token: &str, body: serde_json::Value) -> reqwest::blocking::Response {
    client()
        .post(kiln.url("/v1/tokens"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .unwrap()
}

fn invoke_as(kiln: &Kiln, token: &str, path: &str) -> reqwest::blocking::Response {
    client()
        .post(kiln.url(path))
        .bearer_auth(token)
        .body("")
        .send()
        .unwrap()
}

#[test]
pub(crate) fn invoke_only_token_is_limited_to_its_functions_and_revocable() {
    let kiln = Kiln::start();
    kiln.must_deploy("logger", wat("logger"));
    kiln.must_deploy("bad", wat("exit3"));
    kiln.must_deploy("echo", wat("echo"));

    let response = create(&kiln, &kiln.token, json!({"functions": ["logger"]}));
    assert_eq!(response.status(), 201);
    let created: serde_json::Value = response.json().unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let secret = created["token"].as_str().unwrap().to_owned();
    assert_eq!(created["scope"], "invoke");
    assert_eq!(created["functions"], json!(["logger"]));
    assert_ne!(secret, kiln.token);

    // It invokes its function, sync and async.
    let ok = invoke_as(&kiln, &secret, "/v1/functions/logger/invoke");
    assert_eq!(ok.status(), 200);
    let sync_id = ok.headers()["x-kiln-invocation-id"].to_str().unwrap().to_owned();
    assert_eq!(ok.text().unwrap(), "");
    let submitted = invoke_as(&kiln, &secret, "/v1/functions/logger/invoke-async");
    assert_eq!(submitted.status(), 202);
    let submitted: serde_json::Value = submitted.json().unwrap();
    // It reads the records and logs of its functions' invocations, not of others'.
    let own = submitted["status_url"].as_str().unwrap();
    assert_eq!(kiln_get_as(&kiln, &secret, own).status(), 200);
    let own_logs = kiln_get_as(&kiln, &secret, &format!("/v1/invocations/{sync_id}/logs"));
    assert_eq!(own_logs.status(), 200);
    // A failed invocation always keeps its log, so its function is known.
    let other = kiln.invoke("bad", "");
    let other_id = other.headers()["x-kiln-invocation-id"].to_str().unwrap().to_owned();
    let others = kiln_get_as(&kiln, &secret, &format!("/v1/invocations/{other_id}/logs"));
    expect_error(others, 403, "forbidden");
    let others = kiln_get_as(&kiln, &secret, &format!("/v1/invocations/{other_id}"));
    expect_error(others, 403, "forbidden");
    // Not another function, and no admin route.
    let other = expect_error(invoke_as(&kiln, &secret, "/v1/functions/echo/invoke"), 403, "forbidden");
    assert!(other["message"].as_str().unwrap().contains("echo"), "{other}");
    let as_scoped = |method: reqwest::Method, path: &str| {
        client()
            .request(method, kiln.url(path))
            .bearer_auth(&secret)
            .send()
            .unwrap()
    };
    expect_error(as_scoped(reqwest::Method::GET, "/v1/functions"), 403, "forbidden");
    expect_error(
        as_scoped(reqwest::Method::GET, "/v1/functions/logger"),
        403,
        "forbidden",
    );
    expect_error(
        as_scoped(reqwest::Method::DELETE, "/v1/functions/logger"),
        403,
        "forbidden",
    );
    expect_error(
        as_scoped(reqwest::Method::PUT, "/v1/functions/logger"),
        403,
        "forbidden",
    );
    expect_error(create(&kiln, &secret, json!({"functions": ["echo"]})), 403, "forbidden");
    expect_error(
        as_scoped(reqwest::Method::DELETE, &format!("/v1/tokens/{id}")),
        403,
        "forbidden",
    );

    // Listed without its secret; the database holds only its hash.
    let listed: serde_json::Value = kiln.get("/v1/tokens").json().unwrap();
    assert_eq!(listed["tokens"][0]["id"], id.as_str());
    assert!(listed["tokens"][0].get("token").is_none());
    let db = std::fs::read(kiln.data.join("kiln.db")).unwrap_or_default();
    let wal = std::fs::read(kiln.data.join("kiln.db-wal")).unwrap_or_default();
    let needle = secret.as_bytes();
    assert!(!db.windows(needle.len()).any(|w| w == needle));
    assert!(!wal.windows(needle.len()).any(|w| w == needle));

    // Revoked: refused at once; a second revoke is 404.
    assert_eq!(kiln.delete(&format!("/v1/tokens/{id}")).status(), 204);
    expect_error(
        invoke_as(&kiln, &secret, "/v1/functions/logger/invoke"),
        401,
        "unauthorized",
    );
    expect_error(kiln.delete(&format!("/v1/tokens/{id}")), 404, "not_found");
    // The admin token is unaffected.
    assert_eq!(kiln.invoke("echo", "x").status(), 200);
}

#[test]
fn token_requests_are_checked() {
    let kiln = Kiln::start();
    expect_error(
        create(&kiln, &kiln.token, json!({"functions": []})),
        400,
        "invalid_request",
    );
    expect_error(
        create(&kiln, &kiln.token, json!({"functions": ["Bad Name"]})),
        400,
        "invalid_request",
    );
    expect_error(
        create(&kiln, &kiln.token, json!({"function": ["a"]})),
        400,
        "invalid_request",
    );
    expect_error(create(&kiln, "wrong", json!({"functions": ["a"]})), 401, "unauthorized");
    expect_error(kiln.delete("/v1/tokens/admin"), 404, "not_found");
}

#[test]
pub(crate) fn scoped_tokens_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let secret = {
        let kiln = Kiln::start_in(dir.path(), &[]);
        kiln.must_deploy("hello", wat("hello"));
        let created: serde_json::Value = create(&kiln, &kiln.token, json!({"functions": ["hello"]}))
            .json()
            .unwrap();
        created["token"].as_str().unwrap().to_owned()
    };
    let kiln = Kiln::start_in(dir.path(), &[]);
    assert_eq!(invoke_as(&kiln, &secret, "/v1/functions/hello/invoke").status(), 200);
    expect_error(kiln_get_as(&kiln, &secret, "/v1/functions"), 403, "forbidden");
}

fn kiln_get_as(kiln: &Kiln, token: &str, path: &str) -> reqwest::blocking::Response {
    client().get(kiln.url(path)).bearer_auth(token).send().unwrap()
}
