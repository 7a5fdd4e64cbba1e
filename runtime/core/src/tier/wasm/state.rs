//! TEMPORARY interface stub (replaced by the `state` branch); never committed.
use super::instance::ComponentState;
use wasmtime::component::Instance;
use wasmtime::Store;
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateError(String);
#[derive(Clone)]
pub struct StateLayout;
pub struct Instrumented {
    pub wasm: Vec<u8>,
    pub layout: StateLayout,
}
pub struct InstanceState(Vec<u8>);
impl InstanceState {
    pub fn encode(&self) -> Vec<u8> {
        self.0.clone()
    }
    pub fn decode(b: &[u8]) -> Result<InstanceState, StateError> {
        Ok(InstanceState(b.to_vec()))
    }
}
pub fn instrument(c: &[u8]) -> Result<Instrumented, StateError> {
    Ok(Instrumented {
        wasm: c.to_vec(),
        layout: StateLayout,
    })
}
pub async fn capture(
    _: &mut Store<ComponentState>,
    _: &Instance,
    _: &StateLayout,
) -> Result<InstanceState, StateError> {
    Err(StateError("stub".into()))
}
pub async fn restore(
    _: &mut Store<ComponentState>,
    _: &Instance,
    _: &StateLayout,
    _: &InstanceState,
) -> Result<(), StateError> {
    Err(StateError("stub".into()))
}
