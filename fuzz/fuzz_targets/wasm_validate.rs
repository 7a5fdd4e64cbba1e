//! Upload validation (`inspect`): any bytes — binary modules and components, WAT text, garbage —
//! as an upload is given, and valid modules from wasm-smith (driven by the same bytes), which get
//! past wasmparser's validator into Kiln's own checks, inspected both as binary and as WAT text.
#![no_main]

use arbitrary::Unstructured;
use kiln_core::function::ArtifactKind;
use kiln_core::tier::wasm::validate::{inspect, Artifact, CodeLimits};
use libfuzzer_sys::fuzz_target;

/// The limits of the default config (128 MiB) and pool.
const LIMITS: CodeLimits = CodeLimits {
    memory_bytes: 128 << 20,
    table_elements: 100_000,
    memories_per_module: 1,
    tables_per_module: 4,
};

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(module) = smith(data) {
        if let Some(binary) = check(&module) {
            // The same module as text must get the same verdict: text is converted, then inspected.
            // Text that the `wat` crate itself cannot read back (wasmprinter 0.254 prints syntax
            // that wat 1.263 may spell differently) is a gap between those two crates, not a
            // verdict of Kiln's: skipped, but only when `wat` alone refuses it too.
            if let Ok(text) = wasmprinter::print_bytes(&module) {
                match inspect(text.as_bytes(), &LIMITS) {
                    Ok(from_text) => {
                        assert_eq!(from_text.kind, binary.kind);
                        assert_eq!(from_text.init_hook, binary.init_hook);
                    }
                    Err(e) if e.0.starts_with("not WebAssembly") && wat::parse_str(&text).is_err() => {}
                    Err(e) => panic!("accepted as binary, refused as text: {e}\n{text}"),
                }
            }
        }
    }
});

/// Inspects `upload` and checks what holds of anything accepted.
fn check(upload: &[u8]) -> Option<Artifact> {
    let artifact = inspect(upload, &LIMITS).ok()?;
    assert!(artifact.bytes.starts_with(b"\0asm"), "the stored form is binary");
    let kind = if wasmparser::Parser::is_component(&artifact.bytes) {
        ArtifactKind::Component
    } else {
        ArtifactKind::Module
    };
    assert_eq!(artifact.kind, kind);
    assert!(artifact.kind != ArtifactKind::Component || artifact.init_hook.is_none());
    // What is stored is inspected again on every load path: it must pass, unchanged.
    let again = inspect(&artifact.bytes, &LIMITS).expect("the stored binary of an accepted upload is accepted");
    assert_eq!(again.bytes, artifact.bytes);
    assert_eq!(again.kind, artifact.kind);
    assert_eq!(again.init_hook, artifact.init_hook);
    Some(artifact)
}

/// `(module (func (export "_start")))`: wasm-smith's modules must export it, as Kiln's must.
const START: &[u8] =
    b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x03\x02\x01\0\x07\x0a\x01\x06_start\0\0\x0a\x04\x01\x02\0\x0b";

/// A valid module from wasm-smith, with a config also drawn from the input (no imports, a `_start`
/// export, so that modules get through every check and some are accepted).
fn smith(data: &[u8]) -> Option<Vec<u8>> {
    let mut u = Unstructured::new(data);
    let mut config: wasm_smith::Config = u.arbitrary().ok()?;
    config.max_imports = 0;
    config.exports = Some(START.to_vec());
    config.max_memories = config.max_memories.min(2);
    config.max_tables = config.max_tables.min(5);
    let module = wasm_smith::Module::new(config, &mut u).ok()?;
    Some(module.to_bytes())
}
