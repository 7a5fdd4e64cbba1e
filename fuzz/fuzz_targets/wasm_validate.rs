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
            if let Ok(text) = wasmprinter::print_bytes(&module) {
                let from_text = inspect(text.as_bytes(), &LIMITS)
                    .unwrap_or_else(|e| panic!("accepted as binary, refused as text: {e}\n{text}"));
                assert_eq!(from_text.kind, binary.kind);
                assert_eq!(from_text.init_hook, binary.init_hook);
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

/// A valid module from wasm-smith, with a config also drawn from the input (imports off, so the
/// module reaches the memory, table and export checks).
fn smith(data: &[u8]) -> Option<Vec<u8>> {
    let mut u = Unstructured::new(data);
    let mut config: wasm_smith::Config = u.arbitrary().ok()?;
    config.max_imports = 0;
    config.max_memories = config.max_memories.min(2);
    config.max_tables = config.max_tables.min(5);
    let module = wasm_smith::Module::new(config, &mut u).ok()?;
    Some(module.to_bytes())
}
