//! The web console (`/ui/`) in a real browser: `runtime/console/tests/browser.mjs` drives Debian's
//! Chromium with playwright-core against this Kiln and checks every page with axe-core (see that
//! script for the steps). Screenshots are left in `target/console-screenshots/`; with
//! `KILN_DOCS_SCREENSHOTS=1` the README's three are also written to `docs/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{client, component, guests_dir, Kiln};

/// What the browser test needs beyond Kiln, or why it cannot run here.
fn browser_tools(console: &Path) -> Result<PathBuf, String> {
    let chromium = std::env::var_os("KILN_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return Err(format!(
            "{} is missing (runtime/scripts/setup.sh installs Debian's chromium)",
            chromium.display()
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is not on the PATH".into());
    }
    for package in ["playwright-core", "axe-core"] {
        if !console.join("node_modules").join(package).join("package.json").exists() {
            return Err(format!(
                "{package} is not installed in runtime/console/node_modules (runtime/scripts/setup.sh runs npm ci there)"
            ));
        }
    }
    Ok(chromium)
}

#[test]
fn the_console_deploys_invokes_and_revokes_a_token_in_a_browser() {
    const TEST: &str = "console::the_console_deploys_invokes_and_revokes_a_token_in_a_browser";
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let console = root.join("runtime/console");
    let chromium = match browser_tools(&console) {
        Ok(chromium) => chromium,
        Err(reason) => return kiln_testkit::skip(TEST, &reason),
    };
    let kiln = Kiln::start();
    // What the sandboxes page makes sandboxes of (deployed by the browser test when it gets there):
    // a component that counts requests.
    let counter = kiln.data.join("http-counter.wasm");
    std::fs::write(&counter, component("http-counter")).unwrap();
    // The link `kiln ui` prints is what the browser signs in with.
    let ui = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("ui")
        .env("KILN_URL", kiln.url(""))
        .env("KILN_DATA", &kiln.data)
        .env_remove("KILN_TOKEN")
        .output()
        .unwrap();
    assert!(ui.status.success(), "{}", String::from_utf8_lossy(&ui.stderr));
    let link = String::from_utf8(ui.stdout).unwrap().trim().to_owned();
    assert!(link.starts_with(&kiln.url("/ui/#token=")), "{link}");
    let screenshots = root.join("target/console-screenshots");
    let mut node = Command::new("node");
    node.arg(console.join("tests/browser.mjs"))
        .current_dir(&console)
        .env("KILN_URL", kiln.url(""))
        .env("KILN_TOKEN", &kiln.token)
        .env("KILN_UI_LINK", &link)
        .env("KILN_FUNCTION_FILE", guests_dir().join("wat/logger.wat"))
        .env("KILN_SANDBOX_COMPONENT", &counter)
        .env("KILN_CHROMIUM", &chromium)
        .env("KILN_SCREENSHOTS", &screenshots);
    if std::env::var_os("KILN_DOCS_SCREENSHOTS").is_some() {
        node.env("KILN_DOCS_SCREENSHOTS", root.join("docs"));
    }
    let output = node.output().expect("running node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{}\nthe server's log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        crate::microvm::tail(&kiln.log(), 4000)
    );
    assert!(stdout.contains("browser: passed"), "{stdout}");
    for shot in ["console-functions", "console-invocation", "console-metrics"] {
        assert!(screenshots.join(format!("{shot}.png")).exists(), "no screenshot {shot}");
    }
}

/// What the browser cannot see for itself: the console's files come with a strict CSP, a type, and
/// an ETag that a revalidation answers with 304; `/ui` leads to `/ui/`; a missing file is 404.
#[test]
fn the_console_is_served_from_the_binary_with_a_strict_policy() {
    let kiln = Kiln::start();
    let http = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let redirect = http.get(kiln.url("/ui")).send().unwrap();
    assert_eq!(redirect.status(), 308);
    assert_eq!(redirect.headers()["location"], "/ui/");

    let page = client().get(kiln.url("/ui/")).send().unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in ["default-src 'none'", "script-src 'self'", "frame-ancestors 'none'"] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(headers["cache-control"], "no-cache");
    assert!(page
        .text()
        .unwrap()
        .contains("<script type=\"module\" src=\"/ui/app.js\">"));

    let script = client().get(kiln.url("/ui/app.js")).send().unwrap();
    assert_eq!(script.headers()["content-type"], "text/javascript; charset=utf-8");
    let etag = script.headers()["etag"].clone();
    let again = client()
        .get(kiln.url("/ui/app.js"))
        .header("if-none-match", etag)
        .send()
        .unwrap();
    assert_eq!(again.status(), 304);

    crate::support::expect_error(
        client().get(kiln.url("/ui/secret.txt")).send().unwrap(),
        404,
        "not_found",
    );
    let post = client().post(kiln.url("/ui/")).send().unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET");
}

fn get_json(kiln: &Kiln, token: &str, path: &str) -> serde_json::Value {
    let response = client().get(kiln.url(path)).bearer_auth(token).send().unwrap();
    let status = response.status();
    let body = response.text().unwrap();
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn ids(page: &serde_json::Value) -> Vec<String> {
    page["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

/// `GET /v1/invocations`, which the console's list reads: sync and async, the quiet successes
/// that leave no log included, newest first, filtered, paged, and a scoped token's own only.
#[test]
pub(crate) fn invocations_are_listed_sync_and_async_newest_first() {
    let kiln = Kiln::start();
    kiln.must_deploy("echo", crate::support::wat("echo"));
    kiln.must_deploy("logger", crate::support::wat("logger"));
    kiln.must_deploy("bad", crate::support::wat("exit3"));
    let id =
        |response: reqwest::blocking::Response| response.headers()["x-kiln-invocation-id"].to_str().unwrap().to_owned();
    let quiet = id(kiln.invoke("echo", "hi"));
    let logged = id(kiln.invoke("logger", "hi"));
    let failed = id(kiln.invoke("bad", ""));
    let submitted: serde_json::Value = kiln
        .invoke_path("/v1/functions/logger/invoke-async", "later")
        .json()
        .unwrap();
    let queued = submitted["id"].as_str().unwrap().to_owned();
    crate::support::wait_done(&kiln, &queued, std::time::Duration::from_secs(30));

    // Sync logs reach the store a moment after the answer: wait for the list to have them.
    let mut page = serde_json::Value::Null;
    crate::support::wait_until("the list has all four", std::time::Duration::from_secs(10), || {
        page = get_json(&kiln, &kiln.token, "/v1/invocations");
        ids(&page).len() == 4
    });
    assert_eq!(
        ids(&page),
        [queued.as_str(), failed.as_str(), logged.as_str(), quiet.as_str()],
        "newest first: {page}"
    );
    let by_id = |id: &str| {
        page["invocations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()
            .clone()
    };
    let quiet_line = by_id(&quiet);
    assert_eq!(
        (quiet_line["mode"].as_str(), quiet_line["state"].as_str()),
        (Some("sync"), Some("succeeded"))
    );
    assert!(quiet_line.get("logs_url").is_none(), "no log is kept: {quiet_line}");
    assert_eq!(by_id(&failed)["state"], "failed");
    assert_eq!(by_id(&failed)["outcome"], "failed");
    let logged_line = by_id(&logged);
    assert_eq!(logged_line["logs_url"], format!("/v1/invocations/{logged}/logs"));
    let async_line = by_id(&queued);
    assert_eq!(
        (async_line["mode"].as_str(), async_line["state"].as_str()),
        (Some("async"), Some("succeeded"))
    );
    assert_eq!(async_line["status_url"], format!("/v1/invocations/{queued}"));
    assert_eq!(async_line["attempts"], 1);
    assert!(async_line["created_at"].as_str().unwrap().ends_with('Z'));

    assert_eq!(
        ids(&get_json(&kiln, &kiln.token, "/v1/invocations?function=logger")),
        [queued.as_str(), logged.as_str()]
    );
    assert_eq!(
        ids(&get_json(&kiln, &kiln.token, "/v1/invocations?state=failed")),
        [failed.as_str()]
    );
    let first = get_json(&kiln, &kiln.token, "/v1/invocations?limit=3");
    assert_eq!(ids(&first), [queued.as_str(), failed.as_str(), logged.as_str()]);
    let next = first["next_before"].as_str().unwrap();
    let second = get_json(&kiln, &kiln.token, &format!("/v1/invocations?limit=3&before={next}"));
    assert_eq!(ids(&second), [quiet.as_str()]);
    assert!(second.get("next_before").is_none());

    let token: serde_json::Value = client()
        .post(kiln.url("/v1/tokens"))
        .bearer_auth(&kiln.token)
        .json(&serde_json::json!({"functions": ["logger"]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let scoped = token["token"].as_str().unwrap();
    assert_eq!(
        ids(&get_json(&kiln, scoped, "/v1/invocations")),
        [queued.as_str(), logged.as_str()]
    );
    assert!(ids(&get_json(&kiln, scoped, "/v1/invocations?function=echo")).is_empty());

    for bad in ["state=done", "limit=0", "before=nope", "function=Echo", "fn=echo"] {
        let response = client()
            .get(kiln.url(&format!("/v1/invocations?{bad}")))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap();
        crate::support::expect_error(response, 400, "invalid_request");
    }
}

/// `GET /v1/metrics`, which the console's metrics page reads: the last hour per function, with
/// error rates and quantiles, and a scoped token's functions only.
#[test]
fn the_last_hour_per_function_is_served_as_json() {
    let kiln = Kiln::start();
    kiln.must_deploy("echo", crate::support::wat("echo"));
    kiln.must_deploy("bad", crate::support::wat("exit3"));
    for _ in 0..3 {
        assert_eq!(kiln.invoke("echo", "x").status(), 200);
    }
    assert_eq!(kiln.invoke("bad", "").status(), 502);

    let stats = get_json(&kiln, &kiln.token, "/v1/metrics");
    assert_eq!(stats["bucket_s"], 60);
    let functions = stats["functions"].as_array().unwrap();
    let names: Vec<&str> = functions.iter().map(|f| f["function"].as_str().unwrap()).collect();
    assert_eq!(names, ["bad", "echo"]);
    let (bad, echo) = (&functions[0], &functions[1]);
    assert_eq!(echo["hour"]["invocations"], 3);
    assert_eq!(echo["hour"]["errors"], 0);
    assert_eq!(echo["hour"]["error_rate"], 0.0);
    let (p50, p99) = (
        echo["hour"]["p50_ms"].as_f64().unwrap(),
        echo["hour"]["p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 < 10_000.0, "{echo}");
    assert!(
        (echo["rate_per_s"].as_f64().unwrap() - 3.0 / 3600.0).abs() < 1e-9,
        "{echo}"
    );
    assert_eq!(bad["hour"]["errors"], 1);
    assert_eq!(bad["hour"]["error_rate"], 1.0);
    let minutes = echo["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    // The current minute is the last; an invocation near a minute's end may be in the one before.
    let recent: u64 = minutes[58..].iter().map(|m| m["invocations"].as_u64().unwrap()).sum();
    assert_eq!(recent, 3, "{echo}");
    assert!(
        minutes[0].get("p50_ms").is_none(),
        "a minute without invocations has no quantiles"
    );

    let only = get_json(&kiln, &kiln.token, "/v1/metrics?function=bad");
    assert_eq!(only["functions"].as_array().unwrap().len(), 1);
    let token: serde_json::Value = client()
        .post(kiln.url("/v1/tokens"))
        .bearer_auth(&kiln.token)
        .json(&serde_json::json!({"functions": ["echo"]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let scoped = get_json(&kiln, token["token"].as_str().unwrap(), "/v1/metrics");
    let names: Vec<&str> = scoped["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo"]);
}
