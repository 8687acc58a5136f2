//! The daemon's locks, as types that make their order hard to break (ARCHITECTURE.md, "Locks").
//!
//! 1. [`VmLocks`] hands out a [`VmGuard`] per VM: the check-and-publish steps of one VM's
//!    lifecycle. Functions that publish a VM's state take `&VmGuard` (see
//!    [`crate::services::Fleet::publish`]), so they cannot be called without it.
//! 2. [`Reservations`] hands out a [`Claim`]: checking and claiming a name, a guest address or
//!    a host port, for one check and one insert. A `Claim` wraps a std mutex guard, which is
//!    not `Send`: it cannot be held across an `.await` in a task, so never across I/O.
//! 3. The store's connection (inside `banger_store`): one statement or transaction.
//!
//! Apart: [`NamedLocks`] (one artifact build or rewrite per name, and a VM's workspace I/O),
//! never taken while a VM guard is held, except where ARCHITECTURE.md says so. Network locks
//! live in `services::net` and are never taken with a VM guard held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// A set of async locks by name, created on first use.
#[derive(Default)]
pub struct NamedLocks {
    map: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

impl NamedLocks {
    /// Waits for and takes the lock named `name`.
    pub async fn lock(&self, name: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(name.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Forgets the lock named `name` when nobody holds or waits for it.
    pub fn forget(&self, name: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(name).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(name);
        }
    }
}

/// Per-VM lifecycle locks. A VM's lock is held for the check-and-publish steps of one action
/// on that VM (set, delete, the start and end of a start or stop), never across boot, pulls or
/// guest I/O; different VMs never contend.
#[derive(Default)]
pub struct VmLocks {
    locks: NamedLocks,
}

/// Proof that VM [`VmGuard::id`]'s lock is held.
pub struct VmGuard {
    id: String,
    _held: OwnedMutexGuard<()>,
}

impl VmGuard {
    /// The VM whose lock this is.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::fmt::Debug for VmGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmGuard").field("id", &self.id).finish()
    }
}

impl VmLocks {
    /// Waits for and takes the lock of VM `id`.
    pub async fn lock(&self, id: &str) -> VmGuard {
        VmGuard { id: id.to_owned(), _held: self.locks.lock(id).await }
    }

    /// Forgets the lock of a deleted VM.
    pub fn forget(&self, id: &str) {
        self.locks.forget(id);
    }
}

/// The reservation lock: names, guest addresses and host ports are checked and claimed under
/// it (one check and one insert).
#[derive(Default)]
pub struct Reservations {
    lock: Mutex<()>,
}

/// Proof that the reservation lock is held. Not `Send`, so never held across an `.await`.
pub struct Claim<'a> {
    _held: MutexGuard<'a, ()>,
}

impl Reservations {
    /// Takes the reservation lock (briefly: a check and an insert).
    pub fn claim(&self) -> Claim<'_> {
        Claim { _held: self.lock.lock().unwrap_or_else(|p| p.into_inner()) }
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
        assert_eq!(held.id(), "a");
        let other = tokio::time::timeout(Duration::from_millis(100), locks.lock("b")).await;
        assert!(other.is_ok(), "another vm's lock is free");
        let same = tokio::time::timeout(Duration::from_millis(100), locks.lock("a")).await;
        assert!(same.is_err(), "the same vm's lock waits");
        drop(held);
        let _again = locks.lock("a").await;
    }
}
