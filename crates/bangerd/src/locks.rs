//! Per-VM locks. A VM's lock is held for a whole lifecycle action on that VM (set, delete, later
//! start and stop) so those never interleave; different VMs never contend.
//!
//! Lock order (also in ARCHITECTURE.md): VM lock → reservation lock → store connection. The
//! operation registry, the handle cache and this set's own map are leaves taken alone. A VM's
//! workspace lock (a second set) is taken only after its VM lock is released, never with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// The set of per-VM locks, created on first use.
#[derive(Default)]
pub struct VmLocks {
    map: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

impl VmLocks {
    /// Waits for and takes the lock of VM `id`.
    pub async fn lock(&self, id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Forgets the lock of a deleted VM.
    pub fn forget(&self, id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(id).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_vm_serialises_and_other_vms_do_not() {
        let locks = Arc::new(VmLocks::default());
        let held = locks.lock("a").await;
        let other = tokio::time::timeout(Duration::from_millis(100), locks.lock("b")).await;
        assert!(other.is_ok(), "another vm's lock is free");
        let same = tokio::time::timeout(Duration::from_millis(100), locks.lock("a")).await;
        assert!(same.is_err(), "the same vm's lock waits");
        drop(held);
        let _again = locks.lock("a").await;
    }
}
