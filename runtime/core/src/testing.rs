//! What the core's unit tests share: a real core on a temporary data directory, without a server.

use std::path::Path;
use std::sync::Arc;

use crate::clock::SystemClock;
use crate::config::CoreConfig;
use crate::connectors::Connectors;
use crate::functions::Functions;
use crate::identity::Issuer;
use crate::storage::budget::DiskBudget;
use crate::storage::{Layout, LocalBlobs, Sqlite, Storage};
use crate::telemetry::metrics::Metrics;
use crate::tier::microvm::{Capability, MicrovmTier};
use crate::tier::wasm::egress::NoConnector;
use crate::tier::wasm::WasmTier;
use crate::tier::Tiers;

/// Deployed functions on `dir`: the real Wasm tier (a pool of 4 instances, no egress), the
/// microvm tier unavailable.
pub fn functions(dir: &Path) -> Functions {
    let layout = Layout::new(dir.to_path_buf());
    layout.prepare().unwrap();
    let mut config = CoreConfig::new(dir.to_path_buf());
    config.max_instances = 4;
    let blobs = Arc::new(LocalBlobs::new(layout.clone()));
    let storage = Arc::new(Storage {
        metadata: Arc::new(Sqlite::open(&layout.database()).unwrap()),
        blobs: blobs.clone(),
        budget: Arc::new(DiskBudget::new(layout.root.clone(), 0, None)),
        layout: layout.clone(),
    });
    let connectors = Arc::new(Connectors::open(storage.metadata.clone()).unwrap());
    let issuer = Issuer::open("http://kiln.test", &layout.identity_keys(), Arc::new(SystemClock)).unwrap();
    let wasm = WasmTier::open(
        &config,
        &layout,
        blobs,
        Arc::new(NoConnector),
        connectors.clone(),
        Arc::new(issuer),
    )
    .unwrap();
    let unavailable = Capability::Unavailable("not in unit tests".into());
    let tiers = Tiers {
        wasm: Arc::new(wasm),
        microvm: Arc::new(MicrovmTier::with_parts(unavailable, None, None, 1, layout)),
    };
    Functions::new(storage, tiers, connectors, Arc::new(Metrics::default())).unwrap()
}
