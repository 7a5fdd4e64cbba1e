//! Kiln JavaScript runtime: QuickJS-NG (rquickjs) as a WASI preview-1 reactor.
//!
//! `wizer.initialize` (deploy): boots QuickJS, loads `$KILN_HANDLER` (default `/app/main.js`) as an ES module (its imports
//! resolved under `/app`), runs its top level, keeps the handler. Snapshotted by wizer.
//! `kiln.restore` (every fresh instance): reseeds `Math.random`, calls the module's `onRestore` export if any.
//! `_start` (every invocation): JSON on stdin -> handler(event) (awaited) -> JSON on stdout.
use rquickjs::function::Rest;
use rquickjs::loader::{ImportAttributes, Resolver, ScriptLoader};
use std::path::{Component, Path, PathBuf};
use rquickjs::{CatchResultExt, CaughtError, Context, Ctx, Function, Module, Object, Persistent, Promise, Runtime, Value};
use std::cell::RefCell;
use std::io::{Read, Write};

struct State {
    _rt: Runtime,
    ctx: Context,
    handler: Persistent<Function<'static>>,
    on_restore: Option<Persistent<Function<'static>>>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    // Math.random state: zero in the snapshot, seeded from WASI random_get on first use per instance.
    static RNG: RefCell<u64> = const { RefCell::new(0) };
}

const APP: &str = "/app";
const STACK_LIMIT: usize = match option_env!("KILN_QJS_STACK") { Some(_) => 128 * 1024, None => 256 * 1024 };

fn fail(msg: &str, code: i32) -> ! {
    let _ = writeln!(std::io::stderr(), "{msg}");
    std::process::exit(code)
}

fn describe(e: CaughtError<'_>) -> String {
    match e {
        CaughtError::Exception(ex) => {
            let class = ex
                .get::<_, Object>("constructor")
                .ok()
                .and_then(|c| c.get::<_, String>("name").ok())
                .unwrap_or_else(|| "Error".into());
            format!(
                "{class}: {}\n{}",
                ex.message().unwrap_or_default(),
                ex.stack().unwrap_or_default()
            )
        }
        CaughtError::Value(v) => format!("Uncaught: {v:?}"),
        CaughtError::Error(e) => format!("Error: {e}"),
    }
}

fn random() -> f64 {
    RNG.with(|s| {
        let mut s = s.borrow_mut();
        if *s == 0 {
            let mut b = [0u8; 8];
            unsafe { wasi_random_get(b.as_mut_ptr(), 8) };
            *s = u64::from_le_bytes(b) | 1;
        }
        // xorshift64*
        let mut x = *s;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *s = x;
        (x.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    #[link_name = "random_get"]
    fn wasi_random_get(buf: *mut u8, len: usize) -> u16;
}

fn log_line(args: Rest<Value<'_>>) {
    let mut line = String::new();
    for (i, v) in args.0.iter().enumerate() {
        if i > 0 {
            line.push(' ');
        }
        if let Some(s) = v.as_string() {
            line.push_str(&s.to_string().unwrap_or_default());
        } else {
            let ctx = v.ctx();
            match ctx.json_stringify(v.clone()) {
                Ok(Some(s)) => line.push_str(&s.to_string().unwrap_or_default()),
                _ => line.push_str(&format!("{v:?}")),
            }
        }
    }
    line.push('\n');
    let _ = std::io::stderr().write_all(line.as_bytes());
}

fn install_globals(ctx: &Ctx<'_>) -> rquickjs::Result<()> {
    let console = Object::new(ctx.clone())?;
    for name in ["log", "info", "warn", "error", "debug"] {
        console.set(name, Function::new(ctx.clone(), log_line)?)?;
    }
    ctx.globals().set("console", console)?;
    let math: Object = ctx.globals().get("Math")?;
    math.set("random", Function::new(ctx.clone(), random)?)?;
    Ok(())
}

/// Resolves ES module specifiers to files under /app: relative to the importing module, absolute,
/// or bare (`/app/node_modules/NAME`, its `index.js`, or `/app/NAME.js`). Read at deploy only.
struct AppResolver;

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

impl Resolver for AppResolver {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<String> {
        let candidates: Vec<PathBuf> = if name.starts_with('.') || name.starts_with('/') {
            let dir = Path::new(base).parent().unwrap_or(Path::new(APP));
            let p = normalize(&dir.join(name));
            vec![p.clone(), p.with_extension("js"), p.with_extension("mjs"), p.join("index.js")]
        } else {
            let nm = Path::new(APP).join("node_modules").join(name);
            vec![nm.join("index.js"), nm.with_extension("js"), nm.clone(), Path::new(APP).join(name).with_extension("js")]
        };
        candidates
            .into_iter()
            .find(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned())
            .ok_or_else(|| rquickjs::Error::new_resolving(base, name))
    }
}

#[export_name = "wizer.initialize"]
pub extern "C" fn initialize() {
    let rt = Runtime::new().expect("runtime");
    // QuickJS measures the C (shadow) stack in linear memory, Wasmtime bounds the native Wasm stack
    // (Kiln: 1 MiB). Keep QuickJS's limit low enough that deep recursion is a RangeError, not a trap.
    rt.set_max_stack_size(STACK_LIMIT);
    // ES modules in `.mjs` files too, as Node (and Lambda's documentation) name them.
    rt.set_loader(AppResolver, ScriptLoader::default().with_extension("mjs"));
    let ctx = Context::full(&rt).expect("context");
    // Kiln names the entry file in KILN_HANDLER (deploy only); `/app/main.js` otherwise.
    let entry = std::env::var("KILN_HANDLER").unwrap_or_else(|_| format!("{APP}/main.js"));
    let source = std::fs::read(&entry).unwrap_or_else(|e| fail(&format!("cannot read {entry}: {e}"), 70));
    let (handler, on_restore) = ctx.with(|ctx| {
        install_globals(&ctx).expect("globals");
        let result = (|| {
            let module = Module::declare(ctx.clone(), entry.clone(), source)?;
            let (module, promise) = module.eval()?;
            promise.finish::<()>()?; // top-level await
            let handler: Function = match module.get::<_, Value>("default")?.into_function() {
                Some(f) => f,
                None => module.get("handler")?,
            };
            let on_restore: Option<Function> = module.get::<_, Value>("onRestore")?.into_function();
            Ok((
                Persistent::save(&ctx, handler),
                on_restore.map(|f| Persistent::save(&ctx, f)),
            ))
        })();
        result
            .catch(&ctx)
            .unwrap_or_else(|e| fail(&format!("loading the function failed: {}", describe(e)), 70))
    });
    rt.run_gc();
    STATE.with(|s| *s.borrow_mut() = Some(State { _rt: rt, ctx, handler, on_restore }));
}

fn call_and_await<'js>(ctx: &Ctx<'js>, f: Function<'js>, arg: Option<Value<'js>>) -> rquickjs::Result<Value<'js>> {
    let v: Value = match arg {
        Some(a) => f.call((a,))?,
        None => f.call(())?,
    };
    if let Some(p) = v.as_promise() {
        let p: Promise = p.clone();
        return p.finish::<Value>();
    }
    let _ = ctx;
    Ok(v)
}

extern "C" {
    /// wasi-libc: forget the preopened-directory table filled at deploy (it is in the snapshot);
    /// it is re-read from the invocation's own preopens on next use.
    fn __wasilibc_reset_preopens();
}

#[export_name = "kiln.restore"]
pub extern "C" fn restore() {
    unsafe { __wasilibc_reset_preopens() };
    // Math.random's state, if the top level drew from it, is in the snapshot and would be the same
    // in every instance: forget it, so the next draw seeds from this instance's WASI random.
    RNG.with(|s| *s.borrow_mut() = 0);
    STATE.with(|s| {
        let s = s.borrow();
        let s = s.as_ref().expect("initialised");
        let Some(on_restore) = &s.on_restore else { return };
        s.ctx.with(|ctx| {
            let f = on_restore.clone().restore(&ctx).expect("restore");
            if let Err(e) = call_and_await(&ctx, f, None).catch(&ctx) {
                fail(&format!("onRestore failed: {}", describe(e)), 1);
            }
        })
    })
}

#[export_name = "_start"]
pub extern "C" fn start() {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        fail(&format!("reading stdin: {e}"), 70);
    }
    let code = STATE.with(|s| {
        let s = s.borrow();
        let s = s.as_ref().expect("initialised");
        s.ctx.with(|ctx| {
            let event = if input.iter().all(u8::is_ascii_whitespace) {
                Value::new_null(ctx.clone())
            } else {
                match ctx.json_parse(input).catch(&ctx) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = writeln!(std::io::stderr(), "invalid JSON input: {}", describe(e));
                        return 2;
                    }
                }
            };
            let handler = s.handler.clone().restore(&ctx).expect("restore");
            let result = call_and_await(&ctx, handler, Some(event))
                .and_then(|v| ctx.json_stringify(v))
                .catch(&ctx);
            match result {
                Ok(json) => {
                    let json = json.map(|s| s.to_string().unwrap_or_default()).unwrap_or_else(|| "null".into());
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(json.as_bytes());
                    let _ = out.write_all(b"\n");
                    let _ = out.flush();
                    0
                }
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "{}", describe(e));
                    1
                }
            }
        })
    });
    if code != 0 {
        std::process::exit(code);
    }
}
