//! The daemon's services. Each owns its state and locks, receives its collaborators when the
//! composition root (`crate::daemon`) builds it, returns its own error enum, and knows nothing
//! of HTTP (`crate::http` maps their errors to statuses).
//!
//! Dependencies point one way: `Vms` → `Lifecycle` → `Snapshots` → `Ssh`, `Artifacts`;
//! `Lifecycle` → `Net`, `Forwards`, `Sessions`; `Workspace` and `Sessions` stand alone. All of
//! them share the [`Fleet`]: the store, the VM and reservation locks, the handle cache, the
//! VMM drivers and the agent connections.

pub mod artifacts;
pub mod caller;
pub mod container_disk;
pub mod doctor;
pub mod files;
pub mod forwards;
pub mod lifecycle;
pub mod meminfo;
pub mod net;
pub mod recovery;
pub mod sessions;
pub mod snapshots;
pub mod ssh;
pub mod vms;
pub mod workspace;

#[cfg(test)]
pub mod testing;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use banger_core::config::{VmmChoice, VmmKind};
use banger_core::Layout;
use banger_core::{Config, VmRecord};
use banger_store::{Store, StoreError};
use banger_vmm::{HostFacts, Selection, Vmm};

use crate::agent_conn::AgentConn;
use crate::handles::HandleCache;
use crate::locks::{Reservations, VmGuard, VmLocks};
use crate::ops::OpRegistry;

/// Why a VM could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The store failed, or has no such VM.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM is not running.
    #[error("vm '{vm}' is not running; start it with `banger vm start {vm}`")]
    NotRunning {
        /// The VM.
        vm: String,
    },
    /// A VM guard for another VM was passed.
    #[error("internal: vm {vm} published under the lock of vm {held}")]
    WrongGuard {
        /// The VM being published.
        vm: String,
        /// The VM whose lock was held.
        held: String,
    },
    /// No VMM can run VMs here as asked.
    #[error("cannot select a vmm")]
    Select(#[source] banger_vmm::SelectError),
}

/// What every service that touches VMs shares. It has no feature logic: lookups, the one
/// liveness check, the VM lock and guarded publication.
pub struct Fleet {
    /// Where files live.
    pub layout: Layout,
    /// The configuration in force.
    pub config: Config,
    /// Durable records.
    pub store: Arc<Store>,
    /// Asynchronous operations.
    pub ops: Arc<OpRegistry>,
    /// Per-VM lifecycle locks.
    pub locks: VmLocks,
    /// The reservation lock (names, guest addresses, host ports).
    pub reservations: Reservations,
    /// What is currently true of running VMs.
    pub handles: HandleCache,
    /// Facts about this host that VMM selection depends on.
    pub host: HostFacts,
    /// What new VMs use when they do not say.
    pub default_vmm: VmmChoice,
    /// One driver per VMM kind, for the daemon's life (a driver reaps the VMMs it spawned).
    drivers: HashMap<VmmKind, Arc<dyn Vmm>>,
    /// One agent connection per VM that has been talked to (a leaf lock).
    agents: Mutex<HashMap<String, Arc<AgentConn>>>,
    /// This fleet's failpoints (tests only: see [`crate::failpoint`]).
    #[cfg(test)]
    pub failpoints: Arc<crate::failpoint::Failpoints>,
}

impl Fleet {
    /// A fleet over an open store, with the real drivers for this host.
    pub fn new(layout: Layout, config: Config, store: Store, host: HostFacts, default_vmm: VmmChoice) -> Self {
        let drivers = [VmmKind::Qemu, VmmKind::Firecracker]
            .into_iter()
            .map(|kind| (kind, Selection { kind, accel: host.accel(), tsc_khz: host.tsc_khz }.driver_for(&config)))
            .collect();
        Self::with_drivers(layout, config, store, host, default_vmm, drivers)
    }

    /// A fleet with the given drivers (tests give fakes).
    pub fn with_drivers(
        layout: Layout,
        config: Config,
        store: Store,
        host: HostFacts,
        default_vmm: VmmChoice,
        drivers: HashMap<VmmKind, Arc<dyn Vmm>>,
    ) -> Self {
        let store = Arc::new(store);
        Self {
            ops: OpRegistry::new(store.clone()),
            layout,
            config,
            store,
            locks: VmLocks::default(),
            reservations: Reservations::default(),
            handles: HandleCache::default(),
            host,
            default_vmm,
            drivers,
            agents: Mutex::new(HashMap::new()),
            #[cfg(test)]
            failpoints: Arc::default(),
        }
    }

    /// The driver of VMM `kind`.
    pub fn driver(&self, kind: VmmKind) -> Arc<dyn Vmm> {
        self.drivers
            .get(&kind)
            .cloned()
            .unwrap_or_else(|| Selection { kind, accel: self.host.accel(), tsc_khz: None }.driver_for(&self.config))
    }

    /// Resolves a VMM choice for a new VM on this host.
    pub fn resolve_vmm(&self, choice: Option<VmmChoice>) -> Result<VmmKind, FleetError> {
        banger_vmm::select(choice.unwrap_or(self.default_vmm), &self.host).map(|s| s.kind).map_err(FleetError::Select)
    }

    /// The one liveness check: does `vm` have a live VMM right now? Its driver decides, from
    /// the pid in its handles and its VM dir (so a reused pid is not mistaken for the VMM).
    pub fn alive(&self, vm: &VmRecord) -> bool {
        let pid = self.handles.get(vm).and_then(|h| h.pid);
        pid.is_some_and(|pid| self.driver(vm.spec.vmm).is_alive(pid, std::path::Path::new(&vm.vm_dir)))
    }

    /// The agent connection of `vm` (made on first use; it connects lazily, the way the VM's
    /// driver says).
    pub fn agent_for(&self, vm: &VmRecord) -> Arc<AgentConn> {
        let endpoint = self.driver(vm.spec.vmm).agent_endpoint(std::path::Path::new(&vm.vm_dir));
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.entry(vm.id.clone()).or_insert_with(|| Arc::new(AgentConn::with_endpoint(endpoint))).clone()
    }

    /// Forgets `vm`'s agent connection (after it stopped).
    pub fn drop_agent(&self, vm: &VmRecord) {
        self.agents.lock().unwrap_or_else(|p| p.into_inner()).remove(&vm.id);
    }

    /// VM `reference` and its agent connection, when it runs.
    pub fn running_agent(&self, reference: &str) -> Result<(VmRecord, Arc<AgentConn>), FleetError> {
        let vm = self.store.find_vm(reference)?;
        if !self.alive(&vm) {
            return Err(FleetError::NotRunning { vm: vm.name });
        }
        let agent = self.agent_for(&vm);
        Ok((vm, agent))
    }

    /// Writes `vm`'s record (its state, above all) under its own VM lock.
    pub fn publish(&self, guard: &VmGuard, vm: &VmRecord) -> Result<(), FleetError> {
        if guard.id() != vm.id {
            return Err(FleetError::WrongGuard { vm: vm.id.clone(), held: guard.id().to_owned() });
        }
        self.store.update_vm(vm)?;
        Ok(())
    }
}
