//! Deploy-time inspection of an upload, before anything is stored or compiled: is it a Wasm module
//! or component (or WAT text, converted here), is it valid, does it import only what Kiln provides,
//! and does it fit the limits it will run under. Every rejection says, for a person, what is wrong.

use wasmparser::{Operator, Parser, Payload, TypeRef, Validator};

use crate::function::ArtifactKind;

/// Limits an artifact is checked against; they match what the instance pool can hold.
#[derive(Debug, Clone, Copy)]
pub struct CodeLimits {
    /// The function's memory limit, in bytes: a larger declared minimum could never instantiate.
    pub memory_bytes: u64,
    /// Elements a table may start with.
    pub table_elements: u64,
    pub memories_per_module: usize,
    pub tables_per_module: usize,
}

/// A validated artifact, in binary form.
#[derive(Debug)]
pub struct Artifact {
    pub kind: ArtifactKind,
    pub bytes: Vec<u8>,
    /// The init hook this module exports, to be run once at deploy and snapshotted.
    pub init_hook: Option<&'static str>,
}

/// Init-hook export names, in order of preference: Wizer's classic name (the API's), and the
/// name `wasmtime-wizer` uses by default.
pub const INIT_HOOKS: [&str; 2] = ["wizer.initialize", "wizer-initialize"];
/// The restore hook, run on every fresh instance before the entry point.
pub const RESTORE_HOOK: &str = "kiln.restore";

/// Why an upload is not runnable code; the text goes to the user as an `invalid_code` message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCode(pub String);

fn invalid(msg: impl Into<String>) -> InvalidCode {
    InvalidCode(msg.into())
}

const WASI_P1: &str = "wasi_snapshot_preview1";
const CLI_RUN: &str = "wasi:cli/run@0.2";
const HTTP_HANDLER: &str = "wasi:http/incoming-handler@0.2";

/// Inspects an upload. WAT text is accepted and converted to binary first, so the digest is always
/// that of the binary that runs.
pub fn inspect(upload: &[u8], limits: &CodeLimits) -> Result<Artifact, InvalidCode> {
    let bytes = to_binary(upload)?;
    let kind = if Parser::is_component(&bytes) {
        ArtifactKind::Component
    } else if Parser::is_core_wasm(&bytes) {
        ArtifactKind::Module
    } else {
        return Err(invalid(
            "unsupported WebAssembly binary version (expected a module or a component)",
        ));
    };
    Validator::new_with_features(super::engine::features())
        .validate_all(&bytes)
        .map_err(|e| invalid(format!("invalid WebAssembly: {e}")))?;
    check_compile_cost(&bytes)?;
    let init_hook = match kind {
        ArtifactKind::Module => check_module(&bytes, limits)?,
        ArtifactKind::Component => {
            check_component(&bytes)?;
            None
        }
        ArtifactKind::Native | ArtifactKind::Image => unreachable!("Wasm validation never yields a native kind"),
    };
    Ok(Artifact { kind, bytes, init_hook })
}

fn to_binary(upload: &[u8]) -> Result<Vec<u8>, InvalidCode> {
    if upload.is_empty() {
        return Err(invalid("the upload is empty"));
    }
    if upload.starts_with(b"\0asm") {
        return Ok(upload.to_vec());
    }
    if upload.starts_with(b"\x7fELF") {
        return Err(invalid(
            "this is a native ELF executable, not WebAssembly; native code runs only on the microvm tier (\"tier\": \"microvm\")",
        ));
    }
    let is_text = !upload.contains(&0) && std::str::from_utf8(upload).is_ok();
    if is_text {
        return wat::parse_bytes(upload).map(|b| b.into_owned()).map_err(|e| {
            invalid(format!(
                "not WebAssembly: no `\\0asm` header, and not valid WebAssembly text (WAT) either: {e}"
            ))
        });
    }
    Err(invalid(
        "not WebAssembly: the upload does not start with the `\\0asm` header",
    ))
}

/// Checks a module; returns the init hook it exports, if any.
fn check_module(bytes: &[u8], limits: &CodeLimits) -> Result<Option<&'static str>, InvalidCode> {
    let mut memories = 0;
    let mut tables = 0;
    let mut has_start = false;
    let mut init_hook = None;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| invalid(format!("invalid WebAssembly: {e}")))? {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(|e| invalid(e.to_string()))?;
                    if import.module != WASI_P1 {
                        return Err(invalid(format!(
                            "imports `{}::{}`, which Kiln does not provide: modules may import only `{WASI_P1}` functions",
                            import.module, import.name
                        )));
                    }
                    if !matches!(import.ty, TypeRef::Func(_) | TypeRef::FuncExact(_)) {
                        return Err(invalid(format!(
                            "imports `{}::{}` as a non-function; `{WASI_P1}` provides only functions",
                            import.module, import.name
                        )));
                    }
                }
            }
            Payload::MemorySection(reader) => {
                for memory in reader {
                    let memory = memory.map_err(|e| invalid(e.to_string()))?;
                    memories += 1;
                    let page = 1u64 << memory.page_size_log2.unwrap_or(16);
                    let min_bytes = memory.initial.saturating_mul(page);
                    if min_bytes > limits.memory_bytes {
                        return Err(invalid(format!(
                            "declares a minimum linear memory of {} MiB, more than the function's memory limit of {} MiB",
                            min_bytes >> 20,
                            limits.memory_bytes >> 20
                        )));
                    }
                }
            }
            Payload::TableSection(reader) => {
                for table in reader {
                    let table = table.map_err(|e| invalid(e.to_string()))?;
                    tables += 1;
                    if table.ty.initial > limits.table_elements {
                        return Err(invalid(format!(
                            "declares a table of {} elements; the limit is {}",
                            table.ty.initial, limits.table_elements
                        )));
                    }
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(|e| invalid(e.to_string()))?;
                    if export.kind != wasmparser::ExternalKind::Func {
                        continue;
                    }
                    has_start |= export.name == "_start";
                    if let Some(hook) = INIT_HOOKS.iter().find(|h| **h == export.name) {
                        init_hook = init_hook.or(Some(*hook));
                    }
                }
            }
            _ => {}
        }
    }
    if memories > limits.memories_per_module {
        return Err(invalid(format!(
            "declares {memories} memories; at most {} are supported",
            limits.memories_per_module
        )));
    }
    if tables > limits.tables_per_module {
        return Err(invalid(format!(
            "declares {tables} tables; at most {} are supported",
            limits.tables_per_module
        )));
    }
    if !has_start {
        return Err(invalid(
            "exports no `_start` function: a module must be a WASI preview 1 command",
        ));
    }
    Ok(init_hook)
}

/// Budgets that keep compilation time bounded. Cranelift's register allocation and SSA
/// construction are superlinear in some shapes of code that cost the uploader almost nothing: a
/// 340 KB function with 30,000 locals live across one loop compiles for over a minute, 120 KB of
/// 40,000 nested loops for three minutes, 13 KB declaring 50,000 locals in each of 1,000
/// functions for 5.7 s (measured on 2 cores; ten times the functions, ten times the time). Real
/// code is far from these budgets: a 10.8 MB Rust debug build (47,693 functions) declares 226,644
/// locals, has 4,285 loop levels in all and a locals-across-loops estimate of 5.4 million. The
/// budgets are 18 to 230 times that, and each caps the time of its shape of code to a few seconds.
const MAX_DECLARED_LOCALS: u64 = 5_000_000;
/// Loop levels summed over every loop (a loop nested d deep counts d): deep nesting is quadratic.
const MAX_LOOP_LEVELS: u64 = 1_000_000;
/// Sum over functions of K × P, where K is the number of distinct locals used inside loops and P
/// the number of (loop, local) pairs where the loop uses the local: each pair is a value live
/// around that loop, and register allocation grows with pairs times the values they compete with.
const MAX_LOOP_LOCALS_COST: u64 = 100_000_000;

/// Rejects code whose compilation would take disproportionately long (see the budgets above).
/// Runs over every function body, including those of modules nested in a component.
fn check_compile_cost(bytes: &[u8]) -> Result<(), InvalidCode> {
    let too_complex = |what: String| {
        invalid(format!(
            "too complex to compile in reasonable time: {what}; split the code into smaller functions"
        ))
    };
    let mut declared_locals = 0u64;
    let mut loop_levels = 0u64;
    let mut loop_locals_cost = 0u64;
    let mut function = 0u64;
    // Per local: the clock at which it was last counted for every loop then open.
    let mut counted_at: Vec<u64> = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        let Payload::CodeSectionEntry(body) = payload.map_err(|e| invalid(format!("invalid WebAssembly: {e}")))? else {
            continue;
        };
        let bad = |e: wasmparser::BinaryReaderError| invalid(format!("invalid WebAssembly: {e}"));
        for locals in body.get_locals_reader().map_err(bad)? {
            declared_locals += u64::from(locals.map_err(bad)?.0);
        }
        if declared_locals > MAX_DECLARED_LOCALS {
            return Err(too_complex(format!(
                "its functions declare more than {MAX_DECLARED_LOCALS} locals in all"
            )));
        }
        // Control frames (true for a loop) and the clock values at which the open loops opened.
        let mut frames: Vec<bool> = Vec::new();
        let mut open_loops: Vec<u64> = Vec::new();
        let mut clock = 0u64;
        let (mut k, mut p) = (0u64, 0u64);
        counted_at.clear();
        let mut ops = body.get_operators_reader().map_err(bad)?;
        while !ops.eof() {
            let local = match ops.read().map_err(bad)? {
                Operator::Block { .. } | Operator::If { .. } | Operator::Try { .. } | Operator::TryTable { .. } => {
                    frames.push(false);
                    continue;
                }
                Operator::Loop { .. } => {
                    frames.push(true);
                    clock += 1;
                    open_loops.push(clock);
                    loop_levels += open_loops.len() as u64;
                    if loop_levels > MAX_LOOP_LEVELS {
                        return Err(too_complex(format!(
                            "function body {function} nests loops at least {} deep, and loop levels summed over all loops pass {MAX_LOOP_LEVELS}",
                            open_loops.len()
                        )));
                    }
                    continue;
                }
                Operator::End | Operator::Delegate { .. } => {
                    if frames.pop() == Some(true) {
                        open_loops.pop();
                    }
                    continue;
                }
                Operator::LocalGet { local_index }
                | Operator::LocalSet { local_index }
                | Operator::LocalTee { local_index } => local_index as usize,
                _ => continue,
            };
            if open_loops.is_empty() {
                continue;
            }
            if local >= counted_at.len() {
                counted_at.resize(local + 1, 0);
            }
            let last = counted_at[local];
            if last == 0 {
                k += 1;
            }
            // Loops opened at or before `last` are still open and already count this local.
            p += (open_loops.len() - open_loops.partition_point(|&opened| opened <= last)) as u64;
            counted_at[local] = clock;
            if k.saturating_mul(p) > MAX_LOOP_LOCALS_COST {
                break;
            }
        }
        loop_locals_cost = loop_locals_cost.saturating_add(k.saturating_mul(p));
        if loop_locals_cost > MAX_LOOP_LOCALS_COST {
            return Err(too_complex(format!(
                "function body {function} keeps at least {k} locals live around its loops, and the estimate of locals live across loops passes {MAX_LOOP_LOCALS_COST}"
            )));
        }
        function += 1;
    }
    Ok(())
}

fn check_component(bytes: &[u8]) -> Result<(), InvalidCode> {
    let mut depth = 0usize;
    let mut has_run = false;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| invalid(format!("invalid WebAssembly: {e}")))?;
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let name = import.map_err(|e| invalid(e.to_string()))?.name.name;
                    if !(name.starts_with("wasi:") && name.contains("@0.2.")) {
                        return Err(invalid(format!(
                            "imports `{name}`, which Kiln does not provide: components may import WASI 0.2 interfaces only"
                        )));
                    }
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let name = export.map_err(|e| invalid(e.to_string()))?.name.name;
                    has_run |= name.starts_with(CLI_RUN) || name.starts_with(HTTP_HANDLER);
                }
            }
            _ => {}
        }
    }
    if !has_run {
        return Err(invalid(
            "exports neither `wasi:cli/run` nor `wasi:http/incoming-handler`: a component must target the `wasi:cli/command` or the `wasi:http/proxy` world",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: CodeLimits = CodeLimits {
        memory_bytes: 128 << 20,
        table_elements: 100_000,
        memories_per_module: 1,
        tables_per_module: 4,
    };

    fn err(src: &[u8]) -> String {
        inspect(src, &LIMITS).unwrap_err().0
    }

    #[test]
    fn accepts_a_wasi_command_in_text_and_binary() {
        let wat = br#"(module
            (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
            (memory (export "memory") 1)
            (func (export "_start")))"#;
        let a = inspect(wat, &LIMITS).unwrap();
        assert_eq!(a.kind, ArtifactKind::Module);
        assert!(a.bytes.starts_with(b"\0asm"));
        let b = inspect(&a.bytes, &LIMITS).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.init_hook, None);
        let hooked = inspect(
            br#"(module (func (export "_start")) (func (export "wizer.initialize")))"#,
            &LIMITS,
        );
        assert_eq!(hooked.unwrap().init_hook, Some("wizer.initialize"));
    }

    #[test]
    fn compile_bombs_are_refused_and_ordinary_loops_are_not() {
        let func = |locals: usize, body: String| {
            format!(
                "(module (func (export \"_start\") {} {body}))",
                "(local i32)".repeat(locals)
            )
        };
        // 1,500 nested loops: 1,125,750 loop levels.
        let deep = func(0, format!("{}{}", "(loop ".repeat(1500), ")".repeat(1500)));
        assert!(err(deep.as_bytes()).contains("nests loops at least 1414 deep"));
        // 10,001 locals, all used inside one loop: 10,001 × 10,001 pairs.
        let body = |n: usize| -> String { (0..n).map(|i| format!("(local.set {i} (local.get {i}))")).collect() };
        let live = func(10_001, format!("(loop {})", body(10_001)));
        assert!(err(live.as_bytes()).contains("keeps at least 10001 locals live around its loops"));
        // Ordinary shapes pass: loops 20 deep using 200 locals, and 5,000 locals used outside loops.
        let nested = func(200, format!("{}{}{}", "(loop ".repeat(20), body(200), ")".repeat(20)));
        inspect(nested.as_bytes(), &LIMITS).unwrap();
        inspect(func(5_000, body(5_000)).as_bytes(), &LIMITS).unwrap();
    }

    #[test]
    fn rejections_say_why() {
        assert!(err(b"").contains("empty"));
        assert!(err(b"\x7fELF\x02\x01\x01").contains("ELF"));
        assert!(err(b"hello world").contains("\\0asm"));
        assert!(err(b"\0asm\x01\0\0\0\x01").contains("invalid WebAssembly"));
        assert!(err(b"(module (func $f (result i32)))").contains("invalid"));
        assert!(err(b"(module)").contains("_start"));
        assert!(err(br#"(module (import "env" "f" (func)) (func (export "_start")))"#).contains("env::f"));
        assert!(err(b"(module (memory 4096) (func (export \"_start\")))").contains("memory limit"));
        assert!(err(b"(module (table 1000000 funcref) (func (export \"_start\")))").contains("table"));
    }
}
