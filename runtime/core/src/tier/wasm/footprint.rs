//! What one instance of some code takes from the pool — memories, tables, core instances —
//! counted from its binary when it is compiled, and the *weight* that follows: how many of the
//! pool's permits one invocation of it holds (see `engine`). Counting is static: a module is one
//! core instance with the memories and tables it defines; a component is every core instance it
//! instantiates, with the memories and tables of the modules it instantiates. Where the count
//! cannot be exact (a nested component instantiated twice, an aliased module) the store's own
//! caps (`limits::PoolShare`) still hold the invocation to its weight, so a miscount can only fail
//! that function, never take another's slots.

use serde::{Deserialize, Serialize};
use wasmparser::{ComponentInstance, Instance, Parser, Payload};

use super::engine::{CORE_INSTANCES_PER_PERMIT, TABLES_PER_PERMIT};
use crate::function::ArtifactKind;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    pub memories: u32,
    pub tables: u32,
    pub core_instances: u32,
}

impl Footprint {
    /// Pool permits one instance holds: enough for each kind of slot it takes, at least one.
    pub fn weight(&self) -> u32 {
        self.memories
            .max(self.tables.div_ceil(TABLES_PER_PERMIT))
            .max(self.core_instances.div_ceil(CORE_INSTANCES_PER_PERMIT))
            .max(1)
    }

    fn add(&mut self, other: Footprint) {
        self.memories = self.memories.saturating_add(other.memories);
        self.tables = self.tables.saturating_add(other.tables);
        self.core_instances = self.core_instances.saturating_add(other.core_instances);
    }

    fn max(self, other: Footprint) -> Footprint {
        Footprint {
            memories: self.memories.max(other.memories),
            tables: self.tables.max(other.tables),
            core_instances: self.core_instances.max(other.core_instances),
        }
    }

    /// Counts a validated binary (not text: the caller converts Wat first).
    pub fn of(kind: ArtifactKind, bytes: &[u8]) -> Footprint {
        match kind {
            ArtifactKind::Component => count(bytes, true),
            _ => count(bytes, false),
        }
    }
}

/// One scope of the binary being walked: a core module, or a component with its own index spaces.
enum Scope {
    Module(Footprint),
    Component {
        /// Each defined core module, by its order of definition.
        modules: Vec<Footprint>,
        /// Each defined nested component, instantiated once.
        components: Vec<Footprint>,
        /// What instantiating this component instantiates.
        total: Footprint,
    },
}

fn count(bytes: &[u8], component: bool) -> Footprint {
    let root = if component {
        Scope::Component {
            modules: Vec::new(),
            components: Vec::new(),
            total: Footprint::default(),
        }
    } else {
        Scope::Module(Footprint {
            core_instances: 1,
            ..Footprint::default()
        })
    };
    let mut stack = vec![root];
    // Anything that does not parse was refused at validation; count what parsed.
    for payload in Parser::new(0).parse_all(bytes).map_while(Result::ok) {
        match payload {
            Payload::ModuleSection { .. } => stack.push(Scope::Module(Footprint {
                core_instances: 1,
                ..Footprint::default()
            })),
            Payload::ComponentSection { .. } => stack.push(Scope::Component {
                modules: Vec::new(),
                components: Vec::new(),
                total: Footprint::default(),
            }),
            Payload::MemorySection(reader) => {
                if let Some(Scope::Module(module)) = stack.last_mut() {
                    module.memories = module.memories.saturating_add(reader.count());
                }
            }
            Payload::TableSection(reader) => {
                if let Some(Scope::Module(module)) = stack.last_mut() {
                    module.tables = module.tables.saturating_add(reader.count());
                }
            }
            Payload::InstanceSection(reader) => {
                if let Some(Scope::Component { modules, total, .. }) = stack.last_mut() {
                    for instance in reader.into_iter().map_while(Result::ok) {
                        if let Instance::Instantiate { module_index, .. } = instance {
                            total.add(pick(modules, module_index));
                        }
                    }
                }
            }
            Payload::ComponentInstanceSection(reader) => {
                if let Some(Scope::Component { components, total, .. }) = stack.last_mut() {
                    for instance in reader.into_iter().map_while(Result::ok) {
                        if let ComponentInstance::Instantiate { component_index, .. } = instance {
                            total.add(pick(components, component_index));
                        }
                    }
                }
            }
            Payload::End(_) if stack.len() > 1 => {
                let done = stack.pop().expect("more than one scope");
                if let Some(Scope::Component {
                    modules, components, ..
                }) = stack.last_mut()
                {
                    match done {
                        Scope::Module(module) => modules.push(module),
                        Scope::Component { total, .. } => components.push(total),
                    }
                }
            }
            _ => {}
        }
    }
    match stack.into_iter().next() {
        Some(Scope::Module(module)) => module,
        Some(Scope::Component { total, .. }) => total,
        None => Footprint::default(),
    }
}

/// The definition at `index`, or — for an index that names an imported or aliased item — the
/// largest definition in scope, so a miscount errs on the heavy side.
fn pick(defined: &[Footprint], index: u32) -> Footprint {
    defined
        .get(index as usize)
        .copied()
        .unwrap_or_else(|| defined.iter().copied().fold(Footprint::default(), Footprint::max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(wat: &str) -> Footprint {
        Footprint::of(ArtifactKind::Component, &wat::parse_str(wat).unwrap())
    }

    #[test]
    fn modules_and_components_are_counted_per_instantiation() {
        let module = wat::parse_str("(module (memory 1) (table 1 funcref) (table 1 funcref))").unwrap();
        let counted = Footprint::of(ArtifactKind::Module, &module);
        assert_eq!(
            counted,
            Footprint {
                memories: 1,
                tables: 2,
                core_instances: 1
            }
        );
        assert_eq!(counted.weight(), 1);

        let twice = component(
            r#"(component
                (core module $m (memory 1) (table 1 funcref))
                (core module $n)
                (core instance (instantiate $m))
                (core instance (instantiate $m))
                (core instance (instantiate $n)))"#,
        );
        assert_eq!(
            twice,
            Footprint {
                memories: 2,
                tables: 2,
                core_instances: 3
            }
        );
        assert_eq!(twice.weight(), 2, "two memories take two permits");

        let nested = component(
            r#"(component
                (component $inner
                    (core module $m (memory 1))
                    (core instance (instantiate $m)))
                (instance (instantiate $inner))
                (instance (instantiate $inner)))"#,
        );
        assert_eq!(
            nested,
            Footprint {
                memories: 2,
                tables: 0,
                core_instances: 2
            }
        );

        let many = Footprint {
            memories: 1,
            tables: 1,
            core_instances: 9,
        };
        assert_eq!(
            many.weight(),
            3,
            "nine core instances need three permits' worth of slots"
        );
    }
}
