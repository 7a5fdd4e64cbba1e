//! Inside a microVM sandbox, end to end on Kiln's VMM (run within the nested boot of
//! `microvm::native_functions_deploy_and_invoke_on_kilns_vmm_where_hardware_virtualization_exists`):
//! a busybox image deployed, its server started and its ready hook run before the snapshot; exec
//! buffered and streamed, a shell on a pty over a websocket, files both ways, `busybox httpd`
//! through ingress, the restore, suspend and terminate hooks, the guest's network and identity
//! (and both after a resume and in a fork), and a snapshot rebuilt where the CPU key differs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

use crate::support::{busybox_rootfs, Kiln};

/// The guest's network, as a program that knows nothing of Kiln uses it: plain `busybox wget`
/// reaches the one host server its connector allows and is refused at once elsewhere; UDP leaves
/// only for the connector's (`"udp": true`) host and port, and its answers come back; names
/// resolve only through Kiln (10.0.2.3), under the same policy.
fn network(
    kiln: &Kiln,
    exec: &dyn Fn(&[&str]) -> serde_json::Value,
    allowed: u16,
    denied: u16,
    udp: &std::net::UdpSocket,
    udp_echo: u16,
) {
    let fetched = exec(&[
        "busybox",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://10.0.2.2:{allowed}/"),
    ]);
    if fetched["exit_code"] != 0 {
        let state = exec(&[
            "sh",
            "-c",
            "busybox ip addr; busybox ip route; ls -la /kiln/modules /dev/net; cat /proc/modules; busybox dmesg | busybox tail -8",
        ]);
        panic!(
            "wget to the allowed server failed: {fetched}\nthe guest's network: {}{}\nkiln's log: {}",
            state["stdout"],
            state["stderr"],
            crate::microvm::tail(&kiln.log(), 4000)
        );
    }
    assert_eq!(fetched["stdout"], "from the host", "{fetched}");
    let started = Instant::now();
    let refused = exec(&[
        "busybox",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://10.0.2.2:{denied}/"),
    ]);
    assert_ne!(refused["exit_code"], 0, "{refused}");
    assert!(refused["stderr"].as_str().unwrap().contains("refused"), "{refused}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a denied connect must fail fast"
    );
    // busybox's `nc` has no UDP; its `nslookup` sends datagrams to any server and port.
    let port = udp.local_addr().unwrap().port();
    let sent = exec(&[
        "sh",
        "-c",
        &format!("busybox timeout 10 busybox nslookup leak.example 10.0.2.2:{port}; echo sent"),
    ]);
    assert!(sent["stdout"].as_str().unwrap().contains("sent"), "{sent}");
    assert!(
        !sent["stdout"].as_str().unwrap().contains("NXDOMAIN"),
        "an answer came back: {sent}"
    );
    udp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 64];
    assert!(udp.recv_from(&mut buf).is_err(), "a datagram left the guest");
    // To the connector's UDP entry it goes, and the answer (the test server's NXDOMAIN) returns.
    let answered = exec(&[
        "sh",
        "-c",
        &format!("busybox timeout 20 busybox nslookup through.example 10.0.2.2:{udp_echo}; true"),
    ]);
    assert!(
        answered["stdout"].as_str().unwrap().contains("NXDOMAIN"),
        "UDP through the connector: {answered}"
    );
    // The agent loaded the network's module and then closed module loading for good.
    let disabled = exec(&["cat", "/proc/sys/kernel/modules_disabled"]);
    assert_eq!(disabled["stdout"], "1\n", "{disabled}");
    let resolv = exec(&["cat", "/etc/resolv.conf"]);
    assert_eq!(resolv["stdout"], "nameserver 10.0.2.3\n", "{resolv}");
    let lookup = exec(&["busybox", "nslookup", "blocked.example"]);
    assert_ne!(lookup["exit_code"], 0, "{lookup}");
    let said = format!("{}{}", lookup["stdout"], lookup["stderr"]);
    assert!(said.contains("10.0.2.3"), "the answer is Kiln's: {said}");
}

/// The claims of a token the guest fetched from `http://kiln.internal/identity` (by name, through
/// Kiln's DNS) with plain `busybox wget`, verified against the JWKS with `jsonwebtoken`, with every
/// claim checked against what the sandbox is.
fn identity(kiln: &Kiln, exec: &dyn Fn(&[&str]) -> serde_json::Value, sandbox: &str, digest: &str) {
    let url = crate::identity::identity_url(crate::identity::AUDIENCE, "&ttl=600");
    let fetched = exec(&["busybox", "wget", "-q", "-O", "-", &url]);
    assert_eq!(fetched["exit_code"], 0, "{fetched}");
    let answer: serde_json::Value = serde_json::from_str(fetched["stdout"].as_str().unwrap()).unwrap();
    let token = answer["token"].as_str().unwrap();
    let claims = crate::identity::verify(kiln, &kiln.url(""), token, crate::identity::AUDIENCE)
        .unwrap_or_else(|e| panic!("the guest's token does not verify: {e:?}"));
    assert_eq!(claims["sub"], format!("sandbox:{sandbox}"), "{claims}");
    assert_eq!(
        (
            claims["function"].as_str(),
            claims["version"].as_u64(),
            claims["digest"].as_str()
        ),
        (Some("busybox"), Some(1), Some(digest)),
        "{claims}"
    );
    let (issued, expires) = (claims["iat"].as_u64().unwrap(), claims["exp"].as_u64().unwrap());
    assert_eq!(expires - issued, 600, "{claims}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(issued.abs_diff(now) < 120, "iat {issued}, now {now}");
    // Only port 80 of kiln.internal is Kiln's; a bad request is the API's error.
    let other = exec(&["busybox", "wget", "-q", "-O", "-", "http://kiln.internal:8080/identity"]);
    assert!(other["stderr"].as_str().unwrap().contains("refused"), "{other}");
    let bad = exec(&["sh", "-c", "busybox wget -O - http://kiln.internal/identity 2>&1; true"]);
    assert!(bad["stdout"].as_str().unwrap().contains("400"), "{bad}");
}

/// A connection the guest opened before a suspend does not survive it: the host's end closes
/// when the VM stops, a resume opens no connection again, and the guest's next send on the old
/// one is reset. `held` is a host listener its connector allows; the guest holds a `busybox nc`
/// to it, fed from a FIFO.
fn hold_connection(exec: &dyn Fn(&[&str]) -> serde_json::Value, held: &std::net::TcpListener) -> TcpStream {
    let port = held.local_addr().unwrap().port();
    let script = format!(
        "mkfifo /tmp/in\n\
         busybox sleep 600 > /tmp/in 2>/dev/null < /dev/null &\n\
         (busybox nc 10.0.2.2 {port} < /tmp/in > /dev/null 2>&1; echo ended $? > /tmp/held) > /dev/null 2>&1 < /dev/null &\n\
         echo started"
    );
    let started = exec(&["sh", "-c", &script]);
    assert_eq!(started["stdout"], "started\n", "{started}");
    held.set_nonblocking(false).unwrap();
    let (mut stream, _) = held.accept().unwrap();
    // Both ends live: a byte from the host reaches the guest's nc, and it has not ended.
    stream.write_all(b"x").unwrap();
    let alive = exec(&[
        "sh",
        "-c",
        "busybox sleep 1; test -e /tmp/held && cat /tmp/held || echo alive",
    ]);
    assert_eq!(alive["stdout"], "alive\n", "{alive}");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    held.set_nonblocking(true).unwrap();
    stream
}

fn connection_was_reset(
    exec: &dyn Fn(&[&str]) -> serde_json::Value,
    held: &std::net::TcpListener,
    mut host_end: TcpStream,
) {
    match host_end.read(&mut [0u8; 16]) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the host's end of a suspended guest's connection is still open: {other:?}"),
    }
    // Read-write, so the open never waits for a reader: `nc` may have ended already.
    let wrote = exec(&["sh", "-c", "echo hello 1<>/tmp/in; echo wrote"]);
    assert_eq!(wrote["stdout"], "wrote\n", "{wrote}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ended = exec(&["sh", "-c", "cat /tmp/held 2>/dev/null; true"]);
        if ended["stdout"].as_str().unwrap().starts_with("ended") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's old connection was not reset after the resume"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    match held.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a resume opened a connection again: {other:?}"),
    }
}

/// The busybox image of these tests: `httpd` serving `/www` on 8080, every hook marking `/marks`.
fn image() -> Vec<u8> {
    let hook = |name: &str| format!("#!/bin/sh\necho {name} >> /marks\necho hook {name} ran\n").into_bytes();
    let (ready, restore, suspend, terminate) = (hook("ready"), hook("restore"), hook("suspend"), hook("terminate"));
    busybox_rootfs(&[
        ("www/index.html", 0o644, b"served by busybox httpd\n"),
        ("kiln/hooks/ready", 0o755, &ready[..]),
        ("kiln/hooks/restore", 0o755, &restore[..]),
        ("kiln/hooks/suspend", 0o755, &suspend[..]),
        ("kiln/hooks/terminate", 0o755, &terminate[..]),
    ])
}

pub fn images_exec_shell_files_and_hooks(kiln: Kiln, data: &Path, args: &[&str]) -> Kiln {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let config = json!({
        "tier": "microvm", "memory_mb": 256, "timeout_ms": 120000,
        "entrypoint": ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    });
    // An image whose ready hook fails is refused with the hook's output; nothing is stored.
    let failing = busybox_rootfs(&[("kiln/hooks/ready", 0o755, b"#!/bin/sh\necho not ready today\nexit 4\n")]);
    let response = crate::microvm::deploy_booting(&kiln, "notready", failing, &config);
    let error = crate::support::expect_error(response, 422, "invalid_code");
    assert!(
        error["message"].as_str().unwrap().contains("not ready today"),
        "{error}"
    );
    crate::support::expect_error(kiln.get("/v1/functions/notready"), 404, "not_found");

    let started = Instant::now();
    let response = crate::microvm::deploy_booting(&kiln, "busybox", image(), &config);
    let status = response.status();
    let body: serde_json::Value = response.json().unwrap();
    assert_eq!(status, 201, "{body}\n{}", crate::microvm::tail(&kiln.log(), 6000));
    assert_eq!(body["kind"], "image", "{body}");
    let digest = body["digest"].as_str().unwrap().to_owned();
    eprintln!(
        "busybox image deployed (boot, ready hook, snapshot) in {:?}",
        started.elapsed()
    );

    let post = |kiln: &Kiln, path: &str, body: serde_json::Value| {
        http.post(kiln.url(path))
            .bearer_auth(&kiln.token)
            .json(&body)
            .send()
            .unwrap()
    };
    // Its network may reach one server of the host: the test's own, on loopback, named literally
    // by a connector (the guest reaches the host's loopback through its gateway, 10.0.2.2).
    let upstream = crate::support::upstream("from the host");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let denied_port = closed.local_addr().unwrap().port();
    drop(closed);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_port = held.local_addr().unwrap().port();
    let udp_echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_echo_port = udp_echo.local_addr().unwrap().port();
    // Answers every DNS query NXDOMAIN: something busybox in the guest can send and understand.
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp_echo.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            buf[2] |= 0x80;
            buf[3] = (buf[3] & 0xf0) | 3;
            let _ = udp_echo.send_to(&buf[..n], from);
        }
    });
    let connector = json!({"name": "host-web", "udp": true, "allowed_hosts": [
        format!("http://127.0.0.1:{upstream}"),
        format!("http://127.0.0.1:{held_port}"),
        format!("http://127.0.0.1:{udp_echo_port}"),
    ]});
    assert_eq!(post(&kiln, "/v1/connectors", connector).status(), 201);
    let response = post(
        &kiln,
        "/v1/sandboxes",
        json!({"function": "busybox", "connectors": ["host-web"]}),
    );
    let status = response.status();
    let sandbox: serde_json::Value = response.json().unwrap();
    assert_eq!(status, 201, "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let exec = |argv: &[&str]| -> serde_json::Value {
        let response = post(&kiln, &format!("/v1/sandboxes/{id}/exec"), json!({ "argv": argv }));
        let status = response.status();
        let body: serde_json::Value = response.json().unwrap();
        assert_eq!(
            status,
            200,
            "exec {argv:?}: {body}\n{}",
            crate::microvm::tail(&kiln.log(), 4000)
        );
        body
    };

    // Buffered exec: both streams and the exit code.
    let result = exec(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(
        (
            result["stdout"].as_str(),
            result["stderr"].as_str(),
            result["exit_code"].as_i64()
        ),
        (Some("out\n"), Some("err\n"), Some(3)),
        "{result}"
    );
    // stdin, env and cwd reach the process; a missing program is 127, as a shell says.
    let response = post(
        &kiln,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"argv": ["sh", "-c", "cat; echo \" $NAME $(pwd)\""], "stdin": "piped", "env": {"NAME": "kiln"}, "cwd": "/www"}),
    );
    let body: serde_json::Value = response.json().unwrap();
    assert_eq!(body["stdout"], "piped kiln /www\n", "{body}");
    assert_eq!(exec(&["/no/such/program"])["exit_code"], 127);
    // A timeout kills it and says so.
    let response = post(
        &kiln,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"argv": ["sleep", "60"], "timeout_ms": 1000}),
    );
    let body: serde_json::Value = response.json().unwrap();
    assert_eq!(
        (body["timed_out"].as_bool(), body["exit_code"].as_i64()),
        (Some(true), Some(137)),
        "{body}"
    );

    // The ready hook ran once at the build; the restore hook once when the sandbox started.
    assert_eq!(exec(&["cat", "/marks"])["stdout"], "ready\nrestore\n");

    network(&kiln, &exec, upstream, denied_port, &udp, udp_echo_port);
    identity(&kiln, &exec, &id, &digest);

    // A streamed exec of 10 MiB arrives whole and in order: random bytes made in the guest
    // (cheap to make there, unlike 10 MiB of text under nested emulation), streamed as SSE, and
    // compared with the guest's own SHA-256 of them.
    let size = 10 << 20;
    let made = exec(&["sh", "-c", &format!("head -c {size} /dev/urandom > /tmp/big")]);
    assert_eq!(made["exit_code"], 0, "{made}");
    let started = Instant::now();
    let response = http
        .post(kiln.url(&format!("/v1/sandboxes/{id}/exec")))
        .bearer_auth(&kiln.token)
        .header("accept", "text/event-stream")
        .json(&json!({"argv": ["cat", "/tmp/big"], "timeout_ms": 600000}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let (stdout, stderr, exit) = read_events(&kiln, response);
    assert_eq!(stdout.len(), size, "streamed stdout length");
    assert!(stderr.is_empty());
    assert_eq!(exit["exit_code"], 0, "{exit}");
    eprintln!("streamed {} MiB through exec in {:?}", size >> 20, started.elapsed());
    let theirs = exec(&["busybox", "sha256sum", "/tmp/big"]);
    let ours = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&stdout))
    };
    assert!(
        theirs["stdout"].as_str().unwrap().starts_with(&ours),
        "the streamed bytes differ from the file: {theirs}"
    );

    // A shell on a pty: its size, its terminal, arithmetic, a resize, and its exit code.
    shell_session(&kiln, &id);

    // A file round-trips byte for byte, with its mode; a missing one is 404.
    let blob: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let response = http
        .put(kiln.url(&format!("/v1/sandboxes/{id}/files?path=/data/blob.bin&mode=0600")))
        .bearer_auth(&kiln.token)
        .body(blob.clone())
        .send()
        .unwrap();
    let status = response.status();
    assert_eq!(
        status,
        200,
        "{}\n{}",
        response.text().unwrap(),
        crate::microvm::tail(&kiln.log(), 8000)
    );
    let response = http
        .get(kiln.url(&format!("/v1/sandboxes/{id}/files?path=/data/blob.bin")))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let back = response.bytes().unwrap().to_vec();
    let sha = |bytes: &[u8]| {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(bytes))
    };
    let written = exec(&["busybox", "sha256sum", "/data/blob.bin"]);
    assert!(
        written["stdout"].as_str().unwrap().starts_with(&sha(&blob)),
        "the file written differs from what was sent: {written}"
    );
    assert!(
        back == blob,
        "the file read back differs: {} bytes, {} sent; first difference at {:?}",
        back.len(),
        blob.len(),
        back.iter().zip(&blob).position(|(a, b)| a != b)
    );
    assert_eq!(
        exec(&["busybox", "stat", "-c", "%a", "/data/blob.bin"])["stdout"],
        "600\n"
    );
    let response = http
        .get(kiln.url(&format!("/v1/sandboxes/{id}/files?path=/no/such/file")))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    crate::support::expect_error(response, 404, "not_found");

    // busybox httpd, the image's entrypoint, serves through ingress.
    let response = http
        .get(kiln.url(&format!("/sbx/{id}/index.html")))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().unwrap(), "served by busybox httpd\n");

    // Suspend runs the suspend hook; resume the restore hook again. A connection open across
    // them is reset, and the resumed guest's tokens still name it.
    let host_end = hold_connection(&exec, &held);
    let response = post(&kiln, &format!("/v1/sandboxes/{id}/suspend"), json!({}));
    assert_eq!(response.status(), 200, "{}", response.text().unwrap());
    let response = post(&kiln, &format!("/v1/sandboxes/{id}/resume"), json!({}));
    assert_eq!(response.status(), 200, "{}", response.text().unwrap());
    assert_eq!(exec(&["cat", "/marks"])["stdout"], "ready\nrestore\nsuspend\nrestore\n");
    connection_was_reset(&exec, &held, host_end);
    identity(&kiln, &exec, &id, &digest);

    // A fork is a sandbox of its own: its tokens name it, not its source.
    let response = post(&kiln, &format!("/v1/sandboxes/{id}/fork"), json!({"count": 1}));
    let status = response.status();
    let forked: serde_json::Value = response.json().unwrap();
    assert_eq!(status, 201, "{forked}");
    let fork = forked["sandboxes"][0]["id"].as_str().unwrap().to_owned();
    let exec_in_fork = |argv: &[&str]| -> serde_json::Value {
        let response = post(&kiln, &format!("/v1/sandboxes/{fork}/exec"), json!({ "argv": argv }));
        let status = response.status();
        let body: serde_json::Value = response.json().unwrap();
        assert_eq!(
            status,
            200,
            "exec {argv:?} in the fork: {body}\n{}",
            crate::microvm::tail(&kiln.log(), 4000)
        );
        body
    };
    identity(&kiln, &exec_in_fork, &fork, &digest);
    let response = http
        .delete(kiln.url(&format!("/v1/sandboxes/{fork}")))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    // Forking suspended the source; it runs again for its terminate hook below.
    let response = post(&kiln, &format!("/v1/sandboxes/{id}/resume"), json!({}));
    assert_eq!(response.status(), 200, "{}", response.text().unwrap());
    // Terminate runs the terminate hook (its output is in the server's log).
    let response = http
        .delete(kiln.url(&format!("/v1/sandboxes/{id}")))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        kiln.log().contains("hook terminate ran"),
        "{}",
        crate::microvm::tail(&kiln.log(), 4000)
    );

    // A node whose CPU key differs rebuilds the snapshot from the stored image, and says so.
    let mut kiln = kiln;
    kiln.kill();
    let kiln = Kiln::start_in_with_env(data, args, &[("KILN_MICROVM_CPU_KEY_SALT", "another-cpu")]);
    let response = post(&kiln, "/v1/sandboxes", json!({"function": "busybox"}));
    let status = response.status();
    let sandbox: serde_json::Value = response.json().unwrap();
    assert_eq!(status, 201, "{sandbox}");
    assert!(
        kiln.log().contains("snapshot was taken on another CPU"),
        "{}",
        crate::microvm::tail(&kiln.log(), 4000)
    );
    let id = sandbox["id"].as_str().unwrap();
    let response = post(
        &kiln,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"argv": ["cat", "/marks"]}),
    );
    let body: serde_json::Value = response.json().unwrap();
    assert_eq!(
        body["stdout"], "ready\nrestore\n",
        "the rebuilt snapshot did not run the ready hook"
    );
    // Back on this node's own CPU key for the rest of the nested run.
    let mut kiln = kiln;
    kiln.kill();
    Kiln::start_in(data, args)
}

/// Reads an exec's server-sent events to the end: (stdout, stderr, the exit event's data). Says
/// how far it got every 2 MiB, and on failure, with the server's log.
fn read_events(kiln: &Kiln, mut response: reqwest::blocking::Response) -> (Vec<u8>, Vec<u8>, serde_json::Value) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let started = Instant::now();
    let mut text = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut reported = 0;
    loop {
        match response.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading the events after {} bytes in {:?}: {e}\n{}",
                text.len(),
                started.elapsed(),
                crate::microvm::tail(&kiln.log(), 4000)
            ),
        }
        if text.len() - reported >= 2 << 20 {
            reported = text.len();
            eprintln!("  {} MiB of events in {:?}", reported >> 20, started.elapsed());
        }
    }
    let text = String::from_utf8(text).unwrap();
    let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), serde_json::Value::Null);
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let mut name = "";
        let mut data = "";
        for line in event.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n;
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = d;
            }
        }
        match name {
            "stdout" => stdout.extend(b64.decode(data).unwrap()),
            "stderr" => stderr.extend(b64.decode(data).unwrap()),
            "exit" => exit = serde_json::from_str(data).unwrap(),
            other => panic!(
                "unexpected event {other:?}: {data}\nkiln's log: {}",
                crate::microvm::tail(&kiln.log(), 4000)
            ),
        }
    }
    (stdout, stderr, exit)
}

/// A websocket client just big enough for the shell and ingress: masked frames out, any length in.
pub struct Socket(TcpStream);

impl Socket {
    /// Connects to `path` with Kiln's token and checks the handshake's answer.
    pub fn connect(kiln: &Kiln, path: &str) -> Socket {
        let mut stream = TcpStream::connect(&kiln.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            kiln.addr, kiln.token
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
        Socket(stream)
    }

    pub fn send(&mut self, opcode: u8, payload: &[u8]) {
        let mask = [7u8, 1, 2, 3];
        assert!(payload.len() < 126);
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&frame).unwrap();
    }

    pub fn receive(&mut self) -> (u8, Vec<u8>) {
        let mut header = [0u8; 2];
        self.0.read_exact(&mut header).unwrap();
        let len = match header[1] & 0x7f {
            126 => {
                let mut n = [0u8; 2];
                self.0.read_exact(&mut n).unwrap();
                u16::from_be_bytes(n) as usize
            }
            127 => {
                let mut n = [0u8; 8];
                self.0.read_exact(&mut n).unwrap();
                u64::from_be_bytes(n) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        self.0.read_exact(&mut payload).unwrap();
        (header[0] & 0x0f, payload)
    }

    /// Reads terminal output until it contains `needle`; returns all of it.
    fn until(&mut self, needle: &str) -> String {
        let mut seen = String::new();
        while !seen.contains(needle) {
            let (opcode, payload) = self.receive();
            assert_eq!(
                opcode, 2,
                "expected terminal bytes, got opcode {opcode}; so far: {seen:?}"
            );
            seen.push_str(&String::from_utf8_lossy(&payload));
        }
        seen
    }
}

fn shell_session(kiln: &Kiln, id: &str) {
    let mut shell = Socket::connect(kiln, &format!("/v1/sandboxes/{id}/shell?cols=80&rows=24"));
    shell.send(2, b"stty size; tty; echo $((6*7))\n");
    let seen = shell.until("\n42");
    assert!(seen.contains("24 80"), "stty size: {seen:?}");
    assert!(seen.contains("/dev/pts/"), "tty: {seen:?}");
    shell.send(1, br#"{"resize": {"cols": 120, "rows": 40}}"#);
    shell.send(2, b"stty size\n");
    let seen = shell.until("40 120");
    assert!(seen.contains("40 120"), "{seen:?}");
    shell.send(2, b"exit 5\n");
    loop {
        let (opcode, payload) = shell.receive();
        if opcode == 8 {
            assert!(payload.len() >= 2, "a close frame without a code");
            assert_eq!(
                String::from_utf8_lossy(&payload[2..]),
                "5",
                "the close reason is the exit code"
            );
            break;
        }
        assert_eq!(opcode, 2);
    }
}
