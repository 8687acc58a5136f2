//! The daemon's view of what is currently true of each VM: an in-memory cache of
//! [`VmHandles`], mirrored to each VM's `handles.json`. At start-up, [`HandleCache::reconcile`]
//! adopts VMs whose VMM outlived the previous daemon (found by the command-line marker, the
//! only way to know a process we did not spawn) and cleans up after those whose VMM is gone.
//! While the daemon runs, the one liveness check is `Fleet::alive`, which asks the VM's driver.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use banger_core::vm::{transition, VmEvent};
use banger_core::VmRecord;
use banger_host::VmHandles;
use banger_store::Store;

/// A test's liveness judge: is this pid a live (fake) VMM?
#[cfg(test)]
pub type TestAlive = std::sync::Arc<dyn Fn(u32) -> bool + Send + Sync>;

/// In-memory handles, keyed by VM id.
#[derive(Default)]
pub struct HandleCache {
    map: Mutex<HashMap<String, VmHandles>>,
    /// Tests whose "VMMs" are not processes judge liveness here instead of the OS.
    #[cfg(test)]
    pub test_alive: Mutex<Option<TestAlive>>,
}

/// What start-up reconciliation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// VMs whose VMM is alive and now managed by this daemon, with the VMM's pid.
    pub adopted: Vec<(VmRecord, u32)>,
    /// VMs whose VMM was gone; marked stopped and cleaned up.
    pub reaped: Vec<String>,
    /// VMs whose VMM was named by a pidfile but not by handles: it was killed.
    pub orphans: Vec<String>,
}

impl HandleCache {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmHandles>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handles of `vm`, if it has any.
    pub fn get(&self, vm: &VmRecord) -> Option<VmHandles> {
        self.map().get(&vm.id).cloned()
    }

    /// Records `handles` for `vm`, in memory and in its scratch file.
    pub fn publish(&self, vm: &VmRecord, handles: VmHandles) -> Result<(), banger_host::handles::HandlesError> {
        handles.store(Path::new(&vm.paths().handles))?;
        self.map().insert(vm.id.clone(), handles);
        Ok(())
    }

    /// Forgets `vm`'s handles and removes its scratch files.
    pub fn release(&self, vm: &VmRecord) {
        let paths = vm.paths();
        let handles = self.map().remove(&vm.id);
        let handles = handles.or_else(|| VmHandles::load(Path::new(&paths.handles)).ok().flatten());
        for file in handles.iter().flat_map(|h| h.scratch_files.iter()) {
            if let Err(e) = std::fs::remove_file(file) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(vm = %vm.name, file, error = %e, "cannot remove scratch file");
                }
            }
        }
        if let Err(e) = VmHandles::remove(Path::new(&paths.handles)) {
            tracing::warn!(vm = %vm.name, error = %banger_core::error_chain(&e), "cannot remove handles file");
        }
    }

    fn judge(&self, h: &VmHandles) -> bool {
        #[cfg(test)]
        if let Some(alive) = self.test_alive.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return h.pid.is_some_and(|pid| alive(pid));
        }
        h.is_alive()
    }

    /// Rebuilds the cache from each VM's scratch file and the OS, fixing the store's observed
    /// states to match.
    pub fn reconcile(&self, store: &Store) -> Result<ReconcileReport, banger_store::StoreError> {
        let mut report = ReconcileReport::default();
        for mut vm in store.list_vms()? {
            let path = vm.paths().handles;
            let handles = match VmHandles::load(Path::new(&path)) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(vm = %vm.name, error = %banger_core::error_chain(&e), "unreadable handles; treating the vm as stopped");
                    None
                }
            };
            if let Some(h) = handles.filter(|h| self.judge(h)) {
                tracing::info!(vm = %vm.name, pid = ?h.pid, "adopted running vm");
                if let Some(pid) = h.pid {
                    report.adopted.push((vm.clone(), pid));
                }
                self.map().insert(vm.id.clone(), h);
                if !matches!(vm.state, banger_core::ObservedState::Running | banger_core::ObservedState::Paused) {
                    // Its VMM outlived the daemon that booted it: it is running now.
                    vm.state = banger_core::ObservedState::Running;
                    vm.updated_at = banger_core::time::now_rfc3339();
                    store.update_vm(&vm)?;
                }
                continue;
            }
            if vm.state.is_active() || Path::new(&path).exists() {
                self.release(&vm);
                if vm.state.is_active() {
                    vm.state = transition(vm.state, &VmEvent::Exited).unwrap_or(vm.state);
                    vm.updated_at = banger_core::time::now_rfc3339();
                    vm.last_error.get_or_insert_with(|| "the vmm exited while the daemon was away".into());
                    store.update_vm(&vm)?;
                }
                tracing::info!(vm = %vm.name, state = vm.state.as_str(), "vmm gone; cleaned up");
                report.reaped.push(vm.name.clone());
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_core::{DesiredState, ObservedState, VmSpec};

    fn vm(dir: &Path, name: &str, state: ObservedState) -> VmRecord {
        let id = banger_core::new_id();
        let vm_dir = dir.join(&id);
        std::fs::create_dir_all(&vm_dir).expect("mkdir");
        VmRecord {
            id,
            name: name.into(),
            spec: VmSpec {
                image: "i".into(),
                kernel: "k".into(),
                vcpus: 1,
                memory_mib: 256,
                disk_mib: 1024,
                vmm: banger_core::config::VmmKind::Qemu,
                network: false,
                allow_vm_traffic: false,
            },
            desired_state: DesiredState::Running,
            state,
            guest_ip: None,
            vm_dir: vm_dir.display().to_string(),
            created_at: banger_core::time::now_rfc3339(),
            updated_at: banger_core::time::now_rfc3339(),
            last_error: None,
        }
    }

    #[test]
    fn reconcile_adopts_live_and_reaps_dead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_in_memory().expect("store");
        let live = vm(dir.path(), "live", ObservedState::Running);
        let dead = vm(dir.path(), "dead", ObservedState::Running);
        let idle = vm(dir.path(), "idle", ObservedState::Created);
        for v in [&live, &dead, &idle] {
            store.insert_vm(v).expect("insert");
        }
        // "live" is this test process; "dead" is a reaped child.
        let scratch = dir.path().join("dead-overlay.scratch");
        std::fs::write(&scratch, b"x").expect("scratch");
        VmHandles { pid: Some(std::process::id()), ..Default::default() }
            .store(Path::new(&live.paths().handles))
            .expect("live");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        VmHandles { pid: Some(pid), scratch_files: vec![scratch.display().to_string()], ..Default::default() }
            .store(Path::new(&dead.paths().handles))
            .expect("dead");

        let cache = HandleCache::default();
        let report = cache.reconcile(&store).expect("reconcile");
        let adopted: Vec<&str> = report.adopted.iter().map(|(vm, _)| vm.name.as_str()).collect();
        assert_eq!((adopted, report.reaped), (vec!["live"], vec!["dead".to_owned()]));
        let alive = |vm: &VmRecord| cache.get(vm).is_some_and(|h| h.is_alive());
        assert!(alive(&live));
        assert!(!alive(&dead));
        assert!(!alive(&idle));
        let dead_now = store.find_vm("dead").expect("dead");
        assert_eq!(dead_now.state, ObservedState::Stopped);
        assert!(dead_now.last_error.is_some());
        assert!(!scratch.exists(), "scratch files removed");
        assert!(!Path::new(&dead.paths().handles).exists(), "handles file removed");
        assert_eq!(store.find_vm("idle").expect("idle").state, ObservedState::Created);
    }

    #[test]
    fn publish_then_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = vm(dir.path(), "a", ObservedState::Running);
        let cache = HandleCache::default();
        cache.publish(&v, VmHandles { pid: Some(std::process::id()), ..Default::default() }).expect("publish");
        assert!(cache.get(&v).is_some_and(|h| h.is_alive()));
        assert!(Path::new(&v.paths().handles).exists());
        cache.release(&v);
        assert!(cache.get(&v).is_none());
        assert!(!Path::new(&v.paths().handles).exists());
    }
}
