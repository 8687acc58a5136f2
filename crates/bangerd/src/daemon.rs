//! The daemon's shared state: the composition root that the API handlers and services reach
//! through. Each subsystem owns its own lock; see `locks.rs` for the order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use banger_core::Config;
use banger_host::Layout;
use banger_store::Store;
use tokio::sync::Notify;

use banger_core::config::{VmmChoice, VmmKind};
use banger_core::VmRecord;
use banger_vmm::{HostFacts, Selection, Vmm};

use crate::agent_conn::AgentConn;
use crate::error::ApiFailure;
use crate::forward::Forwarder;
use crate::handles::HandleCache;
use crate::locks::VmLocks;
use crate::net::NetService;
use crate::ops::OpRegistry;

/// Everything a request can reach.
pub struct Daemon {
    /// Where files live.
    pub layout: Layout,
    /// The configuration in force.
    pub config: Config,
    /// The file it came from.
    pub config_source: Option<PathBuf>,
    /// Durable records.
    pub store: Arc<Store>,
    /// Asynchronous operations.
    pub ops: Arc<OpRegistry>,
    /// Per-VM lifecycle locks.
    pub vm_locks: VmLocks,
    /// Per-VM workspace locks: held across a workspace import's or export's guest I/O, which
    /// never runs under the VM lock (see `workspace.rs`).
    pub workspace_locks: VmLocks,
    /// Held only while a name or a forward's host port (and later an IP) is checked and
    /// claimed.
    pub reservation: Mutex<()>,
    /// What is currently true of running VMs.
    pub handles: HandleCache,
    /// When this daemon started.
    pub started_at: SystemTime,
    /// Notified to begin a clean shutdown.
    pub shutdown: Notify,
    /// One agent connection per VM that has been talked to (a leaf lock).
    agents: Mutex<HashMap<String, Arc<AgentConn>>>,
    /// One driver per VMM kind, for the daemon's life (a driver reaps the VMMs it spawned).
    drivers: HashMap<VmmKind, Arc<dyn Vmm>>,
    /// What new VMs use when they do not say (`--vmm` of the daemon, else the config).
    pub default_vmm: VmmChoice,
    /// Facts about this host that VMM selection depends on.
    pub host: HostFacts,
    /// Per-artifact locks (`kernel:NAME`, `image:NAME`): one pull or build per name at a time.
    pub artifact_locks: VmLocks,
    /// The guest network (bridge, TAP pool, rules, DNS), brought up on first need.
    pub net: NetService,
    /// Port forward listeners of running VMs (a leaf lock).
    pub forwarder: Forwarder,
}

impl Daemon {
    /// Assembles a daemon over an open store.
    pub fn new(
        layout: Layout,
        config: Config,
        config_source: Option<PathBuf>,
        store: Store,
        host: HostFacts,
        default_vmm: VmmChoice,
    ) -> Arc<Self> {
        let drivers = [VmmKind::Qemu, VmmKind::Firecracker]
            .into_iter()
            .map(|kind| (kind, Selection { kind, accel: host.accel(), tsc_khz: host.tsc_khz }.driver_for(&config)))
            .collect();
        let store = Arc::new(store);
        Arc::new(Self {
            ops: OpRegistry::new(store.clone()),
            layout,
            config_source,
            store,
            vm_locks: VmLocks::default(),
            workspace_locks: VmLocks::default(),
            reservation: Mutex::new(()),
            handles: HandleCache::default(),
            started_at: SystemTime::now(),
            shutdown: Notify::new(),
            agents: Mutex::new(HashMap::new()),
            drivers,
            default_vmm,
            host,
            artifact_locks: VmLocks::default(),
            net: NetService::new(&config),
            config,
            forwarder: Forwarder::default(),
        })
    }

    /// The driver of VMM `kind`.
    pub fn driver(&self, kind: VmmKind) -> Arc<dyn Vmm> {
        self.drivers
            .get(&kind)
            .cloned()
            .unwrap_or_else(|| Selection { kind, accel: self.host.accel(), tsc_khz: None }.driver_for(&self.config))
    }

    /// Resolves a VMM choice for a new VM on this host.
    pub fn resolve_vmm(&self, choice: Option<VmmChoice>) -> Result<VmmKind, ApiFailure> {
        banger_vmm::select(choice.unwrap_or(self.default_vmm), &self.host)
            .map(|s| s.kind)
            .map_err(|e| ApiFailure::invalid(e.to_string()))
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

    /// The agent connection of a running VM, or why there is none.
    pub fn running_agent(&self, reference: &str) -> Result<Arc<AgentConn>, ApiFailure> {
        let vm = self.store.find_vm(reference)?;
        if !self.handles.alive(&vm) {
            return Err(ApiFailure::conflict(format!(
                "vm '{}' is not running; start it with `banger vm start {}`",
                vm.name, vm.name
            )));
        }
        Ok(self.agent_for(&vm))
    }
}
