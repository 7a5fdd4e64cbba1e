//! HTTP-trigger functions (`wasi:http/proxy` components at `/fn/{name}/...`): what the guest sees,
//! auth and `public`, limits mapped to 504/502, streamed bodies, and deny-by-default egress.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::json;

use crate::support::{client, component, expect_error, upstream, Kiln};

fn fn_url(kiln: &Kiln, path: &str) -> String {
    kiln.url(&format!("/fn/{path}"))
}

#[test]
fn hello_over_http1_and_h2c_sees_method_path_query_and_headers() {
    let kiln = Kiln::start();
    kiln.must_deploy("hello", component("http-hello"));
    let response = client()
        .post(fn_url(&kiln, "hello/a/b?x=1&y=two"))
        .bearer_auth(&kiln.token)
        .header("x-test", "present")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "gone")
        .body("ignored")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-kiln-version"], "1");
    let body = response.text().unwrap();
    assert!(body.starts_with("hello from wasi:http\n"), "{body}");
    assert!(body.contains("method: POST\n"), "{body}");
    assert!(body.contains("path: /a/b?x=1&y=two\n"), "{body}");
    let headers = body.lines().find_map(|l| l.strip_prefix("headers: ")).unwrap();
    let headers: Vec<&str> = headers.split(',').collect();
    assert!(headers.contains(&"x-test"), "{body}");
    assert!(
        !headers.contains(&"authorization"),
        "the token reached the guest: {body}"
    );
    assert!(
        !headers.contains(&"x-hop"),
        "a hop-by-hop header reached the guest: {body}"
    );

    // The function's root, with and without the trailing slash.
    for path in ["hello", "hello/"] {
        let body = client()
            .get(fn_url(&kiln, path))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert!(body.contains("method: GET\npath: /\n"), "{path}: {body}");
    }

    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .get(fn_url(&kiln, "hello/over/h2?q"))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert!(response.text().unwrap().contains("path: /over/h2?q\n"));

    // The two kinds of function are called at their own routes.
    expect_error(kiln.invoke("hello", ""), 400, "invalid_request");
    kiln.must_deploy("greet", component("greet"));
    expect_error(
        client()
            .get(fn_url(&kiln, "greet/"))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap(),
        400,
        "invalid_request",
    );
}

#[test]
fn a_token_is_required_unless_the_function_is_public() {
    let kiln = Kiln::start();
    kiln.must_deploy("private", component("http-hello"));
    let response = kiln.deploy_with("open", component("http-hello"), json!({"public": true}));
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());

    expect_error(
        client().get(fn_url(&kiln, "private/")).send().unwrap(),
        401,
        "unauthorized",
    );
    expect_error(
        client()
            .get(fn_url(&kiln, "private/"))
            .bearer_auth("wrong")
            .send()
            .unwrap(),
        401,
        "unauthorized",
    );
    let open = client().get(fn_url(&kiln, "open/x")).send().unwrap();
    assert_eq!(open.status(), 200);
    assert!(open.text().unwrap().contains("path: /x\n"));
    // Without a token a missing function is indistinguishable from a private one.
    expect_error(
        client().get(fn_url(&kiln, "missing/")).send().unwrap(),
        401,
        "unauthorized",
    );
    expect_error(
        client()
            .get(fn_url(&kiln, "missing/"))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap(),
        404,
        "not_found",
    );
    expect_error(
        client()
            .get(fn_url(&kiln, "Bad%20Name/"))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap(),
        400,
        "invalid_request",
    );
}

#[test]
fn timeout_is_504_and_a_trap_is_502_with_the_json_body() {
    let kiln = Kiln::start();
    let response = kiln.deploy_with("hello", component("http-hello"), json!({"timeout_ms": 300}));
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());
    let get = |path: &str| {
        client()
            .get(fn_url(&kiln, path))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap()
    };
    expect_error(get("hello/spin"), 504, "timeout");
    let error = expect_error(get("hello/trap"), 502, "function_failed");
    assert!(error["trap"].is_string(), "{error}");
    assert!(error["stderr"].as_str().unwrap().contains("asked to trap"), "{error}");
    // A trap after the response started: the client sees the body cut short, not a complete one.
    let partial = client()
        .get(fn_url(&kiln, "hello/partial"))
        .bearer_auth(&kiln.token)
        .send();
    if let Ok(partial) = partial {
        assert!(partial.text().is_err(), "a body cut short by a trap read as complete");
    }
    // Its status was sent before the trap: the log says what happened.
    assert!(
        kiln.wait_for_log(
            "http trigger failed while streaming its response",
            Duration::from_secs(10)
        ),
        "{}",
        kiln.log()
    );
    // The guest's stderr is in that line, escaped: its own lines (the panic message) never start a
    // line of the server's log.
    assert!(kiln.log().contains("trapped mid-body"), "{}", kiln.log());
    assert!(
        !kiln.log().lines().any(|line| line.starts_with("trapped mid-body")),
        "guest text forged a log line:\n{}",
        kiln.log()
    );
    // The server is still healthy and the function still answers.
    assert_eq!(get("hello/").status(), 200);
    assert_eq!(kiln.metric("kiln_pool_instances_in_use "), 0);
}

#[test]
fn a_guest_whose_client_went_away_still_runs_to_its_end_and_frees_its_instance() {
    let kiln = Kiln::start();
    let response = kiln.deploy_with("hello", component("http-hello"), json!({"timeout_ms": 1000}));
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());
    let address = kiln
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut connection = std::net::TcpStream::connect(&address).unwrap();
    write!(
        connection,
        "GET /fn/hello/spin HTTP/1.1\r\nhost: kiln\r\nauthorization: Bearer {}\r\n\r\n",
        kiln.token
    )
    .unwrap();
    let in_use = || kiln.metric("kiln_pool_instances_in_use ");
    let started = std::time::Instant::now();
    while in_use() != 1 {
        assert!(started.elapsed() < Duration::from_secs(5), "the guest never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(connection);
    // The guest was running inside the request when the client left: it goes on (as a request
    // whose side effects are under way must), holding its instance until its timeout ends it.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(in_use(), 1, "the guest was stopped when its client went away");
    while in_use() != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the instance was never given back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        client()
            .get(fn_url(&kiln, "hello/"))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap()
            .status(),
        200
    );
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn ten_mib_streams_in_and_out_without_the_server_holding_it() {
    let kiln = Kiln::start();
    // A generous timeout: a loaded CI machine streams 10 MiB through a debug build slowly.
    let response = kiln.deploy_with("echo", component("http-echo"), json!({"timeout_ms": 120_000}));
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());
    // Full duplex, as a streaming client must be: one thread writes the body while this one reads
    // the echo (a client that sends everything before reading would deadlock on socket buffers).
    // HTTP/1.0, so the answer is the raw bytes up to the close rather than chunked.
    let roundtrip = |len: usize| {
        let mut stream = std::net::TcpStream::connect(&kiln.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let head = format!(
            "POST /fn/echo/ HTTP/1.0\r\nHost: kiln\r\nAuthorization: Bearer {}\r\nContent-Length: {len}\r\n\r\n",
            kiln.token
        );
        let sender = std::thread::spawn(move || {
            writer.write_all(head.as_bytes()).unwrap();
            let mut chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < len {
                let n = chunk.len().min(len - sent);
                for (i, b) in chunk[..n].iter_mut().enumerate() {
                    *b = ((sent + i) % 251) as u8;
                }
                writer.write_all(&chunk[..n]).unwrap();
                sent += n;
            }
        });
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                stream.read(&mut byte).unwrap(),
                1,
                "connection closed in the response head"
            );
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        let (mut received, mut buf) = (0usize, vec![0u8; 64 * 1024]);
        loop {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, ((received + i) % 251) as u8, "byte {} differs", received + i);
            }
            received += n;
        }
        sender.join().unwrap();
        assert_eq!(received, len);
    };
    // Warm up (first instance, allocator arenas), then measure the peak across a 10 MiB echo.
    roundtrip(1 << 20);
    let before = peak_rss_kib(kiln.pid());
    roundtrip(10 << 20);
    let grown = peak_rss_kib(kiln.pid()).saturating_sub(before);
    assert!(
        grown < 6 * 1024,
        "the server's peak memory grew by {grown} KiB over a 10 MiB echo: the body was buffered"
    );
}

#[test]
fn egress_is_denied_by_default_and_allowed_only_to_listed_public_or_literal_hosts() {
    let kiln = Kiln::start();
    let port = upstream("from upstream");
    let other = upstream("should not be reached");
    let deploy = |name: &str, allowed: serde_json::Value| {
        let response = kiln.deploy_with(name, component("http-fetch"), json!({ "allowed_hosts": allowed }));
        assert_eq!(response.status(), 201, "{}", response.text().unwrap());
    };
    let fetch = |name: &str, url: String| {
        let response = client()
            .post(fn_url(&kiln, &format!("{name}/")))
            .bearer_auth(&kiln.token)
            .body(url)
            .send()
            .unwrap();
        (response.status().as_u16(), response.text().unwrap())
    };
    deploy("listed", json!([format!("http://127.0.0.1:{port}")]));
    deploy("nothing", json!([]));
    deploy("by-name", json!([format!("http://localhost:{port}")]));

    let (status, body) = fetch("listed", format!("http://127.0.0.1:{port}/x"));
    assert_eq!((status, body.as_str()), (200, "upstream 200\nfrom upstream"));

    let (status, body) = fetch("nothing", format!("http://127.0.0.1:{port}/x"));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");

    // Another port on the same host is another destination.
    let (status, body) = fetch("listed", format!("http://127.0.0.1:{other}/"));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    let (status, body) = fetch("listed", format!("https://127.0.0.1:{port}/"));
    assert!(status == 502 && body.contains("HttpRequestDenied"), "{body}");

    // A name that resolves to a loopback address is refused even when listed: only a literal
    // address entry reaches an internal one.
    let (status, body) = fetch("by-name", format!("http://localhost:{port}/"));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("DestinationIpProhibited"), "{body}");

    // A bad entry is refused at deploy.
    let response = kiln.deploy_with(
        "bad",
        component("http-fetch"),
        json!({"allowed_hosts": ["https://a.com/path"]}),
    );
    expect_error(response, 400, "invalid_request");
}
