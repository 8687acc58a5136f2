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

use banger_core::VmRecord;

use crate::agent_conn::AgentConn;
use crate::error::ApiFailure;
use crate::handles::HandleCache;
use crate::locks::VmLocks;
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
    /// Held only while a name (and later an IP) is checked and claimed.
    pub reservation: Mutex<()>,
    /// What is currently true of running VMs.
    pub handles: HandleCache,
    /// When this daemon started.
    pub started_at: SystemTime,
    /// Notified to begin a clean shutdown.
    pub shutdown: Notify,
    /// One agent connection per VM that has been talked to (a leaf lock).
    agents: Mutex<HashMap<String, Arc<AgentConn>>>,
    /// The VMM driver.
    pub vmm: Arc<dyn banger_vmm::Vmm>,
    /// Per-artifact locks (`kernel:NAME`, `image:NAME`): one pull or build per name at a time.
    pub artifact_locks: VmLocks,
}

impl Daemon {
    /// Assembles a daemon over an open store.
    pub fn new(
        layout: Layout,
        config: Config,
        config_source: Option<PathBuf>,
        store: Store,
        vmm: Arc<dyn banger_vmm::Vmm>,
    ) -> Arc<Self> {
        let store = Arc::new(store);
        Arc::new(Self {
            ops: OpRegistry::new(store.clone()),
            layout,
            config,
            config_source,
            store,
            vm_locks: VmLocks::default(),
            reservation: Mutex::new(()),
            handles: HandleCache::default(),
            started_at: SystemTime::now(),
            shutdown: Notify::new(),
            agents: Mutex::new(HashMap::new()),
            vmm,
            artifact_locks: VmLocks::default(),
        })
    }

    /// The agent connection of `vm` (made on first use; it connects lazily).
    pub fn agent_for(&self, vm: &VmRecord) -> Arc<AgentConn> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents
            .entry(vm.id.clone())
            .or_insert_with(|| Arc::new(AgentConn::new(PathBuf::from(&vm.vm_dir).join("agent.sock"))))
            .clone()
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
