//! The hostile-guest suite. Every guest under `guests/hostile/` (plus a few uploads that cannot be
//! written as WAT: garbage, a truncated module, a native ELF, compile bombs) goes to one real
//! server and must end the way its table row says, within its time bound, while `/healthz` keeps
//! answering. Then come the phases a single invocation cannot show: a trap storm from 8 threads, a
//! concurrency flood, and a cross-invocation leak hunt over reused pool slots. Last, the server
//! must be healthy and back near the RSS, open fds and threads it had before the suite.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};

use crate::support::{expect_error, hostile, wat, Kiln};

/// How a deploy or an invocation must end.
enum Outcome {
    /// The deploy is refused: 422 invalid_code, the message containing this.
    Refused(&'static str),
    /// 200 with exactly this output.
    Output(&'static str),
    /// 200 with an output this check accepts.
    OutputLike(fn(&str) -> Result<(), String>),
    /// 502 function_failed; `trap` and `exit_code` must be present and contain / equal what is
    /// given, or be absent when `None`; the stderr tail must contain `stderr`.
    Failed {
        message: &'static str,
        trap: Option<&'static str>,
        exit_code: Option<i64>,
        stderr: &'static str,
    },
    /// 504 timeout, not before the function's timeout_ms.
    Timeout,
}

/// Where the code of a row comes from.
enum Code {
    /// `guests/hostile/<name>.wat`.
    Wat(&'static str),
    /// Bytes made by the test (no WAT can say them).
    Made(&'static str, fn() -> Vec<u8>),
}

impl Code {
    fn name(&self) -> &'static str {
        match self {
            Code::Wat(name) | Code::Made(name, _) => name,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Code::Wat(name) => hostile(name),
            Code::Made(_, make) => make(),
        }
    }
}

struct Row {
    code: Code,
    config: Value,
    input: &'static [u8],
    outcome: Outcome,
    /// Longest the deploy (for `Refused`) or the invocation may take.
    bound: Duration,
    /// Longest `/healthz` may take to answer while it runs.
    stall: Duration,
    /// Whether the repeat rounds run it again: not the ones whose 16-64 MiB host-side buffers or
    /// thousands of host timers leave the allocator holding memory it reuses only over many runs,
    /// nor the recursion (see its row).
    repeat: bool,
}

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);
/// Timeout of the guests that must time out.
const TIMEOUT_MS: u64 = 300;

fn row(code: Code, config: Value, input: &'static [u8], outcome: Outcome, bound: Duration) -> Row {
    Row {
        code,
        config,
        input,
        outcome,
        bound,
        stall: SEC,
        repeat: true,
    }
}

fn failed(message: &'static str) -> Outcome {
    Outcome::Failed {
        message,
        trap: None,
        exit_code: None,
        stderr: "",
    }
}

fn table() -> Vec<Row> {
    let quick = || json!({"timeout_ms": 5000, "memory_mb": 32});
    let timing_out = || json!({"timeout_ms": TIMEOUT_MS});
    let timeout_bound = Duration::from_millis(TIMEOUT_MS) + SEC;
    let exit = |code: i64| Outcome::Failed {
        message: "exited with code",
        trap: None,
        exit_code: Some(code),
        stderr: "bye\n",
    };
    let bad_exit = || Outcome::Failed {
        message: "exit with invalid exit status",
        trap: None,
        exit_code: None,
        stderr: "bye\n",
    };
    vec![
        // Time: guest code, a host call, instantiation, and host calls in a loop all time out.
        row(Code::Wat("loop"), timing_out(), b"", Outcome::Timeout, timeout_bound),
        row(
            Code::Wat("sleep_forever"),
            timing_out(),
            b"",
            Outcome::Timeout,
            timeout_bound,
        ),
        row(
            Code::Wat("start_loop"),
            timing_out(),
            b"",
            Outcome::Timeout,
            timeout_bound,
        ),
        row(
            Code::Wat("clock_spin"),
            timing_out(),
            b"",
            Outcome::Timeout,
            timeout_bound,
        ),
        // Memory and tables.
        row(
            Code::Wat("memory_grow"),
            json!({"timeout_ms": 5000, "memory_mb": 16}),
            b"",
            failed("exceeded its memory limit: memory limit of 16 MiB exceeded"),
            3 * SEC,
        ),
        row(
            Code::Wat("huge_memory"),
            quick(),
            b"",
            Outcome::Refused("more than the function's memory limit of 32 MiB"),
            3 * SEC,
        ),
        row(
            Code::Wat("huge_table"),
            quick(),
            b"",
            Outcome::Refused("declares a table of 10000000 elements; the limit is 100000"),
            3 * SEC,
        ),
        row(
            Code::Wat("table_grow"),
            quick(),
            b"",
            Outcome::Output("size=100000 huge=-1\n"),
            3 * SEC,
        ),
        row(
            Code::Wat("import_memory"),
            quick(),
            b"",
            Outcome::Refused("imports `wasi_snapshot_preview1::memory` as a non-function"),
            3 * SEC,
        ),
        // Issue 16, defect 2: a 64-bit memory's growth request wrapped the limiter's count and
        // let a component's memories grow past memory_mb (200 on the old server).
        row(
            Code::Wat("wide_memory"),
            json!({"timeout_ms": 5000, "memory_mb": 128}),
            b"",
            Outcome::Refused("memory64"),
            3 * SEC,
        ),
        row(
            Code::Wat("two_memories"),
            json!({"timeout_ms": 5000, "memory_mb": 128}),
            b"",
            failed("memory limit of 128 MiB exceeded"),
            3 * SEC,
        ),
        // Stack.
        // Not repeated: each run may land on another of the pool's fiber stacks, and a stack
        // may keep the ~1 MiB a recursion touched resident until it is zeroed on its next use,
        // so repeats could grow the server by up to 1 MiB per stack slot.
        Row {
            repeat: false,
            ..row(
                Code::Wat("recursion"),
                quick(),
                b"",
                Outcome::Failed {
                    message: "the function trapped: stack overflow",
                    trap: Some("call stack exhausted"),
                    exit_code: None,
                    stderr: "",
                },
                3 * SEC,
            )
        },
        // Output.
        row(
            Code::Wat("stdout_flood"),
            quick(),
            b"",
            failed("stdout exceeded its limit of 6291456 bytes"),
            3 * SEC,
        ),
        row(
            Code::Wat("stderr_flood"),
            quick(),
            b"",
            Outcome::Failed {
                message: "stderr exceeded its limit of 65536 bytes",
                trap: None,
                exit_code: None,
                stderr: "EEEE\n",
            },
            3 * SEC,
        ),
        row(
            Code::Wat("huge_write"),
            quick(),
            b"",
            failed("stdout exceeded its limit of 6291456 bytes"),
            3 * SEC,
        ),
        // The sandbox: no filesystem, no sockets.
        row(
            Code::Wat("fs_escape"),
            quick(),
            b"",
            Outcome::OutputLike(check_fs_escape),
            3 * SEC,
        ),
        row(
            Code::Wat("sockets"),
            quick(),
            b"",
            Outcome::OutputLike(check_sockets),
            3 * SEC,
        ),
        // Traps (the storm phase invokes it ~300 times more).
        row(
            Code::Wat("trap_storm"),
            quick(),
            b"",
            Outcome::Failed {
                message: "the function trapped",
                trap: Some("out of bounds memory access"),
                exit_code: None,
                stderr: "storm\n",
            },
            3 * SEC,
        ),
        // Exports.
        row(
            Code::Wat("no_exports"),
            quick(),
            b"",
            Outcome::Refused("exports no `_start` function"),
            3 * SEC,
        ),
        // Randomness: 4 GiB at once, 1 MiB out of bounds, 1 MiB at a time forever, 32 MiB for real.
        row(
            Code::Wat("random_abuse"),
            json!({"timeout_ms": 1000, "memory_mb": 96}),
            b"h",
            failed("requested len 4294967295 exceeds limit 1048576"),
            3 * SEC,
        ),
        Row {
            repeat: false,
            ..row(
                Code::Wat("random_abuse"),
                json!({"timeout_ms": 1000, "memory_mb": 96}),
                b"o",
                failed("out of bounds"),
                3 * SEC,
            )
        },
        Row {
            repeat: false,
            ..row(
                Code::Wat("random_abuse"),
                json!({"timeout_ms": 1000, "memory_mb": 96}),
                b"f",
                Outcome::Output("errno=0 zero_words=0\n"),
                3 * SEC,
            )
        },
        // Kiln caps one random_get at 1 MiB (a few ms of host work), so the guest yields often.
        Row {
            repeat: false,
            ..row(
                Code::Wat("random_abuse"),
                json!({"timeout_ms": 1000, "memory_mb": 96}),
                b"l",
                Outcome::Timeout,
                3 * SEC,
            )
        },
        // Exit codes, including ones WASI cannot express.
        row(
            Code::Wat("proc_exit"),
            quick(),
            b"0",
            Outcome::Output("exiting\n"),
            3 * SEC,
        ),
        row(Code::Wat("proc_exit"), quick(), b"1", exit(1), 3 * SEC),
        row(Code::Wat("proc_exit"), quick(), b"125", exit(125), 3 * SEC),
        row(Code::Wat("proc_exit"), quick(), b"126", bad_exit(), 3 * SEC),
        row(Code::Wat("proc_exit"), quick(), b"255", bad_exit(), 3 * SEC),
        row(Code::Wat("proc_exit"), quick(), b"4294967295", bad_exit(), 3 * SEC),
        row(Code::Wat("proc_exit"), quick(), b"2147483648", bad_exit(), 3 * SEC),
        // Host objects: an instance may hold 10,000; 480,000 timers in one poll_oneoff call fail
        // fast instead of turning guest memory into host memory.
        Row {
            stall: POLL_BOMB_STALL,
            repeat: false,
            ..row(
                Code::Wat("poll_bomb"),
                json!({"timeout_ms": 500, "memory_mb": 96}),
                POLL_BOMB_SUBSCRIPTIONS,
                failed("resource table has no free keys"),
                2 * SEC,
            )
        },
        // Under the bound, the timers are real: a timeout.
        Row {
            repeat: false,
            ..row(
                Code::Wat("poll_bomb"),
                json!({"timeout_ms": 500, "memory_mb": 96}),
                b"3000",
                Outcome::Timeout,
                2 * SEC,
            )
        },
        // Uploads that are not Wasm at all, or not whole.
        row(
            Code::Made("garbage", garbage),
            json!({}),
            b"",
            Outcome::Refused("does not start with the `\\0asm` header"),
            3 * SEC,
        ),
        row(
            Code::Made("garbage_after_header", garbage_after_header),
            json!({}),
            b"",
            Outcome::Refused("invalid WebAssembly"),
            3 * SEC,
        ),
        row(
            Code::Made("truncated", truncated),
            json!({}),
            b"",
            Outcome::Refused("invalid WebAssembly"),
            3 * SEC,
        ),
        row(
            Code::Made("native_elf", native_elf),
            json!({}),
            b"",
            Outcome::Refused("native ELF executable"),
            3 * SEC,
        ),
        // Compile bombs: tiny uploads that kept Cranelift busy for minutes before validate.rs
        // refused them (on 2 cores: 67 s for the first, 176 s for the second; the third's 1,000-
        // function version took 5.7 s, so about a minute for these 10,000).
        row(
            Code::Made("bomb_live_locals", bomb_live_locals),
            json!({}),
            b"",
            Outcome::Refused("locals live around its loops"),
            10 * SEC,
        ),
        row(
            Code::Made("bomb_deep_loops", bomb_deep_loops),
            json!({}),
            b"",
            Outcome::Refused("nests loops"),
            10 * SEC,
        ),
        row(
            Code::Made("bomb_declared_locals", bomb_declared_locals),
            json!({}),
            b"",
            Outcome::Refused("declare more than"),
            10 * SEC,
        ),
    ]
}

/// Subscriptions the poll bomb asks for, and how long `/healthz` may stall meanwhile. 20,000
/// keeps what the allocator retains afterwards (about 1 KiB per subscription, after a few runs)
/// inside the suite's RSS budget. The guest's default, 480,000, makes the server keep ~470 MB for
/// good, answer 1.2 s past the timeout and stall `/healthz` for 1.8 s: a known problem, not fixed
/// here (the WASI context in invoke.rs does not bound the host objects a guest may create).
const POLL_BOMB_SUBSCRIPTIONS: &[u8] = b"480000";
const POLL_BOMB_STALL: Duration = Duration::from_millis(500);

fn check_errnos(output: &str, names: &[&str]) -> Result<(), String> {
    let lines: Vec<&str> = output.lines().collect();
    if lines.len() != names.len() {
        return Err(format!("expected {} lines", names.len()));
    }
    for (line, name) in lines.iter().zip(names) {
        let errno = line
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| format!("line {line:?} is not {name}=<errno>"))?;
        if errno == 0 {
            return Err(format!("{name} succeeded"));
        }
    }
    Ok(())
}

fn check_fs_escape(output: &str) -> Result<(), String> {
    if output.contains("LEAKED") || output.contains("root:") {
        return Err("the guest read a host file".into());
    }
    let without_preopens = output.replacen("preopens=0\n", "", 1);
    if without_preopens.len() == output.len() {
        return Err("the guest found a preopened directory".into());
    }
    check_errnos(
        &without_preopens,
        &[
            "prestat3",
            "open_dotdot",
            "open_abs",
            "open_stdin",
            "open_neg",
            "open_dot",
            "read3",
            "readdir3",
            "mkdir3",
            "stat3",
        ],
    )?;
    // No preopen, so the probes of fd 3 find nothing there at all (errno 8, badf).
    if !output.contains("prestat3=8\n") || !output.contains("open_dotdot=8\n") {
        return Err("fd 3 is not a bad descriptor".into());
    }
    Ok(())
}

fn check_sockets(output: &str) -> Result<(), String> {
    check_errnos(
        output,
        &[
            "accept3",
            "accept0",
            "recv3",
            "recv0",
            "send1000",
            "send1",
            "shutdown3",
            "shutdown1",
        ],
    )
}

/// Deterministic bytes from a xorshift generator.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn garbage() -> Vec<u8> {
    noise(0x9E37_79B9_7F4A_7C15, 256 * 1024)
}

fn garbage_after_header() -> Vec<u8> {
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.extend(noise(0xD1B5_4A32_D192_ED03, 256 * 1024));
    bytes
}

fn truncated() -> Vec<u8> {
    let whole = wat::parse_bytes(&hostile("leak")).unwrap().into_owned();
    whole[..whole.len() / 2].to_vec()
}

/// A real native executable of this host.
fn native_elf() -> Vec<u8> {
    let elf = std::fs::read("/bin/true").expect("/bin/true");
    assert!(elf.starts_with(b"\x7fELF"));
    elf
}

fn uleb(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    uleb(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// A WASI command module with `count` functions of type `() -> ()`, each with `i32_locals` locals
/// and the body `code` (without the final `end`); function 0 is `_start`.
fn module(count: u32, i32_locals: u32, code: &[u8]) -> Vec<u8> {
    let mut out = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut out);
    let mut functions = Vec::new();
    uleb(count.into(), &mut functions);
    functions.resize(functions.len() + count as usize, 0);
    section(3, &functions, &mut out);
    section(5, &[1, 0, 1], &mut out);
    section(7, b"\x01\x06_start\x00\x00", &mut out);
    let mut body = Vec::new();
    if i32_locals == 0 {
        body.push(0);
    } else {
        body.push(1);
        uleb(i32_locals.into(), &mut body);
        body.push(0x7f);
    }
    body.extend_from_slice(code);
    body.push(0x0b);
    let mut bodies = Vec::new();
    uleb(count.into(), &mut bodies);
    for _ in 0..count {
        uleb(body.len() as u64, &mut bodies);
        bodies.extend_from_slice(&body);
    }
    section(10, &bodies, &mut out);
    out
}

/// One function, 30,000 locals, all of them updated inside one loop, `l[i] = l[i] + l[i + 1]`
/// (340 KB).
fn bomb_live_locals() -> Vec<u8> {
    let locals = 30_000u64;
    let mut code = vec![0x03, 0x40];
    for i in 0..locals {
        code.push(0x20);
        uleb(i, &mut code);
        code.push(0x20);
        uleb((i + 1) % locals, &mut code);
        code.extend_from_slice(&[0x6a, 0x21]);
        uleb(i, &mut code);
    }
    code.extend_from_slice(&[0x20, 0, 0x0d, 0, 0x0b]);
    module(1, locals as u32, &code)
}

/// One function, 40,000 nested loops (120 KB).
fn bomb_deep_loops() -> Vec<u8> {
    let depth = 40_000;
    let mut code = [0x03, 0x40].repeat(depth);
    code.extend_from_slice(&[0x41, 0, 0x0d, 0]);
    code.extend(std::iter::repeat_n(0x0b, depth));
    module(1, 0, &code)
}

/// 10,000 functions declaring 50,000 locals each (130 KB).
fn bomb_declared_locals() -> Vec<u8> {
    let mut code = vec![0x20];
    uleb(49_999, &mut code);
    code.push(0x1a);
    module(10_000, 50_000, &code)
}

/// 2,000 straight-line functions of 5.6 KB each (11 MB): big, but honest work for the compiler.
fn many_large_functions() -> Vec<u8> {
    let mut code = Vec::new();
    for i in 0..800u32 {
        let local = |n: u32| (n % 16) as u8;
        code.extend_from_slice(&[0x20, local(i), 0x20, local(i * 7 + 3), 0x6a, 0x21, local(i * 5 + 1)]);
    }
    module(2_000, 16, &code)
}

/// Polls `/healthz` until dropped and remembers the slowest answer.
struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Duration>>,
}

impl Probe {
    fn start(kiln: &Kiln) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let url = kiln.url("/healthz");
        let thread = std::thread::spawn(move || {
            let client = fresh_client();
            let mut slowest = Duration::ZERO;
            while !flag.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let status = client.get(&url).send().map(|r| r.status().as_u16());
                assert_eq!(status.ok(), Some(200), "/healthz failed while a hostile guest ran");
                slowest = slowest.max(asked.elapsed());
                std::thread::sleep(Duration::from_millis(20));
            }
            slowest
        });
        Probe {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("health probe")
    }
}

/// A client of its own: its connections close when it is dropped, so they do not linger as open
/// fds in the server.
fn fresh_client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1)
        .build()
        .unwrap()
}

fn function_name(code: &Code) -> String {
    code.name().replace('_', "-")
}

/// Checks one answer against its outcome; `what` names the row in failures.
fn check(what: &str, response: Response, outcome: &Outcome, elapsed: Duration, timeout_ms: u64) {
    match outcome {
        Outcome::Refused(needle) => {
            let error = expect_error(response, 422, "invalid_code");
            let message = error["message"].as_str().unwrap();
            assert!(message.contains(needle), "{what}: {message:?} should say {needle:?}");
        }
        Outcome::Output(expected) => {
            let status = response.status().as_u16();
            let body = response.text().unwrap();
            assert_eq!((status, body.as_str()), (200, *expected), "{what}");
        }
        Outcome::OutputLike(accept) => {
            let status = response.status().as_u16();
            let body = response.text().unwrap();
            assert_eq!(status, 200, "{what}: {body}");
            if let Err(why) = accept(&body) {
                panic!("{what}: {why}; output:\n{body}");
            }
        }
        Outcome::Failed {
            message,
            trap,
            exit_code,
            stderr,
        } => {
            let error = expect_error(response, 502, "function_failed");
            let text = error["message"].as_str().unwrap();
            assert!(text.contains(message), "{what}: {error} should say {message:?}");
            match trap {
                Some(needle) => assert!(
                    error["trap"].as_str().is_some_and(|t| t.contains(needle)),
                    "{what}: trap should say {needle:?}: {error}"
                ),
                None => assert!(error.get("trap").is_none(), "{what}: unexpected trap: {error}"),
            }
            assert_eq!(
                error.get("exit_code").and_then(Value::as_i64),
                *exit_code,
                "{what}: {error}"
            );
            let tail = error["stderr"].as_str().expect("stderr tail");
            assert!(tail.contains(stderr), "{what}: stderr tail should contain {stderr:?}");
            assert!(tail.len() <= 4096, "{what}: the stderr tail is {} bytes", tail.len());
        }
        Outcome::Timeout => {
            let error = expect_error(response, 504, "timeout");
            assert!(
                error["message"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("timeout of {timeout_ms} ms")),
                "{what}: {error}"
            );
            assert!(
                elapsed >= Duration::from_millis(timeout_ms) - 10 * MS,
                "{what}: timed out early, after {elapsed:?}"
            );
        }
    }
}

/// Resident memory (KiB), open fds and threads of a process.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

fn usage(pid: i32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    Usage {
        rss_kib: field("VmRSS:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc fd").count() as u64,
        threads: field("Threads:"),
    }
}

/// How far past the baseline the server may stay once the suite is over and its functions are
/// deleted. The RSS allowance is what the pool keeps by design, 2 MiB of dirty linear memory per
/// memory slot used (`linear_memory_keep_resident` in pool.rs; the test server has 64 slots), plus
/// 64 MiB for what the allocator keeps after the big host-side buffers of the suite (compiling
/// 11 MB of code, a 6 MiB stdout, 16 MiB of randomness, 20,000 timers). Measured: +94 to +103 MiB
/// (about 30 MiB of it the leak hunt's 64 warm slots, 23 MiB the compilation).
const RSS_SLACK_KIB: u64 = (64 * 2 + 64) * 1024;
const FD_SLACK: u64 = 10;
const THREAD_SLACK: u64 = 8;
/// How much repeating guests that already ran may grow the server: nothing, give or take the
/// allocator's noise and a few pool slots the repeat lands on for the first time (each keeps up
/// to 2 MiB resident by design; on a loaded machine the repeat of the table grew it 9.6 MiB).
const REPEAT_RSS_SLACK_KIB: u64 = 16 * 1024;

fn within(base: Usage, now: Usage) -> bool {
    now.rss_kib <= base.rss_kib + RSS_SLACK_KIB
        && now.fds <= base.fds + FD_SLACK
        && now.threads <= base.threads + THREAD_SLACK
}

/// Asserts that running `what` again did not grow the server (giving connections that just
/// closed a moment to go).
fn no_growth(what: &str, before: Usage, pid: i32) {
    if let Err(after) = grew_not(what, before, pid) {
        panic!("{what} grew the server: {before:?} before, {after:?} after");
    }
}

/// Whether the server stayed within the repeat slack of `before`, giving connections that just
/// closed a moment to go; `Err` carries what it grew to.
fn grew_not(what: &str, before: Usage, pid: i32) -> Result<(), Usage> {
    let grown = |after: Usage| {
        after.rss_kib > before.rss_kib + REPEAT_RSS_SLACK_KIB
            || after.fds > before.fds + 2
            || after.threads > before.threads + 2
    };
    let started = Instant::now();
    let mut after = usage(pid);
    while grown(after) && started.elapsed() < 3 * SEC {
        std::thread::sleep(Duration::from_millis(100));
        after = usage(pid);
    }
    eprintln!("hostile: {what}: {before:?} -> {after:?}");
    if grown(after) {
        Err(after)
    } else {
        Ok(())
    }
}

#[test]
fn hostile_guests_cannot_hurt_the_host() {
    let suite = Instant::now();
    let kiln = Kiln::start();
    let pid = kiln.pid();

    // Warm up what every server has after its first deploy and invocation (compiler threads, the
    // database, the pool), then take the baseline.
    kiln.must_deploy("hello", wat("hello"));
    assert_eq!(kiln.invoke("hello", "").text().unwrap(), "Hello from Kiln!\n");
    std::thread::sleep(Duration::from_millis(500));
    let baseline = usage(pid);

    // The table, a big honest compile, the trap storm, the concurrency flood, the leak hunt.
    let mut functions: Vec<String> = Vec::new();
    run_table(&kiln, &mut functions, true, 1);
    functions.push(compile_big(&kiln));
    let before = usage(pid);
    storm(&kiln);
    no_growth("304 more traps", before, pid);
    functions.push(flood(&kiln));
    functions.extend(leak_hunt(&kiln));
    // Guests that already ran, again: whatever a hostile invocation leaves behind must not add
    // up. Two rounds first put each function back in pool slots of its own (the leak hunt took
    // them all; under load a guest may land on a slot it never used, which then keeps its pages
    // resident by design, and that settles); the two rounds after must not grow the server. A
    // leak grows with every round; slots settle.
    // A leak grows the server in every round; slots settling (or the allocator keeping a
    // buffer) grow it once. So a pair of rounds that grew is repeated, up to three pairs, and
    // only growth in every pair fails (CI saw a single pair grow 20 MiB once on a loaded host).
    run_table(&kiln, &mut functions, false, 2);
    for pair in 1..=3 {
        let before = usage(pid);
        run_table(&kiln, &mut functions, false, 2);
        match grew_not("the table twice more", before, pid) {
            Ok(()) => break,
            Err(after) if pair == 3 => panic!(
                "the table grew the server in three pairs of rounds running, the last {before:?} before, {after:?} after"
            ),
            Err(_) => {}
        }
    }
    let loaded = usage(pid);

    // Healthy after all that, and back near the baseline once the suite's functions are gone.
    assert_eq!(kiln.get("/healthz").status(), 200);
    assert_eq!(kiln.invoke("hello", "").text().unwrap(), "Hello from Kiln!\n");
    for name in &functions {
        let status = kiln.delete(&format!("/v1/functions/{name}")).status();
        assert_eq!(status, 204, "deleting {name}");
    }
    let settle = Instant::now();
    let mut after = usage(pid);
    while !within(baseline, after) && settle.elapsed() < 12 * SEC {
        std::thread::sleep(Duration::from_millis(250));
        after = usage(pid);
    }
    eprintln!(
        "hostile: baseline {baseline:?}; with the suite's {} functions {loaded:?}; after deleting them {after:?} (settled in {:.1?}); suite took {:.1?}",
        functions.len(),
        settle.elapsed(),
        suite.elapsed()
    );
    assert!(
        within(baseline, after),
        "the server did not come back near its baseline: {baseline:?} before, {after:?} after"
    );
    assert_eq!(kiln.get("/healthz").status(), 200);
    assert!(!kiln.log().contains("panicked"), "the server panicked:\n{}", kiln.log());
}

/// Every row of the table: deploys (once per function) and, unless refused, invokes, with
/// `/healthz` probed meanwhile. The first pass reports each row; a repeat pass runs each
/// repeatable row `times` times, quietly. Adds the functions it deploys to `functions`.
fn run_table(kiln: &Kiln, functions: &mut Vec<String>, first: bool, times: usize) {
    for row in table() {
        let name = function_name(&row.code);
        let what = format!("{} {:?}", row.code.name(), String::from_utf8_lossy(row.input));
        let timeout_ms = row.config["timeout_ms"].as_u64().unwrap_or(10_000);
        if let Outcome::Refused(_) = row.outcome {
            let started = Instant::now();
            let response = kiln.deploy_with(&name, row.code.bytes(), row.config.clone());
            let elapsed = started.elapsed();
            check(&what, response, &row.outcome, elapsed, timeout_ms);
            assert!(elapsed <= row.bound, "{what}: refusing took {elapsed:?}");
            expect_error(kiln.get(&format!("/v1/functions/{name}")), 404, "not_found");
            if first {
                eprintln!("hostile: {what:<32} refused in {elapsed:.3?}");
            }
            continue;
        }
        if !functions.contains(&name) {
            let response = kiln.deploy_with(&name, row.code.bytes(), row.config.clone());
            let status = response.status();
            assert_eq!(status, 201, "deploying {what}: {}", response.text().unwrap());
            functions.push(name.clone());
        }
        let times = if first {
            1
        } else if row.repeat {
            times
        } else {
            0
        };
        for _ in 0..times {
            let probe = Probe::start(kiln);
            let started = Instant::now();
            let response = kiln.invoke(&name, row.input);
            let elapsed = started.elapsed();
            let stall = probe.finish();
            check(&what, response, &row.outcome, elapsed, timeout_ms);
            assert!(elapsed <= row.bound, "{what}: took {elapsed:?}, bound {:?}", row.bound);
            assert!(stall <= row.stall, "{what}: /healthz took {stall:?} while it ran");
            if first {
                let rss = usage(kiln.pid()).rss_kib >> 10;
                eprintln!(
                    "hostile: {what:<32} {elapsed:>10.3?}  slowest /healthz {stall:>10.3?}  server RSS {rss} MiB"
                );
            }
        }
    }
}

/// A big but honest module compiles within its bound and runs, with the server answering.
fn compile_big(kiln: &Kiln) -> String {
    let name = "many-large-functions";
    let big = many_large_functions();
    let size = big.len();
    let probe = Probe::start(kiln);
    let started = Instant::now();
    let response = kiln.deploy(name, big);
    let compiled_in = started.elapsed();
    let stall = probe.finish();
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());
    assert!(
        compiled_in < 20 * SEC,
        "{size} bytes of straight-line code took {compiled_in:?} to deploy"
    );
    assert!(stall <= 2 * SEC, "/healthz took {stall:?} during a compilation");
    assert_eq!(kiln.invoke(name, "").status(), 200);
    eprintln!("hostile: {size} bytes of large functions compiled in {compiled_in:.3?} (slowest /healthz {stall:.3?})");
    name.into()
}

/// ~300 trapping invocations from 8 threads: every one a 502 naming the trap.
fn storm(kiln: &Kiln) {
    let started = Instant::now();
    let url = kiln.url("/v1/functions/trap-storm/invoke");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (url, token) = (url.clone(), kiln.token.clone());
            std::thread::spawn(move || {
                let client = fresh_client();
                (0..38)
                    .map(|_| {
                        let response = client.post(&url).bearer_auth(&token).send().unwrap();
                        (response.status().as_u16(), response.text().unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let answers: Vec<(u16, String)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(answers.len(), 304);
    for (status, body) in &answers {
        assert_eq!(*status, 502, "{body}");
        assert!(
            body.contains("out of bounds memory access") && body.contains("storm\\n"),
            "{body}"
        );
    }
    assert_eq!(kiln.get("/healthz").status(), 200);
    eprintln!("hostile: trap storm of 304 from 8 threads in {:.3?}", started.elapsed());
}

/// Fires 10 invocations at once at `slow` (300 ms each) deployed with max_concurrency 2.
fn flood(kiln: &Kiln) -> String {
    let config = json!({"max_concurrency": 2, "timeout_ms": 5000});
    assert_eq!(kiln.deploy_with("slow", hostile("slow"), config).status(), 201);
    let started = Instant::now();
    let answers = burst(kiln, "slow", &vec![Vec::new(); 10]);
    let span = started.elapsed();
    let mut ok = 0;
    let mut busy = 0;
    for (status, body) in &answers {
        match status {
            200 => {
                assert_eq!(body, "done");
                ok += 1;
            }
            429 => {
                let json: Value = serde_json::from_str(body).unwrap();
                assert_eq!(json["error"]["code"], "too_many_requests", "{body}");
                busy += 1;
            }
            _ => panic!("flood: unexpected {status}: {body}"),
        }
    }
    // Two run per 300 ms window at most; without the limit all 10 would finish in one window.
    let windows = span.as_millis().div_ceil(300) as usize;
    assert!(
        ok >= 1 && busy >= 1 && ok <= 2 * windows,
        "flood: {ok} ran and {busy} were turned away in {span:?}"
    );
    // The permits came back.
    assert_eq!(kiln.invoke("slow", "").text().unwrap(), "done");
    eprintln!("hostile: flood of 10 at max_concurrency 2: {ok} ran, {busy} got 429, in {span:.3?}");
    "slow".into()
}

/// Invokes `name` once per input, all at once (each from its own thread and connection); returns
/// the answers in input order.
fn burst(kiln: &Kiln, name: &str, inputs: &[Vec<u8>]) -> Vec<(u16, String)> {
    let url = kiln.url(&format!("/v1/functions/{name}/invoke"));
    let barrier = Arc::new(Barrier::new(inputs.len()));
    let threads: Vec<_> = inputs
        .iter()
        .map(|input| {
            let (url, token, barrier, input) = (url.clone(), kiln.token.clone(), barrier.clone(), input.clone());
            std::thread::spawn(move || {
                let client = fresh_client();
                barrier.wait();
                let response = client.post(&url).bearer_auth(&token).body(input).send().unwrap();
                (response.status().as_u16(), response.text().unwrap())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// The CVE-2022-39393 hunt. 64 writers at once (every memory slot of the pool: the test server runs
/// with 64 instances) put a secret chosen here into their memory, data area and a global, 8 of
/// them also past the 2 MiB the pool keeps resident; 8 more write it and trap. Then 64 scanners of
/// the same function and 64 of a different module, at once so that they cover every slot, look
/// for it, and for any non-zero byte in memory they just grew.
fn leak_hunt(kiln: &Kiln) -> Vec<String> {
    let config = json!({"memory_mb": 8, "timeout_ms": 10_000});
    for (name, guest) in [("leak", "leak"), ("leak-scan", "leak_scan")] {
        let status = kiln.deploy_with(name, hostile(guest), config.clone()).status();
        assert!(status == 201 || status == 200, "deploying {guest}: {status}");
    }
    // A fresh secret each run, with no zero byte (so the writers' pages hold no zero word).
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let secret: Vec<u8> = noise(seed, 64).into_iter().map(|b| b.max(1)).collect();
    let with_mode = |mode: u8| [&[mode][..], &secret].concat();

    // The scanners can find what is there: the writer scanning its own memory sees every copy,
    // the other module sees its own data segment.
    let own = kiln.invoke("leak", with_mode(b'P')).text().unwrap();
    assert!(
        own.starts_with("matches=35841 nonzero=286720 data=changed global=") && !own.contains("global=0\n"),
        "the scanner does not see a secret that is there: {own}"
    );
    let control = kiln.invoke("leak-scan", &b"a different modu"[..]).text().unwrap();
    assert_eq!(control, "matches=1 nonzero=0 global=7\n", "the other scanner is blind");

    let started = Instant::now();
    let writers: Vec<Vec<u8>> = (0..64)
        .map(|i| with_mode(if i % 8 == 0 { b'B' } else { b'W' }))
        .collect();
    let answers = burst(kiln, "leak", &writers);
    let wrote = answers.iter().filter(|(s, b)| *s == 200 && b == "wrote\n").count();
    assert!(
        answers.iter().all(|(s, _)| *s == 200 || *s == 429) && wrote >= 56,
        "writers: {answers:?}"
    );
    // Writers that trap after writing: their slots must be reset all the same.
    for (status, body) in burst(kiln, "leak", &vec![with_mode(b'T'); 8]) {
        assert_eq!(status, 502, "{body}");
    }
    // Scanners: every answer is a clean scan (or, rarely, a 429 when a slot is not back yet).
    let mut scanned = 0;
    for (name, input, clean) in [
        ("leak", with_mode(b'S'), "matches=0 nonzero=0 data=same global=0\n"),
        ("leak-scan", secret[..16].to_vec(), "matches=0 nonzero=0 global=7\n"),
    ] {
        let answers = burst(kiln, name, &vec![input; 64]);
        for (status, body) in &answers {
            assert!(
                *status == 429 || body == clean,
                "{name} found something: {status} {body}"
            );
        }
        let done = answers.iter().filter(|(s, _)| *s == 200).count();
        assert!(done >= 56, "only {done} of 64 {name} scanners ran");
        scanned += done;
    }
    eprintln!(
        "hostile: leak hunt ({wrote} writers at once, 8 trapping, {scanned} scanners, nothing found) in {:.3?}",
        started.elapsed()
    );
    vec!["leak".into(), "leak-scan".into()]
}
