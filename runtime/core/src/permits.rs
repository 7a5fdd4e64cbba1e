//! Admission: every invocation holds two permits while its guest lives — one of its function's
//! `max_concurrency`, one of its tier's capacity (pool slots for Wasm, VMs for the microvm tier).
//! Both are taken without waiting (a full limit is `too_many_requests`, never a queue) and both are owned, so
//! they can move into whatever runs the guest and are given back when it ends, even if the
//! caller has gone.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::outcome::InvokeError;

/// A limit on things running at once, and the permits that enforce it.
#[derive(Debug)]
pub struct Limit {
    permits: Arc<Semaphore>,
    limit: u32,
}

impl Limit {
    pub fn new(limit: u32) -> Limit {
        Limit {
            permits: Arc::new(Semaphore::new(limit as usize)),
            limit,
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Permits taken now.
    pub fn in_use(&self) -> usize {
        (self.limit as usize).saturating_sub(self.permits.available_permits())
    }

    fn try_take(&self, count: u32) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_many_owned(count).ok()
    }

    /// Waits for `count` permits (deploy-time work that must not be refused, e.g. a boot).
    pub async fn take(&self, count: u32) -> OwnedSemaphorePermit {
        self.permits
            .clone()
            .acquire_many_owned(count)
            .await
            .expect("the permits are never closed")
    }
}

/// The two permits of one running invocation.
#[derive(Debug)]
pub struct Permits {
    _function: OwnedSemaphorePermit,
    _capacity: OwnedSemaphorePermit,
}

impl Permits {
    /// Takes a permit of `function` (the function named `name`) and `weight` of the tier's
    /// `capacity` (what one instance of its code takes, see `tier::wasm::footprint`), or neither.
    pub fn take(name: &str, function: &Limit, capacity: &Limit, weight: u32) -> Result<Permits, InvokeError> {
        let function_permit = function
            .try_take(1)
            .ok_or_else(|| InvokeError::FunctionBusy(name.to_owned(), function.limit))?;
        let capacity_permit = capacity.try_take(weight).ok_or(InvokeError::PoolBusy(capacity.limit))?;
        Ok(Permits {
            _function: function_permit,
            _capacity: capacity_permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_or_neither_and_given_back_on_drop() {
        let function = Limit::new(2);
        let capacity = Limit::new(1);
        let first = Permits::take("f", &function, &capacity, 1).unwrap();
        assert_eq!((function.in_use(), capacity.in_use()), (1, 1));
        let refused = Permits::take("f", &function, &capacity, 1).unwrap_err();
        assert!(matches!(refused, InvokeError::PoolBusy(1)), "{refused}");
        assert_eq!(function.in_use(), 1, "a refused take leaves the function's permit");
        drop(first);
        assert_eq!((function.in_use(), capacity.in_use()), (0, 0));
        let busy = Limit::new(0);
        let refused = Permits::take("f", &busy, &capacity, 1).unwrap_err();
        assert!(
            matches!(refused, InvokeError::FunctionBusy(ref name, 0) if name == "f"),
            "{refused}"
        );
        assert_eq!(capacity.in_use(), 0);
    }
}
