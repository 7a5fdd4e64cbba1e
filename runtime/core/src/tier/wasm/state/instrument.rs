//! Instrumentation: a component rewritten so that the host can read and write the state of every
//! core instance inside it. The approach follows `wasmtime-wizer`'s component instrumentation
//! (export each module's internal state, reach it from an extra module, lift that module's
//! functions into an exported instance); the code is Kiln's own and adds the setters.
//!
//! 1. Each core module defined at the top level gets extra exports (`kiln-state:m0`, `…:g0`,
//!    `…:t0`) of its defined memories, mutable globals and tables. Only the export section
//!    changes, so no function, memory or global index moves and the code is untouched.
//! 2. An *accessor* module (generated as WAT and assembled by the `wat` crate) imports those
//!    exports from every instance of those modules and defines small functions over them.
//! 3. At the end of the component: the accessor module is instantiated with those instances,
//!    its functions are lifted (the getters of a memory with that memory as their canonical-ABI
//!    `memory`, the setter with the accessor's `realloc`) and exported as the instance
//!    [`ACCESS_INSTANCE`].
//!
//! Nothing the original component does changes: its instances, imports and exports are as they
//! were, and the accessor is one more core instance that defines no memory or table and runs
//! nothing until the host calls it.

use std::fmt::Write as _;
use std::ops::Range;

use sha2::{Digest as _, Sha256};
use wasmparser::{
    CanonicalFunction, ComponentAlias, ComponentExternalKind, ComponentInstance, ComponentOuterAliasKind,
    ComponentType, DataKind, Encoding, ExternalKind, Instance, Operator, Parser, Payload, RefType, TypeRef, ValType,
    Validator,
};

use super::format::PAGE;
use super::{FreshImage, GlobalKind, GlobalSlot, Layout, MemorySlot, StateError, TableSlot};

/// The instance export through which the host reaches the state. A guest exporting this name
/// itself is refused, so the name cannot collide.
pub const ACCESS_INSTANCE: &str = "kiln:state/access";
/// Prefix of the extra core exports; a module already exporting a name with it is refused.
const EXPORT_PREFIX: &str = "kiln-state:";
/// Hashed into the fingerprint: a state captured under another instrumentation scheme (another
/// order of memories, say) never restores into this one.
const SCHEME: &[u8] = b"kiln-state instrumentation 1\0";

/// A component with state accessors added, and where its state is.
#[derive(Debug, Clone)]
pub struct Instrumented {
    /// The instrumented component: compile, link and serve it like the original.
    pub component: Vec<u8>,
    pub layout: Layout,
}

/// Section ids of a core module, and their required order.
const EXPORT_SECTION: u8 = 7;
fn section_rank(id: u8) -> u8 {
    match id {
        1..=5 => id,
        13 => 6,      // tag
        6 => 7,       // global
        7 => 8,       // export
        8 => 9,       // start
        9 => 10,      // element
        12 => 11,     // data count
        10 => 12,     // code
        11 => 13,     // data
        _ => u8::MAX, // custom sections keep their place
    }
}

fn unsupported(what: impl Into<String>) -> StateError {
    StateError::Unsupported(what.into())
}

fn invalid(e: wasmparser::BinaryReaderError) -> StateError {
    StateError::Invalid(e.to_string())
}

/// What instrumentation needs of one core module.
struct ModuleInfo<'a> {
    bytes: &'a [u8],
    imported_memories: u32,
    imported_globals: u32,
    imported_tables: u32,
    memories: Vec<wasmparser::MemoryType>,
    globals: Vec<wasmparser::GlobalType>,
    tables: Vec<wasmparser::TableType>,
    has_start: bool,
    /// Active data segments writing a memory this module imports: at instantiation they change
    /// another instance's memory.
    writes_imported_memory: bool,
    /// Per defined memory: the byte ranges its active data segments write, or `None` when an
    /// offset is not a constant.
    data: Vec<Option<Vec<Range<u64>>>>,
}

impl<'a> ModuleInfo<'a> {
    fn parse(bytes: &'a [u8]) -> Result<ModuleInfo<'a>, StateError> {
        let mut info = ModuleInfo {
            bytes,
            imported_memories: 0,
            imported_globals: 0,
            imported_tables: 0,
            memories: Vec::new(),
            globals: Vec::new(),
            tables: Vec::new(),
            has_start: false,
            writes_imported_memory: false,
            data: Vec::new(),
        };
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.map_err(invalid)? {
                Payload::ImportSection(reader) => {
                    for import in reader.into_imports() {
                        match import.map_err(invalid)?.ty {
                            TypeRef::Memory(_) => info.imported_memories += 1,
                            TypeRef::Global(_) => info.imported_globals += 1,
                            TypeRef::Table(_) => info.imported_tables += 1,
                            _ => {}
                        }
                    }
                }
                Payload::MemorySection(reader) => {
                    for memory in reader {
                        info.memories.push(memory.map_err(invalid)?);
                    }
                }
                Payload::GlobalSection(reader) => {
                    for global in reader {
                        info.globals.push(global.map_err(invalid)?.ty);
                    }
                }
                Payload::TableSection(reader) => {
                    for table in reader {
                        info.tables.push(table.map_err(invalid)?.ty);
                    }
                }
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let name = export.map_err(invalid)?.name;
                        if name.starts_with(EXPORT_PREFIX) {
                            return Err(unsupported(format!(
                                "a core module already exports `{name}`, a name Kiln's instrumentation reserves"
                            )));
                        }
                    }
                }
                Payload::StartSection { .. } => info.has_start = true,
                Payload::DataSection(reader) => {
                    info.data.resize(info.memories.len(), Some(Vec::new()));
                    for segment in reader {
                        let segment = segment.map_err(invalid)?;
                        let DataKind::Active {
                            memory_index,
                            offset_expr,
                        } = segment.kind
                        else {
                            continue;
                        };
                        let Some(defined) = memory_index.checked_sub(info.imported_memories) else {
                            info.writes_imported_memory = true;
                            continue;
                        };
                        let Some(ranges) = info.data.get_mut(defined as usize) else {
                            continue;
                        };
                        let mut ops = offset_expr.get_operators_reader();
                        let offset = match (ops.read(), ops.read()) {
                            (Ok(Operator::I32Const { value }), Ok(Operator::End)) => Some(value as u32 as u64),
                            _ => None,
                        };
                        match (offset, ranges.as_mut()) {
                            (Some(offset), Some(ranges)) => {
                                ranges.push(offset..offset + segment.data.len() as u64);
                            }
                            _ => *ranges = None,
                        }
                    }
                }
                _ => {}
            }
        }
        info.data.resize(info.memories.len(), Some(Vec::new()));
        Ok(info)
    }

    /// The module with exports of its defined memories, mutable globals and tables added.
    fn instrumented(&self) -> Result<Vec<u8>, StateError> {
        let mut added = Vec::new();
        let mut count = 0u32;
        let mut export = |name: String, kind: u8, index: u32| {
            write_name(&mut added, &name);
            added.push(kind);
            leb_u32(&mut added, index);
            count += 1;
        };
        for (i, _) in self.memories.iter().enumerate() {
            export(format!("{EXPORT_PREFIX}m{i}"), 0x02, self.imported_memories + i as u32);
        }
        for (i, global) in self.globals.iter().enumerate() {
            if global.mutable {
                export(format!("{EXPORT_PREFIX}g{i}"), 0x03, self.imported_globals + i as u32);
            }
        }
        for (i, _) in self.tables.iter().enumerate() {
            export(format!("{EXPORT_PREFIX}t{i}"), 0x01, self.imported_tables + i as u32);
        }
        if count == 0 {
            return Ok(self.bytes.to_vec());
        }

        let export_section = |existing: Option<&[u8]>| -> Result<Vec<u8>, StateError> {
            let (old_count, old_entries) = match existing {
                Some(section) => read_leb_u32(section).ok_or_else(|| unsupported("a malformed export section"))?,
                None => (0, &[][..]),
            };
            let mut content = Vec::with_capacity(5 + old_entries.len() + added.len());
            leb_u32(&mut content, old_count + count);
            content.extend_from_slice(old_entries);
            content.extend_from_slice(&added);
            Ok(content)
        };
        let mut out = Vec::with_capacity(self.bytes.len() + added.len() + 16);
        out.extend_from_slice(&self.bytes[..8]);
        let mut placed = false;
        for payload in Parser::new(0).parse_all(self.bytes) {
            let payload = payload.map_err(invalid)?;
            let Some((id, range)) = payload.as_section() else {
                continue;
            };
            let content = &self.bytes[range];
            if id == EXPORT_SECTION {
                write_section(&mut out, EXPORT_SECTION, &export_section(Some(content))?);
                placed = true;
                continue;
            }
            // No export section: add one where the order of sections puts it.
            if !placed && section_rank(id) != u8::MAX && section_rank(id) > section_rank(EXPORT_SECTION) {
                write_section(&mut out, EXPORT_SECTION, &export_section(None)?);
                placed = true;
            }
            write_section(&mut out, id, content);
        }
        if !placed {
            write_section(&mut out, EXPORT_SECTION, &export_section(None)?);
        }
        Ok(out)
    }
}

/// Counts of the top-level component's index spaces that the appended sections refer to.
#[derive(Default)]
struct Counts {
    core_modules: u32,
    core_instances: u32,
    core_funcs: u32,
    core_memories: u32,
    types: u32,
    funcs: u32,
    instances: u32,
}

impl Counts {
    fn external(&mut self, kind: ComponentExternalKind, what: &str) -> Result<(), StateError> {
        match kind {
            ComponentExternalKind::Func => self.funcs += 1,
            ComponentExternalKind::Type => self.types += 1,
            ComponentExternalKind::Instance => self.instances += 1,
            ComponentExternalKind::Module | ComponentExternalKind::Component | ComponentExternalKind::Value => {
                return Err(unsupported(format!(
                    "the component {what} a {}, which the instrumentation cannot follow",
                    kind.desc()
                )))
            }
        }
        Ok(())
    }
}

enum Section<'a> {
    Raw(u8, &'a [u8]),
    Module(usize),
}

/// One nesting level of the walk.
#[derive(PartialEq)]
enum Frame {
    Module,
    Component,
}

/// Adds state accessors to `component` (see the module doc). Refuses components whose state the
/// accessors could not reach completely; each refusal says what is in the way.
pub fn instrument(component: &[u8]) -> Result<Instrumented, StateError> {
    let features = super::super::engine::features();
    Validator::new_with_features(features)
        .validate_all(component)
        .map_err(|e| StateError::Invalid(format!("not a valid component: {e}")))?;

    let mut sections = Vec::new();
    let mut modules: Vec<ModuleInfo> = Vec::new();
    let mut counts = Counts::default();
    // Core instances made by instantiating a module defined here: (core instance, module).
    let mut instantiations: Vec<(u32, u32)> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut top_seen = false;

    for payload in Parser::new(0).parse_all(component) {
        let payload = payload.map_err(invalid)?;
        // Inside a module: its payloads were read by `ModuleInfo::parse`; wait for its end.
        if stack.last() == Some(&Frame::Module) {
            if let Payload::End(_) = payload {
                stack.pop();
            }
            continue;
        }
        let top = top_seen && stack.is_empty();
        if !top {
            nested_payload(&payload, &mut stack, &mut top_seen)?;
            continue;
        }
        if let Payload::ModuleSection { unchecked_range, .. } = &payload {
            modules.push(ModuleInfo::parse(&component[unchecked_range.clone()])?);
            sections.push(Section::Module(modules.len() - 1));
            counts.core_modules += 1;
            stack.push(Frame::Module);
            continue;
        }
        if let Some((id, range)) = payload.as_section() {
            sections.push(Section::Raw(id, &component[range]));
        }
        match payload {
            Payload::ComponentSection { .. } => stack.push(Frame::Component),
            Payload::InstanceSection(reader) => {
                for instance in reader {
                    if let Instance::Instantiate { module_index, .. } = instance.map_err(invalid)? {
                        instantiations.push((counts.core_instances, module_index));
                    }
                    counts.core_instances += 1;
                }
            }
            Payload::ComponentInstanceSection(reader) => {
                for instance in reader {
                    if let ComponentInstance::Instantiate { args, .. } = instance.map_err(invalid)? {
                        if args.iter().any(|a| a.kind == ComponentExternalKind::Module) {
                            return Err(unsupported(
                                "the component passes a core module to a nested component, whose instances the \
                                 instrumentation cannot reach",
                            ));
                        }
                    }
                    counts.instances += 1;
                }
            }
            Payload::ComponentAliasSection(reader) => {
                for alias in reader {
                    match alias.map_err(invalid)? {
                        ComponentAlias::CoreInstanceExport { kind, .. } => match kind {
                            ExternalKind::Func | ExternalKind::FuncExact => counts.core_funcs += 1,
                            ExternalKind::Memory => counts.core_memories += 1,
                            ExternalKind::Table | ExternalKind::Global | ExternalKind::Tag => {}
                        },
                        ComponentAlias::InstanceExport { kind, .. } => counts.external(kind, "aliases")?,
                        ComponentAlias::Outer { kind, .. } => match kind {
                            ComponentOuterAliasKind::Type => counts.types += 1,
                            ComponentOuterAliasKind::CoreType => {}
                            ComponentOuterAliasKind::CoreModule | ComponentOuterAliasKind::Component => {
                                return Err(unsupported("the component aliases an outer module or component"))
                            }
                        },
                    }
                }
            }
            Payload::ComponentCanonicalSection(reader) => {
                for function in reader {
                    match function.map_err(invalid)? {
                        CanonicalFunction::Lift { .. } => counts.funcs += 1,
                        // Every other canonical built-in defines a core function.
                        _ => counts.core_funcs += 1,
                    }
                }
            }
            Payload::ComponentTypeSection(reader) => {
                for ty in reader {
                    check_type(&ty.map_err(invalid)?)?;
                    counts.types += 1;
                }
            }
            Payload::ComponentImportSection(reader) => {
                for import in reader {
                    counts.external(import.map_err(invalid)?.ty.kind(), "imports")?;
                }
            }
            Payload::ComponentExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(invalid)?;
                    if export.name.name.starts_with("kiln:state") {
                        return Err(unsupported(format!(
                            "the component already exports `{}`, a name Kiln reserves",
                            export.name.name
                        )));
                    }
                    counts.external(export.kind, "exports")?;
                }
            }
            Payload::ComponentStartSection { .. } => {
                return Err(unsupported("the component has a start function"));
            }
            Payload::Version { encoding, .. } if encoding != Encoding::Component => {
                return Err(StateError::Invalid("a core module, not a component".into()));
            }
            _ => {}
        }
    }

    let fingerprint = {
        let mut hash = Sha256::new();
        hash.update(SCHEME);
        hash.update(component);
        <[u8; 32]>::from(hash.finalize())
    };
    let plan = Plan::new(&modules, &instantiations)?;
    let layout = plan.layout(fingerprint, &modules);

    let mut out = Vec::with_capacity(component.len() + 4096);
    out.extend_from_slice(&component[..8]);
    for section in &sections {
        match section {
            Section::Raw(id, content) => write_section(&mut out, *id, content),
            Section::Module(i) => write_section(&mut out, 1, &modules[*i].instrumented()?),
        }
    }
    plan.append(&mut out, &counts, &layout)?;

    Validator::new_with_features(features).validate_all(&out).map_err(|e| {
        StateError::Invalid(format!(
            "the instrumented component does not validate (a Kiln bug): {e}"
        ))
    })?;
    Ok(Instrumented { component: out, layout })
}

/// Checks a payload of a nested component or of the top-level header, tracking nesting.
fn nested_payload(payload: &Payload<'_>, stack: &mut Vec<Frame>, top_seen: &mut bool) -> Result<(), StateError> {
    match payload {
        Payload::Version { encoding, .. } if !*top_seen => {
            if *encoding != Encoding::Component {
                return Err(StateError::Invalid("a core module, not a component".into()));
            }
            *top_seen = true;
        }
        Payload::ComponentSection { .. } => stack.push(Frame::Component),
        Payload::End(_) => {
            stack.pop();
        }
        // A nested component with core instances holds state the accessors cannot reach.
        Payload::ModuleSection { .. } | Payload::InstanceSection(_) => {
            return Err(unsupported(
                "a nested component instantiates core modules; only top-level core instances can be captured",
            ))
        }
        Payload::ComponentTypeSection(reader) => {
            for ty in reader.clone() {
                check_type(&ty.map_err(invalid)?)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Resource types a component defines have handles that live in the runtime's tables, outside
/// any memory: an instance holding one could not be restored whole.
fn check_type(ty: &ComponentType<'_>) -> Result<(), StateError> {
    if let ComponentType::Resource { .. } = ty {
        return Err(unsupported(
            "the component defines a resource type; handles to its own resources live outside its memories",
        ));
    }
    Ok(())
}

/// Which state each captured core instance contributes, in layout order.
struct Plan {
    /// Per captured instance: its core instance index and module index.
    instances: Vec<(u32, u32)>,
    memories: Vec<(usize, u32)>,
    globals: Vec<(usize, u32, GlobalKind)>,
    tables: Vec<(usize, u32, &'static str)>,
    /// Some module has a start function, or data segments writing another module's memory: a
    /// fresh instance's memories may then hold more than their own data segments.
    fresh_unknown: bool,
}

impl Plan {
    fn new(modules: &[ModuleInfo<'_>], instantiations: &[(u32, u32)]) -> Result<Plan, StateError> {
        let mut plan = Plan {
            instances: Vec::new(),
            memories: Vec::new(),
            globals: Vec::new(),
            tables: Vec::new(),
            fresh_unknown: modules.iter().any(|m| m.has_start || m.writes_imported_memory),
        };
        for &(core_instance, module_index) in instantiations {
            let module = modules.get(module_index as usize).ok_or_else(|| {
                unsupported(format!(
                    "core instance {core_instance} instantiates a module not defined here"
                ))
            })?;
            let k = plan.instances.len();
            for (i, memory) in module.memories.iter().enumerate() {
                if memory.memory64 || memory.shared || memory.page_size_log2.is_some_and(|p| p != 16) {
                    return Err(unsupported(format!(
                        "module {module_index} has a 64-bit, shared or custom-page memory"
                    )));
                }
                plan.memories.push((k, i as u32));
            }
            for (i, global) in module.globals.iter().enumerate() {
                if !global.mutable {
                    continue;
                }
                let kind = match global.content_type {
                    ValType::I32 => GlobalKind::I32,
                    ValType::I64 => GlobalKind::I64,
                    ValType::F32 => GlobalKind::F32,
                    ValType::F64 => GlobalKind::F64,
                    ValType::V128 => GlobalKind::V128,
                    ValType::Ref(_) => {
                        return Err(unsupported(format!(
                            "module {module_index} has a mutable reference-typed global, whose value cannot be saved"
                        )))
                    }
                };
                plan.globals.push((k, i as u32, kind));
            }
            for (i, table) in module.tables.iter().enumerate() {
                let element = match table.element_type {
                    RefType::FUNCREF => "funcref",
                    RefType::EXTERNREF => "externref",
                    other => {
                        return Err(unsupported(format!(
                            "module {module_index} has a table of {other}, which the instrumentation does not handle"
                        )))
                    }
                };
                if table.table64 || table.shared {
                    return Err(unsupported(format!(
                        "module {module_index} has a 64-bit or shared table"
                    )));
                }
                plan.tables.push((k, i as u32, element));
            }
            plan.instances.push((core_instance, module_index));
        }
        Ok(plan)
    }

    fn layout(&self, fingerprint: [u8; 32], modules: &[ModuleInfo<'_>]) -> Layout {
        let module = |k: usize| &modules[self.instances[k].1 as usize];
        let memories = self
            .memories
            .iter()
            .map(|&(k, i)| {
                let info = module(k);
                let fresh = match (&info.data[i as usize], self.fresh_unknown) {
                    (Some(ranges), false) => FreshImage::Pages(page_ranges(ranges)),
                    _ => FreshImage::Unknown,
                };
                MemorySlot {
                    core_instance: self.instances[k].0,
                    module: self.instances[k].1,
                    index: info.imported_memories + i,
                    initial_pages: info.memories[i as usize].initial,
                    fresh,
                }
            })
            .collect();
        let globals = self
            .globals
            .iter()
            .map(|&(k, i, kind)| GlobalSlot {
                core_instance: self.instances[k].0,
                module: self.instances[k].1,
                index: module(k).imported_globals + i,
                kind,
            })
            .collect();
        let tables = self
            .tables
            .iter()
            .map(|&(k, i, _)| TableSlot {
                core_instance: self.instances[k].0,
                module: self.instances[k].1,
                index: module(k).imported_tables + i,
                initial: module(k).tables[i as usize].initial,
            })
            .collect();
        Layout {
            fingerprint,
            memories,
            globals,
            tables,
        }
    }

    /// The accessor module's text.
    fn accessor_wat(&self, fingerprint: &[u8; 32]) -> String {
        let mut wat = String::from("(module\n");
        let import = |k: usize| format!("i{k}");
        for (n, &(k, i)) in self.memories.iter().enumerate() {
            let _ = writeln!(
                wat,
                "(import \"{}\" \"{EXPORT_PREFIX}m{i}\" (memory $m{n} 0))",
                import(k)
            );
        }
        for (n, &(k, i, kind)) in self.globals.iter().enumerate() {
            let _ = writeln!(
                wat,
                "(import \"{}\" \"{EXPORT_PREFIX}g{i}\" (global $g{n} (mut {})))",
                import(k),
                kind.wat()
            );
        }
        for (n, &(k, i, element)) in self.tables.iter().enumerate() {
            let _ = writeln!(
                wat,
                "(import \"{}\" \"{EXPORT_PREFIX}t{i}\" (table $t{n} 0 {element}))",
                import(k)
            );
        }
        let fingerprint = u64::from_le_bytes(fingerprint[..8].try_into().expect("8 bytes")) as i64;
        let _ = write!(
            wat,
            r#"
(global $cursor (mut i32) (i32.const 0))
(global $saved (mut i64) (i64.const 0))
(func (export "fingerprint") (result i64) (i64.const {fingerprint}))
(func (export "seek") (param i32) (global.set $cursor (local.get 0)))
(func (export "realloc") (param i32 i32 i32 i32) (result i32) (global.get $cursor))
(func (export "write") (param i32 i32))
"#
        );
        for n in 0..self.memories.len() {
            // The read lends memory [0, size - 8) as a list and uses the last 8 bytes as its
            // return area; `tail` reads them first and `read-post` puts them back.
            let _ = write!(
                wat,
                r#"
(func (export "m{n}-grow") (param i32) (result i32) (memory.grow $m{n} (local.get 0)))
(func (export "m{n}-tail") (result i64)
  (if (result i64) (i32.eqz (memory.size $m{n}))
    (then (i64.const 0))
    (else (i64.load $m{n} (i32.sub (i32.shl (memory.size $m{n}) (i32.const 16)) (i32.const 8))))))
(func (export "m{n}-read") (result i32) (local $end i32)
  (local.set $end (i32.sub (i32.shl (memory.size $m{n}) (i32.const 16)) (i32.const 8)))
  (global.set $saved (i64.load $m{n} (local.get $end)))
  (i32.store $m{n} (local.get $end) (i32.const 0))
  (i32.store $m{n} offset=4 (local.get $end) (local.get $end))
  (local.get $end))
(func (export "m{n}-read-post") (param i32) (i64.store $m{n} (local.get 0) (global.get $saved)))
(func (export "m{n}-zero") (param i32 i32) (memory.fill $m{n} (local.get 0) (i32.const 0) (local.get 1)))
"#
            );
        }
        for (n, &(_, _, kind)) in self.globals.iter().enumerate() {
            let _ = match kind {
                GlobalKind::I32 | GlobalKind::I64 => write!(
                    wat,
                    r#"
(func (export "g{n}-get") (result {t}) (global.get $g{n}))
(func (export "g{n}-set") (param {t}) (global.set $g{n} (local.get 0)))"#,
                    t = kind.wat()
                ),
                // Floats travel as their bits: lifting a float may canonicalise a NaN.
                GlobalKind::F32 => write!(
                    wat,
                    r#"
(func (export "g{n}-get") (result i32) (i32.reinterpret_f32 (global.get $g{n})))
(func (export "g{n}-set") (param i32) (global.set $g{n} (f32.reinterpret_i32 (local.get 0))))"#
                ),
                GlobalKind::F64 => write!(
                    wat,
                    r#"
(func (export "g{n}-get") (result i64) (i64.reinterpret_f64 (global.get $g{n})))
(func (export "g{n}-set") (param i64) (global.set $g{n} (f64.reinterpret_i64 (local.get 0))))"#
                ),
                GlobalKind::V128 => write!(
                    wat,
                    r#"
(func (export "g{n}-get-lo") (result i64) (i64x2.extract_lane 0 (global.get $g{n})))
(func (export "g{n}-get-hi") (result i64) (i64x2.extract_lane 1 (global.get $g{n})))
(func (export "g{n}-set") (param i64 i64)
  (global.set $g{n} (i64x2.replace_lane 1 (i64x2.replace_lane 0 (v128.const i64x2 0 0) (local.get 0)) (local.get 1))))"#
                ),
            };
        }
        for n in 0..self.tables.len() {
            let _ = write!(wat, "\n(func (export \"t{n}-size\") (result i32) (table.size $t{n}))");
        }
        wat.push_str("\n)\n");
        wat
    }

    /// Appends the accessor module, its instance, the lifted accessors and the export.
    fn append(&self, out: &mut Vec<u8>, counts: &Counts, layout: &Layout) -> Result<(), StateError> {
        let wat = self.accessor_wat(&layout.fingerprint);
        let module = wat::parse_str(&wat)
            .map_err(|e| StateError::Invalid(format!("the accessor module does not assemble (a Kiln bug): {e}")))?;
        write_section(out, 1, &module);

        // Instantiate it with every captured instance, named `i{k}`.
        let mut content = Vec::new();
        leb_u32(&mut content, 1);
        content.push(0x00);
        leb_u32(&mut content, counts.core_modules);
        leb_u32(&mut content, self.instances.len() as u32);
        for (k, &(core_instance, _)) in self.instances.iter().enumerate() {
            write_name(&mut content, &format!("i{k}"));
            content.push(0x12);
            leb_u32(&mut content, core_instance);
        }
        write_section(out, 2, &content);
        let accessor = counts.core_instances;

        // The component-level types of the accessors.
        let types = Types::new(counts.types);
        write_section(out, 7, &types.section());

        // Core aliases: each memory (for the `memory` option) and each accessor function.
        let mut aliases = Vec::new();
        let mut alias_count = 0u32;
        let mut alias = |sort: u8, instance: u32, name: &str| {
            aliases.extend_from_slice(&[0x00, sort, 0x01]);
            leb_u32(&mut aliases, instance);
            write_name(&mut aliases, name);
            alias_count += 1;
        };
        for &(k, i) in &self.memories {
            alias(0x02, self.instances[k].0, &format!("{EXPORT_PREFIX}m{i}"));
        }
        let memory = |n: usize| counts.core_memories + n as u32;
        let mut core_funcs: Vec<String> = Vec::new();
        let mut core_func = |name: String| -> u32 {
            let index = counts.core_funcs + core_funcs.len() as u32;
            alias(0x00, accessor, &name);
            core_funcs.push(name);
            index
        };

        let mut lifts: Vec<Lift> = Vec::new();
        lifts.push((
            "fingerprint".into(),
            core_func("fingerprint".into()),
            types.get_s64,
            vec![],
        ));
        lifts.push(("seek".into(), core_func("seek".into()), types.set_offset, vec![]));
        let realloc = core_func("realloc".into());
        let write = core_func("write".into());
        for n in 0..self.memories.len() {
            let m = memory(n);
            lifts.push((
                format!("m{n}-grow"),
                core_func(format!("m{n}-grow")),
                types.grow,
                vec![],
            ));
            lifts.push((
                format!("m{n}-tail"),
                core_func(format!("m{n}-tail")),
                types.get_s64,
                vec![],
            ));
            let read = core_func(format!("m{n}-read"));
            let post = core_func(format!("m{n}-read-post"));
            lifts.push((format!("m{n}-read"), read, types.read, vec![(0x03, m), (0x05, post)]));
            lifts.push((
                format!("m{n}-write"),
                write,
                types.write,
                vec![(0x03, m), (0x04, realloc)],
            ));
            lifts.push((
                format!("m{n}-zero"),
                core_func(format!("m{n}-zero")),
                types.zero,
                vec![],
            ));
        }
        for (n, &(_, _, kind)) in self.globals.iter().enumerate() {
            match kind {
                GlobalKind::I32 | GlobalKind::F32 => {
                    lifts.push((
                        format!("g{n}-get"),
                        core_func(format!("g{n}-get")),
                        types.get_s32,
                        vec![],
                    ));
                    lifts.push((
                        format!("g{n}-set"),
                        core_func(format!("g{n}-set")),
                        types.set_s32,
                        vec![],
                    ));
                }
                GlobalKind::I64 | GlobalKind::F64 => {
                    lifts.push((
                        format!("g{n}-get"),
                        core_func(format!("g{n}-get")),
                        types.get_s64,
                        vec![],
                    ));
                    lifts.push((
                        format!("g{n}-set"),
                        core_func(format!("g{n}-set")),
                        types.set_s64,
                        vec![],
                    ));
                }
                GlobalKind::V128 => {
                    lifts.push((
                        format!("g{n}-get-lo"),
                        core_func(format!("g{n}-get-lo")),
                        types.get_s64,
                        vec![],
                    ));
                    lifts.push((
                        format!("g{n}-get-hi"),
                        core_func(format!("g{n}-get-hi")),
                        types.get_s64,
                        vec![],
                    ));
                    lifts.push((
                        format!("g{n}-set"),
                        core_func(format!("g{n}-set")),
                        types.set_v128,
                        vec![],
                    ));
                }
            }
        }
        for n in 0..self.tables.len() {
            lifts.push((
                format!("t{n}-size"),
                core_func(format!("t{n}-size")),
                types.get_u32,
                vec![],
            ));
        }
        let mut alias_section = Vec::new();
        leb_u32(&mut alias_section, alias_count);
        alias_section.extend_from_slice(&aliases);
        write_section(out, 6, &alias_section);

        // canon lift, one per accessor.
        let mut canon = Vec::new();
        leb_u32(&mut canon, lifts.len() as u32);
        for (_, func, ty, options) in &lifts {
            canon.extend_from_slice(&[0x00, 0x00]);
            leb_u32(&mut canon, *func);
            leb_u32(&mut canon, options.len() as u32);
            for &(option, index) in options {
                canon.push(option);
                leb_u32(&mut canon, index);
            }
            leb_u32(&mut canon, *ty);
        }
        write_section(out, 8, &canon);

        // An instance of the lifted functions, exported under `ACCESS_INSTANCE`.
        let mut instance = Vec::new();
        leb_u32(&mut instance, 1);
        instance.push(0x01);
        leb_u32(&mut instance, lifts.len() as u32);
        for (j, (name, ..)) in lifts.iter().enumerate() {
            instance.push(0x00);
            write_name(&mut instance, name);
            instance.push(0x01);
            leb_u32(&mut instance, counts.funcs + j as u32);
        }
        write_section(out, 5, &instance);
        let mut export = Vec::new();
        leb_u32(&mut export, 1);
        export.push(0x00);
        write_name(&mut export, ACCESS_INSTANCE);
        export.push(0x05);
        leb_u32(&mut export, counts.instances);
        export.push(0x00);
        write_section(out, 11, &export);
        Ok(())
    }
}

/// An accessor to lift: (export name, core function, component function type, canon options).
type Lift = (String, u32, u32, Vec<(u8, u32)>);

/// A component function type: named parameters and an optional result.
type FuncType<'a> = (&'a [(&'a str, ValTy)], Option<ValTy>);

impl GlobalKind {
    fn wat(self) -> &'static str {
        match self {
            GlobalKind::I32 => "i32",
            GlobalKind::I64 => "i64",
            GlobalKind::F32 => "f32",
            GlobalKind::F64 => "f64",
            GlobalKind::V128 => "v128",
        }
    }
}

/// The component types the accessors are lifted at, by index.
struct Types {
    base: u32,
    read: u32,
    get_s64: u32,
    get_s32: u32,
    get_u32: u32,
    grow: u32,
    set_offset: u32,
    write: u32,
    zero: u32,
    set_s32: u32,
    set_s64: u32,
    set_v128: u32,
}

const S32: u8 = 0x7a;
const U32: u8 = 0x79;
const S64: u8 = 0x78;
const U8: u8 = 0x7d;

impl Types {
    fn new(base: u32) -> Types {
        Types {
            base,
            read: base + 1,
            get_s64: base + 2,
            get_s32: base + 3,
            get_u32: base + 4,
            grow: base + 5,
            set_offset: base + 6,
            write: base + 7,
            zero: base + 8,
            set_s32: base + 9,
            set_s64: base + 10,
            set_v128: base + 11,
        }
    }

    /// The type section: `list<u8>` first (at `base`), then the function types in the order of
    /// the indices above.
    fn section(&self) -> Vec<u8> {
        let list = ValTy::Index(self.base);
        let funcs: [FuncType<'_>; 11] = [
            (&[], Some(list)),
            (&[], Some(ValTy::Prim(S64))),
            (&[], Some(ValTy::Prim(S32))),
            (&[], Some(ValTy::Prim(U32))),
            (&[("pages", ValTy::Prim(U32))], Some(ValTy::Prim(S32))),
            (&[("offset", ValTy::Prim(U32))], None),
            (&[("data", list)], None),
            (&[("offset", ValTy::Prim(U32)), ("len", ValTy::Prim(U32))], None),
            (&[("value", ValTy::Prim(S32))], None),
            (&[("value", ValTy::Prim(S64))], None),
            (&[("lo", ValTy::Prim(S64)), ("hi", ValTy::Prim(S64))], None),
        ];
        let mut out = Vec::new();
        leb_u32(&mut out, 1 + funcs.len() as u32);
        out.extend_from_slice(&[0x70, U8]);
        for (params, result) in funcs {
            out.push(0x40);
            leb_u32(&mut out, params.len() as u32);
            for (name, ty) in params {
                write_name(&mut out, name);
                ty.write(&mut out);
            }
            match result {
                Some(ty) => {
                    out.push(0x00);
                    ty.write(&mut out);
                }
                None => out.extend_from_slice(&[0x01, 0x00]),
            }
        }
        out
    }
}

#[derive(Clone, Copy)]
enum ValTy {
    Prim(u8),
    Index(u32),
}

impl ValTy {
    fn write(self, out: &mut Vec<u8>) {
        match self {
            ValTy::Prim(byte) => out.push(byte),
            // A type index is a non-negative s33, so that it never reads as a primitive's byte.
            ValTy::Index(index) => leb_s33(out, index as i64),
        }
    }
}

/// Data-segment byte ranges widened to whole host pages, sorted and merged.
fn page_ranges(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let page = PAGE as u64;
    let mut pages: Vec<Range<u64>> = ranges
        .iter()
        .filter(|r| r.start < r.end)
        .map(|r| r.start / page * page..r.end.div_ceil(page) * page)
        .collect();
    pages.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(pages.len());
    for r in pages {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

fn leb_u32(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn leb_s33(out: &mut Vec<u8>, mut value: i64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        let done = (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0);
        if done {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_leb_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let mut value = 0u32;
    for (i, &byte) in bytes.iter().enumerate().take(5) {
        value |= ((byte & 0x7f) as u32) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

fn write_name(out: &mut Vec<u8>, name: &str) {
    leb_u32(out, name.len() as u32);
    out.extend_from_slice(name.as_bytes());
}

fn write_section(out: &mut Vec<u8>, id: u8, content: &[u8]) {
    out.push(id);
    leb_u32(out, content.len() as u32);
    out.extend_from_slice(content);
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // lists of byte ranges, some of one
mod tests {
    use super::*;

    #[test]
    fn lebs() {
        let mut out = Vec::new();
        leb_u32(&mut out, 624485);
        assert_eq!(out, [0xE5, 0x8E, 0x26]);
        assert_eq!(read_leb_u32(&out), Some((624485, &[][..])));
        let mut out = Vec::new();
        leb_s33(&mut out, 63);
        leb_s33(&mut out, 64);
        assert_eq!(
            out,
            [0x3f, 0xc0, 0x00],
            "64 takes two bytes so it cannot read as a primitive"
        );
    }

    #[test]
    fn data_pages_are_merged() {
        assert_eq!(page_ranges(&[8192..8200, 0..1, 4000..4100, 20000..20000]), [0..12288]);
        assert_eq!(page_ranges(&[0..1, 8192..8193]), [0..4096, 8192..12288]);
    }
}
