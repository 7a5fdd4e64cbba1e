//! One microvm invocation, shaped like a Wasm one: take the function's permit (refused when it runs its
//! `max_concurrency`) and one of the tier's VM permits (refused when `--microvm-max-vms` VMs run), then
//! on the blocking pool hand the snapshot to a jailed helper process (`kiln_vmm::jail`), which
//! restores it (memory mapped `MAP_PRIVATE` from a read-only bind mount), sends RESEED with 32
//! bytes of fresh host randomness and REQUEST with the input, reads LOG frames (stderr) until the
//! RESPONSE (exit code and stdout), answers and exits. Exit code 0 is a success with the stdout;
//! anything else is `function_failed` with the exit code and the stderr tail; the vCPU is kicked
//! at the function's timeout (`timeout`), as a Wasm guest is interrupted. A helper that dies or
//! hangs (past the timeout plus the jail's margin it is killed) is `function_failed`, never a
//! hang.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use kiln_vmm::invocation::SEED_LEN;
use kiln_vmm::jail::JailError;
use kiln_vmm::{Reply, RunError};

use super::snapshots::Verified;
use super::MicrovmTier;
use crate::function::FunctionConfig;
use crate::outcome::{Failure, InvokeError, Success, STDERR_CAP, STDERR_TAIL, STDOUT_CAP};
use crate::permits::Permits;

/// A loaded microvm version: its snapshot's directory, verified against its seal when it was
/// loaded, restored by a jailed helper for each invocation.
pub struct MicrovmFunction {
    dir: PathBuf,
    verified: Verified,
}

impl MicrovmFunction {
    pub fn new(dir: PathBuf, verified: Verified) -> Self {
        Self { dir, verified }
    }

    /// The snapshot's directory (`memory`, `state`, `seal`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest memory's size and SHA-256, as the load verified them.
    pub fn verified(&self) -> Verified {
        self.verified
    }
}

impl MicrovmTier {
    /// Runs one request on a VM restored from `function` in a jailed helper. The permits move to
    /// the blocking thread that waits for the helper: they are released when the helper has
    /// answered (or died, or been killed), even if this future is dropped first (a client that
    /// hangs up does not free a slot early).
    pub(crate) async fn run_vm(
        &self,
        permits: Permits,
        function: &Arc<MicrovmFunction>,
        config: &FunctionConfig,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        let Some(jail) = self.jail.clone() else {
            return Err(InvokeError::failed(self.unavailable()));
        };
        let (function, timeout) = (function.clone(), config.timeout());
        // Automatic reseed: every restore gets its own entropy, so guests restored from one
        // snapshot never share the RNG state they were snapshotted with.
        let seed: [u8; SEED_LEN] = rand::random();
        #[cfg(test)]
        let helper = self.next_helper.lock().expect("helper lock poisoned").take();
        let outcome = tokio::task::spawn_blocking(move || {
            let _permits = permits;
            #[cfg(test)]
            if let Some(helper) = helper {
                return helper.restore_and_invoke(&function.dir, &seed, &input, timeout, STDERR_CAP);
            }
            jail.restore_and_invoke(&function.dir, &seed, &input, timeout, STDERR_CAP)
            // The helper has answered and exits (reaped by the jail's reaper thread): the VM, its
            // vCPU and its private memory are gone with it.
        })
        .await
        .expect("microVM task panicked");
        shape(outcome, config)
    }

    /// Makes the next invocation use `helper` (tests: its pids, its jailed hook).
    #[cfg(test)]
    pub(crate) fn use_next(&self, helper: kiln_vmm::jail::Helper) {
        *self.next_helper.lock().expect("helper lock poisoned") = Some(helper);
    }
}

/// Turns what the guest answered, or how its helper failed, into the response a Wasm invocation
/// would give.
fn shape(outcome: Result<Reply, JailError>, config: &FunctionConfig) -> Result<Success, InvokeError> {
    let reply = match outcome {
        Ok(reply) => reply,
        Err(e) => {
            return Err(match e.run_error() {
                Some(RunError::Timeout(_)) => InvokeError::Timeout(config.timeout_ms),
                Some(RunError::MemoryExceeded { .. }) => InvokeError::failed(format!(
                    "the function exceeded its memory limit of {} MiB: {e}",
                    config.memory_mb
                )),
                Some(RunError::Shutdown) => {
                    InvokeError::failed("the microVM's guest stopped (kernel panic or reset)".into())
                }
                // The helper died (a seccomp kill, a crash, killed from outside), hung past its
                // deadline, or could not restore: the invocation failed, the server did not.
                _ => InvokeError::failed(format!("the microVM failed: {e}")),
            });
        }
    };
    // The VMM kept at most STDERR_CAP bytes of the log.
    let log = &reply.log[reply.log.len().saturating_sub(STDERR_TAIL)..];
    let stderr_tail = String::from_utf8_lossy(log).into_owned();
    let message = if reply.stdout.len() > STDOUT_CAP {
        format!("the function's stdout exceeded its limit of {STDOUT_CAP} bytes")
    } else if reply.exit_code == SIGKILLED {
        // Nothing in the guest sends SIGKILL but the kernel's OOM killer.
        format!(
            "the function was killed (SIGKILL, exit code {SIGKILLED}): it most likely ran out of its \
             memory limit of {} MiB",
            config.memory_mb
        )
    } else if reply.exit_code != 0 {
        format!("the function exited with code {}", reply.exit_code)
    } else {
        return Ok(Success {
            stdout: Bytes::from(reply.stdout),
            stderr_tail,
        });
    };
    Err(InvokeError::Failed(Failure {
        message,
        trap: None,
        exit_code: (reply.exit_code != 0).then_some(reply.exit_code),
        stderr_tail,
    }))
}

/// The exit code the agent reports for a function killed by SIGKILL (128 + 9).
const SIGKILLED: i32 = 137;

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use kiln_vmm::jail::Jail;
    use kiln_vmm::test_guest::{self, AGENT_LOG};
    use kiln_vmm::VmConfig;

    use super::*;
    use crate::digest::Digest;
    use crate::function::{ArtifactKind, Tier, VersionRecord};
    use crate::permits::Limit;
    use crate::registry::{Entry, LoadedFunction};
    use crate::storage::Layout;
    use crate::tier::microvm::snapshots::{self, Staged};
    use crate::tier::microvm::{test_helper, Capability};
    use crate::tier::Tier as _;

    fn reply(exit_code: i32, stdout: &[u8], log: &[u8]) -> Reply {
        Reply {
            exit_code,
            stdout: stdout.to_vec(),
            log: log.to_vec(),
            log_truncated: false,
        }
    }

    #[test]
    fn exit_codes_and_output_map_to_the_wasm_tiers_outcomes() {
        let config = FunctionConfig::default();
        let ok = shape(Ok(reply(0, b"out", b"log")), &config).unwrap();
        assert_eq!(ok.stdout, Bytes::from_static(b"out"));
        assert_eq!(ok.stderr_tail, "log");
        let Err(InvokeError::Failed(failure)) = shape(Ok(reply(3, b"", b"bad input\n")), &config) else {
            panic!("exit code 3 is a failure");
        };
        assert_eq!(failure.exit_code, Some(3));
        assert_eq!(failure.message, "the function exited with code 3");
        assert_eq!(failure.stderr_tail, "bad input\n");
        let Err(InvokeError::Failed(failure)) = shape(Ok(reply(137, b"", b"")), &config) else {
            panic!("SIGKILL is a failure");
        };
        assert_eq!(failure.exit_code, Some(137));
        assert!(
            failure.message.contains("memory limit of 128 MiB"),
            "{}",
            failure.message
        );
        let big = vec![b'x'; STDOUT_CAP + 1];
        let Err(InvokeError::Failed(failure)) = shape(Ok(reply(0, &big, b"")), &config) else {
            panic!("stdout over its cap is a failure");
        };
        assert!(
            failure.message.contains("stdout exceeded its limit"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_helper_that_fails_is_a_failed_invocation_with_the_in_process_mapping() {
        use kiln_vmm::jail::HelperExit;
        let config = FunctionConfig::default();
        let died = shape(Err(JailError::Died(HelperExit::Signal(libc::SIGSYS))), &config);
        let Err(InvokeError::Failed(failure)) = died else {
            panic!("a dead helper is a failed invocation: {died:?}");
        };
        assert!(failure.message.contains("SIGSYS"), "{}", failure.message);
        let hung = shape(Err(JailError::Hung(Duration::from_secs(6))), &config);
        assert!(matches!(hung, Err(InvokeError::Failed(_))), "{hung:?}");
        let timeout = shape(Err(JailError::Run(RunError::Timeout(config.timeout()))), &config);
        assert!(matches!(timeout, Err(InvokeError::Timeout(t)) if t == config.timeout_ms));
        let memory = shape(
            Err(JailError::Run(RunError::MemoryExceeded {
                addr: 1 << 30,
                size: 128 << 20,
            })),
            &config,
        );
        let Err(InvokeError::Failed(failure)) = memory else {
            panic!("{memory:?}");
        };
        assert!(
            failure.message.contains("memory limit of 128 MiB"),
            "{}",
            failure.message
        );
    }

    /// Admit, then run: the tier's two steps, as `Functions::invoke` takes them.
    async fn invoke(
        tier: &MicrovmTier,
        f: &LoadedFunction,
        concurrency: &Limit,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        let permits = tier.admit(f, concurrency)?;
        tier.run(permits, f, "test", input).await
    }

    /// The tier with a jail whose helpers are this test binary, on a fresh data directory, and
    /// the jail; `None` after recording why this host cannot run it.
    async fn jailed_tier(test: &str, data: &std::path::Path, max_vms: u32) -> Option<(MicrovmTier, Arc<Jail>)> {
        let jail = match tokio::task::spawn_blocking(|| test_helper::jail(0)).await.unwrap() {
            Ok(jail) => Arc::new(jail),
            Err(reason) => {
                kiln_testkit::skip(test, &reason);
                return None;
            }
        };
        let layout = Layout::new(data.to_path_buf());
        layout.prepare().unwrap();
        let tier = MicrovmTier::with_parts(Capability::Available, Some(jail.clone()), None, max_vms, layout);
        assert!(tier.is_available(), "{:?}", tier.reason());
        Some((tier, jail))
    }

    /// A test guest booted in the jail, snapshotted, sealed and published as a deploy's snapshot
    /// is, then loaded through the tier (which verifies its seal) as version 1 of `name`.
    async fn deployed(
        tier: &MicrovmTier,
        jail: &Arc<Jail>,
        name: &str,
        image: Vec<u8>,
        config: &FunctionConfig,
    ) -> LoadedFunction {
        let digest = Digest::of(&image);
        let staged = Staged::new(&tier.layout, digest.clone()).unwrap();
        let (jail, sealer, path) = (
            jail.clone(),
            tier.sealer.clone().unwrap(),
            staged.path().unwrap().to_path_buf(),
        );
        let seal_digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            jail.boot_flat64_and_snapshot(&image, VmConfig::new(4), Duration::from_secs(30), &path)
                .unwrap();
            snapshots::seal(&sealer, &path, &seal_digest).unwrap();
        })
        .await
        .unwrap();
        assert_eq!(tier.publish(staged).unwrap(), digest);
        let record = VersionRecord {
            name: name.into(),
            version: 1,
            digest: Digest::of(name.as_bytes()),
            code_digest: digest,
            kind: ArtifactKind::Native,
            config: config.clone(),
            created_at: String::new(),
        };
        let entry = tier.load(&record).await.unwrap();
        LoadedFunction::new(record, entry)
    }

    fn microvm_config(timeout_ms: u64) -> FunctionConfig {
        FunctionConfig {
            tier: Tier::Microvm,
            timeout_ms,
            ..FunctionConfig::default()
        }
    }

    /// Whether this process holds a descriptor of `/dev/kvm` (or a VM or vCPU).
    fn holds_kvm(pid: &str) -> bool {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path())
                    .map(|target| {
                        let target = target.display().to_string();
                        target == "/dev/kvm" || target.starts_with("anon_inode:kvm")
                    })
                    .unwrap_or(false)
            })
    }

    /// Kiln's invocation path — permits, the jailed helper on the blocking pool, automatic
    /// RESEED, REQUEST, LOG and RESPONSE, shaping, timeout — with the VMM's tiny agent-protocol
    /// guest in place of Linux, so it runs on hosts (PVM) where the Linux guest cannot. Every VM,
    /// the snapshot's boot included, runs in a helper: this process never opens /dev/kvm.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restored_snapshots_are_reseeded_and_answer_through_kilns_invoke_path() {
        let test = "tier::microvm::invoke::restored_snapshots_are_reseeded_and_answer_through_kilns_invoke_path";
        let data = tempfile::tempdir().unwrap();
        let Some((tier, jail)) = jailed_tier(test, data.path(), 1).await else {
            return;
        };
        let config = microvm_config(5_000);
        let native = deployed(&tier, &jail, "native", test_guest::agent(), &config).await;
        let concurrency = Limit::new(8);

        let mut seeds = Vec::new();
        for i in 0..4 {
            let input = format!("request {i}");
            let success = invoke(&tier, &native, &concurrency, Bytes::from(input.clone()))
                .await
                .unwrap();
            // The guest answers with the seed it was sent and the input; exit code 0 because every
            // invocation starts from the snapshot (the guest counts requests since it booted).
            let (seed, echoed) = success.stdout.split_at(SEED_LEN);
            assert_eq!(echoed, input.as_bytes());
            assert_ne!(seed, [0; SEED_LEN], "no RESEED reached the guest");
            seeds.push(seed.to_vec());
            assert_eq!(success.stderr_tail.as_bytes(), AGENT_LOG);
        }
        seeds.sort();
        seeds.dedup();
        assert_eq!(seeds.len(), 4, "every restore got fresh entropy");

        // The tier's VM limit: with its one permit taken, an invocation is refused; the function's own
        // limit is checked first.
        let held = Permits::take("other", &Limit::new(1), &tier.vms, 1).unwrap();
        let busy = invoke(&tier, &native, &concurrency, Bytes::new()).await.err().unwrap();
        assert!(matches!(busy, InvokeError::PoolBusy(1)), "{busy}");
        drop(held);
        assert_eq!(concurrency.in_use(), 0, "a refused invocation holds no function permit");

        // A guest that never answers: kicked at the function's timeout, reported as Wasm's is.
        let spinning = deployed(&tier, &jail, "spin", test_guest::spin(), &microvm_config(100)).await;
        let started = Instant::now();
        let err = invoke(&tier, &spinning, &concurrency, Bytes::from_static(b"x"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, InvokeError::Timeout(100)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        // The permits came back with the VM: the tier serves again.
        assert!(invoke(&tier, &native, &concurrency, Bytes::from_static(b"ok"))
            .await
            .is_ok());
        assert_eq!((concurrency.in_use(), tier.vms.in_use()), (0, 0));
        assert!(!holds_kvm("self"), "the tier's process holds a KVM descriptor");
    }

    fn status_field(status: &str, field: &str) -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
            .trim()
            .to_owned()
    }

    fn namespace(pid: &str, name: &str) -> String {
        std::fs::read_link(format!("/proc/{pid}/ns/{name}"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{name}: {e}"))
            .display()
            .to_string()
    }

    /// Starts an invocation of `function` (a spinning guest) on a helper of the test's own, and
    /// returns the worker's pid once it is jailed, with the invocation's outcome to come.
    async fn invocation_in_view(
        tier: &Arc<MicrovmTier>,
        jail: &Arc<Jail>,
        function: &Arc<LoadedFunction>,
    ) -> (u32, tokio::task::JoinHandle<(Result<Success, InvokeError>, Instant)>) {
        let mut helper = {
            let jail = jail.clone();
            tokio::task::spawn_blocking(move || jail.spawn())
                .await
                .unwrap()
                .unwrap()
        };
        let (jailed, on_jailed) = mpsc::channel();
        helper.on_jailed(move |pid| jailed.send(pid).unwrap());
        tier.use_next(helper);
        let invocation = {
            let (tier, function) = (tier.clone(), function.clone());
            tokio::spawn(async move {
                let outcome = invoke(&tier, &function, &Limit::new(1), Bytes::from_static(b"spin")).await;
                (outcome, Instant::now())
            })
        };
        let pid = tokio::task::spawn_blocking(move || on_jailed.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the helper was never jailed");
        (pid, invocation)
    }

    /// Issue 16's check: a Kiln invocation's vCPU runs in a separate process, in its own
    /// namespaces, behind seccomp, without capabilities, rooted in the snapshot's directory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kiln_invocation_runs_its_vcpu_in_a_jailed_helper_with_seccomp() {
        let test = "tier::microvm::invoke::a_kiln_invocation_runs_its_vcpu_in_a_jailed_helper_with_seccomp";
        let data = tempfile::tempdir().unwrap();
        let Some((tier, jail)) = jailed_tier(test, data.path(), 4).await else {
            return;
        };
        let tier = Arc::new(tier);
        let spin = Arc::new(deployed(&tier, &jail, "spin", test_guest::spin(), &microvm_config(60_000)).await);
        let Entry::Microvm(function) = &spin.entry else {
            unreachable!()
        };
        let (pid, invocation) = invocation_in_view(&tier, &jail, &spin).await;
        let pid_text = pid.to_string();
        assert_ne!(pid, std::process::id());
        for ns in ["mnt", "pid", "net", "user", "ipc", "uts"] {
            assert_ne!(
                namespace(&pid_text, ns),
                namespace("self", ns),
                "the helper shares the server's {ns} namespace"
            );
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert_eq!(status_field(&status, "Seccomp"), "2", "seccomp filter mode");
        assert_eq!(status_field(&status, "NoNewPrivs"), "1");
        for caps in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(&status, caps), "0000000000000000", "{caps}");
        }
        assert_eq!(status_field(&status, "NSpid").split_whitespace().last(), Some("1"));
        // Its root is the snapshot's directory, as the load verified it...
        use std::os::unix::fs::MetadataExt;
        let root = std::fs::metadata(format!("/proc/{pid}/root/.")).unwrap();
        let snapshot = std::fs::metadata(function.dir()).unwrap();
        assert_eq!((root.dev(), root.ino()), (snapshot.dev(), snapshot.ino()));
        // ...it holds the KVM descriptors, and the server none.
        assert!(holds_kvm(&pid_text), "the helper runs no VM");
        assert!(!holds_kvm("self"), "the server holds a KVM descriptor");
        // Stopping the test: the helper dies mid-invoke (see the next test).
        assert_eq!(kill9(pid), 0);
        let (outcome, _) = invocation.await.unwrap();
        assert!(matches!(outcome, Err(InvokeError::Failed(_))), "{:?}", outcome.err());
    }

    /// `kill(pid, SIGKILL)`.
    fn kill9(pid: u32) -> i32 {
        // SAFETY: kill with a pid the jail reported (a helper this test started) and a signal.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }
    }

    /// A helper killed mid-invoke (a guest escaping into it would be killed by its filter the
    /// same way) fails that invocation at once — `function_failed` — and nothing else: the
    /// permits come back and the tier serves the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_helper_killed_mid_invoke_is_function_failed_promptly() {
        let test = "tier::microvm::invoke::a_helper_killed_mid_invoke_is_function_failed_promptly";
        let data = tempfile::tempdir().unwrap();
        let Some((tier, jail)) = jailed_tier(test, data.path(), 4).await else {
            return;
        };
        let tier = Arc::new(tier);
        let spin = Arc::new(deployed(&tier, &jail, "spin", test_guest::spin(), &microvm_config(60_000)).await);
        let agent = deployed(&tier, &jail, "agent", test_guest::agent(), &microvm_config(5_000)).await;
        for _ in 0..3 {
            let (pid, invocation) = invocation_in_view(&tier, &jail, &spin).await;
            let killed = Instant::now();
            assert_eq!(kill9(pid), 0);
            let (outcome, answered) = tokio::time::timeout(Duration::from_secs(10), invocation)
                .await
                .expect("the invocation hangs after its helper died")
                .unwrap();
            let Err(InvokeError::Failed(failure)) = outcome else {
                panic!("a killed helper is function_failed: {:?}", outcome.err());
            };
            assert!(
                failure.message.contains("died") && failure.message.contains("SIGKILL"),
                "{}",
                failure.message
            );
            let took = answered - killed;
            assert!(took < Duration::from_secs(2), "answered {took:?} after the kill");
        }
        assert_eq!(tier.vms.in_use(), 0, "the dead helpers' VM permits came back");
        assert!(invoke(&tier, &agent, &Limit::new(1), Bytes::from_static(b"after"))
            .await
            .is_ok());
    }
}
