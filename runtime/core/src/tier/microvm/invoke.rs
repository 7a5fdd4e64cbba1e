//! One microvm invocation, shaped like a Wasm one: take the function's permit (refused when it runs its
//! `max_concurrency`) and one of the tier's VM permits (refused when `--microvm-max-vms` VMs run), then
//! on the blocking pool restore the snapshot (memory mapped `MAP_PRIVATE`), send RESEED with 32
//! bytes of fresh host randomness and REQUEST with the input, read LOG frames (stderr) until the
//! RESPONSE (exit code and stdout), and tear the VM down. Exit code 0 is a success with the stdout;
//! anything else is `function_failed` with the exit code and the stderr tail; the vCPU is
//! kicked at the function's timeout (`timeout`), as a Wasm guest is interrupted.

use std::sync::Arc;

use bytes::Bytes;
use kiln_vmm::invocation::SEED_LEN;
use kiln_vmm::{Reply, RestoreError, RunError, Snapshot};

use super::MicrovmTier;
use crate::function::FunctionConfig;
use crate::outcome::{Failure, InvokeError, Success, STDERR_CAP, STDERR_TAIL, STDOUT_CAP};
use crate::permits::Permits;

/// A loaded microvm version: its snapshot, restored for each invocation.
pub struct MicrovmFunction {
    snapshot: Snapshot,
}

impl MicrovmFunction {
    pub fn new(snapshot: Snapshot) -> Self {
        Self { snapshot }
    }
}

/// What went wrong on the VM's thread.
#[derive(Debug)]
enum RunFailure {
    Restore(RestoreError),
    Invoke(kiln_vmm::InvokeError),
}

impl MicrovmTier {
    /// Restores `function`, runs one request and tears the VM down. The permits move to the VM's
    /// thread: they are released when the VM is gone, even if this future is dropped first (a
    /// client that hangs up does not free a slot early).
    pub(crate) async fn run_vm(
        &self,
        permits: Permits,
        function: &Arc<MicrovmFunction>,
        config: &FunctionConfig,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        let Some(hypervisor) = self.hypervisor.clone() else {
            return Err(InvokeError::failed(self.unavailable()));
        };
        let (function, timeout) = (function.clone(), config.timeout());
        // Automatic reseed: every restore gets its own entropy, so guests restored from one
        // snapshot never share the RNG state they were snapshotted with.
        let seed: [u8; SEED_LEN] = rand::random();
        let outcome = tokio::task::spawn_blocking(move || {
            let _permits = permits;
            let mut vm = function.snapshot.restore(&hypervisor).map_err(RunFailure::Restore)?;
            vm.invoke(&seed, &input, timeout, STDERR_CAP)
                .map_err(RunFailure::Invoke)
            // `vm` drops here: the VM, its vCPU and its private memory are gone.
        })
        .await
        .expect("microVM task panicked");
        shape(outcome, config)
    }
}

/// Turns what the guest answered into the response a Wasm invocation would give.
fn shape(outcome: Result<Reply, RunFailure>, config: &FunctionConfig) -> Result<Success, InvokeError> {
    let reply = match outcome {
        Ok(reply) => reply,
        Err(RunFailure::Restore(e)) => {
            return Err(InvokeError::failed(format!(
                "cannot restore the function's microVM: {e}"
            )))
        }
        Err(RunFailure::Invoke(e)) => {
            return Err(match e.run_error() {
                Some(RunError::Timeout(_)) => InvokeError::Timeout(config.timeout_ms),
                Some(RunError::MemoryExceeded { .. }) => InvokeError::failed(format!(
                    "the function exceeded its memory limit of {} MiB: {e}",
                    config.memory_mb
                )),
                Some(RunError::Shutdown) => {
                    InvokeError::failed("the microVM's guest stopped (kernel panic or reset)".into())
                }
                _ => InvokeError::failed(format!("the microVM failed: {e}")),
            })
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
    use std::time::{Duration, Instant};

    use kiln_vmm::test_guest::{self, AGENT_LOG};
    use kiln_vmm::{Hypervisor, MicroVm, VmConfig};

    use super::*;
    use crate::function::Tier;
    use crate::permits::Limit;
    use crate::registry::{Entry, LoadedFunction};
    use crate::tier::microvm::Capability;
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

    /// A snapshot of a test guest speaking the agent's protocol, where this host has KVM.
    fn snapshot_of(hv: &Hypervisor, image: &[u8], dir: &std::path::Path) -> Arc<MicrovmFunction> {
        let mut vm = MicroVm::boot_flat64(hv, VmConfig::new(4), image, Duration::from_secs(10)).unwrap();
        Snapshot::create(hv, &mut vm, dir).unwrap();
        Arc::new(MicrovmFunction::new(Snapshot::load(dir).unwrap()))
    }

    /// Admit, then run: the tier's two steps, as `Functions::invoke` takes them.
    async fn invoke(
        tier: &MicrovmTier,
        f: &LoadedFunction,
        concurrency: &Limit,
        input: Bytes,
    ) -> Result<Success, InvokeError> {
        let permits = tier.admit(f, concurrency)?;
        tier.run(permits, f, input).await
    }

    /// Kiln's invocation path — permits, restore on the blocking pool, automatic RESEED, REQUEST,
    /// LOG and RESPONSE, teardown, shaping, timeout — with the VMM's tiny agent-protocol guest in
    /// place of Linux, so it runs on hosts (PVM) where the Linux guest cannot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restored_snapshots_are_reseeded_and_answer_through_kilns_invoke_path() {
        let test = "tier::microvm::invoke::restored_snapshots_are_reseeded_and_answer_through_kilns_invoke_path";
        let hv = match Hypervisor::open() {
            Ok(hv) => Arc::new(hv),
            Err(e) => return kiln_testkit::skip(test, &format!("this host has no usable KVM ({e})")),
        };
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let data = tempfile::tempdir().unwrap();
        let agent = snapshot_of(&hv, &test_guest::agent(), dirs.0.path());
        let spin = snapshot_of(&hv, &test_guest::spin(), dirs.1.path());
        let layout = crate::storage::Layout::new(data.path().to_path_buf());
        let tier = MicrovmTier::with_parts(Capability::Available, Some(hv), None, 1, layout);
        let config = FunctionConfig {
            tier: Tier::Microvm,
            timeout_ms: 5_000,
            ..FunctionConfig::default()
        };
        let function = |snapshot: &Arc<MicrovmFunction>, config: &FunctionConfig| {
            let record = crate::function::VersionRecord {
                name: "native".into(),
                version: 1,
                digest: crate::digest::Digest::of(b"upload"),
                code_digest: crate::digest::Digest::of(b"snapshot"),
                kind: crate::function::ArtifactKind::Native,
                config: config.clone(),
                created_at: String::new(),
            };
            LoadedFunction::new(record, Entry::Microvm(snapshot.clone()))
        };
        let concurrency = Limit::new(8);
        let native = function(&agent, &config);

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
        let short = FunctionConfig {
            timeout_ms: 100,
            ..config.clone()
        };
        let spinning = function(&spin, &short);
        let started = Instant::now();
        let err = invoke(&tier, &spinning, &concurrency, Bytes::from_static(b"x"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, InvokeError::Timeout(100)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        // The permits came back with the VM: the tier serves again.
        assert!(invoke(&tier, &native, &concurrency, Bytes::from_static(b"ok"))
            .await
            .is_ok());
        assert_eq!((concurrency.in_use(), tier.vms.in_use()), (0, 0));
    }
}
