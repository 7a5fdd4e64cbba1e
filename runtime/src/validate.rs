//! Deploy-time inspection of an upload, before anything is stored or compiled: is it a Wasm module
//! or component (or WAT text, converted here), is it valid, does it import only what Kiln provides,
//! and does it fit the limits it will run under. Every rejection says, for a person, what is wrong.

use wasmparser::{Parser, Payload, TypeRef, Validator, WasmFeatures};

/// What kind of artifact a version runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    /// A core module, WASI preview 1 command (`_start`).
    Module,
    /// A component targeting `wasi:cli/command` (exports `wasi:cli/run`).
    Component,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Module => "module",
            ArtifactKind::Component => "component",
        }
    }

    pub fn parse(s: &str) -> Option<ArtifactKind> {
        match s {
            "module" => Some(ArtifactKind::Module),
            "component" => Some(ArtifactKind::Component),
            _ => None,
        }
    }
}

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
}

/// Why an upload is not runnable code; the text goes to the user in the 422 body.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCode(pub String);

fn invalid(msg: impl Into<String>) -> InvalidCode {
    InvalidCode(msg.into())
}

const WASI_P1: &str = "wasi_snapshot_preview1";
const CLI_RUN: &str = "wasi:cli/run@0.2";

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
    Validator::new_with_features(WasmFeatures::default())
        .validate_all(&bytes)
        .map_err(|e| invalid(format!("invalid WebAssembly: {e}")))?;
    match kind {
        ArtifactKind::Module => check_module(&bytes, limits)?,
        ArtifactKind::Component => check_component(&bytes)?,
    }
    Ok(Artifact { kind, bytes })
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

fn check_module(bytes: &[u8], limits: &CodeLimits) -> Result<(), InvalidCode> {
    let mut memories = 0;
    let mut tables = 0;
    let mut has_start = false;
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
                    if export.name == "_start" && export.kind == wasmparser::ExternalKind::Func {
                        has_start = true;
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
                    has_run |= name.starts_with(CLI_RUN);
                }
            }
            _ => {}
        }
    }
    if !has_run {
        return Err(invalid(
            "exports no `wasi:cli/run` interface: a component must target the `wasi:cli/command` world",
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
