//! Functions whose `CreateFunction` answered before their deploy finished. Lambda creates a
//! function asynchronously: it answers `State: Pending`, and clients wait for `Active` (boto3's
//! `function_active_v2` waiter, `aws lambda wait function-active-v2`). Kiln waits up to
//! [`CREATE_WAIT`] and answers `Active` when the deploy is done by then, `Pending` otherwise, so
//! that a slow build (a first Ruby deploy takes half a minute) never outlasts a client's read
//! timeout. Until the deploy ends, `GetFunction` shows the pending function and `Invoke` is a
//! `ResourceConflictException`; a deploy that fails shows `State: Failed` with its reason for
//! [`FAILED_KEPT`]. This is the node's own memory: another node sees the function once it is
//! committed.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const CREATE_WAIT: Duration = Duration::from_secs(10);
pub const FAILED_KEPT: Duration = Duration::from_secs(15 * 60);

#[derive(Default)]
pub struct Creations(Mutex<HashMap<String, Creation>>);

struct Creation {
    /// The `FunctionConfiguration` shown meanwhile.
    view: Value,
    failed_at: Option<Instant>,
}

impl Creations {
    /// The creations, those that failed long enough ago forgotten.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Creation>> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|_, creation| creation.failed_at.is_none_or(|at| at.elapsed() < FAILED_KEPT));
        all
    }

    /// Records `name` as being created, shown as `view` (its `State` set here); `false` if it
    /// already is.
    pub fn begin(&self, name: &str, mut view: Value) -> bool {
        view["State"] = "Pending".into();
        view["StateReason"] = "The function is being created.".into();
        view["StateReasonCode"] = "Creating".into();
        view["LastUpdateStatus"] = "InProgress".into();
        match self.lock().entry(name.to_owned()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(Creation { view, failed_at: None });
                true
            }
        }
    }

    /// The deploy committed: the function is the database's to show.
    pub fn succeeded(&self, name: &str) {
        self.lock().remove(name);
    }

    /// The deploy failed, for `reason`: shown as `Failed` for a while, then forgotten.
    pub fn failed(&self, name: &str, reason: &str) {
        if let Some(creation) = self.lock().get_mut(name) {
            creation.view["State"] = "Failed".into();
            creation.view["StateReason"] = reason.into();
            creation.view["StateReasonCode"] = "InvalidCode".into();
            creation.view["LastUpdateStatus"] = "Failed".into();
            creation.failed_at = Some(Instant::now());
        }
    }

    /// What `GetFunctionConfiguration` shows of a function being created (or whose creation
    /// failed lately).
    pub fn view(&self, name: &str) -> Option<Value> {
        self.lock().get(name).map(|creation| creation.view.clone())
    }

    /// Whether a deploy of `name` is still running.
    pub fn pending(&self, name: &str) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|creation| creation.failed_at.is_none())
    }
}

/// Lambda's answer to an operation on a function that is not `Active`.
pub fn not_active(state: &str) -> String {
    format!("The operation cannot be performed at this time. The function is currently in the following state: {state}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_creation_is_pending_then_gone_or_failed() {
        let creations = Creations::default();
        assert!(creations.begin("f", json!({"FunctionName": "f"})));
        assert!(!creations.begin("f", json!({})), "created twice at once");
        assert!(creations.pending("f"));
        assert_eq!(creations.view("f").unwrap()["State"], "Pending");
        creations.succeeded("f");
        assert!(creations.view("f").is_none() && !creations.pending("f"));

        assert!(creations.begin("g", json!({})));
        creations.failed("g", "the handler raised at load");
        let view = creations.view("g").unwrap();
        assert_eq!(view["State"], "Failed");
        assert_eq!(view["StateReason"], "the handler raised at load");
        assert!(!creations.pending("g"));
    }
}
