//! What suspending and resuming a Wasm sandbox costs (`tier::wasm::state`): `capture` of a live
//! instance holding ~4 MiB of non-zero memory, `decode` of the encoded state, and `restore` into a
//! fresh instance, on Kiln's engine (pooling allocator, async) with stores built as Kiln builds
//! them (`instance::Guest::store`). The instantiation of the fresh instance is timed apart: it is
//! what any request to a new instance pays anyway.
//!
//! Usage: `cargo run --release -p kiln-bench --bin sandbox-state [MIB] [ITERATIONS]`
//! (defaults 4 and 50). Prints the median and the best of each step. A debug build runs too, but
//! its numbers say nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_core::function::ArtifactKind;
use kiln_core::tier::wasm::egress::{Egress, NoConnector};
use kiln_core::tier::wasm::footprint::Footprint;
use kiln_core::tier::wasm::instance::{ComponentState, Guest, StdoutCap};
use kiln_core::tier::wasm::limits::PoolShare;
use kiln_core::tier::wasm::state::{capture, instrument, restore, InstanceState, Instrumented, Layout};
use wasmtime::component::{Component, Instance, InstancePre, Linker};
use wasmtime::{Engine, Store};

/// A component whose memory a call fills with `bytes` of xorshift output (no zero page), and whose
/// `sum` reads all of its memory back, to check a restore.
const GUEST: &str = r#"
(component
  (core module $m
    (memory 1)
    (func (export "fill") (param $bytes i32) (param $seed i64) (local $at i32) (local $x i64)
      (local $pages i32)
      (local.set $pages (i32.shr_u (i32.add (local.get $bytes) (i32.const 65535)) (i32.const 16)))
      (if (i32.gt_u (local.get $pages) (memory.size))
        (then (drop (memory.grow (i32.sub (local.get $pages) (memory.size))))))
      (local.set $x (i64.or (local.get $seed) (i64.const 1)))
      (block $done (loop $next
        (br_if $done (i32.ge_u (local.get $at) (local.get $bytes)))
        (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 13))))
        (local.set $x (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 7))))
        (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 17))))
        (i64.store (local.get $at) (local.get $x))
        (local.set $at (i32.add (local.get $at) (i32.const 8)))
        (br $next))))
    (func (export "sum") (result i64) (local $at i32) (local $end i32) (local $sum i64)
      (local.set $end (i32.shl (memory.size) (i32.const 16)))
      (block $done (loop $next
        (br_if $done (i32.ge_u (local.get $at) (local.get $end)))
        (local.set $sum (i64.add (i64.rotl (local.get $sum) (i64.const 5)) (i64.load (local.get $at))))
        (local.set $at (i32.add (local.get $at) (i32.const 8)))
        (br $next)))
      (local.get $sum)))
  (core instance $m (instantiate $m))
  (func (export "fill") (param "bytes" u32) (param "seed" u64) (canon lift (core func $m "fill")))
  (func (export "sum") (result u64) (canon lift (core func $m "sum"))))
"#;

const MIB: usize = 1 << 20;

struct Bench {
    engine: Engine,
    pre: InstancePre<ComponentState>,
    layout: Layout,
    weight: u32,
    egress: Egress,
}

impl Bench {
    fn new() -> Bench {
        let engine = kiln_core::tier::wasm::engine::engine(8, None).expect("engine");
        let Instrumented { component, layout } =
            instrument(&wat::parse_str(GUEST).expect("valid WAT")).expect("instrumented");
        let weight = Footprint::of(ArtifactKind::Component, &component).weight();
        let compiled = Component::new(&engine, &component).expect("compiles");
        let pre = Linker::new(&engine).instantiate_pre(&compiled).expect("no imports");
        Bench {
            engine,
            pre,
            layout,
            weight,
            egress: Egress::deny_all(Arc::new(NoConnector)),
        }
    }

    fn store(&self) -> Store<ComponentState> {
        let guest = Guest {
            args: &[],
            env: &[],
            egress: &self.egress,
            identity: None,
            memory_bytes: 256 * MIB,
            share: PoolShare::of_weight(self.weight),
            timeout: Duration::from_secs(600),
            timeout_ms: 600_000,
        };
        guest
            .store::<ComponentState>(&self.engine, Bytes::new(), StdoutCap::Invocation)
            .store
    }

    async fn instance(&self) -> (Store<ComponentState>, Instance) {
        let mut store = self.store();
        let instance = self.pre.instantiate_async(&mut store).await.expect("instantiates");
        (store, instance)
    }
}

async fn sum(store: &mut Store<ComponentState>, instance: &Instance) -> u64 {
    let f = instance.get_typed_func::<(), (u64,)>(&mut *store, "sum").expect("sum");
    f.call_async(&mut *store, ()).await.expect("sum runs").0
}

/// Median and best of `samples`, in milliseconds.
fn report(step: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{step:<12} median {:8.3} ms   best {:8.3} ms",
        ms(samples[samples.len() / 2]),
        ms(samples[0])
    );
}

async fn run(mib: usize, iterations: usize) {
    let bench = Bench::new();
    let (mut store, instance) = bench.instance().await;
    let fill = instance
        .get_typed_func::<(u32, u64), ()>(&mut store, "fill")
        .expect("fill");
    fill.call_async(&mut store, ((mib * MIB) as u32, 7))
        .await
        .expect("fill runs");
    let expected = sum(&mut store, &instance).await;

    let (mut captures, mut decodes, mut instantiations, mut restores) = (vec![], vec![], vec![], vec![]);
    let mut encoded_len = 0;
    for _ in 0..iterations {
        let started = Instant::now();
        let state = capture(&mut store, &instance, &bench.layout).await.expect("capture");
        captures.push(started.elapsed());
        let bytes = state.into_bytes();
        encoded_len = bytes.len();

        let started = Instant::now();
        let state = InstanceState::decode_vec(bytes).expect("decode");
        decodes.push(started.elapsed());

        let started = Instant::now();
        let (mut fresh, fresh_instance) = bench.instance().await;
        instantiations.push(started.elapsed());
        let started = Instant::now();
        restore(&mut fresh, &fresh_instance, &bench.layout, &state)
            .await
            .expect("restore");
        restores.push(started.elapsed());
        assert_eq!(
            sum(&mut fresh, &fresh_instance).await,
            expected,
            "the restored memory differs"
        );
    }
    println!(
        "{mib} MiB of non-zero memory, encoded state {:.2} MiB, {iterations} iterations",
        encoded_len as f64 / MIB as f64
    );
    report("capture", &mut captures);
    report("decode", &mut decodes);
    report("instantiate", &mut instantiations);
    report("restore", &mut restores);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: sandbox-state [MIB] [ITERATIONS]";
    let mib: usize = args.next().map_or(4, |a| a.parse().expect(usage));
    let iterations: usize = args.next().map_or(50, |a| a.parse().expect(usage));
    assert!((1..4096).contains(&mib) && iterations > 0, "{usage}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(mib, iterations));
}
