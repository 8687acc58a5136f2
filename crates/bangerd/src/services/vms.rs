//! VM records: create (as an asynchronous operation, booting it too when asked), list, show,
//! set and delete, and the reads of one VM (logs, stats, listening ports).
//!
//! A create runs in three phases so that no global lock is held across slow work:
//! 1. validate and resolve defaults (no lock);
//! 2. reserve: under the short reservation lock, check the name is free and insert the row;
//! 3. prepare: make the VM's directory (no global lock).

use std::sync::Arc;

use banger_core::egress::EgressPolicy;
use banger_core::error_chain as chain;
use banger_core::size::{check_range, DISK_MIB, MEMORY_MIB, VCPUS};
use banger_core::vm::{transition, VmEvent};
use banger_core::{
    new_id, validate_artifact_name, validate_name, DesiredState, ObservedState, OperationRecord, PortForward, VmRecord,
    VmSpec,
};
use banger_proto::{CreateVmRequest, GitIdentity, GuestPort, UpdateVmRequest, VmLogs, VmPorts, VmStats, VmView};
use banger_store::{Pending, StoreError, Table};

use crate::ops::{Cancelled, OpHandle};
use crate::services::caller::Caller;
use crate::services::container_disk::{self, ContainerDiskError};
use crate::services::forwards::{Forwards, ForwardsError};
use crate::services::lifecycle::{Lifecycle, LifecycleError};
use crate::services::net::{Net, NetError};
use crate::services::snapshots::{Snapshots, SnapshotsError};
use crate::services::ssh::{GitIdentityError, Ssh, SshError};
use crate::services::workspace::Workspace;
use crate::services::{Fleet, FleetError};

/// Why a VM could not be created, changed or deleted.
#[derive(Debug, thiserror::Error)]
pub enum VmsError {
    /// The operation registry.
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
    /// The store failed, has no such VM, or the name is taken.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No VMM, or the VM could not be reached.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// A bad VM name.
    #[error("invalid name")]
    Name(#[from] banger_core::NameError),
    /// A bad image or kernel name.
    #[error("invalid {what}")]
    RefName {
        /// "image name" or "kernel name".
        what: &'static str,
        /// Why.
        #[source]
        source: banger_core::NameError,
    },
    /// A size out of range.
    #[error(transparent)]
    Size(#[from] banger_core::size::SizeError),
    /// The VM's state does not allow it.
    #[error(transparent)]
    Transition(#[from] banger_core::TransitionError),
    /// A bad git identity.
    #[error(transparent)]
    Git(#[from] GitIdentityError),
    /// A bad egress policy.
    #[error("invalid egress policy")]
    Egress(#[from] banger_core::egress::EgressError),
    /// It runs.
    #[error("vm '{0}' is running; stop it first with `banger vm stop {0}`")]
    Running(String),
    /// A fork whose first start is still to come.
    #[error("vm '{0}' is a fork that has not started yet: its first start restores the snapshot's machine as it was; start it once (`banger vm start {0}`), stop it, then change it")]
    UnstartedFork(String),
    /// An update that changes nothing.
    #[error("nothing to change; pass --cpus, --memory, --disk, --image or --kernel")]
    NothingToChange,
    /// A smaller work disk.
    #[error("the work disk can only grow: it is {have} MiB, asked for {asked} MiB")]
    DiskShrink {
        /// Its size.
        have: u64,
        /// The size asked for.
        asked: u64,
    },
    /// The VM directory could not be made.
    #[error("cannot create vm directory {dir}")]
    VmDir {
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM directory could not be removed (the delete is finished at the next start-up).
    #[error("cannot remove vm directory {dir}; retry `banger vm delete`")]
    RemoveDir {
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The create was cancelled.
    #[error("creating vm '{0}' was cancelled")]
    Cancelled(String),
    /// Its forwards.
    #[error(transparent)]
    Forwards(#[from] ForwardsError),
    /// Its guest address.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Its host key.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// Its snapshot (a fork, or warm start).
    #[error(transparent)]
    Snapshots(#[from] SnapshotsError),
    /// Its first start.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// Its container disk.
    #[error(transparent)]
    ContainerDisk(#[from] ContainerDiskError),
    /// The guest agent could not be asked.
    #[error("cannot list ports of vm '{vm}'")]
    Ports {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: crate::agent_conn::AgentError,
    },
    /// The guest agent answered something else.
    #[error("unexpected answer from the agent of vm '{vm}': {answer}")]
    UnexpectedAnswer {
        /// The VM.
        vm: String,
        /// What it said.
        answer: String,
    },
    /// A test's injected failure.
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

fn check_ref_name(what: &'static str, value: &str) -> Result<(), VmsError> {
    validate_artifact_name(value).map_err(|source| VmsError::RefName { what, source })
}

/// The VMs service.
pub struct Vms {
    fleet: Arc<Fleet>,
    lifecycle: Arc<Lifecycle>,
    snapshots: Arc<Snapshots>,
    forwards: Arc<Forwards>,
    ssh: Arc<Ssh>,
    net: Arc<Net>,
    workspace: Arc<Workspace>,
}

impl Vms {
    /// The service, wired to its collaborators: starts (`vm run`), forks and warm start,
    /// `--publish`, host keys, guest addresses and the workspace locks forgotten on delete.
    pub fn new(
        fleet: Arc<Fleet>,
        lifecycle: Arc<Lifecycle>,
        snapshots: Arc<Snapshots>,
        forwards: Arc<Forwards>,
        ssh: Arc<Ssh>,
        net: Arc<Net>,
        workspace: Arc<Workspace>,
    ) -> Arc<Self> {
        Arc::new(Self { fleet, lifecycle, snapshots, forwards, ssh, net, workspace })
    }

    /// A VM as the API shows it.
    pub fn vm_view(&self, record: VmRecord) -> VmView {
        let origin_snapshot = self.snapshots.origin_snapshot_name(&record.id);
        self.view_with(record, origin_snapshot)
    }

    fn view_with(&self, record: VmRecord, origin_snapshot: Option<String>) -> VmView {
        VmView {
            paths: record.paths().into(),
            alive: self.fleet.alive(&record),
            record: record.into(),
            origin_snapshot,
            egress: None,
        }
    }

    /// Every VM as the API shows it (the fork origins read in one query, not one per VM).
    pub fn list_views(&self) -> Result<Vec<VmView>, VmsError> {
        let origins = self.fleet.store.vm_origin_names()?;
        let vms = self.fleet.store.list_vms()?;
        Ok(vms
            .into_iter()
            .map(|record| {
                let origin = origins.get(&record.id).cloned();
                self.view_with(record, origin)
            })
            .collect())
    }

    fn resolve_spec(&self, req: &CreateVmRequest) -> Result<VmSpec, VmsError> {
        let c = &self.fleet.config;
        let spec = VmSpec {
            image: req.image.clone().unwrap_or_else(|| c.default_image.clone()),
            kernel: req.kernel.clone().unwrap_or_else(|| c.default_kernel.clone()),
            vcpus: req.vcpus.unwrap_or(c.default_vcpus),
            memory_mib: req.memory_mib.unwrap_or(c.default_memory_mib),
            disk_mib: req.disk_mib.unwrap_or(c.default_disk_mib),
            vmm: self.fleet.resolve_vmm(req.vmm.map(Into::into))?,
            network: req.network.unwrap_or(c.network),
            allow_vm_traffic: req.allow_vm_traffic.unwrap_or(c.allow_vm_traffic),
        };
        check_spec(&spec)?;
        Ok(spec)
    }

    /// Validates a create request and starts its operation; the VM is recorded in the
    /// background. Bad input and taken names are refused here, before anything is written.
    pub fn begin_create_vm(self: &Arc<Self>, req: CreateVmRequest) -> Result<OperationRecord, VmsError> {
        self.begin_create_vm_as(req, Caller::UNKNOWN)
    }

    /// [`Vms::begin_create_vm`] for `caller`, whose own rights open a `container_disk`.
    pub fn begin_create_vm_as(
        self: &Arc<Self>,
        req: CreateVmRequest,
        caller: Caller,
    ) -> Result<OperationRecord, VmsError> {
        validate_name(&req.name)?;
        if req.container_disk.is_some() && (req.from_snapshot.is_some() || req.warm_start) {
            return Err(ContainerDiskError::WithSnapshot.into());
        }
        let git = crate::services::ssh::check_git_identity(req.git_identity.clone())?;
        let (spec, origin) = match &req.from_snapshot {
            Some(reference) => {
                let snapshot = self.snapshots.find(reference)?;
                let spec = crate::services::snapshots::fork_spec(&snapshot, &req, self.fleet.config.allow_vm_traffic)?;
                (spec, Origin::Fork(Box::new(snapshot)))
            }
            None => {
                let spec = self.resolve_spec(&req)?;
                let warm = if req.warm_start && req.start && self.fleet.config.warm_start {
                    self.snapshots.warm_key_for(&spec, git.as_ref())?
                } else {
                    None
                };
                match warm.map(|key| (self.snapshots.warm_snapshot(&key), key)) {
                    Some((Ok(Some(snapshot)), _)) => {
                        let spec = VmSpec { allow_vm_traffic: spec.allow_vm_traffic && snapshot.network, ..spec };
                        (spec, Origin::Fork(Box::new(snapshot)))
                    }
                    Some((Err(e), _)) => return Err(e.into()),
                    Some((Ok(None), key)) => (spec, Origin::WarmBoot(key)),
                    None => (spec, Origin::Boot),
                }
            }
        };
        // The request's rules add to the config's; its mode replaces the config's.
        let mut egress = self.fleet.config.default_egress();
        if let Some(policy) = &req.egress {
            let given = policy.to_model()?;
            egress.allow.extend(given.allow);
            egress.deny.extend(given.deny);
            egress = EgressPolicy::new(given.mode, egress.allow, egress.deny)?;
        }
        let publish: Vec<PortForward> = req.publish.iter().map(|&f| f.into()).collect();
        self.forwards.check_publish(&publish)?;
        self.ensure_name_free(&req.name)?;
        let disk = req.container_disk.as_deref().map(|p| container_disk::open(&caller, p)).transpose()?;
        let op = self.fleet.ops.begin("vm.create", &req.name);
        let _ = op.stage("validate");
        let snapshot = op.snapshot()?;
        let this = self.clone();
        let start = req.start.then_some(git);
        tokio::spawn(async move { this.run_create(op, req.name, spec, start, (publish, egress), origin, disk).await });
        Ok(snapshot)
    }

    fn ensure_name_free(&self, name: &str) -> Result<(), VmsError> {
        match self.fleet.store.find_vm(name) {
            Ok(vm) if vm.name == name => Err(StoreError::NameTaken { kind: "vm", name: name.to_owned() }.into()),
            Ok(_) | Err(StoreError::NotFound { .. } | StoreError::Ambiguous { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The create operation's body; with `start`, the VM is booted too (with that git identity).
    /// A fork's dir gets the snapshot's files (its start restores them); a warm boot is
    /// snapshotted as the warm-start snapshot once ready; a container disk is copied into the
    /// VM's dir before it starts. Returns the new record; on failure or cancellation nothing it
    /// made is left behind.
    #[expect(clippy::too_many_arguments, reason = "a create's parts, each used once")]
    pub async fn run_create(
        self: Arc<Self>,
        op: OpHandle,
        name: String,
        spec: VmSpec,
        start: Option<Option<GitIdentity>>,
        (publish, egress): (Vec<PortForward>, EgressPolicy),
        origin: Origin,
        disk: Option<container_disk::Opened>,
    ) -> Result<VmRecord, VmsError> {
        let mut result = self.create_stages(&op, &name, spec, (&publish, &egress), (&origin, disk)).await;
        if let (Some(git), Ok(vm)) = (start, &result) {
            result = match self.lifecycle.start_vm(&op, &vm.id, git.as_ref()).await {
                Ok(vm) => Ok(vm),
                Err(LifecycleError::Cancelled) => Err(CreateFailure::Cancelled),
                Err(e) => Err(CreateFailure::Failed(e.into())),
            };
        }
        if let (Origin::WarmBoot(key), Ok(vm)) = (&origin, &result) {
            if op.stage("warm-snapshot").is_ok() {
                match self.snapshots.make_warm_snapshot(vm, key).await {
                    Ok(s) => tracing::info!(vm = %vm.name, snapshot = %s.name, "warm-start snapshot kept"),
                    Err(e) => op.warn(&format!("cannot keep a warm-start snapshot: {}", chain(&e))),
                }
            }
        }
        match &result {
            Ok(vm) => {
                tracing::info!(vm = %vm.name, id = %vm.id, op = %op.id(), "vm created");
                op.succeed(Some(vm.id.clone()));
            }
            Err(CreateFailure::Cancelled) => op.cancelled(),
            Err(CreateFailure::Failed(e)) => {
                tracing::warn!(vm = %name, op = %op.id(), error = %chain(e), "vm create failed");
                op.fail(chain(e));
            }
        }
        result.map_err(|e| match e {
            CreateFailure::Cancelled => VmsError::Cancelled(name),
            CreateFailure::Failed(e) => e,
        })
    }

    async fn create_stages(
        &self,
        op: &OpHandle,
        name: &str,
        spec: VmSpec,
        (publish, egress): (&[PortForward], &EgressPolicy),
        (origin, disk): (&Origin, Option<container_disk::Opened>),
    ) -> Result<VmRecord, CreateFailure> {
        op.stage("reserve")?;
        let fork = match origin {
            Origin::Fork(snapshot) => Some(snapshot),
            Origin::Boot | Origin::WarmBoot(_) => None,
        };
        // The row is recorded "being made" (for a fork: a fork whose disks are still being
        // copied) and marked complete once its directory, host key and disk copies are all there.
        // A crash in between leaves a row the start-up sweep deletes with its directory.
        let vm = self.reserve(name, spec, fork.map(|s| s.id.as_str()))?;
        let undo = |d: &Self, vm: &VmRecord| {
            // Files first; the row, still "being made", last.
            if let Err(e) = crate::services::snapshots::remove_dir(std::path::Path::new(&vm.vm_dir)) {
                tracing::error!(vm = %vm.name, dir = %vm.vm_dir, error = %e, "cannot remove a failed create's directory");
            } else if let Err(e) = d.fleet.store.delete_vm(&vm.id) {
                tracing::error!(vm = %vm.name, error = %chain(&e), "cannot roll back vm row");
            }
        };
        let claimed = self.fleet.store.set_egress_policy(&vm.id, egress).map_err(VmsError::from);
        if let Err(e) = claimed
            .and_then(|()| self.forwards.claim(&vm, publish).map_err(VmsError::from))
            .and_then(|()| self.reserved())
        {
            undo(self, &vm);
            return Err(CreateFailure::Failed(e));
        }
        let prepared = op.stage("prepare").map_err(CreateFailure::from).and_then(|()| {
            banger_host::paths::ensure_dir(std::path::Path::new(&vm.vm_dir), 0o700)
                .map_err(|source| CreateFailure::Failed(VmsError::VmDir { dir: vm.vm_dir.clone(), source }))?;
            // The host key is made here, so it is known (and pinned) before the VM first boots.
            self.ssh.vm_host_key(&vm).map(drop).map_err(|e| CreateFailure::Failed(e.into()))?;
            self.prepared().map_err(CreateFailure::Failed)
        });
        if let Err(e) = prepared {
            undo(self, &vm);
            return Err(e);
        }
        if let Some(snapshot) = fork {
            let copied = match op.stage("copy-snapshot") {
                Ok(()) => match self.snapshots.copy_snapshot_into(snapshot, &vm).await {
                    Ok(()) => self.fork_copied().map_err(CreateFailure::Failed),
                    Err(e) => Err(CreateFailure::Failed(e.into())),
                },
                Err(c) => Err(c.into()),
            };
            if let Err(e) = copied {
                undo(self, &vm);
                return Err(e);
            }
        }
        if let Some(disk) = disk {
            let copied = match op.stage("container-disk") {
                Ok(()) => {
                    let dir = std::path::PathBuf::from(&vm.vm_dir);
                    match tokio::task::spawn_blocking(move || container_disk::copy_into(disk, &dir)).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(CreateFailure::Failed(e.into())),
                        Err(e) => Err(CreateFailure::Failed(VmsError::VmDir {
                            dir: vm.vm_dir.clone(),
                            source: std::io::Error::other(e),
                        })),
                    }
                }
                Err(c) => Err(c.into()),
            };
            if let Err(e) = copied {
                undo(self, &vm);
                return Err(e);
            }
        }
        if let Err(e) = self.complete(&vm) {
            undo(self, &vm);
            return Err(CreateFailure::Failed(e));
        }
        if let Err(e) = self.ssh.rewrite_known_hosts().await {
            tracing::warn!(vm = %vm.name, error = %chain(&e), "cannot update known_hosts");
        }
        Ok(vm)
    }

    /// Claims `name` (and, for a networked VM, a guest address) and records the VM, under the
    /// reservation lock. Held for one check and one insert: never across I/O beyond the store.
    fn reserve(&self, name: &str, spec: VmSpec, origin: Option<&str>) -> Result<VmRecord, VmsError> {
        let claim = self.fleet.reservations.claim();
        self.ensure_name_free(name)?;
        let guest_ip = if spec.network { Some(self.net.allocate_guest_ip(&claim)?.to_string()) } else { None };
        let id = new_id();
        let now = banger_core::time::now_rfc3339();
        let vm = VmRecord {
            vm_dir: self.fleet.layout.vm_dir(&id).display().to_string(),
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
        // Under the same lock as a snapshot delete's check: it sees this fork or fails.
        self.fleet.store.insert_vm_as(&vm, origin, Some(Pending::Making))?;
        Ok(vm)
    }

    /// Step boundaries of a create where tests inject failures and crashes.
    fn reserved(&self) -> Result<(), VmsError> {
        crate::failpoint!(self.fleet, "vm.create.reserve");
        Ok(())
    }

    fn prepared(&self) -> Result<(), VmsError> {
        crate::failpoint!(self.fleet, "vm.create.prepare");
        Ok(())
    }

    fn fork_copied(&self) -> Result<(), VmsError> {
        crate::failpoint!(self.fleet, "vm.fork.copied");
        Ok(())
    }

    /// Publishes a new VM: its files are all there.
    fn complete(&self, vm: &VmRecord) -> Result<(), VmsError> {
        crate::failpoint!(self.fleet, "vm.create.complete");
        self.fleet.store.set_pending(Table::Vms, &vm.id, None)?;
        Ok(())
    }

    /// Changes a stopped VM's spec.
    pub async fn update_vm(&self, reference: &str, req: UpdateVmRequest) -> Result<VmRecord, VmsError> {
        let id = self.fleet.store.find_vm(reference)?.id;
        let guard = self.fleet.locks.lock(&id).await;
        let mut vm = self.fleet.store.find_vm(&id)?;
        if self.fleet.alive(&vm) {
            return Err(VmsError::Running(vm.name));
        }
        transition(vm.state, &VmEvent::Modify)?;
        if crate::services::snapshots::restore_state(&vm).is_some() {
            return Err(VmsError::UnstartedFork(vm.name));
        }
        let UpdateVmRequest { image, kernel, vcpus, memory_mib, disk_mib } = req;
        if image.is_none() && kernel.is_none() && vcpus.is_none() && memory_mib.is_none() && disk_mib.is_none() {
            return Err(VmsError::NothingToChange);
        }
        let mut spec = vm.spec.clone();
        if let Some(disk) = disk_mib {
            if disk < spec.disk_mib {
                return Err(VmsError::DiskShrink { have: spec.disk_mib, asked: disk });
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
        self.fleet.publish(&guard, &vm)?;
        tracing::info!(vm = %vm.name, "vm updated");
        Ok(vm)
    }

    /// Deletes a stopped VM: marks its record "being deleted", removes its directory, then the
    /// record. A crash in between is finished by the start-up sweep; a directory that cannot be
    /// removed keeps the record (and the mark), so nothing is leaked unseen.
    pub async fn delete_vm(&self, reference: &str) -> Result<VmRecord, VmsError> {
        let id = self.fleet.store.find_vm(reference)?.id;
        let guard = self.fleet.locks.lock(&id).await;
        let vm = self.fleet.store.find_vm(&id)?;
        if self.fleet.alive(&vm) {
            return Err(VmsError::Running(vm.name));
        }
        transition(vm.state, &VmEvent::Delete)?;
        self.fleet.store.set_pending(Table::Vms, &vm.id, Some(Pending::Deleting))?;
        // Its forwards' rows go with its row; listeners, if any were left, go here.
        self.forwards.deactivate(&vm).await;
        self.fleet.handles.release(&vm);
        self.remove_vm_dir(&vm)?;
        self.fleet.store.delete_vm(&vm.id)?;
        drop(guard);
        self.fleet.locks.forget(&vm.id);
        self.workspace.forget(&vm.id);
        if let Err(e) = self.ssh.rewrite_known_hosts().await {
            tracing::warn!(vm = %vm.name, error = %chain(&e), "cannot update known_hosts");
        }
        tracing::info!(vm = %vm.name, id = %vm.id, "vm deleted");
        Ok(vm)
    }
}

impl Vms {
    fn remove_vm_dir(&self, vm: &VmRecord) -> Result<(), VmsError> {
        crate::failpoint!(self.fleet, "vm.delete.marked");
        crate::services::snapshots::remove_dir(std::path::Path::new(&vm.vm_dir))
            .map_err(|source| VmsError::RemoveDir { dir: vm.vm_dir.clone(), source })?;
        crate::failpoint!(self.fleet, "vm.delete.files");
        Ok(())
    }

    /// VM `reference`'s serial console log: all of it, or its last `tail` lines. The guest
    /// writes it, so it is read from its end, at most [`logfile::CONSOLE_LOG_CAP`] bytes (the
    /// size it is rotated at), each line cut to [`logfile::MAX_LINE_BYTES`].
    pub fn logs(&self, reference: &str, tail: Option<usize>) -> Result<VmLogs, VmsError> {
        use banger_vmm::logfile;
        let vm = self.fleet.store.find_vm(reference)?;
        let path = vm.paths().console_log;
        let file = std::path::Path::new(&path);
        // With its `.1`: right after a rotation the log itself is empty.
        let (bytes, cut) = logfile::read_log_tail(file, logfile::CONSOLE_LOG_CAP).unwrap_or_default();
        let lines = logfile::capped_lines(&bytes, logfile::MAX_LINE_BYTES, cut);
        let lines = &lines[lines.len().saturating_sub(tail.unwrap_or(usize::MAX))..];
        let text = if lines.is_empty() { String::new() } else { lines.join("\n") + "\n" };
        Ok(VmLogs { path, text })
    }

    /// VM `reference`'s resource use: the VMM's CPU time and memory from `/proc` (RSS and PSS,
    /// its memory file), and the guest's own view of its memory through the agent (bounded).
    pub async fn stats(&self, reference: &str) -> Result<VmStats, VmsError> {
        self.stats_with(reference, true).await
    }

    /// [`Self::stats`] without the guest's view: no agent round trip, for pages that poll every
    /// running VM each second (a slow or silent guest must not hold up the others' rows).
    pub async fn host_stats(&self, reference: &str) -> Result<VmStats, VmsError> {
        self.stats_with(reference, false).await
    }

    async fn stats_with(&self, reference: &str, guest_view: bool) -> Result<VmStats, VmsError> {
        let vm = self.fleet.store.find_vm(reference)?;
        let running = self.fleet.alive(&vm);
        let handles = self.fleet.handles.get(&vm).filter(|_| running);
        let pid = handles.as_ref().and_then(|h| h.pid);
        let driver = self.fleet.driver(vm.spec.vmm);
        let stats = pid.and_then(|p| driver.stats(p).ok());
        let vmm_metrics = match handles.and_then(|h| h.control_socket) {
            Some(socket) => driver.metrics(std::path::Path::new(&vm.vm_dir), std::path::Path::new(&socket)).await,
            None => None,
        };
        let memory = pid.and_then(|p| banger_vmm::vmm_memory(p).ok());
        let guest = match running && guest_view {
            true => crate::services::meminfo::guest_meminfo(&self.fleet.agent_for(&vm)).await,
            false => None,
        };
        let uptime_secs = pid
            .and_then(|p| std::fs::metadata(format!("/proc/{p}")).ok())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .map(|e| e.as_secs());
        Ok(VmStats {
            name: vm.name,
            running,
            pid,
            cpu_time_ms: stats.map(|s| s.cpu_time_ms),
            rss_kib: memory.map(|m| m.rss_kib).or(stats.map(|s| s.rss_kib)),
            pss_kib: memory.map(|m| m.pss_kib),
            memory_file_kib: memory.and_then(|m| m.memory_file_kib),
            memory_returned_kib: memory
                .and_then(|m| m.memory_file_kib)
                .map(|file| (vm.spec.memory_mib * 1024).saturating_sub(file)),
            host_memory_kib: memory.map(|m| m.host_kib()),
            snapshot_memory_kib: memory.and_then(|m| m.snapshot_memory_kib),
            guest_mem_total_kib: guest.map(|g| g.total_kib),
            guest_mem_available_kib: guest.map(|g| g.available_kib),
            uptime_secs,
            vmm_metrics,
        })
    }

    /// The sockets listening in running VM `reference`.
    pub async fn ports(&self, reference: &str) -> Result<VmPorts, VmsError> {
        let (vm, agent) = self.fleet.running_agent(reference)?;
        let answer = agent
            .call(&banger_proto::agent::AgentRequest::Ports, std::time::Duration::from_secs(10))
            .await
            .map_err(|source| VmsError::Ports { vm: vm.name.clone(), source })?;
        let banger_proto::agent::AgentResponse::Ports { ports } = answer else {
            return Err(VmsError::UnexpectedAnswer { vm: vm.name, answer: format!("{answer:?}") });
        };
        let ports = ports.into_iter().map(|p| GuestPort { proto: p.proto, address: p.address, port: p.port }).collect();
        Ok(VmPorts { name: vm.name, ports })
    }
}

fn check_spec(spec: &VmSpec) -> Result<(), VmsError> {
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
    Failed(VmsError),
}

impl From<Cancelled> for CreateFailure {
    fn from(_: Cancelled) -> Self {
        Self::Cancelled
    }
}

impl From<VmsError> for CreateFailure {
    fn from(e: VmsError) -> Self {
        Self::Failed(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::Daemon;
    use crate::services::testing::{daemon, FakeProvision, FakeVmm};
    use banger_core::OpState;

    fn req(name: &str) -> CreateVmRequest {
        CreateVmRequest { name: name.into(), ..Default::default() }
    }

    async fn create(d: &Arc<Daemon>, name: &str) -> Result<VmRecord, VmsError> {
        let spec = d.vms.resolve_spec(&req(name))?;
        let op = d.fleet.ops.begin("vm.create", name);
        d.vms
            .clone()
            .run_create(op, name.into(), spec, None, (Vec::new(), EgressPolicy::default()), Origin::Boot, None)
            .await
    }

    #[tokio::test]
    async fn an_unstarted_fork_keeps_its_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let vm = create(&d, "fork").await.expect("create");
        std::fs::write(std::path::Path::new(&vm.vm_dir).join(crate::services::snapshots::RESTORE_STATE), "state")
            .expect("state");
        let change = UpdateVmRequest { vcpus: Some(2), ..Default::default() };
        let refused = d.vms.update_vm("fork", change.clone()).await.expect_err("restore pending");
        assert!(matches!(refused, VmsError::UnstartedFork(_)), "{refused}");
        assert!(refused.to_string().contains("start it once"), "{refused}");
        std::fs::remove_file(std::path::Path::new(&vm.vm_dir).join(crate::services::snapshots::RESTORE_STATE))
            .expect("rm");
        assert_eq!(d.vms.update_vm("fork", change).await.expect("a booted fork is a vm like any").spec.vcpus, 2);
    }

    #[tokio::test]
    async fn logs_read_a_bounded_tail_with_capped_lines() {
        use banger_vmm::logfile::{CONSOLE_LOG_CAP, CUT_MARK, MAX_LINE_BYTES};
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let vm = create(&d, "loud").await.expect("create");
        let console = std::path::PathBuf::from(vm.paths().console_log);
        // A 20 GiB sparse log (never read whole) ending in a line with no end, then short ones.
        let file = std::fs::File::create(&console).expect("log");
        file.set_len(20 << 30).expect("sparse");
        drop(file);
        let long = "y".repeat(3 * MAX_LINE_BYTES);
        let mut log = std::fs::OpenOptions::new().append(true).open(&console).expect("append");
        std::io::Write::write_all(&mut log, format!("\n{long}\nlast\n").as_bytes()).expect("write");
        let all = d.vms.logs("loud", None).expect("logs");
        assert!(all.text.len() as u64 <= CONSOLE_LOG_CAP, "{} bytes", all.text.len());
        assert!(all.text.lines().all(|l| l.len() <= MAX_LINE_BYTES + CUT_MARK.len()));
        assert!(all.text.ends_with(&format!("{CUT_MARK}\nlast\n")), "the newest lines, the long one cut");
        let tail = d.vms.logs("loud", Some(1)).expect("tail");
        assert_eq!(tail.text, "last\n");
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
        d.fleet.store.insert_image(&image).expect("image");
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
        d.fleet.store.insert_snapshot(&snapshot).expect("snapshot");
        let refused = d.artifacts.delete_image("minimal").expect_err("pinned by a snapshot");
        assert!(matches!(refused, crate::services::artifacts::ArtifactsError::InUse { .. }), "{refused}");
        let message = refused.to_string();
        assert!(message.contains("used by snapshot base") && message.contains("snapshot delete"), "{message}");
        assert!(d.fleet.store.get_image("minimal").expect("get").is_some(), "nothing was deleted");
        d.fleet.store.delete_snapshot(&snapshot.id).expect("delete snapshot");
        d.artifacts.delete_image("minimal").expect("deletable now");
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
        assert!(losses.iter().all(|e| matches!(e, VmsError::Store(StoreError::NameTaken { .. }))), "{losses:?}");
        let vms = d.fleet.store.list_vms().expect("list");
        assert_eq!(vms.len(), 1);
        let dirs = std::fs::read_dir(d.fleet.layout.vms_dir()).expect("vms dir").count();
        assert_eq!(dirs, 1, "losers leave no directory");
        let ops = d.fleet.ops.list().expect("ops");
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
            CreateVmRequest { vmm: Some(banger_proto::VmmChoice::Firecracker), ..req("ok") },
        ] {
            let e = d.vms.begin_create_vm(bad).expect_err("refused");
            let invalid = matches!(e, VmsError::Name(_) | VmsError::Size(_) | VmsError::RefName { .. })
                || matches!(e, VmsError::Fleet(FleetError::Select(_)));
            assert!(invalid, "{e:?}");
        }
        create(&d, "taken").await.expect("first");
        let e = d.vms.begin_create_vm(req("taken")).expect_err("duplicate refused");
        assert!(matches!(e, VmsError::Store(StoreError::NameTaken { .. })), "{e:?}");
        assert_eq!(d.fleet.store.list_vms().expect("list").len(), 1);
        assert_eq!(d.fleet.ops.list().expect("ops").len(), 1, "refused creates record no operation");
    }

    #[tokio::test]
    async fn set_and_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let vm = create(&d, "web").await.expect("create");
        assert!(std::path::Path::new(&vm.vm_dir).is_dir());
        let up = d
            .vms
            .update_vm("web", UpdateVmRequest { vcpus: Some(2), disk_mib: Some(4096), ..Default::default() })
            .await
            .expect("set");
        assert_eq!((up.spec.vcpus, up.spec.disk_mib), (2, 4096));
        let shrink = d.vms.update_vm("web", UpdateVmRequest { disk_mib: Some(1024), ..Default::default() }).await;
        assert!(shrink.is_err_and(|e| e.to_string().contains("only grow")));
        assert!(d.vms.update_vm("web", UpdateVmRequest::default()).await.is_err());
        d.vms.delete_vm(&vm.id[..6]).await.expect("delete by id prefix");
        assert!(!std::path::Path::new(&vm.vm_dir).exists());
        let gone = d.vms.delete_vm("web").await.expect_err("gone");
        assert!(matches!(gone, VmsError::Store(StoreError::NotFound { .. })), "{gone}");
    }

    #[tokio::test]
    async fn a_created_and_started_vm_is_deleted_only_once_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vmm, provision) = (Arc::new(FakeVmm::default()), Arc::new(FakeProvision::default()));
        let d = crate::services::testing::daemon_with(dir.path(), vmm.clone(), provision.clone(), |c| {
            c.network = false;
        });
        let spec = d.vms.resolve_spec(&req("web")).expect("spec");
        let op = d.fleet.ops.begin("vm.create", "web");
        let id = op.id().to_owned();
        let vm = d
            .vms
            .clone()
            .run_create(op, "web".into(), spec, Some(None), (Vec::new(), EgressPolicy::default()), Origin::Boot, None)
            .await;
        let vm = vm.expect("created and started");
        assert_eq!(vm.state, banger_core::ObservedState::Running);
        let stages: Vec<String> = d.fleet.ops.get(&id).expect("op").stages.into_iter().map(|s| s.name).collect();
        assert_eq!(stages, ["reserve", "prepare", "provision", "boot", "agent"].map(String::from));
        assert!(std::path::Path::new(&vm.vm_dir).join("ssh_host_ed25519_key").is_file(), "host key made at create");
        assert_eq!((provision.calls().len(), vmm.running()), (1, 1));
        let refused = d.vms.delete_vm("web").await.expect_err("running");
        assert!(matches!(refused, VmsError::Running(_)), "{refused}");
        assert!(std::path::Path::new(&vm.vm_dir).is_dir(), "nothing removed");
        d.lifecycle.stop_vm("web", false).await.expect("stop");
        let deleted = d.vms.delete_vm("web").await.expect("delete");
        assert_eq!(deleted.id, vm.id);
        assert!(!std::path::Path::new(&vm.vm_dir).exists(), "its directory went with it");
        assert!(d.fleet.store.list_vms().expect("list").is_empty());
        assert_eq!(vmm.running(), 0);
    }

    #[tokio::test]
    async fn a_create_whose_start_fails_keeps_the_record_as_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vmm = Arc::new(FakeVmm::default());
        vmm.fail_launch.store(true, std::sync::atomic::Ordering::SeqCst);
        let d = crate::services::testing::daemon_with(dir.path(), vmm.clone(), Default::default(), |c| {
            c.network = false;
        });
        let spec = d.vms.resolve_spec(&req("web")).expect("spec");
        let op = d.fleet.ops.begin("vm.create", "web");
        let e = d
            .vms
            .clone()
            .run_create(op, "web".into(), spec, Some(None), (Vec::new(), EgressPolicy::default()), Origin::Boot, None)
            .await;
        let e = e.expect_err("launch fails");
        assert!(matches!(e, VmsError::Lifecycle(LifecycleError::Launch(_))), "{e}");
        let vm = d.fleet.store.find_vm("web").expect("the record stays, to be inspected and deleted");
        assert_eq!(vm.state, banger_core::ObservedState::Failed);
        d.vms.delete_vm("web").await.expect("a failed vm deletes");
        assert_eq!(vmm.running(), 0);
    }

    #[tokio::test]
    async fn guest_addresses_are_unique_reused_after_delete_and_exhaustion_says_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A /29: .1 is the host, .2 to .6 are the five guest addresses.
        let d = crate::services::testing::daemon_with(dir.path(), Default::default(), Default::default(), |c| {
            c.bridge_subnet = "10.9.0.0/29".parse().expect("subnet");
        });
        let mut ips = Vec::new();
        for i in 0..5 {
            ips.push(create(&d, &format!("vm{i}")).await.expect("create").guest_ip.expect("an address"));
        }
        assert_eq!(ips, ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]);
        let offline = CreateVmRequest { network: Some(false), ..req("offline") };
        let spec = d.vms.resolve_spec(&offline).expect("spec");
        let op = d.fleet.ops.begin("vm.create", "offline");
        let vm = d
            .vms
            .clone()
            .run_create(op, "offline".into(), spec, None, (Vec::new(), EgressPolicy::default()), Origin::Boot, None)
            .await
            .expect("no address needed");
        assert_eq!(vm.guest_ip, None, "--no-network takes no address");
        let full = create(&d, "one-too-many").await.expect_err("exhausted");
        assert!(matches!(full, VmsError::Net(NetError::Exhausted(_))), "{full}");
        let message = chain(&full);
        assert!(message.contains("10.9.0.0/29 has no free address") && message.contains("bridge_subnet"), "{message}");
        assert!(d.fleet.store.find_vm("one-too-many").is_err(), "nothing recorded on failure");
        d.vms.delete_vm("vm2").await.expect("delete");
        let again = create(&d, "reuser").await.expect("create after delete");
        assert_eq!(again.guest_ip.as_deref(), Some("10.9.0.4"), "the freed address is reused");
    }
}
