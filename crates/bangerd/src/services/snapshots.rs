//! Memory snapshots: pause and resume, snapshots of a running VM, forks started from them, and
//! warm start.
//!
//! A snapshot is the VM's memory and device state (written by the VMM while the guest is
//! paused) plus copies of its overlay and work disks made during the same pause, so the three
//! agree; the guest is resumed afterwards unless it was paused before. Files live in
//! `<state>/snapshots/<id>/`, the record in the `snapshots` table. Taking one holds the VM's lock
//! from the pause to the resume (like `image promote`, the other exception): no stop, pause or
//! resume may run between the state and the disk copies. That is VMM and file I/O of a second or
//! two, never a wait on the guest.
//!
//! A fork is a new VM whose dir gets copies of the snapshot's disks and a link to its state
//! ([`RESTORE_STATE`]); its first start restores that state instead of booting, then the agent
//! gives the guest the fork's identity (clock, hostname, MAC and address, ssh host key,
//! machine id) before the start reports it ready. Later starts boot normally. A fork does not
//! need the snapshot's files once made, but a snapshot cannot be deleted while VMs started from
//! it exist (`vms.origin_snapshot`).
//!
//! Warm start (`warm_start = true`): the first `vm run` for a boot key (image, kernel, shape,
//! agent, guest files) boots cold and is snapshotted right after it is ready; later runs with the
//! same key fork that snapshot. A warm snapshot whose key no longer matches is deleted once no
//! fork uses it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_core::vm::{transition, VmEvent};
use banger_core::{new_id, validate_name, ObservedState, SnapshotRecord, VmRecord, VmSpec};
use banger_proto::agent::{AgentRequest, HostKey, Identity, NetIdentity};
use banger_proto::{CreateVmRequest, SnapshotView};

use banger_core::error_chain as chain;
use banger_store::{Pending, StoreError, Table};

use crate::services::artifacts::agent::AgentBinaryError;
use crate::services::artifacts::Artifacts;
use crate::services::ssh::{Ssh, SshError};
use crate::services::{Fleet, FleetError};

/// A fork's copy of the state it starts from, in its VM dir, until its first start restores it.
pub const RESTORE_STATE: &str = "restore-state.bin";
/// How long the agent may take to zero its free memory before a snapshot.
const SCRUB_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to set the clock after a resume.
const CLOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// A file of a snapshot or fork could not be copied or linked.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A disk copy failed.
    #[error("cannot copy {src}")]
    Disk {
        /// The source.
        src: String,
        /// Why.
        #[source]
        source: banger_image::seed::SeedError,
    },
    /// A state file could not be linked or copied.
    #[error("cannot copy {}", src.display())]
    State {
        /// The source.
        src: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a pause, resume, snapshot, fork or snapshot delete failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotsError {
    /// The store failed, or has no such VM.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM is not running.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The VM's state does not allow it.
    #[error(transparent)]
    Transition(#[from] banger_core::TransitionError),
    /// No such snapshot.
    #[error("no snapshot '{0}'; see `banger snapshot list`")]
    NotFound(String),
    /// The VMM could not do it.
    #[error("cannot {what} vm '{vm}'")]
    Control {
        /// What was asked.
        what: &'static str,
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: banger_vmm::ControlError,
    },
    /// A bad snapshot name.
    #[error("invalid snapshot name")]
    InvalidName(#[source] banger_core::NameError),
    /// The VM is neither running nor paused.
    #[error("vm '{vm}' is {state}; snapshots are taken of running or paused vms")]
    NotSnapshottable {
        /// The VM.
        vm: String,
        /// Its state.
        state: &'static str,
    },
    /// The snapshot directory could not be made.
    #[error("cannot create {}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The disks could not be copied into the snapshot.
    #[error(transparent)]
    Copy(Box<CopyError>),
    /// A fork's files could not be made.
    #[error("cannot fork snapshot '{snapshot}'")]
    Fork {
        /// The snapshot.
        snapshot: String,
        /// Why.
        #[source]
        source: Box<CopyError>,
    },
    /// VMs were forked from it.
    #[error("snapshot '{snapshot}' has forks ({}); delete them first with `banger vm delete {}`", forks.join(", "), forks.join(" "))]
    HasForks {
        /// The snapshot.
        snapshot: String,
        /// Its forks.
        forks: Vec<String>,
    },
    /// A fork request asks for another shape than the snapshot's.
    #[error("a fork of snapshot '{snapshot}' has its {what} ({have}); omit it (asked for {asked})")]
    ForkDiffers {
        /// The snapshot.
        snapshot: String,
        /// What differs.
        what: String,
        /// The snapshot's.
        have: String,
        /// The request's.
        asked: String,
    },
    /// `--allow-vm-traffic` for a fork of a VM without a network.
    #[error("snapshot '{0}' was taken of a vm without a network; --allow-vm-traffic needs one")]
    NoNetwork(String),
    /// The fork's host key.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// The host key could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent binary (part of a warm-start key).
    #[error(transparent)]
    Agent(#[from] AgentBinaryError),
    /// A snapshot's files could not be removed.
    #[error("cannot remove {}", path.display())]
    Remove {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task died.
    #[error("a background task failed")]
    Task(#[from] tokio::task::JoinError),
    /// A test's injected failure.
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

/// Removes directory `dir` and everything in it; one that is not there is removed already.
pub fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The state file a VM's next start restores, if it has one.
pub fn restore_state(vm: &VmRecord) -> Option<PathBuf> {
    Some(Path::new(&vm.vm_dir).join(RESTORE_STATE)).filter(|p| p.is_file())
}

/// The default name of a snapshot of `vm` taken at `now` (RFC 3339): `VM-YYYYMMDD-HHMMSS`.
pub fn default_snapshot_name(vm: &str, now: &str) -> String {
    let digits: String = now.chars().filter(char::is_ascii_digit).take(14).collect();
    let (date, time) = digits.split_at(digits.len().min(8));
    let suffix = format!("-{date}-{time}");
    let keep = 63usize.saturating_sub(suffix.len());
    format!("{}{suffix}", vm.get(..keep).unwrap_or(vm).trim_end_matches('-'))
}

/// Refuses deleting a snapshot while VMs started from it exist.
pub fn check_deletable(snapshot: &SnapshotRecord, forks: &[String]) -> Result<(), SnapshotsError> {
    if forks.is_empty() {
        return Ok(());
    }
    Err(SnapshotsError::HasForks { snapshot: snapshot.name.clone(), forks: forks.to_vec() })
}

/// The spec of a fork of `snapshot`: the snapshot's shape; the request may repeat it but not
/// change it. `allow_vm_traffic` is the request's, else `default_allow`.
pub fn fork_spec(
    snapshot: &SnapshotRecord,
    req: &CreateVmRequest,
    default_allow: bool,
) -> Result<VmSpec, SnapshotsError> {
    let differs = |what: &str, asked: String, have: String| SnapshotsError::ForkDiffers {
        snapshot: snapshot.name.clone(),
        what: what.to_owned(),
        have,
        asked,
    };
    let same = |what: &str, asked: Option<String>, have: String| match asked {
        Some(asked) if asked != have => Err(differs(what, asked, have)),
        _ => Ok(()),
    };
    same("image", req.image.clone(), snapshot.image.clone())?;
    same("kernel", req.kernel.clone(), snapshot.kernel.clone())?;
    same("vcpus", req.vcpus.map(|v| v.to_string()), snapshot.vcpus.to_string())?;
    same("memory in MiB", req.memory_mib.map(|v| v.to_string()), snapshot.memory_mib.to_string())?;
    same("disk in MiB", req.disk_mib.map(|v| v.to_string()), snapshot.disk_mib.to_string())?;
    same("network choice", req.network.map(|v| v.to_string()), snapshot.network.to_string())?;
    let vmm = req.vmm.map(banger_core::config::VmmChoice::from);
    if let Some(vmm) = vmm.filter(|v| *v != banger_core::config::VmmChoice::Auto) {
        same("vmm", Some(vmm.to_string()), snapshot.vmm.to_string())?;
    }
    if req.allow_vm_traffic == Some(true) && !snapshot.network {
        return Err(SnapshotsError::NoNetwork(snapshot.name.clone()));
    }
    Ok(VmSpec {
        image: snapshot.image.clone(),
        kernel: snapshot.kernel.clone(),
        vcpus: snapshot.vcpus,
        memory_mib: snapshot.memory_mib,
        disk_mib: snapshot.disk_mib,
        vmm: snapshot.vmm,
        network: snapshot.network,
        allow_vm_traffic: snapshot.network && req.allow_vm_traffic.unwrap_or(default_allow),
    })
}

/// The guest NIC a fork gets: its MAC, address with prefix, and the gateway (also its DNS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkNic {
    /// MAC address.
    pub mac: String,
    /// `ADDR/PREFIX`.
    pub cidr: String,
    /// Gateway and name server.
    pub gateway: String,
}

/// What the agent of a fork restored from a snapshot is told to become.
pub fn fork_identity(
    vm: &VmRecord,
    now_unix_ms: u64,
    nic: Option<&ForkNic>,
    host_key: HostKey,
    machine_id: String,
) -> Identity {
    Identity {
        time_unix_ms: now_unix_ms,
        hostname: Some(vm.name.clone()),
        net: nic.map(|n| NetIdentity {
            mac: n.mac.clone(),
            cidr: n.cidr.clone(),
            gateway: Some(n.gateway.clone()),
            dns: Some(n.gateway.clone()),
        }),
        host_key: Some(host_key),
        machine_id: Some(machine_id),
    }
}

/// A fresh machine id: 32 lowercase hex digits.
pub fn new_machine_id() -> String {
    format!("{}{}", new_id(), new_id())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// What a warm-start snapshot stands for: everything a cold boot's result depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmParts<'a> {
    /// The spec (image, kernel, shape, VMM, network).
    pub spec: &'a VmSpec,
    /// The image's identity (its creation time and digest).
    pub image_version: String,
    /// The kernel's identity (its release and creation time).
    pub kernel_version: String,
    /// The agent binary's digest.
    pub agent_digest: String,
    /// The guest files written at boot: the git identity and `sync_files`.
    pub guest_files: String,
}

/// The warm-start key of `parts`: a digest, stable across daemon restarts.
pub fn warm_key(parts: &WarmParts<'_>) -> String {
    let s = parts.spec;
    let text = format!(
        "v1|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
        s.image,
        parts.image_version,
        s.kernel,
        parts.kernel_version,
        s.vcpus,
        s.memory_mib,
        s.disk_mib,
        s.vmm.as_str(),
        s.network,
        parts.agent_digest,
        parts.guest_files
    );
    fnv64(text.as_bytes())
}

/// FNV-1a, 64 bits, as hex: stable across builds (unlike `DefaultHasher`).
fn fnv64(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Bytes the files directly in `dir` take on disk.
fn dir_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
        .unwrap_or(0)
}

/// The spare disk slots (`banger_vmm::slots`) in `from` to copy to `to`, as path strings:
/// they are disks like the work disk (an attached workspace lives on one).
fn slot_copies(from: &Path, to: &Path) -> Vec<(String, String)> {
    (0..banger_vmm::slots::QEMU_SLOTS)
        .map(|i| (banger_vmm::slots::slot_file(from, i), banger_vmm::slots::slot_file(to, i)))
        .filter(|(src, _)| src.is_file())
        .map(|(src, dest)| (src.display().to_string(), dest.display().to_string()))
        .collect()
}

fn control_failure(vm: &VmRecord, what: &'static str) -> impl FnOnce(banger_vmm::ControlError) -> SnapshotsError {
    let name = vm.name.clone();
    move |source| SnapshotsError::Control { what, vm: name, source }
}

/// The snapshots service.
pub struct Snapshots {
    fleet: Arc<Fleet>,
    ssh: Arc<Ssh>,
    artifacts: Arc<Artifacts>,
}

impl Snapshots {
    /// The service over `fleet`, with its collaborators.
    pub fn new(fleet: Arc<Fleet>, ssh: Arc<Ssh>, artifacts: Arc<Artifacts>) -> Self {
        Self { fleet, ssh, artifacts }
    }

    /// Snapshot `reference`, by name, id or id prefix.
    pub fn find(&self, reference: &str) -> Result<SnapshotRecord, SnapshotsError> {
        self.fleet.store.find_snapshot(reference).map_err(|e| match e {
            StoreError::NotFound { .. } => SnapshotsError::NotFound(reference.to_owned()),
            e => e.into(),
        })
    }

    /// The control socket of running VM `vm`, or why it has none.
    fn control_socket(&self, vm: &VmRecord) -> Result<PathBuf, SnapshotsError> {
        let handles = self.fleet.handles.get(vm).filter(|_| self.fleet.alive(vm));
        let control =
            handles.and_then(|h| h.control_socket).ok_or_else(|| FleetError::NotRunning { vm: vm.name.clone() })?;
        Ok(PathBuf::from(control))
    }

    /// Pauses a running VM's vCPUs.
    pub async fn pause_vm(&self, reference: &str) -> Result<VmRecord, SnapshotsError> {
        let id = self.fleet.store.find_vm(reference)?.id;
        let _guard = self.fleet.locks.lock(&id).await;
        let mut vm = self.fleet.store.find_vm(&id)?;
        let control = self.control_socket(&vm)?;
        let next = transition(vm.state, &VmEvent::Pause)?;
        self.fleet.driver(vm.spec.vmm).pause(&control).await.map_err(control_failure(&vm, "pause"))?;
        vm.state = next;
        vm.updated_at = banger_core::time::now_rfc3339();
        self.fleet.store.update_vm(&vm)?;
        tracing::info!(vm = %vm.name, "vm paused");
        Ok(vm)
    }

    /// Resumes a paused VM, then sets its clock (it stood still while paused).
    pub async fn resume_vm(&self, reference: &str) -> Result<VmRecord, SnapshotsError> {
        let id = self.fleet.store.find_vm(reference)?.id;
        let vm = {
            let _guard = self.fleet.locks.lock(&id).await;
            let mut vm = self.fleet.store.find_vm(&id)?;
            let control = self.control_socket(&vm)?;
            let next = transition(vm.state, &VmEvent::Resume)?;
            self.fleet.driver(vm.spec.vmm).resume(&control).await.map_err(control_failure(&vm, "resume"))?;
            vm.state = next;
            vm.updated_at = banger_core::time::now_rfc3339();
            self.fleet.store.update_vm(&vm)?;
            vm
        };
        self.correct_clock(&vm).await;
        tracing::info!(vm = %vm.name, "vm resumed");
        Ok(vm)
    }

    /// Asks `vm`'s agent to zero its free memory, so a snapshot leaves it out (best effort: a
    /// failure is logged and the snapshot is only larger).
    async fn scrub_free_memory(&self, vm: &VmRecord) {
        let t = Instant::now();
        match self.fleet.agent_for(vm).call(&AgentRequest::ScrubFreeMemory, SCRUB_TIMEOUT).await {
            Ok(_) => tracing::debug!(vm = %vm.name, elapsed_ms = t.elapsed().as_millis(), "free guest memory scrubbed"),
            Err(e) => tracing::warn!(vm = %vm.name, error = %chain(&e), "cannot scrub free guest memory"),
        }
    }

    /// Sets a resumed guest's clock to the host's (best effort: a failure is logged).
    pub async fn correct_clock(&self, vm: &VmRecord) {
        let request = AgentRequest::Reidentify(Identity { time_unix_ms: now_unix_ms(), ..Default::default() });
        if let Err(e) = self.fleet.agent_for(vm).call(&request, CLOCK_TIMEOUT).await {
            tracing::warn!(vm = %vm.name, error = %chain(&e), "cannot set the guest clock");
        }
    }

    /// The request that gives fork `vm`, just restored and resumed, its own identity (and sets
    /// its clock). Applying it twice is harmless, so it doubles as the readiness probe.
    pub fn fork_identity_request(&self, vm: &VmRecord, nic: Option<&ForkNic>) -> Result<AgentRequest, SnapshotsError> {
        let key = self.ssh.vm_host_key(vm)?;
        let private_key = std::fs::read_to_string(&key.private)
            .map_err(|source| SnapshotsError::Read { path: key.private.clone(), source })?;
        let host_key = HostKey { private_key, public_key: key.line };
        Ok(AgentRequest::Reidentify(fork_identity(vm, now_unix_ms(), nic, host_key, new_machine_id())))
    }

    /// The API view of a snapshot.
    pub fn snapshot_view(&self, record: SnapshotRecord) -> Result<SnapshotView, SnapshotsError> {
        let forks = self.fleet.store.snapshot_forks(&record.id)?;
        Ok(SnapshotView { record: record.into(), forks })
    }

    /// The name of the snapshot VM `vm_id` was forked from, if any.
    pub fn origin_snapshot_name(&self, vm_id: &str) -> Option<String> {
        let origin = self.fleet.store.vm_origin(vm_id).ok().flatten()?;
        self.fleet.store.find_snapshot(&origin).ok().map(|s| s.name)
    }

    /// Snapshots running (or paused) VM `reference` as `name` (default `VM-YYYYMMDD-HHMMSS`).
    pub async fn snapshot_vm(&self, reference: &str, name: Option<String>) -> Result<SnapshotView, SnapshotsError> {
        let source = self.fleet.store.find_vm(reference)?;
        let name = name.unwrap_or_else(|| default_snapshot_name(&source.name, &banger_core::time::now_rfc3339()));
        validate_name(&name).map_err(SnapshotsError::InvalidName)?;
        let record = self.take_snapshot(&source.id, &name, None).await?;
        self.snapshot_view(record)
    }

    /// Takes snapshot `name` of VM `id` (a warm-start one with `warm_key`).
    pub async fn take_snapshot(
        &self,
        id: &str,
        name: &str,
        warm_key: Option<String>,
    ) -> Result<SnapshotRecord, SnapshotsError> {
        let started = Instant::now();
        // Guest I/O, so before the VM lock: zero the free memory the snapshot would save.
        let before = self.fleet.store.find_vm(id)?;
        if before.state == ObservedState::Running {
            self.scrub_free_memory(&before).await;
        }
        let guard = self.fleet.locks.lock(id).await;
        let vm = self.fleet.store.find_vm(id)?;
        let control = self.control_socket(&vm)?;
        if !matches!(vm.state, ObservedState::Running | ObservedState::Paused) {
            return Err(SnapshotsError::NotSnapshottable { vm: vm.name, state: vm.state.as_str() });
        }
        let was_paused = vm.state == ObservedState::Paused;
        let sid = new_id();
        let mut record = SnapshotRecord {
            name: name.to_owned(),
            source_vm_id: vm.id.clone(),
            source_vm_name: vm.name.clone(),
            image: vm.spec.image.clone(),
            kernel: vm.spec.kernel.clone(),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            disk_mib: vm.spec.disk_mib,
            vmm: vm.spec.vmm,
            network: vm.spec.network,
            dir: self.fleet.layout.state_dir.join("snapshots").join(&sid).display().to_string(),
            size_bytes: 0,
            warm_key,
            created_at: banger_core::time::now_rfc3339(),
            id: sid,
        };
        // Intent first: a row that says "being made" (never chosen, listed or forked) holds the
        // name; the files follow; the row is marked complete last. A crash in between leaves a
        // row the start-up sweep rolls back, never a complete-looking snapshot without files.
        {
            let _claim = self.fleet.reservations.claim();
            self.fleet.store.insert_snapshot_as(&record, Some(Pending::Making))?;
        }
        let written = self.write_snapshot(&vm, &control, &record, was_paused).await;
        drop(guard);
        if !was_paused {
            self.correct_clock(&vm).await;
        }
        let completed = match written {
            Ok(size) => self.complete_snapshot(&record.id, size).map(|()| size),
            Err(e) => Err(e),
        };
        match completed {
            Ok(size) => {
                record.size_bytes = size;
                tracing::info!(vm = %vm.name, snapshot = %record.name, size, elapsed_ms = started.elapsed().as_millis(),
                    "snapshot taken");
                Ok(record)
            }
            Err(e) => {
                // Files first, the row (still "being made") last.
                if let Err(r) = remove_dir(Path::new(&record.dir)) {
                    tracing::error!(snapshot = %record.name, error = %r, "cannot remove a failed snapshot's files");
                } else if let Err(d) = self.fleet.store.remove_row(Table::Snapshots, &record.id) {
                    tracing::error!(snapshot = %record.name, error = %chain(&d), "cannot roll back snapshot row");
                }
                Err(e)
            }
        }
    }

    /// Publishes snapshot `id`: its files are all written.
    fn complete_snapshot(&self, id: &str, size: u64) -> Result<(), SnapshotsError> {
        crate::failpoint!(self.fleet, "snapshot.files");
        self.fleet.store.complete_snapshot(id, size)?;
        Ok(())
    }

    /// Pause (unless paused), state, disk copies, resume (unless it was paused). Returns the
    /// bytes written. Called with the VM's lock held.
    async fn write_snapshot(
        &self,
        vm: &VmRecord,
        control: &Path,
        record: &SnapshotRecord,
        was_paused: bool,
    ) -> Result<u64, SnapshotsError> {
        crate::failpoint!(self.fleet, "snapshot.intent");
        let dir = PathBuf::from(&record.dir);
        banger_host::paths::ensure_dir(&dir, 0o700)
            .map_err(|source| SnapshotsError::Dir { path: dir.clone(), source })?;
        let driver = self.fleet.driver(vm.spec.vmm);
        if !was_paused {
            driver.pause(control).await.map_err(control_failure(vm, "pause"))?;
        }
        let paths = record.paths();
        let saved = async {
            let t = Instant::now();
            driver.snapshot(control, Path::new(&paths.state)).await.map_err(control_failure(vm, "snapshot"))?;
            crate::failpoint!(self.fleet, "snapshot.state");
            let state_ms = t.elapsed().as_millis();
            let from = vm.paths();
            let mut copies =
                vec![(from.overlay_disk, paths.overlay_disk.clone()), (from.work_disk, paths.work_disk.clone())];
            copies.extend(slot_copies(Path::new(&vm.vm_dir), &dir));
            let t = Instant::now();
            tokio::task::spawn_blocking(move || -> Result<(), CopyError> {
                for (src, dest) in copies {
                    banger_image::seed::copy_disk(Path::new(&src), Path::new(&dest))
                        .map_err(|source| CopyError::Disk { src, source })?;
                }
                Ok(())
            })
            .await?
            .map_err(|e| SnapshotsError::Copy(Box::new(e)))?;
            tracing::debug!(vm = %vm.name, state_ms, disks_ms = t.elapsed().as_millis(), "snapshot files written");
            Ok::<(), SnapshotsError>(())
        }
        .await;
        if !was_paused {
            if let Err(e) = driver.resume(control).await {
                let failure = control_failure(vm, "resume")(e);
                tracing::error!(vm = %vm.name, error = %chain(&failure), "cannot resume after the snapshot");
                saved?;
                return Err(failure);
            }
        }
        saved?;
        let dir2 = dir.clone();
        Ok(tokio::task::spawn_blocking(move || dir_usage(&dir2)).await?)
    }

    /// Every snapshot.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotView>, SnapshotsError> {
        self.fleet.store.list_snapshots()?.into_iter().map(|s| self.snapshot_view(s)).collect()
    }

    /// Deletes a snapshot no VM was started from: marks its row "being deleted" (it is no
    /// longer found), removes its files, then the row. A crash in between is finished by the
    /// start-up sweep; a failure to remove the files keeps the mark for it.
    pub async fn delete_snapshot(&self, reference: &str) -> Result<SnapshotView, SnapshotsError> {
        let record = {
            let _claim = self.fleet.reservations.claim();
            let record = self.find(reference)?;
            check_deletable(&record, &self.fleet.store.snapshot_forks(&record.id)?)?;
            self.fleet.store.set_pending(Table::Snapshots, &record.id, Some(Pending::Deleting))?;
            record
        };
        let removed = self.remove_snapshot_files(&record).await;
        if let Err(e) = removed {
            tracing::warn!(snapshot = %record.name, dir = %record.dir, error = %chain(&e),
                "cannot remove snapshot files; the next start-up finishes the delete");
            return Err(e);
        }
        self.fleet.store.remove_row(Table::Snapshots, &record.id)?;
        tracing::info!(snapshot = %record.name, "snapshot deleted");
        Ok(SnapshotView { record: record.into(), forks: Vec::new() })
    }

    async fn remove_snapshot_files(&self, record: &SnapshotRecord) -> Result<(), SnapshotsError> {
        crate::failpoint!(self.fleet, "snapshot.delete.marked");
        let dir = PathBuf::from(&record.dir);
        let dir2 = dir.clone();
        tokio::task::spawn_blocking(move || remove_dir(&dir2))
            .await?
            .map_err(|source| SnapshotsError::Remove { path: dir, source })?;
        crate::failpoint!(self.fleet, "snapshot.delete.files");
        self.fleet.driver(record.vmm).release_unused_snapshot_memory();
        Ok(())
    }

    /// Copies snapshot `snapshot`'s disks into new fork `vm`'s dir and links its state there
    /// for the first start.
    pub async fn copy_snapshot_into(&self, snapshot: &SnapshotRecord, vm: &VmRecord) -> Result<(), SnapshotsError> {
        crate::failpoint!(self.fleet, "vm.fork.copy");
        let (from, to) = (snapshot.paths(), vm.paths());
        let restore = Path::new(&vm.vm_dir).join(RESTORE_STATE);
        let (snapshot_dir, fork_dir) = (snapshot.dir.clone(), vm.vm_dir.clone());
        tokio::task::spawn_blocking(move || -> Result<(), CopyError> {
            let slots = slot_copies(Path::new(&snapshot_dir), Path::new(&fork_dir));
            for (src, dest) in
                [(from.overlay_disk, to.overlay_disk), (from.work_disk, to.work_disk)].into_iter().chain(slots)
            {
                banger_image::seed::copy_disk(Path::new(&src), Path::new(&dest))
                    .map_err(|source| CopyError::Disk { src, source })?;
            }
            // The state (and the memory and devices files beside it) is only read: a hard link
            // costs nothing (a copy across file systems).
            let state = PathBuf::from(&from.state);
            let memory = banger_vmm::snapshot_memory_file(&state);
            let devices = banger_vmm::snapshot_devices_file(&state);
            let mut files = vec![(state, restore.clone())];
            if memory.is_file() {
                files.push((memory, banger_vmm::snapshot_memory_file(&restore)));
            }
            if devices.is_file() {
                files.push((devices, banger_vmm::snapshot_devices_file(&restore)));
            }
            for (src, dest) in files {
                if std::fs::hard_link(&src, &dest).is_err() {
                    std::fs::copy(&src, &dest).map_err(|source| CopyError::State { src: src.clone(), source })?;
                }
            }
            Ok(())
        })
        .await?
        .map_err(|source| SnapshotsError::Fork { snapshot: snapshot.name.clone(), source: Box::new(source) })
    }

    /// The warm-start key for `spec` and the caller's git identity, when its image and kernel
    /// exist (before their first build nothing can be warm).
    pub fn warm_key_for(
        &self,
        spec: &VmSpec,
        git: Option<&banger_proto::GitIdentity>,
    ) -> Result<Option<String>, SnapshotsError> {
        let Some(image) = self.fleet.store.get_image(&spec.image)? else { return Ok(None) };
        let Some(kernel) = self.fleet.store.list_kernels()?.into_iter().find(|k| k.name == spec.kernel) else {
            return Ok(None);
        };
        let (_, agent_digest) = self.artifacts.agent()?;
        let git = git.map(|g| format!("{:?}/{:?}", g.name, g.email)).unwrap_or_default();
        let parts = WarmParts {
            spec,
            image_version: format!("{}/{}", image.created_at, image.sha256.unwrap_or_default()),
            kernel_version: format!("{}/{}", kernel.release, kernel.created_at),
            agent_digest,
            guest_files: format!("{git}|{}", self.fleet.config.sync_files.join(",")),
        };
        Ok(Some(warm_key(&parts)))
    }

    /// The warm-start snapshot for `key`, if one is kept.
    pub fn warm_snapshot(&self, key: &str) -> Result<Option<SnapshotRecord>, SnapshotsError> {
        Ok(self.fleet.store.find_warm_snapshot(key)?)
    }

    /// Snapshots `vm`, freshly booted, as the warm-start snapshot of `key`, then deletes the
    /// warm snapshots of the same image, kernel and shape that `key` replaces (those no fork
    /// uses).
    pub async fn make_warm_snapshot(&self, vm: &VmRecord, key: &str) -> Result<SnapshotRecord, SnapshotsError> {
        let name = format!("warm-{key}");
        let record = self.take_snapshot(&vm.id, &name, Some(key.to_owned())).await?;
        let stale: Vec<SnapshotRecord> = self
            .fleet
            .store
            .list_snapshots()?
            .into_iter()
            .filter(|s| s.is_warm() && s.id != record.id)
            .filter(|s| s.image == record.image && s.kernel == record.kernel)
            .filter(|s| s.vcpus == record.vcpus && s.memory_mib == record.memory_mib)
            .collect();
        for s in stale {
            match self.delete_snapshot(&s.id).await {
                Ok(_) => tracing::info!(snapshot = %s.name, "stale warm-start snapshot deleted"),
                Err(e) => tracing::debug!(snapshot = %s.name, error = %chain(&e), "stale warm-start snapshot kept"),
            }
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_core::config::VmmKind;
    use banger_proto::VmmChoice;

    fn snapshot() -> SnapshotRecord {
        SnapshotRecord {
            id: "0123456789abcdef".into(),
            name: "base".into(),
            source_vm_id: "fedcba9876543210".into(),
            source_vm_name: "web".into(),
            image: "debian-bookworm".into(),
            kernel: "debian-6.1-cloud".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 2048,
            vmm: VmmKind::Qemu,
            network: true,
            dir: "/s/snapshots/0123456789abcdef".into(),
            size_bytes: 0,
            warm_key: None,
            created_at: "2026-11-22T17:00:00Z".into(),
        }
    }

    fn vm(name: &str) -> VmRecord {
        VmRecord {
            id: "aaaaaaaaaaaaaaaa".into(),
            name: name.into(),
            spec: fork_spec(&snapshot(), &CreateVmRequest::default(), false).expect("spec"),
            desired_state: banger_core::DesiredState::Running,
            state: ObservedState::Starting,
            guest_ip: Some("172.30.0.7".into()),
            vm_dir: "/s/vms/aaaaaaaaaaaaaaaa".into(),
            created_at: "t".into(),
            updated_at: "t".into(),
            last_error: None,
        }
    }

    #[test]
    fn forks_take_the_snapshot_shape_and_refuse_another() {
        let s = snapshot();
        let spec = fork_spec(&s, &CreateVmRequest::default(), true).expect("spec");
        assert_eq!((spec.vcpus, spec.memory_mib, spec.disk_mib), (1, 512, 2048));
        assert_eq!((spec.image.as_str(), spec.network, spec.allow_vm_traffic), ("debian-bookworm", true, true));
        let same = CreateVmRequest {
            vcpus: Some(1),
            memory_mib: Some(512),
            vmm: Some(VmmChoice::Auto),
            allow_vm_traffic: Some(false),
            ..Default::default()
        };
        assert!(!fork_spec(&s, &same, true).expect("same shape").allow_vm_traffic);
        for bad in [
            CreateVmRequest { memory_mib: Some(1024), ..Default::default() },
            CreateVmRequest { image: Some("minimal".into()), ..Default::default() },
            CreateVmRequest { network: Some(false), ..Default::default() },
            CreateVmRequest { vmm: Some(VmmChoice::Firecracker), ..Default::default() },
        ] {
            let e = fork_spec(&s, &bad, false).expect_err("refused");
            assert!(matches!(e, SnapshotsError::ForkDiffers { .. }), "{e}");
            assert!(e.to_string().contains("omit it"), "{e}");
        }
        let no_net = SnapshotRecord { network: false, ..snapshot() };
        let open = CreateVmRequest { allow_vm_traffic: Some(true), ..Default::default() };
        assert!(fork_spec(&no_net, &open, false).is_err());
        assert!(!fork_spec(&no_net, &CreateVmRequest::default(), true).expect("spec").allow_vm_traffic);
    }

    #[test]
    fn deletion_is_refused_while_forks_exist() {
        let s = snapshot();
        check_deletable(&s, &[]).expect("no forks");
        let e = check_deletable(&s, &["fork-a".into(), "fork-b".into()]).expect_err("forks");
        assert!(matches!(e, SnapshotsError::HasForks { .. }));
        assert_eq!(
            e.to_string(),
            "snapshot 'base' has forks (fork-a, fork-b); delete them first with `banger vm delete fork-a fork-b`"
        );
    }

    #[test]
    fn a_fork_identity_carries_name_nic_key_and_time() {
        let nic =
            ForkNic { mac: "52:54:00:12:34:56".into(), cidr: "172.30.0.7/24".into(), gateway: "172.30.0.1".into() };
        let key = HostKey { private_key: "KEY".into(), public_key: "ssh-ed25519 AAAA root@fork-a".into() };
        let id = fork_identity(&vm("fork-a"), 1_700_000_000_123, Some(&nic), key.clone(), "ab".repeat(16));
        assert_eq!(id.time_unix_ms, 1_700_000_000_123);
        assert_eq!(id.hostname.as_deref(), Some("fork-a"));
        let net = id.net.expect("net");
        assert_eq!((net.mac.as_str(), net.cidr.as_str()), ("52:54:00:12:34:56", "172.30.0.7/24"));
        assert_eq!((net.gateway.as_deref(), net.dns.as_deref()), (Some("172.30.0.1"), Some("172.30.0.1")));
        assert_eq!(id.host_key, Some(key.clone()));
        assert_eq!(id.machine_id.as_deref(), Some("abababababababababababababababab"));
        let offline = fork_identity(&vm("quiet"), 1, None, key, new_machine_id());
        assert!(offline.net.is_none());
        let mid = offline.machine_id.expect("machine id");
        assert!(mid.len() == 32 && mid.bytes().all(|b| b.is_ascii_hexdigit()), "{mid}");
        assert_ne!(new_machine_id(), new_machine_id());
    }

    #[test]
    fn default_names_are_labels_with_the_time() {
        assert_eq!(default_snapshot_name("web", "2026-11-22T17:05:09Z"), "web-20261122-170509");
        let long = "a".repeat(63);
        let name = default_snapshot_name(&long, "2026-11-22T17:05:09.123Z");
        assert_eq!(name.len(), 63);
        validate_name(&name).expect("a valid label");
    }

    #[test]
    fn warm_keys_change_with_every_part() {
        let spec = vm("x").spec;
        let parts = WarmParts {
            spec: &spec,
            image_version: "t1/sha".into(),
            kernel_version: "6.1/t".into(),
            agent_digest: "d1".into(),
            guest_files: String::new(),
        };
        let key = warm_key(&parts);
        assert_eq!(key, warm_key(&parts.clone()), "stable");
        assert_eq!(key.len(), 16);
        let bigger = VmSpec { memory_mib: 1024, ..spec.clone() };
        let more_cpus = VmSpec { vcpus: 2, ..spec.clone() };
        for other in [
            WarmParts { agent_digest: "d2".into(), ..parts.clone() },
            WarmParts { image_version: "t2/sha".into(), ..parts.clone() },
            WarmParts { kernel_version: "6.2/t".into(), ..parts.clone() },
            WarmParts { guest_files: "git".into(), ..parts.clone() },
            WarmParts { spec: &bigger, ..parts.clone() },
            WarmParts { spec: &more_cpus, ..parts.clone() },
        ] {
            assert_ne!(warm_key(&other), key, "{other:?}");
        }
    }
}
