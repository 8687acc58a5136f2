//! VM records: create (as an asynchronous operation), list, show, set and delete. Booting
//! comes with the boot-path issue; here a VM is a durable record and its directory.
//!
//! A create runs in three phases so that no global lock is held across slow work:
//! 1. validate and resolve defaults (no lock);
//! 2. reserve: under the short reservation lock, check the name is free and insert the row;
//! 3. prepare: make the VM's directory (no global lock).

use std::sync::Arc;

use banger_core::size::{check_range, DISK_MIB, MEMORY_MIB, VCPUS};
use banger_core::vm::{transition, VmEvent};
use banger_core::{
    new_id, validate_artifact_name, validate_name, DesiredState, ObservedState, OperationRecord, PortForward, VmRecord,
    VmSpec,
};
use banger_proto::{CreateVmRequest, GitIdentity, UpdateVmRequest, VmView};
use banger_store::StoreError;

use crate::daemon::Daemon;
use crate::error::{chain, ApiFailure};
use crate::ops::{Cancelled, OpHandle};

fn check_ref_name(what: &str, value: &str) -> Result<(), ApiFailure> {
    validate_artifact_name(value).map_err(|e| ApiFailure::invalid(format!("invalid {what}: {e}")))
}

impl Daemon {
    /// A VM as the API shows it.
    pub fn vm_view(&self, record: VmRecord) -> VmView {
        let origin_snapshot = self.origin_snapshot_name(&record.id);
        VmView { paths: record.paths(), alive: self.handles.alive(&record), record, origin_snapshot }
    }

    fn resolve_spec(&self, req: &CreateVmRequest) -> Result<VmSpec, ApiFailure> {
        let c = &self.config;
        let spec = VmSpec {
            image: req.image.clone().unwrap_or_else(|| c.default_image.clone()),
            kernel: req.kernel.clone().unwrap_or_else(|| c.default_kernel.clone()),
            vcpus: req.vcpus.unwrap_or(c.default_vcpus),
            memory_mib: req.memory_mib.unwrap_or(c.default_memory_mib),
            disk_mib: req.disk_mib.unwrap_or(c.default_disk_mib),
            vmm: self.resolve_vmm(req.vmm)?,
            network: req.network.unwrap_or(c.network),
            allow_vm_traffic: req.allow_vm_traffic.unwrap_or(c.allow_vm_traffic),
        };
        check_spec(&spec)?;
        Ok(spec)
    }

    /// Validates a create request and starts its operation; the VM is recorded in the
    /// background. Bad input and taken names are refused here, before anything is written.
    pub fn begin_create_vm(self: &Arc<Self>, req: CreateVmRequest) -> Result<OperationRecord, ApiFailure> {
        validate_name(&req.name)?;
        let git = crate::ssh::check_git_identity(req.git_identity.clone())?;
        let (spec, origin) = match &req.from_snapshot {
            Some(reference) => {
                let snapshot = self.store.find_snapshot(reference).map_err(|e| match e {
                    StoreError::NotFound { .. } => {
                        ApiFailure::not_found(format!("no snapshot '{reference}'; see `banger snapshot list`"))
                    }
                    e => e.into(),
                })?;
                let spec = crate::snapshots::fork_spec(&snapshot, &req, self.config.allow_vm_traffic)?;
                (spec, Origin::Fork(Box::new(snapshot)))
            }
            None => {
                let spec = self.resolve_spec(&req)?;
                let warm = if req.warm_start && req.start && self.config.warm_start {
                    self.warm_key_for(&spec, git.as_ref())?
                } else {
                    None
                };
                match warm.map(|key| (self.warm_snapshot(&key), key)) {
                    Some((Ok(Some(snapshot)), _)) => {
                        let spec = VmSpec { allow_vm_traffic: spec.allow_vm_traffic && snapshot.network, ..spec };
                        (spec, Origin::Fork(Box::new(snapshot)))
                    }
                    Some((Err(e), _)) => return Err(e),
                    Some((Ok(None), key)) => (spec, Origin::WarmBoot(key)),
                    None => (spec, Origin::Boot),
                }
            }
        };
        self.check_publish(&req.publish)?;
        self.ensure_name_free(&req.name)?;
        let op = self.ops.begin("vm.create", &req.name);
        let _ = op.stage("validate");
        let snapshot = op.snapshot()?;
        let daemon = self.clone();
        let start = req.start.then_some(git);
        tokio::spawn(async move { daemon.run_create(op, req.name, spec, start, req.publish, origin).await });
        Ok(snapshot)
    }

    fn ensure_name_free(&self, name: &str) -> Result<(), ApiFailure> {
        match self.store.find_vm(name) {
            Ok(vm) if vm.name == name => Err(StoreError::NameTaken { kind: "vm", name: name.to_owned() }.into()),
            Ok(_) | Err(StoreError::NotFound { .. } | StoreError::Ambiguous { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The create operation's body; with `start`, the VM is booted too (with that git identity).
    /// A fork's dir gets the snapshot's files (its start restores them); a warm boot is
    /// snapshotted as the warm-start snapshot once ready. Returns the new record; on failure or
    /// cancellation nothing it made is left behind.
    pub async fn run_create(
        self: Arc<Self>,
        op: OpHandle,
        name: String,
        spec: VmSpec,
        start: Option<Option<GitIdentity>>,
        publish: Vec<PortForward>,
        origin: Origin,
    ) -> Result<VmRecord, ApiFailure> {
        let mut result = self.create_stages(&op, &name, spec, &publish, &origin).await;
        if let (Some(git), Ok(vm)) = (start, &result) {
            result = match self.start_vm(&op, &vm.id, git.as_ref()).await {
                Ok(vm) => Ok(vm),
                Err(crate::lifecycle::StartFailure::Cancelled) => Err(CreateFailure::Cancelled),
                Err(crate::lifecycle::StartFailure::Api(e)) => Err(CreateFailure::Api(e)),
            };
        }
        if let (Origin::WarmBoot(key), Ok(vm)) = (&origin, &result) {
            if op.stage("warm-snapshot").is_ok() {
                match self.make_warm_snapshot(vm, key).await {
                    Ok(s) => tracing::info!(vm = %vm.name, snapshot = %s.name, "warm-start snapshot kept"),
                    Err(e) => op.warn(&format!("cannot keep a warm-start snapshot: {}", e.message)),
                }
            }
        }
        match &result {
            Ok(vm) => {
                tracing::info!(vm = %vm.name, id = %vm.id, op = %op.id(), "vm created");
                op.succeed(Some(vm.id.clone()));
            }
            Err(CreateFailure::Cancelled) => op.cancelled(),
            Err(CreateFailure::Api(e)) => {
                tracing::warn!(vm = %name, op = %op.id(), error = %e, "vm create failed");
                op.fail(e.message.clone());
            }
        }
        result.map_err(|e| match e {
            CreateFailure::Cancelled => ApiFailure::conflict(format!("creating vm '{name}' was cancelled")),
            CreateFailure::Api(e) => e,
        })
    }

    async fn create_stages(
        &self,
        op: &OpHandle,
        name: &str,
        spec: VmSpec,
        publish: &[PortForward],
        origin: &Origin,
    ) -> Result<VmRecord, CreateFailure> {
        op.stage("reserve")?;
        let fork = match origin {
            Origin::Fork(snapshot) => Some(snapshot),
            Origin::Boot | Origin::WarmBoot(_) => None,
        };
        let vm = self.reserve(name, spec, fork.map(|s| s.id.as_str()))?;
        let undo = |d: &Self, vm: &VmRecord| {
            if let Err(e) = d.store.delete_vm(&vm.id) {
                tracing::error!(vm = %vm.name, error = %chain(&e), "cannot roll back vm row");
            }
            let _ = std::fs::remove_dir_all(&vm.vm_dir);
        };
        if let Err(e) = self.claim_forwards(&vm, publish) {
            undo(self, &vm);
            return Err(e.into());
        }
        let prepared = op.stage("prepare").map_err(CreateFailure::from).and_then(|()| {
            banger_host::paths::ensure_dir(std::path::Path::new(&vm.vm_dir), 0o700).map_err(|e| {
                CreateFailure::Api(ApiFailure::internal(format!("cannot create vm directory {}: {e}", vm.vm_dir)))
            })?;
            // The host key is made here, so it is known (and pinned) before the VM first boots.
            self.vm_host_key(&vm).map(drop).map_err(CreateFailure::Api)
        });
        if let Err(e) = prepared {
            undo(self, &vm);
            return Err(e);
        }
        if let Some(snapshot) = fork {
            let copied = match op.stage("copy-snapshot") {
                Ok(()) => self.copy_snapshot_into(snapshot, &vm).await.map_err(CreateFailure::Api),
                Err(c) => Err(c.into()),
            };
            if let Err(e) = copied {
                undo(self, &vm);
                return Err(e);
            }
        }
        if let Err(e) = self.rewrite_known_hosts().await {
            tracing::warn!(vm = %vm.name, error = %e, "cannot update known_hosts");
        }
        Ok(vm)
    }

    /// Claims `name` (and, for a networked VM, a guest address) and records the VM, under the
    /// reservation lock. Held for one check and one insert: never across I/O beyond the store.
    fn reserve(&self, name: &str, spec: VmSpec, origin: Option<&str>) -> Result<VmRecord, ApiFailure> {
        let _guard = self.reservation.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure_name_free(name)?;
        let guest_ip = if spec.network { Some(self.allocate_guest_ip()?.to_string()) } else { None };
        let id = new_id();
        let now = banger_core::time::now_rfc3339();
        let vm = VmRecord {
            vm_dir: self.layout.vm_dir(&id).display().to_string(),
            id,
            name: name.to_owned(),
            spec,
            desired_state: DesiredState::Stopped,
            state: ObservedState::Created,
            guest_ip,
            created_at: now.clone(),
            updated_at: now,
            last_error: None,
        };
        self.store.insert_vm(&vm)?;
        if let Some(snapshot) = origin {
            // Under the same lock as a snapshot delete's check: it sees this fork or fails.
            if let Err(e) = self.store.set_vm_origin(&vm.id, Some(snapshot)) {
                let _ = self.store.delete_vm(&vm.id);
                return Err(e.into());
            }
        }
        Ok(vm)
    }

    /// The lowest free guest address of the bridge subnet. Call with the reservation lock held.
    pub fn allocate_guest_ip(&self) -> Result<std::net::Ipv4Addr, ApiFailure> {
        let used: std::collections::BTreeSet<std::net::Ipv4Addr> =
            self.store.list_vms()?.iter().filter_map(|v| v.guest_ip.as_deref()?.parse().ok()).collect();
        banger_core::net::allocate(&self.config.bridge_subnet, &used).map_err(|e| ApiFailure::conflict(e.to_string()))
    }

    /// Changes a stopped VM's spec.
    pub async fn update_vm(&self, reference: &str, req: UpdateVmRequest) -> Result<VmRecord, ApiFailure> {
        let id = self.store.find_vm(reference)?.id;
        let _guard = self.vm_locks.lock(&id).await;
        let mut vm = self.store.find_vm(&id)?;
        if self.handles.alive(&vm) {
            return Err(ApiFailure::conflict(format!(
                "vm '{}' is running; stop it first with `banger vm stop {}`",
                vm.name, vm.name
            )));
        }
        transition(vm.state, &VmEvent::Modify)?;
        if crate::snapshots::restore_state(&vm).is_some() {
            return Err(ApiFailure::conflict(format!(
                "vm '{0}' is a fork that has not started yet: its first start restores the snapshot's \
                 machine as it was; start it once (`banger vm start {0}`), stop it, then change it",
                vm.name
            )));
        }
        let UpdateVmRequest { image, kernel, vcpus, memory_mib, disk_mib } = req;
        if image.is_none() && kernel.is_none() && vcpus.is_none() && memory_mib.is_none() && disk_mib.is_none() {
            return Err(ApiFailure::invalid("nothing to change; pass --cpus, --memory, --disk, --image or --kernel"));
        }
        let mut spec = vm.spec.clone();
        if let Some(disk) = disk_mib {
            if disk < spec.disk_mib {
                return Err(ApiFailure::invalid(format!(
                    "the work disk can only grow: it is {} MiB, asked for {disk} MiB",
                    spec.disk_mib
                )));
            }
            spec.disk_mib = disk;
        }
        spec.image = image.unwrap_or(spec.image);
        spec.kernel = kernel.unwrap_or(spec.kernel);
        spec.vcpus = vcpus.unwrap_or(spec.vcpus);
        spec.memory_mib = memory_mib.unwrap_or(spec.memory_mib);
        check_spec(&spec)?;
        vm.spec = spec;
        vm.updated_at = banger_core::time::now_rfc3339();
        self.store.update_vm(&vm)?;
        tracing::info!(vm = %vm.name, "vm updated");
        Ok(vm)
    }

    /// Deletes a stopped VM: its record, then its directory.
    pub async fn delete_vm(&self, reference: &str) -> Result<VmRecord, ApiFailure> {
        let id = self.store.find_vm(reference)?.id;
        let guard = self.vm_locks.lock(&id).await;
        let vm = self.store.find_vm(&id)?;
        if self.handles.alive(&vm) {
            return Err(ApiFailure::conflict(format!(
                "vm '{}' is running; stop it first with `banger vm stop {}`",
                vm.name, vm.name
            )));
        }
        transition(vm.state, &VmEvent::Delete)?;
        // Its forwards' rows go with its row; listeners, if any were left, go here.
        self.deactivate_forwards(&vm).await;
        self.store.delete_vm(&vm.id)?;
        self.handles.release(&vm);
        if let Err(e) = std::fs::remove_dir_all(&vm.vm_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = %vm.name, dir = %vm.vm_dir, error = %e, "cannot remove vm directory");
            }
        }
        drop(guard);
        self.vm_locks.forget(&vm.id);
        self.workspace_locks.forget(&vm.id);
        if let Err(e) = self.rewrite_known_hosts().await {
            tracing::warn!(vm = %vm.name, error = %e, "cannot update known_hosts");
        }
        tracing::info!(vm = %vm.name, id = %vm.id, "vm deleted");
        Ok(vm)
    }
}

fn check_spec(spec: &VmSpec) -> Result<(), ApiFailure> {
    check_ref_name("image name", &spec.image)?;
    check_ref_name("kernel name", &spec.kernel)?;
    check_range("vcpus", u64::from(spec.vcpus), VCPUS)?;
    check_range("memory (MiB)", spec.memory_mib, MEMORY_MIB)?;
    check_range("disk (MiB)", spec.disk_mib, DISK_MIB)?;
    Ok(())
}

/// Where a new VM's first start comes from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A cold boot.
    Boot,
    /// A cold boot that is then kept as the warm-start snapshot of this key.
    WarmBoot(String),
    /// A restore of this snapshot (a fork).
    Fork(Box<banger_core::SnapshotRecord>),
}

enum CreateFailure {
    Cancelled,
    Api(ApiFailure),
}

impl From<Cancelled> for CreateFailure {
    fn from(_: Cancelled) -> Self {
        Self::Cancelled
    }
}

impl From<ApiFailure> for CreateFailure {
    fn from(e: ApiFailure) -> Self {
        Self::Api(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_core::{Config, OpState};
    use banger_host::Layout;
    use banger_store::Store;

    fn daemon(dir: &std::path::Path) -> Arc<Daemon> {
        let layout = Layout::resolve(Some(dir.to_path_buf()), Some(dir.join("s.sock")));
        let store = Store::open(&dir.join("banger.db")).expect("store");
        Daemon::new(layout, Config::default(), None, store, banger_vmm::HostFacts::default(), Default::default())
    }

    fn req(name: &str) -> CreateVmRequest {
        CreateVmRequest { name: name.into(), ..Default::default() }
    }

    async fn create(d: &Arc<Daemon>, name: &str) -> Result<VmRecord, ApiFailure> {
        let spec = d.resolve_spec(&req(name))?;
        let op = d.ops.begin("vm.create", name);
        d.clone().run_create(op, name.into(), spec, None, Vec::new(), Origin::Boot).await
    }

    #[tokio::test]
    async fn an_unstarted_fork_keeps_its_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let vm = create(&d, "fork").await.expect("create");
        std::fs::write(std::path::Path::new(&vm.vm_dir).join(crate::snapshots::RESTORE_STATE), "state").expect("state");
        let change = UpdateVmRequest { vcpus: Some(2), ..Default::default() };
        let refused = d.update_vm("fork", change.clone()).await.expect_err("restore pending");
        assert_eq!(refused.status, axum::http::StatusCode::CONFLICT);
        assert!(refused.message.contains("start it once"), "{}", refused.message);
        std::fs::remove_file(std::path::Path::new(&vm.vm_dir).join(crate::snapshots::RESTORE_STATE)).expect("rm");
        assert_eq!(d.update_vm("fork", change).await.expect("a booted fork is a vm like any").spec.vcpus, 2);
    }

    #[test]
    fn an_image_or_kernel_with_snapshots_is_not_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let image = banger_core::ImageRecord {
            name: "minimal".into(),
            source: "recipe:minimal".into(),
            init_mode: banger_core::InitMode::Fast,
            rootfs: "/i/rootfs.ext4".into(),
            work_seed: None,
            sha256: None,
            size_bytes: 1,
            created_at: "2026-11-22T00:00:00Z".into(),
        };
        d.store.insert_image(&image).expect("image");
        let snapshot = banger_core::SnapshotRecord {
            id: "0123456789abcdef".into(),
            name: "base".into(),
            source_vm_id: "fedcba9876543210".into(),
            source_vm_name: "web".into(),
            image: "minimal".into(),
            kernel: "debian-6.1-cloud".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 2048,
            vmm: banger_core::config::VmmKind::Qemu,
            network: true,
            dir: dir.path().join("snapshots/x").display().to_string(),
            size_bytes: 0,
            warm_key: None,
            created_at: "2026-11-22T00:00:00Z".into(),
        };
        d.store.insert_snapshot(&snapshot).expect("snapshot");
        let refused = d.delete_image("minimal").expect_err("pinned by a snapshot");
        assert_eq!(refused.status, axum::http::StatusCode::CONFLICT);
        assert!(refused.message.contains("used by snapshot base") && refused.message.contains("snapshot delete"));
        assert!(d.store.get_image("minimal").expect("get").is_some(), "nothing was deleted");
        d.store.delete_snapshot(&snapshot.id).expect("delete snapshot");
        d.delete_image("minimal").expect("deletable now");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn twenty_concurrent_creates_of_one_name_have_one_winner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (d, barrier) = (d.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    create(&d, "contested").await
                })
            })
            .collect();
        let mut wins = 0;
        let mut losses = Vec::new();
        for t in tasks {
            match t.await.expect("join") {
                Ok(_) => wins += 1,
                Err(e) => losses.push(e),
            }
        }
        assert_eq!(wins, 1);
        assert_eq!(losses.len(), 19);
        assert!(losses.iter().all(|e| e.code == "conflict" && e.message.contains("already exists")), "{losses:?}");
        let vms = d.store.list_vms().expect("list");
        assert_eq!(vms.len(), 1);
        let dirs = std::fs::read_dir(d.layout.vms_dir()).expect("vms dir").count();
        assert_eq!(dirs, 1, "losers leave no directory");
        let ops = d.ops.list().expect("ops");
        assert_eq!(ops.iter().filter(|o| o.state == OpState::Succeeded).count(), 1);
    }

    #[tokio::test]
    async fn begin_create_refuses_bad_input_before_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        for bad in [
            req("Bad_Name"),
            CreateVmRequest { vcpus: Some(0), ..req("ok") },
            CreateVmRequest { memory_mib: Some(1), ..req("ok") },
            CreateVmRequest { image: Some("no/such".into()), ..req("ok") },
            CreateVmRequest { vmm: Some(banger_core::config::VmmChoice::Firecracker), ..req("ok") },
        ] {
            let e = d.begin_create_vm(bad).expect_err("refused");
            assert_eq!(e.code, "invalid_request", "{e:?}");
        }
        create(&d, "taken").await.expect("first");
        let e = d.begin_create_vm(req("taken")).expect_err("duplicate refused");
        assert_eq!(e.code, "conflict");
        assert_eq!(d.store.list_vms().expect("list").len(), 1);
        assert_eq!(d.ops.list().expect("ops").len(), 1, "refused creates record no operation");
    }

    #[tokio::test]
    async fn set_and_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let vm = create(&d, "web").await.expect("create");
        assert!(std::path::Path::new(&vm.vm_dir).is_dir());
        let up = d
            .update_vm("web", UpdateVmRequest { vcpus: Some(2), disk_mib: Some(4096), ..Default::default() })
            .await
            .expect("set");
        assert_eq!((up.spec.vcpus, up.spec.disk_mib), (2, 4096));
        let shrink = d.update_vm("web", UpdateVmRequest { disk_mib: Some(1024), ..Default::default() }).await;
        assert!(shrink.is_err_and(|e| e.message.contains("only grow")));
        assert!(d.update_vm("web", UpdateVmRequest::default()).await.is_err());
        d.delete_vm(&vm.id[..6]).await.expect("delete by id prefix");
        assert!(!std::path::Path::new(&vm.vm_dir).exists());
        assert_eq!(d.delete_vm("web").await.err().map(|e| e.code), Some("not_found"));
    }

    #[tokio::test]
    async fn guest_addresses_are_unique_reused_after_delete_and_exhaustion_says_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::resolve(Some(dir.path().to_path_buf()), Some(dir.path().join("s.sock")));
        let store = Store::open(&dir.path().join("banger.db")).expect("store");
        // A /29: .1 is the host, .2 to .6 are the five guest addresses.
        let config = Config { bridge_subnet: "10.9.0.0/29".parse().expect("subnet"), ..Config::default() };
        let d = Daemon::new(layout, config, None, store, banger_vmm::HostFacts::default(), Default::default());
        let mut ips = Vec::new();
        for i in 0..5 {
            ips.push(create(&d, &format!("vm{i}")).await.expect("create").guest_ip.expect("an address"));
        }
        assert_eq!(ips, ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]);
        let offline = CreateVmRequest { network: Some(false), ..req("offline") };
        let spec = d.resolve_spec(&offline).expect("spec");
        let op = d.ops.begin("vm.create", "offline");
        let vm = d
            .clone()
            .run_create(op, "offline".into(), spec, None, Vec::new(), Origin::Boot)
            .await
            .expect("no address needed");
        assert_eq!(vm.guest_ip, None, "--no-network takes no address");
        let full = create(&d, "one-too-many").await.expect_err("exhausted");
        assert_eq!(full.code, "conflict");
        assert!(
            full.message.contains("10.9.0.0/29 has no free address") && full.message.contains("bridge_subnet"),
            "{}",
            full.message
        );
        assert!(d.store.find_vm("one-too-many").is_err(), "nothing recorded on failure");
        d.delete_vm("vm2").await.expect("delete");
        let again = create(&d, "reuser").await.expect("create after delete");
        assert_eq!(again.guest_ip.as_deref(), Some("10.9.0.4"), "the freed address is reused");
    }
}
