//! HTTPS (`--tls-cert`, `--tls-key`) with certificates made here by `rcgen`: HTTP/2 and HTTP/1.1
//! by ALPN, the CLI verifying with `--ca`, a handshake held to the header deadline, a renewed
//! certificate taken on SIGHUP (and a broken one refused, the old one kept), and a bad pair
//! stopping the start with the reason.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use reqwest::blocking::Client;

use crate::support::{component, Kiln};

/// A CA and a certificate it signed for `localhost` and 127.0.0.1: (CA PEM, leaf PEM, key PEM).
fn issue(name: &str) -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca.self_signed(&ca_key).unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// A client that trusts only `ca`.
fn trusting(ca: &str, http1: bool) -> Client {
    let mut builder = Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .timeout(Duration::from_secs(30));
    if http1 {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

fn cli(kiln: &Kiln, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_URL", kiln.url(""))
        .env("KILN_TOKEN", &kiln.token)
        .env_remove("KILN_CA")
        .output()
        .unwrap()
}

fn write_pair(dir: &Path, cert: &str, key: &str) {
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
}

#[test]
fn https_by_alpn_the_cli_with_its_ca_and_a_certificate_renewed_on_sighup() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, leaf, key) = issue("first CA");
    write_pair(certs.path(), &leaf, &key);
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let kiln = Kiln::start_with(&[
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
        "--header-read-timeout-ms",
        "1500",
    ]);
    assert_eq!(kiln.scheme, "https");
    assert!(kiln.url("").starts_with("https://127.0.0.1:"));

    // h2 by ALPN, and HTTP/1.1 for a client that offers only that.
    for (http1, version) in [(false, reqwest::Version::HTTP_2), (true, reqwest::Version::HTTP_11)] {
        let response = trusting(&ca, http1)
            .get(kiln.url("/v1/functions"))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap();
        assert_eq!((response.status().as_u16(), response.version()), (200, version));
    }
    // The identity issuer is the https URL.
    let discovery: serde_json::Value = trusting(&ca, false)
        .get(kiln.url("/.well-known/openid-configuration"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(discovery["issuer"], kiln.url(""));
    // Cleartext HTTP on the TLS port gets no answer, and harms nothing.
    let plain = Client::new().get(format!("http://{}/v1/functions", kiln.addr)).send();
    assert!(plain.is_err(), "{plain:?}");
    // A client that connects and never says hello is dropped at the header deadline.
    let mut silent = std::net::TcpStream::connect(&kiln.addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    assert_eq!(silent.read(&mut [0u8; 16]).unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // The CLI: verified with --ca; without it the certificate is unknown and it says so.
    let ca_path = certs.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let listed = cli(&kiln, &["--ca", ca_path.to_str().unwrap(), "ls"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    // Deploy and invoke through the CLI over TLS.
    let wat = crate::support::guests_dir().join("wat/hello.wat");
    let deployed = cli(
        &kiln,
        &[
            "--ca",
            ca_path.to_str().unwrap(),
            "deploy",
            "greeter",
            wat.to_str().unwrap(),
        ],
    );
    assert!(
        deployed.status.success(),
        "{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    let invoked = cli(
        &kiln,
        &["--ca", ca_path.to_str().unwrap(), "invoke", "greeter", "-d", "tls"],
    );
    assert!(invoked.status.success(), "{}", String::from_utf8_lossy(&invoked.stderr));
    assert_eq!(String::from_utf8_lossy(&invoked.stdout), "Hello from Kiln!\n");
    let refused = cli(&kiln, &["ls"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(said.contains("certificate"), "{said}");
    // The shell's websocket goes over TLS too (wss, the same roots): a Wasm sandbox has no shell,
    // and the server's own error comes back through the handshake.
    let deployed = trusting(&ca, false)
        .put(kiln.url("/v1/functions/hello"))
        .bearer_auth(&kiln.token)
        .body(component("http-hello"))
        .send()
        .unwrap();
    assert_eq!(deployed.status(), 201, "{}", deployed.text().unwrap());
    let sandbox: serde_json::Value = trusting(&ca, false)
        .post(kiln.url("/v1/sandboxes"))
        .bearer_auth(&kiln.token)
        .json(&serde_json::json!({"function": "hello"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = sandbox["id"].as_str().unwrap();
    let shell = cli(&kiln, &["--ca", ca_path.to_str().unwrap(), "sandbox", "shell", id]);
    let said = String::from_utf8_lossy(&shell.stderr);
    assert!(!shell.status.success() && said.contains("wasm tier"), "{said}");

    // A renewed certificate (another CA) is served to new connections after SIGHUP.
    let (ca2, leaf2, key2) = issue("second CA");
    write_pair(certs.path(), &leaf2, &key2);
    // SAFETY: a signal to the child process this test started.
    unsafe { libc::kill(kiln.pid(), libc::SIGHUP) };
    assert!(
        kiln.wait_for_log("TLS certificate reloaded", Duration::from_secs(30)),
        "{}",
        kiln.log()
    );
    let renewed = trusting(&ca2, false).get(kiln.url("/healthz")).send().unwrap();
    assert_eq!(renewed.status(), 200);
    assert!(trusting(&ca, false).get(kiln.url("/healthz")).send().is_err());

    // A broken pair is refused on SIGHUP: logged, and the certificate in force stays.
    std::fs::write(&cert_path, "not a certificate").unwrap();
    unsafe { libc::kill(kiln.pid(), libc::SIGHUP) };
    assert!(
        kiln.wait_for_log("TLS certificate not reloaded", Duration::from_secs(30)),
        "{}",
        kiln.log()
    );
    let still = trusting(&ca2, false).get(kiln.url("/healthz")).send().unwrap();
    assert_eq!(still.status(), 200);
}

#[test]
fn a_bad_certificate_or_key_stops_the_start_with_the_reason() {
    let certs = tempfile::tempdir().unwrap();
    let (_, leaf, _) = issue("a CA");
    let (_, _, other_key) = issue("another CA");
    write_pair(certs.path(), &leaf, &other_key);
    let data = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data.path())
            .args(extra)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let said = serve(&["--tls-cert", cert, "--tls-key", key]);
    assert!(said.contains("do not make a pair"), "{said}");
    let said = serve(&["--tls-cert", "/no/such/cert.pem", "--tls-key", key]);
    assert!(said.contains("--tls-cert /no/such/cert.pem"), "{said}");
    let said = serve(&["--tls-cert", cert]);
    assert!(said.contains("--tls-key"), "{said}");
}
