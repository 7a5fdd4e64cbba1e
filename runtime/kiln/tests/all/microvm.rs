//! The microvm tier through the API: uploads it refuses (422 with a reason, on every host); on a
//! host that cannot run it, the 503 and the `/healthz` report that say why; and, on a host with
//! hardware virtualization, native functions deployed (booted, snapshotted) and invoked (restored)
//! through the HTTP API on Kiln's own VMM. That last test needs the Linux guest, so elsewhere
//! (PVM, no /dev/kvm) it prints why and returns; `core/src/tier/microvm/invoke.rs` covers Kiln's
//! invoke path with the VMM's tiny agent-protocol guest on every host with KVM.
//!
//! Every VM runs in a jailed helper, `kiln vmm-jail`: the server process itself never holds a KVM
//! descriptor (checked here on the real binary), and the real binary works as that helper — its
//! dispatch, its allocator under the helper's seccomp filter — with the tiny guests on this
//! host's KVM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{client, expect_error, wat, Kiln};

const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

/// A minimal ELF64 executable for `machine`: one PT_LOAD of the whole file (code: `exit(0)`),
/// plus a PT_INTERP naming the glibc loader when `interpreter` is set (a dynamic executable).
fn elf64(machine: u16, interpreter: bool) -> Vec<u8> {
    const EH: usize = 64;
    const PH: usize = 56;
    let phnum = if interpreter { 2 } else { 1 };
    let code_at = EH + PH * phnum;
    let code: &[u8] = &[0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05]; // mov eax, 60; xor edi, edi; syscall
    let interp = b"/lib64/ld-linux-x86-64.so.2\0";
    let interp_at = code_at + code.len();
    let len = interp_at + if interpreter { interp.len() } else { 0 };
    let base = 0x40_0000u64;

    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&machine.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(base + code_at as u64).to_le_bytes()); // e_entry
    f.extend_from_slice(&(EH as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for half in [EH as u16, PH as u16, phnum as u16, 64, 0, 0] {
        f.extend_from_slice(&half.to_le_bytes());
    }
    let mut segment = |kind: u32, flags: u32, offset: usize, size: usize, align: u64| {
        for word in [kind, flags] {
            f.extend_from_slice(&word.to_le_bytes());
        }
        let addr = base + offset as u64;
        for quad in [offset as u64, addr, addr, size as u64, size as u64, align] {
            f.extend_from_slice(&quad.to_le_bytes());
        }
    };
    if interpreter {
        segment(3, 4, interp_at, interp.len(), 1); // PT_INTERP, R
    }
    segment(1, 5, 0, len, 0x1000); // PT_LOAD, R+X, the whole file at `base`
    f.extend_from_slice(code);
    if interpreter {
        f.extend_from_slice(interp);
    }
    assert_eq!(f.len(), len);
    f
}

fn deploy_microvm(kiln: &Kiln, code: Vec<u8>) -> reqwest::blocking::Response {
    kiln.deploy_with("native", code, json!({"tier": "microvm"}))
}

fn refused(kiln: &Kiln, code: Vec<u8>, needle: &str) {
    let error = expect_error(deploy_microvm(kiln, code), 422, "invalid_code");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

#[test]
fn uploads_the_microvm_tier_cannot_run_are_422_with_the_reason() {
    let kiln = Kiln::start();
    refused(&kiln, Vec::new(), "empty");
    refused(&kiln, wat("hello"), "WebAssembly");
    let binary_wasm = b"\0asm\x01\0\0\0".to_vec();
    refused(&kiln, binary_wasm, "WebAssembly");
    refused(&kiln, elf64(EM_X86_64, true), "dynamically linked");
    // A real dynamic executable: the host's `true` (glibc, PIE; Kiln's own binary is over the
    // 64 MiB code cap in debug builds).
    refused(&kiln, std::fs::read("/bin/true").unwrap(), "dynamically linked");
    refused(&kiln, elf64(EM_AARCH64, false), "aarch64");
    let mut elf32 = elf64(EM_386, false);
    elf32[4] = 1; // ELFCLASS32
    refused(&kiln, elf32, "32-bit");
    refused(&kiln, b"#!/bin/sh\necho hi\n".to_vec(), "not an ELF");
    let mut truncated = elf64(EM_X86_64, false);
    truncated.truncate(70);
    refused(&kiln, truncated, "ELF");
    // Nothing was stored.
    expect_error(kiln.get("/v1/functions/native"), 404, "not_found");
}

#[test]
fn a_valid_executable_meets_the_hosts_capability_check() {
    let kiln = Kiln::start();
    let health: serde_json::Value = client().get(kiln.url("/healthz")).send().unwrap().json().unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["tiers"]["wasm"], true);
    // Without --microvm-kernel and --microvm-agent the tier is unavailable on every host; the
    // reason differs (no /dev/kvm, no hardware virtualization, no guest image) and is reported.
    assert_eq!(health["tiers"]["microvm"], false, "{health}");
    let reason = health["unavailable"]["microvm"].as_str().unwrap().to_owned();
    let has_hardware_virtualization = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .split_whitespace()
        .any(|flag| flag == "vmx" || flag == "svm");
    if !has_hardware_virtualization {
        assert!(reason.contains("vmx") || reason.contains("/dev/kvm"), "{reason}");
    }

    let error = expect_error(deploy_microvm(&kiln, elf64(EM_X86_64, false)), 503, "unavailable");
    assert_eq!(error["message"], reason.as_str());
    // A real static-pie musl executable (the VMM's test function), when its Linux-guest test has
    // built it, passes validation as well.
    let upper = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/kiln-guest/cargo/x86_64-unknown-linux-musl/release/kiln-upper");
    match std::fs::read(&upper) {
        Ok(code) => {
            expect_error(deploy_microvm(&kiln, code), 503, "unavailable");
        }
        Err(_) => eprintln!(
            "not checked: {} is not built (cargo test -p kiln-vmm builds it)",
            upper.display()
        ),
    }
    expect_error(kiln.get("/v1/functions/native"), 404, "not_found");
    // The wasm tier is unaffected.
    kiln.must_deploy("hello", wat("hello"));
}

fn has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .split_whitespace()
        .any(|flag| flag == "vmx" || flag == "svm")
}

fn health(kiln: &Kiln) -> serde_json::Value {
    client().get(kiln.url("/healthz")).send().unwrap().json().unwrap()
}

#[test]
fn the_guest_image_is_checked_where_the_tier_could_run() {
    let missing = "/nonexistent/kiln-guest";
    let kiln = Kiln::start_with(&["--microvm-kernel", missing, "--microvm-agent", missing]);
    let health = health(&kiln);
    assert_eq!(health["tiers"]["microvm"], false, "{health}");
    let reason = health["unavailable"]["microvm"].as_str().unwrap();
    if has_hardware_virtualization() && Path::new("/dev/kvm").exists() {
        assert!(reason.contains("cannot read the guest kernel"), "{reason}");
    } else {
        // The host is the reason, whatever the image: PVM cannot boot Linux.
        assert!(reason.contains("vmx") || reason.contains("/dev/kvm"), "{reason}");
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the guest agent and the test functions (`kiln-upper`, `kiln-webapp`) are, built as
/// static musl executables, or prebuilt in `KILN_GUEST_BINARIES` (a directory; the nested run has
/// no cargo).
fn guest_binaries() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("KILN_GUEST_BINARIES") {
        return Ok(PathBuf::from(dir));
    }
    let target_dir = workspace().join("target/kiln-guest/cargo");
    crate::musl::build(&workspace(), &target_dir, &[&["-p", "kiln-guest-agent"]])
}

/// A client with time for a boot nested in an emulated VM: there the jailed helper's boot,
/// snapshot and seal take minutes (seconds at most on hardware).
fn booting_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
}

/// Deploys as `Kiln::deploy_with` does, with time for the boot.
pub(crate) fn deploy_booting(
    kiln: &Kiln,
    name: &str,
    code: Vec<u8>,
    config: &serde_json::Value,
) -> reqwest::blocking::Response {
    use reqwest::blocking::multipart;
    let form = multipart::Form::new()
        .part("code", multipart::Part::bytes(code))
        .part("config", multipart::Part::text(config.to_string()));
    booting_client()
        .put(kiln.url(&format!("/v1/functions/{name}")))
        .bearer_auth(&kiln.token)
        .multipart(form)
        .send()
        .expect("deploy")
}

#[test]
fn native_functions_deploy_and_invoke_on_kilns_vmm_where_hardware_virtualization_exists() {
    let skip = |reason: &str| {
        kiln_testkit::skip(
            "microvm::native_functions_deploy_and_invoke_on_kilns_vmm_where_hardware_virtualization_exists",
            reason,
        )
    };
    if !has_hardware_virtualization() || !Path::new("/dev/kvm").exists() {
        return skip(
            "this host has no hardware virtualization (vmx/svm) or no /dev/kvm, so Kiln's VMM cannot boot \
             the Linux guest here (runtime/vmm/scripts/nested-api-test.sh runs this test nested)",
        );
    }
    let kernel = workspace().join("target/kiln-guest/vmlinuz");
    if !kernel.exists() {
        return skip(&format!(
            "needs {} (runtime/scripts/setup.sh fetches it)",
            kernel.display()
        ));
    }
    let (agent, upper, webapp) = match guest_binaries() {
        Ok(dir) => (dir.join("kiln-agent"), dir.join("kiln-upper"), dir.join("kiln-webapp")),
        Err(reason) => return skip(&reason),
    };
    let data = tempfile::tempdir().unwrap();
    let args = [
        "--microvm-kernel",
        kernel.to_str().unwrap(),
        "--microvm-agent",
        agent.to_str().unwrap(),
    ];
    let kiln = Kiln::start_in(data.path(), &args);
    let health = health(&kiln);
    if health["tiers"]["microvm"] != true {
        return skip(&format!(
            "the tier is unavailable here: {}",
            health["unavailable"]["microvm"]
        ));
    }

    let started = Instant::now();
    // Generous enough for a nested run (KVM inside an emulated VM: ~1 s per invocation).
    let config = json!({"tier": "microvm", "memory_mb": 256, "timeout_ms": 8000, "env": {"GREETING": "hi"}});
    let response = deploy_booting(&kiln, "upper", std::fs::read(&upper).unwrap(), &config);
    let status = response.status();
    let body: serde_json::Value = response.json().unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["kind"].as_str(), body["tier"].as_str()),
        (Some("native"), Some("microvm"))
    );
    eprintln!("deploy (boot + snapshot) took {:?}", started.elapsed());
    let snapshots = data.path().join("microvm");
    assert_eq!(
        std::fs::read_dir(&snapshots).unwrap().count(),
        1,
        "one snapshot on disk"
    );
    let snapshot = std::fs::read_dir(&snapshots).unwrap().next().unwrap().unwrap().path();

    let invoke = |kiln: &Kiln, input: &str| kiln.invoke("upper", input.as_bytes().to_vec());
    let started = Instant::now();
    let response = invoke(&kiln, "hello, microvm");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().unwrap(), "HELLO, MICROVM");
    eprintln!(
        "first invoke (restore + request + teardown) took {:?}",
        started.elapsed()
    );
    // The function sees its config's environment, and nothing of the host's.
    assert_eq!(invoke(&kiln, "env").text().unwrap(), "GREETING=hi\n");
    // The function's exit code and stderr come back as a Wasm guest's do.
    let error = expect_error(invoke(&kiln, "fail"), 502, "function_failed");
    assert_eq!(error["exit_code"], 3, "{error}");
    // Every restore is reseeded: two invocations from one snapshot draw different randomness.
    let a = invoke(&kiln, "random").text().unwrap();
    let b = invoke(&kiln, "random").text().unwrap();
    assert_eq!(a.len(), 32, "{a}");
    assert_ne!(a, b, "restored guests share their RNG state");
    // A spinning function is stopped at its timeout.
    let started = Instant::now();
    expect_error(invoke(&kiln, "spin"), 504, "timeout");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(invoke(&kiln, "still alive").text().unwrap(), "STILL ALIVE");
    let kiln = crate::microvm_inside::images_exec_shell_files_and_hooks(kiln, data.path(), &args);
    let mut kiln = microvm_sandboxes(kiln, data.path(), &args, &webapp);

    // The snapshot is sealed, and outlives the process: a restarted Kiln serves from it without
    // booting.
    assert!(snapshot.join("seal").exists(), "the snapshot is not sealed");
    kiln.kill();
    let mut kiln = Kiln::start_in(data.path(), &args);
    assert_eq!(invoke(&kiln, "after restart").text().unwrap(), "AFTER RESTART");
    assert!(!kiln.log().contains("does not verify"), "{}", kiln.log());

    // Integrity: a snapshot changed while Kiln was down does not verify when it is loaded. It is
    // set aside, never run, and the function is booted again from its stored upload.
    kiln.kill();
    let state = snapshot.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&state, bytes).unwrap();
    let kiln = Kiln::start_in(data.path(), &args);
    let started = Instant::now();
    let response = booting_client()
        .post(kiln.url("/v1/functions/upper/invoke"))
        .bearer_auth(&kiln.token)
        .body("after a rebuild")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().unwrap(), "AFTER A REBUILD");
    eprintln!("set aside, booted again and invoked in {:?}", started.elapsed());
    assert!(kiln.log().contains("does not verify: set aside"), "{}", kiln.log());
    let mut set_aside = snapshot.clone().into_os_string();
    set_aside.push(".rejected");
    assert!(Path::new(&set_aside).join("state").exists(), "nothing was set aside");
    // Deleting the function removes its snapshot (and what was set aside of it).
    assert_eq!(kiln.delete("/v1/functions/upper").status(), 204);
    assert!(
        !snapshot.exists() && !Path::new(&set_aside).exists(),
        "upper's snapshot outlived it"
    );
}

/// The KVM descriptors (`/dev/kvm`, VMs, vCPUs) process `pid` holds.
fn kvm_descriptors(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|target| target.display().to_string())
        .filter(|target| target == "/dev/kvm" || target.starts_with("anon_inode:kvm"))
        .collect()
}

/// Issue 16: the server holds no KVM file descriptor, on any host — the microVM tier's capability
/// check and every VM run in jailed helper processes. (Before the jail, the server opened
/// `/dev/kvm` at start-up and kept it, on this PVM host too.)
#[test]
fn the_server_process_never_holds_a_kvm_descriptor() {
    let kiln = Kiln::start();
    let health = health(&kiln);
    assert_eq!(health["status"], "ok");
    // A microvm deploy (refused here or not) and a Wasm invocation on top of start-up.
    let _ = deploy_microvm(&kiln, elf64(EM_X86_64, false));
    kiln.must_deploy("hello", wat("hello"));
    assert_eq!(kiln.invoke("hello", b"x".to_vec()).status(), 200);
    assert_eq!(kvm_descriptors(kiln.pid()), Vec::<String>::new());
}

/// A jail whose helpers are the real `kiln` binary (`kiln vmm-jail`), or `None` after recording
/// why this host cannot run one.
fn kiln_jail(test: &str) -> Option<kiln_vmm::jail::Jail> {
    if !Path::new("/dev/kvm").exists() {
        kiln_testkit::skip(test, "this host has no /dev/kvm");
        return None;
    }
    let mut config = kiln_vmm::jail::JailConfig::new(env!("CARGO_BIN_EXE_kiln"), vec!["vmm-jail".into()]);
    // The debug binary is large: its exec is slow on a loaded machine.
    config.start_timeout = Duration::from_secs(30);
    let jail = kiln_vmm::jail::Jail::new(config);
    match jail.probe() {
        Ok(()) => Some(jail),
        Err(reason)
            if ["unshare", "uid_map", "gid_map", "setgroups", "cannot use KVM"]
                .iter()
                .any(|w| reason.contains(w)) =>
        {
            kiln_testkit::skip(test, &format!("this host cannot jail a VM helper: {reason}"));
            None
        }
        Err(reason) => panic!("`kiln vmm-jail` failed its probe on a host with KVM: {reason}"),
    }
}

fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
        .trim()
        .to_owned()
}

/// The real binary as the jailed helper, with the VMM's tiny guests: boots and snapshots one,
/// restores and invokes it, is in its own namespaces with seccomp on, and its filter kills a
/// forbidden syscall. (The Linux guest cannot boot on this host's KVM; the nested API test runs
/// the whole tier through `kiln vmm-jail`.)
#[test]
fn kilns_own_binary_is_the_jailed_vm_helper() {
    use kiln_vmm::jail::{ForbiddenSyscall, HelperExit, JailError};
    use kiln_vmm::test_guest;

    let test = "microvm::kilns_own_binary_is_the_jailed_vm_helper";
    let Some(jail) = kiln_jail(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (agent, spin) = (dir.path().join("agent"), dir.path().join("spin"));
    let boot = Duration::from_secs(30);
    let config = kiln_vmm::VmConfig::new(4);
    jail.boot_flat64_and_snapshot(&test_guest::agent(), config, boot, &agent)
        .unwrap();
    jail.boot_flat64_and_snapshot(&test_guest::spin(), config, boot, &spin)
        .unwrap();
    for i in 0..3u8 {
        let seed = [i + 1; 32];
        let reply = jail
            .restore_and_invoke(&agent, &seed, b"through kiln vmm-jail", Duration::from_secs(10), 4096)
            .unwrap();
        assert_eq!(reply.exit_code, 0);
        assert_eq!(reply.stdout, [seed.as_slice(), b"through kiln vmm-jail"].concat());
        assert_eq!(reply.log, test_guest::AGENT_LOG);
    }

    // Mid-invoke: in its own namespaces, filtered, then killed — an error, promptly.
    let mut helper = jail.spawn().unwrap();
    let (jailed, on_jailed) = std::sync::mpsc::channel();
    helper.on_jailed(move |pid| jailed.send(pid).unwrap());
    let invocation =
        std::thread::spawn(move || helper.restore_and_invoke(&spin, &[0; 32], b"", Duration::from_secs(60), 4096));
    let pid = on_jailed.recv_timeout(Duration::from_secs(30)).unwrap();
    for ns in ["mnt", "pid", "net", "user", "ipc", "uts"] {
        let link = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(link(&pid.to_string()), link("self"), "shares the {ns} namespace");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&status, "Seccomp"), "2");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
    crate::support::signal(pid as i32, libc::SIGKILL);
    let err = invocation.join().unwrap().unwrap_err();
    assert!(
        matches!(err, JailError::Died(HelperExit::Signal(libc::SIGKILL))),
        "{err}"
    );

    let err = jail.probe_forbidden(ForbiddenSyscall::Socket);
    assert!(
        matches!(err, JailError::Died(HelperExit::Signal(libc::SIGSYS))),
        "{err}"
    );
}

/// microVM sandboxes end to end, batched into the one nested boot: a guest HTTP server reached
/// through ingress (state kept across requests, bodies past a stream's window both ways,
/// server-sent events, a websocket, another port), suspend and resume (memory kept, the clock
/// corrected), fork (independent copies with different randomness), auto-resume, terminate,
/// a graceful restart and a crash. Returns the server it ends with.
fn microvm_sandboxes(mut kiln: Kiln, data: &Path, args: &[&str], webapp: &Path) -> Kiln {
    let http = booting_client();
    // Generous: nested emulation moves a few hundred KiB a second through the channel.
    let config = json!({"tier": "microvm", "memory_mb": 256, "timeout_ms": 120000, "env": {"GREETING": "hi"}});
    let response = deploy_booting(&kiln, "web", std::fs::read(webapp).unwrap(), &config);
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());
    let post = |kiln: &Kiln, path: &str, body: serde_json::Value| {
        http.post(kiln.url(path))
            .bearer_auth(&kiln.token)
            .json(&body)
            .send()
            .unwrap()
    };
    let record = |kiln: &Kiln, id: &str| -> serde_json::Value {
        let response = http
            .get(kiln.url(&format!("/v1/sandboxes/{id}")))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().unwrap()
    };
    let get = |kiln: &Kiln, id: &str, path: &str| -> String {
        let response = http
            .get(kiln.url(&format!("/sbx/{id}{path}")))
            .bearer_auth(&kiln.token)
            .send()
            .unwrap();
        let status = response.status();
        let text = response.text().unwrap();
        assert_eq!(status, 200, "GET /sbx/{id}{path}: {text}\n{}", tail(&kiln.log(), 6000));
        text
    };
    let lifecycle = |kiln: &Kiln, id: &str, what: &str, state: &str| {
        let started = Instant::now();
        let response = post(kiln, &format!("/v1/sandboxes/{id}/{what}"), json!({}));
        let status = response.status();
        let body: serde_json::Value = response.json().unwrap();
        assert_eq!(
            (status.as_u16(), body["state"].as_str()),
            (200, Some(state)),
            "{what}: {body}"
        );
        eprintln!("microVM sandbox {what} took {:?}", started.elapsed());
        body
    };

    let started = Instant::now();
    let response = post(
        &kiln,
        "/v1/sandboxes",
        json!({"function": "web", "env": {"ROLE": "primary"}}),
    );
    let status = response.status();
    let sandbox: serde_json::Value = response.json().unwrap();
    assert_eq!(status, 201, "{sandbox}");
    assert_eq!(
        (sandbox["tier"].as_str(), sandbox["state"].as_str()),
        (Some("microvm"), Some("running"))
    );
    let id = sandbox["id"].as_str().unwrap().to_owned();
    eprintln!("microVM sandbox created in {:?}", started.elapsed());
    let started = Instant::now();
    assert_eq!(get(&kiln, &id, "/count"), "1");
    eprintln!("its first request took {:?}", started.elapsed());
    assert_eq!(
        get(&kiln, &id, "/count"),
        "2",
        "the server's memory is not kept between requests"
    );
    // The sandbox's environment adds to the function's.
    assert_eq!(get(&kiln, &id, "/env/ROLE"), "primary");
    assert_eq!(get(&kiln, &id, "/env/GREETING"), "hi");
    // A body larger than a stream's window, both ways.
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let echoed = http
        .post(kiln.url(&format!("/sbx/{id}/echo")))
        .bearer_auth(&kiln.token)
        .body(body.clone())
        .send()
        .unwrap();
    let status = echoed.status();
    let echoed = echoed.bytes().unwrap().to_vec();
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&echoed),
        tail(&kiln.log(), 6000)
    );
    assert!(echoed == body, "the echoed body differs");
    assert_eq!(get(&kiln, &id, "/events"), "data: 1\n\ndata: 2\n\ndata: 3\n\n");
    websocket_echo(&kiln, &id, "hello through the channel");
    // A port nothing listens on is refused; the sandbox lives on.
    let refused = http
        .get(kiln.url(&format!("/sbx/{id}/count")))
        .bearer_auth(&kiln.token)
        .header("X-Kiln-Port", "9")
        .send()
        .unwrap();
    assert_eq!(refused.status(), 502, "{}", refused.text().unwrap());
    assert_eq!(get(&kiln, &id, "/count"), "3");

    // Suspended for a while, then resumed: the memory is kept and the clock is the host's.
    let suspended = lifecycle(&kiln, &id, "suspend", "suspended");
    assert!(suspended["state_bytes"].as_u64().unwrap() > 0, "{suspended}");
    // The gap the clock must be corrected for (time passing is the point here, not a wait).
    std::thread::sleep(Duration::from_secs(8));
    lifecycle(&kiln, &id, "resume", "running");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let guest_now: f64 = get(&kiln, &id, "/time").parse().unwrap();
    assert!(
        (guest_now - host_now).abs() < 4.0,
        "the guest's clock is {:.1} s off after a resume",
        guest_now - host_now
    );
    assert_eq!(
        get(&kiln, &id, "/count"),
        "4",
        "the memory was not kept across suspend and resume"
    );

    // Forks: independent copies, each reseeded.
    let response = post(&kiln, &format!("/v1/sandboxes/{id}/fork"), json!({"count": 2}));
    let status = response.status();
    let body: serde_json::Value = response.json().unwrap();
    assert_eq!(status, 201, "{body}");
    let forks: Vec<String> = body["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    let (a, b) = (&forks[0], &forks[1]);
    assert_ne!(
        get(&kiln, a, "/random"),
        get(&kiln, b, "/random"),
        "forks of one suspend point share their RNG state"
    );
    assert_eq!(get(&kiln, a, "/count"), "5");
    assert_eq!(get(&kiln, a, "/count"), "6");
    assert_eq!(get(&kiln, b, "/count"), "5", "forks are not independent");
    // The fork suspended the source; a request resumes it.
    assert_eq!(record(&kiln, &id)["state"], "suspended");
    assert_eq!(get(&kiln, &id, "/count"), "5");
    // Terminated: its VM files are gone, the forks' are not.
    let response = http
        .delete(kiln.url(&format!("/v1/sandboxes/{id}")))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let vms = data.join("sandboxes").join("vm");
    assert!(!vms.join(&id).exists(), "a terminated sandbox's VM files remain");
    assert!(vms.join(a).exists() && vms.join(b).exists());

    // A graceful stop suspends the running sandboxes; they carry on after the restart.
    let status = kiln.terminate_within(Duration::from_secs(600));
    assert!(status.success(), "{status:?}");
    let kiln = Kiln::start_in(data, args);
    assert_eq!(record(&kiln, a)["state"], "suspended");
    assert_eq!(get(&kiln, a, "/count"), "7");
    assert_eq!(get(&kiln, b, "/count"), "6");
    // A crash: a running sandbox goes back to its last suspend point (the graceful stop's).
    let mut kiln = kiln;
    kiln.kill();
    let kiln = Kiln::start_in(data, args);
    let after = record(&kiln, a);
    assert_eq!(after["state"], "suspended", "{after}");
    assert!(after["resumed_from"].is_string(), "{after}");
    assert_eq!(get(&kiln, a, "/count"), "7", "not back at the last suspend point");
    kiln
}

/// The last `n` bytes of `text` (on a character boundary).
pub(crate) fn tail(text: &str, n: usize) -> &str {
    let mut start = text.len().saturating_sub(n);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// A websocket through ingress: the handshake answered by the guest's server, one message echoed,
/// and the close.
fn websocket_echo(kiln: &Kiln, id: &str, message: &str) {
    let mut socket = crate::microvm_inside::Socket::connect(kiln, &format!("/sbx/{id}/ws"));
    socket.send(1, message.as_bytes());
    assert_eq!(socket.receive(), (1, message.as_bytes().to_vec()));
    socket.send(8, &[]);
    assert_eq!(socket.receive().0, 8);
}

/// Where this host has no hardware virtualization (PVM here, and CI): the test above run nested —
/// QEMU with software emulation (`-cpu max`: AMD SVM, emulated) boots Debian's kernel with its KVM
/// modules, and that VM's `/init` (the `linux` example, as PID 1) runs this very test binary on
/// `native_functions_*`, which starts the real `kiln` binary inside the VM. Everything the
/// microVM tier does through the API — deploy, invoke, sealing, and sandboxes end to end — is
/// then checked on every run, not only on hardware. Slow: about ten minutes of emulation.
/// (`runtime/vmm/scripts/nested-api-test.sh` does the same by hand, printing the console.)
#[test]
fn native_functions_and_sandboxes_nested_in_qemu_where_the_host_has_no_hardware_virtualization() {
    let test = "microvm::native_functions_and_sandboxes_nested_in_qemu_where_the_host_has_no_hardware_virtualization";
    let skip = |reason: &str| kiln_testkit::skip(test, reason);
    if has_hardware_virtualization() {
        return skip("this host has hardware virtualization: native_functions_* runs directly");
    }
    if std::env::var_os("KILN_NESTED").is_some() {
        return skip("already nested");
    }
    let guest = workspace().join("target/kiln-guest");
    let kernel = guest.join("vmlinuz");
    let modules: Vec<PathBuf> = ["1-irqbypass.ko", "2-kvm.ko", "3-kvm-amd.ko"]
        .iter()
        .map(|m| guest.join("modules").join(m))
        .collect();
    let tools = ["qemu-system-x86_64", "objcopy", "ldd"].iter().all(|tool| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let busybox = Path::new("/bin/busybox");
    if !kernel.exists() || modules.iter().any(|m| !m.exists()) || !tools || !busybox.exists() {
        return skip(
            "needs the guest kernel and its KVM modules, /bin/busybox (busybox-static) (runtime/scripts/setup.sh), \
             qemu-system-x86_64, objcopy and ldd",
        );
    }
    let target_dir = guest.join("cargo");
    let packages: [&[&str]; 2] = [&["-p", "kiln-guest-agent"], &["-p", "kiln-vmm", "--example", "linux"]];
    let bin = match crate::musl::build(&workspace(), &target_dir, &packages) {
        Ok(bin) => bin,
        Err(reason) => return skip(&reason),
    };
    let work = tempfile::tempdir().unwrap();
    let read = |path: &Path| std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // The debug binaries without their debug info, for the VM's RAM disk.
    let kiln_bin = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
    let tests_bin = std::env::current_exe().unwrap();
    let stripped = |from: &Path, name: &str| {
        let to = work.path().join(name);
        let status = std::process::Command::new("objcopy")
            .arg("--strip-debug")
            .arg(from)
            .arg(&to)
            .status()
            .unwrap();
        assert!(status.success(), "objcopy {}", from.display());
        read(&to)
    };

    let mut image = kiln_vmm::initramfs::Initramfs::new();
    let mut dirs = std::collections::BTreeSet::new();
    for dir in ["dev", "proc", "sys", "tmp"] {
        dirs.insert(dir.to_owned());
        image.dir(dir, 0o755);
    }
    let mut add = |image: &mut kiln_vmm::initramfs::Initramfs, path: &Path, data: &[u8], mode: u32| {
        let path = path.to_str().unwrap().trim_start_matches('/').to_owned();
        let mut prefix = String::new();
        for part in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            prefix = if prefix.is_empty() {
                part.to_string()
            } else {
                format!("{prefix}/{part}")
            };
            if dirs.insert(prefix.clone()) {
                image.dir(&prefix, 0o755);
            }
        }
        image.file(&path, mode, data);
    };
    image
        .char_device("dev/console", 0o600, 5, 1)
        .char_device("dev/null", 0o666, 1, 3);
    add(&mut image, Path::new("init"), &read(&bin.join("examples/linux")), 0o755);
    for name in ["kiln-agent", "kiln-upper", "kiln-webapp"] {
        add(
            &mut image,
            &Path::new("guest").join(name),
            &read(&bin.join(name)),
            0o755,
        );
    }
    // The busybox image's tests build it from the host's static busybox.
    add(&mut image, busybox, &read(busybox), 0o755);
    for module in &modules {
        let name = module.file_name().unwrap();
        add(&mut image, &Path::new("modules").join(name), &read(module), 0o644);
    }
    // The test finds kiln, the kernel and the workspace by the absolute paths it was built with.
    add(&mut image, &kiln_bin, &stripped(&kiln_bin, "kiln"), 0o755);
    add(
        &mut image,
        &guest.canonicalize().unwrap().join("vmlinuz"),
        &read(&kernel),
        0o644,
    );
    // The guests' network module, found beside the kernel.
    let tun = guest.join("guest-modules/tun.ko");
    if tun.exists() {
        add(
            &mut image,
            &guest.canonicalize().unwrap().join("guest-modules/tun.ko"),
            &read(&tun),
            0o644,
        );
    }
    add(&mut image, Path::new("all"), &stripped(&tests_bin, "all"), 0o755);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    add(
        &mut image,
        &manifest.join("Cargo.toml"),
        &read(&manifest.join("Cargo.toml")),
        0o644,
    );
    // The dynamic loader and the C libraries the two debug binaries link.
    let ldd = std::process::Command::new("ldd")
        .arg(&kiln_bin)
        .arg(&tests_bin)
        .output()
        .unwrap();
    let libs: std::collections::BTreeSet<String> = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/') && w.contains(".so"))
        .map(str::to_owned)
        .collect();
    for lib in libs {
        let real = Path::new(&lib).canonicalize().unwrap();
        add(&mut image, Path::new(&lib), &read(&real), 0o755);
    }
    let run = "/all\0microvm::native_functions_deploy\0--nocapture\0--test-threads\x001";
    add(&mut image, Path::new("run"), run.as_bytes(), 0o644);
    let env = "KILN_MICROVM_QUIRKS=available-tss\0KILN_GUEST_BINARIES=/guest\0KILN_NESTED=1\0RUST_BACKTRACE=1\0HOME=/tmp\0TMPDIR=/tmp";
    add(&mut image, Path::new("run-env"), env.as_bytes(), 0o644);
    let initrd = work.path().join("outer.cpio");
    std::fs::write(&initrd, image.finish()).unwrap();

    let started = Instant::now();
    let output = std::process::Command::new("timeout")
        .arg("2700")
        .args([
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            // The initramfs is the guest's disk: the binaries, the data directory and the
            // sandboxes' snapshots all live in this memory (3 GiB left a suspend 530 MB short of
            // the disk budget once the binaries grew).
            "-m",
            "4096",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init quiet"])
        .output()
        .expect("running qemu");
    let console = String::from_utf8_lossy(&output.stdout);
    eprintln!("nested run took {:?}; its console:\n{console}", started.elapsed());
    if !console.contains("/dev/kvm exists: true") {
        return skip("KVM did not load inside the emulated VM (see its console above)");
    }
    assert!(
        console.contains("test result: ok. 1 passed"),
        "the microVM tier's API test failed nested (its console is above)"
    );
}

/// Deploys an image upload on the microvm tier with `config` (its `tier` set here).
fn deploy_image(kiln: &Kiln, code: Vec<u8>, mut config: serde_json::Value) -> reqwest::blocking::Response {
    config["tier"] = "microvm".into();
    kiln.deploy_with("image", code, config)
}

/// Image uploads the tier refuses are 422 `invalid_code` on every host (checked before the host's
/// capability), each with a message naming the problem, and nothing is stored.
#[test]
fn image_validation_is_422_on_every_host() {
    use crate::support::{busybox_rootfs, gzip, oci_layout_files, tar_of, tar_of_files, TarEntry};
    let kiln = Kiln::start();
    let run = json!({"cmd": ["/bin/sh", "-c", "echo hi"]});
    let refused = |code: Vec<u8>, config: serde_json::Value, needle: &str| {
        let error = expect_error(deploy_image(&kiln, code, config), 422, "invalid_code");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
        expect_error(kiln.get("/v1/functions/image"), 404, "not_found");
    };

    let rootfs = busybox_rootfs(&[]);
    let mut malformed = rootfs.clone();
    malformed[0] ^= 0x55; // the first header's checksum no longer matches (its ustar magic stays)
    refused(malformed, run.clone(), "malformed or truncated");
    let gz = gzip(&rootfs);
    refused(gz[..gz.len() / 2].to_vec(), run.clone(), "truncated");
    refused(rootfs[..rootfs.len() / 2].to_vec(), run.clone(), "truncated");

    let layer = busybox_rootfs(&[]);
    let layer_blob = format!("blobs/sha256/{}", {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&layer))
    });
    let oci = json!({"Entrypoint": ["/bin/sh"]});
    let mut files = oci_layout_files(std::slice::from_ref(&layer), oci.clone());
    files.retain(|(path, _)| *path != layer_blob);
    refused(tar_of_files(&files), json!({}), "missing");
    let mut files = oci_layout_files(std::slice::from_ref(&layer), oci.clone());
    for (path, data) in &mut files {
        if *path == layer_blob {
            *data.last_mut().unwrap() ^= 1; // end-of-archive padding: still a valid tar
        }
    }
    refused(tar_of_files(&files), json!({}), "does not match its digest");

    for path in ["../etc/passwd", "a/../../x"] {
        refused(
            tar_of(&[TarEntry::File(path, 0o755, b"x")]),
            run.clone(),
            "escapes the root",
        );
    }
    refused(
        tar_of(&[TarEntry::Dir("dev"), TarEntry::CharDevice("dev/mem")]),
        run.clone(),
        "device node",
    );
    refused(tar_of(&[TarEntry::Dir("etc")]), run.clone(), "empty");
    // The root filesystem lives in the guest's RAM: at most half of memory_mb (64 → 32 MiB). The
    // gzip-compressed upload is tiny.
    let big = vec![0u8; 33 << 20];
    refused(
        gzip(&busybox_rootfs(&[("big", 0o644, &big)])),
        json!({"memory_mb": 64, "cmd": ["/bin/sh"]}),
        "half the function's memory_mb",
    );
    // Nothing to run: no entrypoint, no cmd, no /function.
    refused(busybox_rootfs(&[]), json!({}), "nothing to run");
    // A bad upload is 422 before any 503: a valid image with a bad config field is 400.
    let error = expect_error(
        deploy_image(&kiln, rootfs.clone(), json!({"user": "root"})),
        400,
        "invalid_request",
    );
    assert!(error["message"].as_str().unwrap().contains("numeric"), "{error}");
    // Image fields on a Wasm function or a plain executable are 400 too.
    let error = expect_error(
        kiln.deploy_with("image", wat("hello"), json!({"cmd": ["x"]})),
        400,
        "invalid_request",
    );
    assert!(error["message"].as_str().unwrap().contains("microvm"), "{error}");
    let error = expect_error(
        deploy_image(&kiln, elf64(EM_X86_64, false), json!({"entrypoint": ["/function"]})),
        400,
        "invalid_request",
    );
    assert!(
        error["message"].as_str().unwrap().contains("static executable"),
        "{error}"
    );
    expect_error(kiln.get("/v1/functions/image"), 404, "not_found");
}

/// Valid images pass validation and meet the host's capability check: 503 here (no guest image,
/// and on this kind of host no hardware virtualization); with a guest kernel and agent on a host
/// with hardware virtualization they deploy.
#[test]
fn image_uploads_that_are_valid_meet_the_hosts_capability_check() {
    use crate::support::{busybox_rootfs, docker_save, gzip, oci_layout};
    let kiln = Kiln::start();
    let rootfs = busybox_rootfs(&[("www/index.html", 0o644, b"hello\n")]);
    let oci = json!({"Entrypoint": ["/bin/httpd", "-f"], "Cmd": ["-h", "/www"], "Env": ["PATH=/bin"]});
    let uploads = [
        (rootfs.clone(), json!({"cmd": ["/bin/sh", "-c", "cat /www/index.html"]})),
        (
            gzip(&rootfs),
            json!({"entrypoint": ["/bin/echo"], "workdir": "/www", "user": "0:0"}),
        ),
        (
            busybox_rootfs(&[("function", 0o755, b"#!/bin/sh\necho hi\n")]),
            json!({}),
        ),
        (oci_layout(std::slice::from_ref(&rootfs), oci.clone()), json!({})),
        (
            gzip(&oci_layout(std::slice::from_ref(&rootfs), oci.clone())),
            json!({"cmd": ["-p", "8080"]}),
        ),
        (
            docker_save(std::slice::from_ref(&rootfs), oci),
            json!({"env": {"A": "1"}}),
        ),
    ];
    for (upload, config) in uploads {
        expect_error(deploy_image(&kiln, upload, config), 503, "unavailable");
        expect_error(kiln.get("/v1/functions/image"), 404, "not_found");
    }
}
