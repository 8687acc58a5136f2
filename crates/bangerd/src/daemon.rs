//! The daemon's shared state: the composition root that the API handlers and services reach
//! through. Each subsystem owns its own lock; see `locks.rs` for the order.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use banger_core::Config;
use banger_host::Layout;
use banger_store::Store;
use tokio::sync::Notify;

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
}

impl Daemon {
    /// Assembles a daemon over an open store.
    pub fn new(layout: Layout, config: Config, config_source: Option<PathBuf>, store: Store) -> Arc<Self> {
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
        })
    }
}
