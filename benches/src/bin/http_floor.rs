//! The floor for HTTP triggers: the least a server built from wasmtime 48 + wasmtime-wasi-http +
//! hyper can spend on one request to a `wasi:http/proxy` component with a fresh instance per
//! request. Per request: a store, a pooled instance (Kiln's engine settings), the request handed
//! over, `handle` called to its end, the store dropped. Nothing else: no auth, no limits, no
//! timeout, no log, no metrics, no streaming past the guest's end (the response is sent only once
//! the guest has returned, so a body larger than wasmtime-wasi-http's channel would stall).
//!
//! Usage:
//!   http-floor COMPONENT.wasm [ITERATIONS]     in process: no sockets, one request at a time;
//!                                              prints the CPU time per request
//!   http-floor COMPONENT.wasm --serve [ADDR]   the same work behind hyper (HTTP/1.1 + h2c,
//!                                              current-thread runtime), for wrk
//!
//! `benches/run.sh` serves it next to Kiln and `wasmtime serve`: the gap between Kiln and this
//! floor is what Kiln's own features cost; the gap between the floor and `wasmtime serve` is the
//! most any server can gain over `wasmtime serve` on this machine.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use kiln_core::tier::wasm::egress::{Egress, NoConnector};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    /// Inbound only: the guest makes no outgoing request, so this deny-all policy never runs.
    hooks: Egress,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

#[derive(Clone)]
struct Floor {
    engine: Engine,
    pre: ProxyPre<State>,
    egress: Egress,
}

impl Floor {
    fn load(path: &str) -> Floor {
        let engine = kiln_core::tier::wasm::engine::engine(64, None).expect("engine");
        let component = Component::from_file(&engine, path).expect("a wasi:http component");
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).expect("link WASI");
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).expect("link wasi:http");
        let pre = linker.instantiate_pre(&component).expect("imports resolved");
        Floor {
            engine,
            pre: ProxyPre::new(pre).expect("exports wasi:http/incoming-handler"),
            egress: Egress::deny_all(std::sync::Arc::new(NoConnector)),
        }
    }

    /// One request through a fresh instance; the response once the guest has returned.
    async fn handle<B>(&self, request: hyper::Request<B>) -> hyper::Response<HyperOutgoingBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let state = State {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: self.egress.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        // Kiln's engine interrupts by epoch; nothing advances it here, so any deadline ahead will do.
        store.set_epoch_deadline(1);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let request = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)
            .unwrap();
        let out = store.data_mut().http().new_response_outparam(sender).unwrap();
        let proxy = self.pre.instantiate_async(&mut store).await.unwrap();
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, request, out)
            .await
            .unwrap();
        drop(store);
        receiver.await.unwrap().unwrap()
    }
}

async fn in_process(floor: Floor, iterations: usize) {
    let one = || async {
        let request = hyper::Request::post("http://localhost/")
            .header("content-length", "2")
            .body(Full::new(Bytes::from_static(b"{}")).map_err(|never| -> ErrorCode { match never {} }))
            .unwrap();
        let response = floor.handle(request).await;
        response.into_body().collect().await.unwrap().to_bytes().len()
    };
    for _ in 0..1000 {
        one().await;
    }
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        for _ in 0..iterations {
            std::hint::black_box(one().await);
        }
        best = best.min(started.elapsed());
    }
    let per_request = best.as_secs_f64() / iterations as f64 * 1e6;
    println!(
        "{iterations} requests in process, best of 3: {per_request:.2} µs each ({:.0} per second on one core)",
        1e6 / per_request
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: http-floor COMPONENT.wasm [ITERATIONS | --serve [ADDR]]";
    let path = args.next().expect(usage);
    let floor = Floor::load(&path);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match args.next().as_deref() {
        Some("--serve") => {
            let addr = args.next().unwrap_or_else(|| "127.0.0.1:7980".into());
            let serve = kiln_bench::serve::serve("http-floor", &addr, move |request: hyper::Request<Incoming>| {
                let floor = floor.clone();
                async move { floor.handle(request).await }
            });
            runtime.block_on(serve);
        }
        iterations => {
            let iterations = iterations.map_or(20_000, |n| n.parse().expect(usage));
            runtime.block_on(in_process(floor, iterations));
        }
    }
}
