//! Egress connectors: named policies made by the admin, referenced by functions and sandboxes,
//! deletable only when nothing live uses them.

use reqwest::blocking::Response;
use serde_json::{json, Value};

use crate::support::{client, component, expect_error, upstream, Kiln};

fn post(kiln: &Kiln, path: &str, token: &str, body: Value) -> Response {
    client()
        .post(kiln.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .unwrap()
}

/// What `http-fetch` answers when asked to fetch `url` through `/fn/<name>/` or a sandbox's
/// ingress (`/sbx/<id>/`).
fn fetch(kiln: &Kiln, path: &str, url: &str) -> (u16, String) {
    let response = client()
        .post(kiln.url(path))
        .bearer_auth(&kiln.token)
        .body(url.to_owned())
        .send()
        .unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

fn denied(answer: &(u16, String), why: &str) -> bool {
    answer.0 == 502 && answer.1.contains(why)
}

#[test]
pub(crate) fn connectors_are_made_used_and_deleted_only_once_nothing_uses_them() {
    let mut kiln = Kiln::start();
    let port = upstream("from upstream");
    let other = upstream("should not be reached");
    let token = kiln.token.clone();
    let spec = json!({
        "name": "loopback", "allowed_hosts": [format!("http://localhost:{port}")],
        "allow_private": ["127.0.0.0/8", "::1/128"], "udp": false,
    });
    let response = post(&kiln, "/v1/connectors", &token, spec.clone());
    assert_eq!(response.status(), 201);
    let made: Value = response.json().unwrap();
    assert_eq!(made["name"], "loopback");
    assert_eq!(made["allow_private"], json!(["127.0.0.0/8", "::1/128"]));
    assert_eq!(made["used_by"], json!([]));
    assert!(made["created_at"].as_str().is_some_and(|t| t.len() >= 20), "{made}");
    // A name is taken for good; bad specs say what is wrong.
    expect_error(post(&kiln, "/v1/connectors", &token, spec), 409, "conflict");
    for (bad, why) in [
        (json!({"name": "x", "allow_private": ["10.0.0.7/8"]}), "host bits"),
        (
            json!({"name": "x", "allow_private": ["8.8.8.0/24"]}),
            "not a private range",
        ),
        (
            json!({"name": "x", "allowed_hosts": ["ftp://a"]}),
            "http:// or https://",
        ),
        (json!({"name": "Not A Name"}), "connector name"),
        (json!({"name": "x", "bogus": true}), "unknown field"),
    ] {
        let error = expect_error(post(&kiln, "/v1/connectors", &token, bad), 400, "invalid_request");
        assert!(error["message"].as_str().unwrap().contains(why), "{why}: {error}");
    }

    // Without the connector, a listed name that resolves to loopback is refused; through it, the
    // same name reaches the server, and nothing else does.
    let deploy = |name: &str, config: Value| {
        let response = kiln.deploy_with(name, component("http-fetch"), config);
        assert_eq!(response.status(), 201, "{}", response.text().unwrap());
    };
    deploy("plain", json!({"allowed_hosts": [format!("http://localhost:{port}")]}));
    deploy("via", json!({"connectors": ["loopback"]}));
    let url = format!("http://localhost:{port}/x");
    assert!(denied(&fetch(&kiln, "/fn/plain/", &url), "DestinationIpProhibited"));
    assert_eq!(
        fetch(&kiln, "/fn/via/", &url),
        (200, "upstream 200\nfrom upstream".into())
    );
    let elsewhere = fetch(&kiln, "/fn/via/", &format!("http://localhost:{other}/"));
    assert!(denied(&elsewhere, "HttpRequestDenied"), "{elsewhere:?}");
    let literal = fetch(&kiln, "/fn/via/", &format!("http://127.0.0.1:{port}/"));
    assert!(denied(&literal, "HttpRequestDenied"), "{literal:?}");
    let error = expect_error(
        kiln.deploy_with("ghost", component("http-fetch"), json!({"connectors": ["nope"]})),
        400,
        "invalid_request",
    );
    assert!(
        error["message"].as_str().unwrap().contains("no connector named `nope`"),
        "{error}"
    );
    expect_error(kiln.get("/v1/functions/ghost"), 404, "not_found");

    // A sandbox's own connectors add to its function's policy.
    let sandbox = |body: Value| -> String {
        let response = post(&kiln, "/v1/sandboxes", &token, body);
        let status = response.status();
        let record: Value = response.json().unwrap();
        assert_eq!(status, 201, "{record}");
        record["id"].as_str().unwrap().to_owned()
    };
    let with = sandbox(json!({"function": "plain", "connectors": ["loopback"]}));
    let without = sandbox(json!({"function": "plain"}));
    assert_eq!(
        fetch(&kiln, &format!("/sbx/{with}/"), &url),
        (200, "upstream 200\nfrom upstream".into())
    );
    assert!(denied(
        &fetch(&kiln, &format!("/sbx/{without}/"), &url),
        "DestinationIpProhibited"
    ));
    // A fork keeps them.
    let response = post(
        &kiln,
        &format!("/v1/sandboxes/{with}/fork"),
        &token,
        json!({"count": 1}),
    );
    assert_eq!(response.status(), 201);
    let fork = response.json::<Value>().unwrap()["sandboxes"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        fetch(&kiln, &format!("/sbx/{fork}/"), &url),
        (200, "upstream 200\nfrom upstream".into())
    );
    assert_eq!(kiln.delete(&format!("/v1/sandboxes/{fork}")).status(), 200);
    let error = expect_error(
        post(
            &kiln,
            "/v1/sandboxes",
            &token,
            json!({"function": "plain", "connectors": ["nope"]}),
        ),
        400,
        "invalid_request",
    );
    assert!(error["message"].as_str().unwrap().contains("nope"), "{error}");

    // In use by a version and a sandbox: 409, saying by what.
    let record: Value = kiln.get("/v1/connectors/loopback").json().unwrap();
    assert_eq!(
        record["used_by"],
        json!([{"function": "via", "version": 1}, {"sandbox": with}])
    );
    let listed: Value = kiln.get("/v1/connectors").json().unwrap();
    assert_eq!(listed["connectors"][0]["name"], "loopback");
    let error = expect_error(kiln.delete("/v1/connectors/loopback"), 409, "conflict");
    assert_eq!(error["used_by"].as_array().unwrap().len(), 2, "{error}");

    // Connectors and their uses outlive a restart.
    let data = kiln.data.clone();
    kiln.terminate();
    let kiln = Kiln::start_in(&data, &[]);
    assert_eq!(
        fetch(&kiln, "/fn/via/", &url),
        (200, "upstream 200\nfrom upstream".into())
    );
    expect_error(kiln.delete("/v1/connectors/loopback"), 409, "conflict");
    // Once the function is gone and the sandbox terminated, the connector may go.
    assert_eq!(kiln.delete("/v1/functions/via").status(), 204);
    let error = expect_error(kiln.delete("/v1/connectors/loopback"), 409, "conflict");
    assert_eq!(error["used_by"], json!([{"sandbox": with}]));
    assert_eq!(kiln.delete(&format!("/v1/sandboxes/{with}")).status(), 200);
    assert_eq!(kiln.delete("/v1/connectors/loopback").status(), 204);
    expect_error(kiln.get("/v1/connectors/loopback"), 404, "not_found");
    expect_error(kiln.delete("/v1/connectors/loopback"), 404, "not_found");
}

#[test]
fn only_the_admin_manages_connectors_and_a_scoped_token_names_only_existing_ones() {
    let kiln = Kiln::start();
    let token = kiln.token.clone();
    let response = kiln.deploy_with("web", component("http-fetch"), json!({}));
    assert_eq!(response.status(), 201);
    let response = post(&kiln, "/v1/tokens", &token, json!({"functions": ["web"]}));
    assert_eq!(response.status(), 201);
    let scoped = response.json::<Value>().unwrap()["token"].as_str().unwrap().to_owned();
    let spec = json!({"name": "api", "allowed_hosts": ["https://api.example.com"]});
    expect_error(post(&kiln, "/v1/connectors", &scoped, spec.clone()), 403, "forbidden");
    assert_eq!(post(&kiln, "/v1/connectors", &token, spec).status(), 201);
    for (method, path) in [
        ("GET", "/v1/connectors"),
        ("GET", "/v1/connectors/api"),
        ("DELETE", "/v1/connectors/api"),
    ] {
        let response = client()
            .request(method.parse().unwrap(), kiln.url(path))
            .bearer_auth(&scoped)
            .send()
            .unwrap();
        expect_error(response, 403, "forbidden");
    }
    expect_error(
        post(
            &kiln,
            "/v1/sandboxes",
            &scoped,
            json!({"function": "web", "connectors": ["missing"]}),
        ),
        400,
        "invalid_request",
    );
    let response = post(
        &kiln,
        "/v1/sandboxes",
        &scoped,
        json!({"function": "web", "connectors": ["api"]}),
    );
    assert_eq!(response.status(), 201);
    // Without a token nothing is said about connectors at all.
    expect_error(
        client().get(kiln.url("/v1/connectors")).send().unwrap(),
        401,
        "unauthorized",
    );
    expect_error(
        client()
            .put(kiln.url("/v1/connectors"))
            .bearer_auth(&token)
            .send()
            .unwrap(),
        405,
        "method_not_allowed",
    );
}
