//! Linking: the one WASI preview 1 linker for modules and the one WASI 0.2 (+ `wasi:http`) linker
//! for components, built once; a compiled artifact is linked against them into [`Code`], ready to
//! instantiate, with its entry points looked up once here rather than by name per invocation.
//! Nothing else is ever linked in (deny by default): an import Kiln does not provide fails here,
//! with its name, at deploy.

use wasmtime::component::Linker as ComponentLinker;
use wasmtime::{Engine, ExternType, InstancePre, Linker, ModuleExport};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use super::compile::Compiled;
use super::instance::{ComponentState, ModuleState};
use super::validate::RESTORE_HOOK;

/// Linked, ready-to-instantiate code.
pub enum Code {
    /// A WASI preview 1 command: `_start`, and the restore hook called before it.
    Module {
        pre: InstancePre<ModuleState>,
        start: ModuleExport,
        restore: Option<ModuleExport>,
    },
    /// A `wasi:cli/command` component.
    Command(CommandPre<ComponentState>),
    /// A `wasi:http/proxy` component, served at `/fn/{name}/...`.
    Http(ProxyPre<ComponentState>),
}

pub struct Linkers {
    module: Linker<ModuleState>,
    component: ComponentLinker<ComponentState>,
}

impl Linkers {
    pub fn new(engine: &Engine) -> wasmtime::Result<Linkers> {
        let mut module = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module, |s: &mut ModuleState| &mut s.wasi)?;
        let mut component = ComponentLinker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component)?;
        // Components may make outbound requests; `egress` decides where they may go.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component)?;
        Ok(Linkers { module, component })
    }

    pub fn module(&self) -> &Linker<ModuleState> {
        &self.module
    }

    /// Resolves a compiled artifact's imports. Fails (with the missing import's name) when the code
    /// needs something Kiln does not provide.
    pub fn link(&self, compiled: &Compiled) -> Result<Code, String> {
        match compiled {
            Compiled::Module(module) => {
                let restore = match module.get_export(RESTORE_HOOK) {
                    None => None,
                    Some(ExternType::Func(ty)) if ty.params().len() == 0 && ty.results().len() == 0 => {
                        module.get_export_index(RESTORE_HOOK)
                    }
                    Some(_) => {
                        return Err(format!(
                            "`{RESTORE_HOOK}` must be a function with no parameters and no results"
                        ))
                    }
                };
                let start = match (module.get_export("_start"), module.get_export_index("_start")) {
                    (Some(ExternType::Func(ty)), Some(start)) if ty.params().len() == 0 && ty.results().len() == 0 => {
                        start
                    }
                    _ => {
                        return Err(
                            "the module must export `_start` as a function with no parameters and no results".into(),
                        )
                    }
                };
                let pre = self.module.instantiate_pre(module).map_err(|e| format!("{e:#}"))?;
                Ok(Code::Module { pre, start, restore })
            }
            Compiled::Component(component) => {
                let pre = self
                    .component
                    .instantiate_pre(component)
                    .map_err(|e| format!("{e:#}"))?;
                // A component exporting the incoming handler is an HTTP trigger, even when (built
                // with Rust's std) it also exports `wasi:cli/run`.
                if let Ok(proxy) = ProxyPre::new(pre.clone()) {
                    return Ok(Code::Http(proxy));
                }
                CommandPre::new(pre).map(Code::Command).map_err(|e| format!("{e:#}"))
            }
        }
    }
}
