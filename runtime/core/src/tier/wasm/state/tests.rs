//! Capture and restore against real instances on Kiln's engine (pooling allocator, async), with
//! stores built by `instance::Guest::store`: the stateful HTTP guest `guests/http-counter`, and
//! WAT components for what Rust guests do not exercise (several memories, every kind of global,
//! a module instantiated twice, tables).

#![allow(clippy::single_range_in_vec_init)] // lists of byte ranges, some of one

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use wasmtime::component::{Component, Instance, Linker};
use wasmtime::{Engine, Store};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::WasiHttpView;

use super::*;
use crate::function::ArtifactKind;
use crate::tier::wasm::compile::Compiled;
use crate::tier::wasm::egress::{Egress, NoConnector};
use crate::tier::wasm::footprint::Footprint;
use crate::tier::wasm::instance::{ComponentState, Guest, StdoutCap};
use crate::tier::wasm::limits::PoolShare;
use crate::tier::wasm::link::{Code, Linkers};

const MIB: usize = 1 << 20;

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| crate::tier::wasm::engine::engine(32, None).expect("engine"))
}

/// A `guests/` crate built as a component (the guests are built once per test process).
fn guest(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests");
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&dir)
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                "http-counter",
                "-p",
                "http-hello",
            ])
            .arg("--target-dir")
            .arg(dir.join("target"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .status()
            .expect("running cargo for the guests");
        assert!(
            status.success(),
            "building the guests failed (is the wasm32-wasip2 target installed?)"
        );
    });
    std::fs::read(dir.join(format!("target/wasm32-wasip2/release/{name}.wasm"))).expect("built guest")
}

/// Compiled components, once per test process (compiling is the slow part of these tests).
fn compile(bytes: &[u8]) -> Component {
    static CACHE: OnceLock<Mutex<HashMap<Vec<u8>, Component>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(component) = cache.lock().unwrap().get(bytes) {
        return component.clone();
    }
    let component = Component::new(engine(), bytes).expect("compiles");
    cache.lock().unwrap().insert(bytes.to_vec(), component.clone());
    component
}

/// A store as Kiln builds them, with `memory_bytes` as its limit.
fn store(bytes: &[u8], memory_bytes: usize) -> Store<ComponentState> {
    let egress = Egress::deny_all(Arc::new(NoConnector));
    let guest = Guest {
        args: &["sandbox".to_owned()],
        env: &[],
        egress: &egress,
        identity: None,
        memory_bytes,
        share: PoolShare::of_weight(Footprint::of(ArtifactKind::Component, bytes).weight()),
        timeout: Duration::from_secs(60),
        timeout_ms: 60_000,
    };
    guest
        .store::<ComponentState>(engine(), Bytes::new(), StdoutCap::Invocation)
        .store
}

/// A running HTTP sandbox: its store, instance and handler.
struct Sandbox {
    store: Store<ComponentState>,
    instance: Instance,
    proxy: Proxy,
}

impl Sandbox {
    /// A fresh instance of `bytes`, linked by Kiln's own linker (which must see an HTTP trigger).
    async fn start(bytes: &[u8], memory_bytes: usize) -> Sandbox {
        let linkers = Linkers::new(engine()).unwrap();
        let Ok(Code::Http(pre)) = linkers.link(&Compiled::Component(compile(bytes))) else {
            panic!("Kiln's linker must take the component as an HTTP trigger")
        };
        let mut store = store(bytes, memory_bytes);
        let instance = pre.instance_pre().instantiate_async(&mut store).await.unwrap();
        let proxy = Proxy::new(&mut store, &instance).unwrap();
        Sandbox { store, instance, proxy }
    }

    async fn get(&mut self, path: &str) -> String {
        let request = http::Request::get(format!("http://sandbox{path}"))
            .body(
                http_body_util::Empty::<Bytes>::new()
                    .map_err(|never: Infallible| -> wasmtime_wasi_http::Error { match never {} }),
            )
            .unwrap();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let request = self
            .store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)
            .unwrap();
        let out = self.store.data_mut().http().new_response_outparam(sender).unwrap();
        self.proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut self.store, request, out)
            .await
            .unwrap();
        let response = receiver.await.unwrap().unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    async fn capture(&mut self, layout: &Layout) -> Result<InstanceState, StateError> {
        capture(&mut self.store, &self.instance, layout).await
    }
}

/// `sum=…` of an answer.
fn sum(answer: &str) -> &str {
    answer.split_whitespace().find(|w| w.starts_with("sum=")).unwrap()
}

#[tokio::test]
async fn the_counter_and_its_buffer_survive_suspend_and_resume() {
    let original = guest("http-counter");
    let Instrumented { component, layout } = instrument(&original).unwrap();
    assert_eq!(layout.memories().len(), 1);
    assert!(!layout.globals().is_empty(), "at least the stack pointer");

    let mut sandbox = Sandbox::start(&component, 64 * MIB).await;
    assert_eq!(sandbox.get("/").await, "count=1 len=0 sum=cbf29ce484222325\n");
    let grown = sandbox.get("/grow?kib=4096").await;
    assert!(grown.starts_with("count=2 len=4194304 "), "{grown}");
    assert!(sandbox.get("/").await.starts_with("count=3 len=4194304 "));

    let state = sandbox.capture(&layout).await.unwrap();
    assert!(state.memory_bytes() >= 4 * MIB as u64);
    // Suspend: only the file outlives the instance.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.state");
    std::fs::write(&path, state.encode()).unwrap();
    drop(state);
    drop(sandbox);

    let state = InstanceState::decode(&std::fs::read(&path).unwrap()).unwrap();
    let mut resumed = Sandbox::start(&component, 64 * MIB).await;
    restore(&mut resumed.store, &resumed.instance, &layout, &state)
        .await
        .unwrap();
    let answer = resumed.get("/").await;
    assert!(answer.starts_with("count=4 len=4194304 "), "{answer}");
    assert_eq!(sum(&answer), sum(&grown), "the buffer came back byte for byte");
    // It goes on as a normal instance: a new buffer, more requests.
    assert!(resumed
        .get("/grow?kib=16&seed=9")
        .await
        .starts_with("count=5 len=16384 "));
}

#[tokio::test]
async fn one_capture_forks_into_instances_that_diverge() {
    let Instrumented { component, layout } = instrument(&guest("http-counter")).unwrap();
    let mut parent = Sandbox::start(&component, 64 * MIB).await;
    let grown = parent.get("/grow?kib=256&seed=5").await;
    assert!(grown.starts_with("count=1 len=262144 "), "{grown}");
    let state = parent.capture(&layout).await.unwrap();

    let mut left = Sandbox::start(&component, 64 * MIB).await;
    restore(&mut left.store, &left.instance, &layout, &state).await.unwrap();
    let mut right = Sandbox::start(&component, 64 * MIB).await;
    restore(&mut right.store, &right.instance, &layout, &state)
        .await
        .unwrap();

    // Each fork starts where the parent was, then goes its own way.
    let left_grown = left.get("/grow?kib=8&seed=1").await;
    assert!(left_grown.starts_with("count=2 len=8192 "), "{left_grown}");
    let answer = right.get("/").await;
    assert!(answer.starts_with("count=2 len=262144 "), "{answer}");
    assert_eq!(
        sum(&answer),
        sum(&grown),
        "the left fork's new buffer is not the right one's"
    );
    let answer = right.get("/").await;
    assert!(answer.starts_with("count=3 len=262144 "), "{answer}");
    let answer = left.get("/").await;
    assert!(answer.starts_with("count=3 len=8192 "), "{answer}");
    assert_eq!(sum(&answer), sum(&left_grown));
    assert_ne!(sum(&left_grown), sum(&grown));
    // Nor did either touch the parent.
    let answer = parent.get("/").await;
    assert!(answer.starts_with("count=2 len=262144 "), "{answer}");
    assert_eq!(sum(&answer), sum(&grown));
}

#[tokio::test]
async fn capture_leaves_the_instance_as_it_was() {
    let Instrumented { component, layout } = instrument(&guest("http-counter")).unwrap();
    let mut sandbox = Sandbox::start(&component, 64 * MIB).await;
    let grown = sandbox.get("/grow?kib=300").await;
    let first = sandbox.capture(&layout).await.unwrap();
    let second = sandbox.capture(&layout).await.unwrap();
    assert_eq!(
        first.encode(),
        second.encode(),
        "two captures in a row see the same state"
    );
    let answer = sandbox.get("/").await;
    assert!(answer.starts_with("count=2 len=307200 "), "{answer}");
    assert_eq!(sum(&answer), sum(&grown));
}

#[tokio::test]
async fn the_instrumented_component_serves_like_the_original() {
    let original = guest("http-counter");
    let Instrumented { component, layout } = instrument(&original).unwrap();
    let again = instrument(&original).unwrap();
    assert_eq!(again.component, component, "instrumenting is deterministic");
    assert_eq!(again.layout, layout);
    let mut a = Sandbox::start(&original, 64 * MIB).await;
    let mut b = Sandbox::start(&component, 64 * MIB).await;
    for path in ["/", "/grow?kib=100&seed=3", "/zeros?kib=8", "/", "/grow?kib=1"] {
        assert_eq!(a.get(path).await, b.get(path).await, "{path}");
    }
    // The other HTTP guests instrument and link too.
    for name in ["http-hello"] {
        let Instrumented { component, .. } = instrument(&guest(name)).unwrap();
        let mut sandbox = Sandbox::start(&component, 64 * MIB).await;
        assert!(sandbox.get("/x").await.starts_with("hello from wasi:http"));
    }
}

#[tokio::test]
async fn capture_refuses_while_a_host_resource_is_held() {
    let Instrumented { component, layout } = instrument(&guest("http-counter")).unwrap();
    let mut sandbox = Sandbox::start(&component, 64 * MIB).await;
    sandbox.get("/hold").await;
    let error = sandbox.capture(&layout).await.unwrap_err();
    assert!(matches!(error, StateError::NotQuiescent(_)), "{error}");
    assert!(error.to_string().contains("1 × wasi:io/poll.pollable"), "{error}");
    sandbox.get("/release").await;
    sandbox.capture(&layout).await.unwrap();
}

#[tokio::test]
async fn a_state_restores_only_into_its_own_component() {
    let counter = instrument(&guest("http-counter")).unwrap();
    let hello = instrument(&guest("http-hello")).unwrap();
    assert_ne!(counter.layout.fingerprint(), hello.layout.fingerprint());
    let mut sandbox = Sandbox::start(&counter.component, 64 * MIB).await;
    sandbox.get("/grow?kib=64").await;
    let state = sandbox.capture(&counter.layout).await.unwrap();

    let mut other = Sandbox::start(&hello.component, 64 * MIB).await;
    let error = restore(&mut other.store, &other.instance, &hello.layout, &state)
        .await
        .unwrap_err();
    assert!(
        matches!(error, StateError::Mismatch(_)),
        "the state's fingerprint: {error}"
    );
    let error = restore(&mut other.store, &other.instance, &counter.layout, &state)
        .await
        .unwrap_err();
    assert!(
        matches!(error, StateError::Mismatch(_)),
        "the instance's own fingerprint: {error}"
    );
    // Nor into an instance of the component as it was before instrumentation.
    let mut plain = Sandbox::start(&guest("http-counter"), 64 * MIB).await;
    let error = restore(&mut plain.store, &plain.instance, &counter.layout, &state)
        .await
        .unwrap_err();
    assert!(error.to_string().contains(ACCESS_INSTANCE), "{error}");
}

#[tokio::test]
async fn a_damaged_state_is_refused() {
    let Instrumented { component, layout } = instrument(&guest("http-counter")).unwrap();
    let mut sandbox = Sandbox::start(&component, 64 * MIB).await;
    sandbox.get("/grow?kib=64").await;
    let bytes = sandbox.capture(&layout).await.unwrap().into_bytes();
    for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
        let error = InstanceState::decode(&bytes[..cut]).unwrap_err();
        assert!(matches!(error, StateError::Corrupt(_)), "cut at {cut}: {error}");
    }
    for at in [20, 100, bytes.len() / 2, bytes.len() - 3] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        let error = InstanceState::decode(&bad).unwrap_err();
        assert!(matches!(error, StateError::Corrupt(_)), "byte {at}: {error}");
    }
    InstanceState::decode_vec(bytes).unwrap();
}

#[tokio::test]
async fn restore_grows_memory_under_the_stores_limit() {
    let Instrumented { component, layout } = instrument(&guest("http-counter")).unwrap();
    let mut sandbox = Sandbox::start(&component, 64 * MIB).await;
    sandbox.get("/grow?kib=4096").await;
    let state = sandbox.capture(&layout).await.unwrap();
    let mut small = Sandbox::start(&component, 3 * MIB).await;
    let error = restore(&mut small.store, &small.instance, &layout, &state)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("memory limit of 3 MiB exceeded"), "{error}");
}

/// Two modules, one instantiated twice: three memories (the first with a data segment), globals
/// of every kind, a table that may grow.
const MANY: &str = r#"
(component
  (core module $a
    (memory (export "memory") 1)
    (global $i (mut i32) (i32.const 1))
    (global $l (mut i64) (i64.const 2))
    (global $f (mut f32) (f32.const 3))
    (global $d (mut f64) (f64.const 4))
    (global $v (mut v128) (v128.const i64x2 5 6))
    (global $constant i32 (i32.const 7))
    (table $t 2 funcref)
    (data (i32.const 100) "hello")
    (func (export "poke") (param i32 i64) (i64.store (local.get 0) (local.get 1)))
    (func (export "peek") (param i32) (result i64) (i64.load (local.get 0)))
    (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
    (func (export "set") (param $x i64)
      (global.set $i (i32.wrap_i64 (local.get $x)))
      (global.set $l (i64.mul (local.get $x) (i64.const 3)))
      ;; NaNs with payloads: they must come back bit for bit.
      (global.set $f (f32.reinterpret_i32 (i32.or (i32.const 0x7fa00000) (i32.wrap_i64 (local.get $x)))))
      (global.set $d (f64.reinterpret_i64 (i64.or (i64.const 0x7ff4000000000000) (local.get $x))))
      (global.set $v (i64x2.replace_lane 1 (i64x2.splat (local.get $x)) (i64.xor (local.get $x) (i64.const -1)))))
    (func (export "get") (param $which i32) (result i64)
      (block $done (result i64)
        (drop (br_if $done (i64.extend_i32_u (global.get $i)) (i32.eq (local.get $which) (i32.const 0))))
        (drop (br_if $done (global.get $l) (i32.eq (local.get $which) (i32.const 1))))
        (drop (br_if $done (i64.extend_i32_u (i32.reinterpret_f32 (global.get $f))) (i32.eq (local.get $which) (i32.const 2))))
        (drop (br_if $done (i64.reinterpret_f64 (global.get $d)) (i32.eq (local.get $which) (i32.const 3))))
        (drop (br_if $done (i64x2.extract_lane 0 (global.get $v)) (i32.eq (local.get $which) (i32.const 4))))
        (drop (br_if $done (i64x2.extract_lane 1 (global.get $v)) (i32.eq (local.get $which) (i32.const 5))))
        (i64.extend_i32_u (global.get $constant))))
    (func (export "grow-table") (result i32) (table.grow $t (ref.null func) (i32.const 1))))
  (core module $b
    (memory (export "memory") 2)
    (global $n (mut i32) (i32.const 0))
    (func (export "poke") (param i32 i64) (i64.store (local.get 0) (local.get 1))
      (global.set $n (i32.add (global.get $n) (i32.const 1))))
    (func (export "peek") (param i32) (result i64) (i64.load (local.get 0)))
    (func (export "pokes") (result i32) (global.get $n)))
  (core instance $a (instantiate $a))
  (core instance $b1 (instantiate $b))
  (core instance $b2 (instantiate $b))
  (func (export "a-poke") (param "addr" u32) (param "value" u64) (canon lift (core func $a "poke")))
  (func (export "a-peek") (param "addr" u32) (result u64) (canon lift (core func $a "peek")))
  (func (export "a-grow") (param "pages" u32) (result s32) (canon lift (core func $a "grow")))
  (func (export "a-set") (param "x" u64) (canon lift (core func $a "set")))
  (func (export "a-get") (param "which" u32) (result u64) (canon lift (core func $a "get")))
  (func (export "a-grow-table") (result s32) (canon lift (core func $a "grow-table")))
  (func (export "b1-poke") (param "addr" u32) (param "value" u64) (canon lift (core func $b1 "poke")))
  (func (export "b1-peek") (param "addr" u32) (result u64) (canon lift (core func $b1 "peek")))
  (func (export "b1-pokes") (result u32) (canon lift (core func $b1 "pokes")))
  (func (export "b2-poke") (param "addr" u32) (param "value" u64) (canon lift (core func $b2 "poke")))
  (func (export "b2-peek") (param "addr" u32) (result u64) (canon lift (core func $b2 "peek")))
  (func (export "b2-pokes") (result u32) (canon lift (core func $b2 "pokes")))
)
"#;

struct Wat {
    store: Store<ComponentState>,
    instance: Instance,
}

impl Wat {
    async fn start(bytes: &[u8]) -> Wat {
        let mut store = store(bytes, 64 * MIB);
        let instance = Linker::new(engine())
            .instantiate_async(&mut store, &compile(bytes))
            .await
            .unwrap();
        Wat { store, instance }
    }

    async fn call<P, R>(&mut self, name: &str, params: P) -> R
    where
        P: wasmtime::component::ComponentNamedList + wasmtime::component::Lower + Send + Sync,
        R: wasmtime::component::ComponentNamedList + wasmtime::component::Lift + Send + Sync + 'static,
    {
        let f = self.instance.get_typed_func::<P, R>(&mut self.store, name).unwrap();
        f.call_async(&mut self.store, params).await.unwrap()
    }

    async fn poke(&mut self, memory: &str, addr: u32, value: u64) {
        self.call::<_, ()>(&format!("{memory}-poke"), (addr, value)).await
    }

    async fn peek(&mut self, memory: &str, addr: u32) -> u64 {
        self.call::<_, (u64,)>(&format!("{memory}-peek"), (addr,)).await.0
    }

    async fn globals(&mut self) -> Vec<u64> {
        let mut values = Vec::new();
        for which in 0..7u32 {
            values.push(self.call::<_, (u64,)>("a-get", (which,)).await.0);
        }
        values
    }
}

#[tokio::test]
async fn every_memory_and_global_of_every_core_instance_comes_back() {
    let original = wat::parse_str(MANY).unwrap();
    let Instrumented { component, layout } = instrument(&original).unwrap();
    assert_eq!(layout.memories().len(), 3);
    assert_eq!(layout.globals().len(), 5 + 2, "mutable globals only");
    assert_eq!(layout.tables().len(), 1);
    assert_eq!(layout.memories()[0].fresh, FreshImage::Pages(vec![0..4096]));

    let mut a = Wat::start(&component).await;
    let fresh_hello = a.peek("a", 100).await;
    assert_eq!(a.call::<_, (i32,)>("a-grow", (2u32,)).await.0, 1);
    let end = 3 * 65536 - 8;
    // The very last bytes of a memory (the read's return area), a data segment overwritten with
    // zeros, a page in the middle; the other module's two instances apart.
    a.poke("a", end, 0x0123_4567_89ab_cdef).await;
    a.poke("a", 96, 0).await;
    a.poke("a", 104, 0).await;
    a.poke("a", 70_000, 42).await;
    a.poke("b1", 2 * 65536 - 8, 11).await;
    a.poke("b2", 8, 22).await;
    a.poke("b2", 16, 23).await;
    a.call::<_, ()>("a-set", (0x1234_5678_9abc_u64,)).await;
    let globals = a.globals().await;

    let state = capture(&mut a.store, &a.instance, &layout).await.unwrap();
    assert_eq!(
        a.peek("a", end).await,
        0x0123_4567_89ab_cdef,
        "the capture put back what it borrowed"
    );
    let state = InstanceState::decode(&state.encode()).unwrap();

    let mut b = Wat::start(&component).await;
    assert_eq!(
        b.peek("a", 100).await,
        fresh_hello,
        "a fresh instance has its data segment"
    );
    restore(&mut b.store, &b.instance, &layout, &state).await.unwrap();
    assert_eq!(b.peek("a", end).await, 0x0123_4567_89ab_cdef);
    assert_eq!(b.peek("a", 96).await, 0, "zeros over the data segment were restored");
    assert_eq!(b.peek("a", 104).await, 0);
    assert_eq!(b.peek("a", 70_000).await, 42);
    assert_eq!(b.peek("b1", 2 * 65536 - 8).await, 11);
    assert_eq!(b.peek("b1", 8).await, 0);
    assert_eq!(b.peek("b2", 8).await, 22);
    assert_eq!(b.call::<_, (u32,)>("b1-pokes", ()).await.0, 1);
    assert_eq!(b.call::<_, (u32,)>("b2-pokes", ()).await.0, 2);
    assert_eq!(
        b.globals().await,
        globals,
        "every global bit for bit, NaN payloads included"
    );
    assert_eq!(
        b.call::<_, (i32,)>("a-grow", (0u32,)).await.0,
        3,
        "the memory's size came back"
    );

    let again = capture(&mut b.store, &b.instance, &layout).await.unwrap();
    assert_eq!(
        again.encode(),
        state.encode(),
        "the restored instance captures to the same state"
    );
}

#[tokio::test]
async fn a_grown_table_is_refused_at_capture() {
    let Instrumented { component, layout } = instrument(&wat::parse_str(MANY).unwrap()).unwrap();
    let mut a = Wat::start(&component).await;
    capture(&mut a.store, &a.instance, &layout).await.unwrap();
    assert_eq!(a.call::<_, (i32,)>("a-grow-table", ()).await.0, 2);
    let error = capture(&mut a.store, &a.instance, &layout).await.unwrap_err();
    assert!(matches!(error, StateError::Unsupported(_)), "{error}");
    assert!(
        error.to_string().contains("has 3 elements and a fresh instance has 2"),
        "{error}"
    );
}

#[test]
fn instrument_refuses_what_it_cannot_capture_whole() {
    let refused = |wat: &str| instrument(&wat::parse_str(wat).unwrap()).unwrap_err().to_string();
    let error = refused(r#"(component (type $r (resource (rep i32))) (export "r" (type $r)))"#);
    assert!(error.contains("resource type"), "{error}");
    let error = refused(
        r#"(component (core module $m) (core instance (instantiate $m))
             (instance $i) (export "kiln:state/access" (instance $i)))"#,
    );
    assert!(error.contains("reserves"), "{error}");
    let error = refused(
        r#"(component (core module $m (memory 1) (func $s) (start $s)
                (global (export "kiln-state:m0") i32 (i32.const 0)))
             (core instance (instantiate $m)))"#,
    );
    assert!(error.contains("reserves"), "{error}");
    let error = refused(r#"(component (component (core module $m) (core instance (instantiate $m))))"#);
    assert!(error.contains("nested component"), "{error}");
    let error = instrument(&wat::parse_str("(module)").unwrap()).unwrap_err();
    assert!(matches!(error, StateError::Invalid(_)), "{error}");
}

#[tokio::test]
async fn a_start_function_makes_every_fresh_page_suspect() {
    // The start function writes the memory at instantiation: zeros in the state must be written.
    let wat = r#"
      (component
        (core module $m
          (memory 1)
          (func $start (i64.store (i32.const 40000) (i64.const 77)))
          (start $start)
          (func (export "poke") (param i32 i64) (i64.store (local.get 0) (local.get 1)))
          (func (export "peek") (param i32) (result i64) (i64.load (local.get 0))))
        (core instance $m (instantiate $m))
        (func (export "m-poke") (param "addr" u32) (param "value" u64) (canon lift (core func $m "poke")))
        (func (export "m-peek") (param "addr" u32) (result u64) (canon lift (core func $m "peek"))))"#;
    let Instrumented { component, layout } = instrument(&wat::parse_str(wat).unwrap()).unwrap();
    assert_eq!(layout.memories()[0].fresh, FreshImage::Unknown);
    let mut a = Wat::start(&component).await;
    assert_eq!(a.peek("m", 40000).await, 77);
    a.poke("m", 40000, 0).await;
    let state = capture(&mut a.store, &a.instance, &layout).await.unwrap();
    assert_eq!(state.stored_bytes(), 0, "an all-zero memory stores nothing");
    let mut b = Wat::start(&component).await;
    restore(&mut b.store, &b.instance, &layout, &state).await.unwrap();
    assert_eq!(b.peek("m", 40000).await, 0);
}
