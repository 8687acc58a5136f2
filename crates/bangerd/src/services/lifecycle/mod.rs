//! Booting and stopping VMs. Locks are held only to check and publish state: the VM lock is
//! released while the VMM boots, the agent comes up, or the guest shuts down.
//!
//! Start: `Starting` is published under the VM lock; then, unlocked: kernel and image (pulled or
//! built when missing), the overlay disk, the initramfs, the VMM launch (its handles are
//! published at once, so a daemon crash from here on leaves an adoptable VM), and the wait for the
//! agent (and for the ports its image declares, [`ports`]). Finally `Running` is published under the lock — unless a stop came in meanwhile.
//!
//! Stop: `Stopping` under the lock; then the agent is asked to power off, then the VMM is told to
//! quit, then killed; finally the handles are released and `Stopped` published.
//!
//! A monitor task per running VM notices a VMM that exits on its own (guest poweroff, crash,
//! kill) and cleans up after it.

pub mod memory;
mod ports;
mod provision;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_core::vm::{transition, VmEvent};
use banger_core::{DesiredState, ObservedState, OperationRecord, VmRecord};
use banger_host::VmHandles;
use banger_proto::agent::AgentRequest;
use banger_proto::GitIdentity;
use banger_vmm::{DiskSpec, LaunchSpec, NetSpec};
use tokio::sync::watch;

use banger_core::error_chain as chain;
use banger_store::StoreError;

pub use self::provision::{ArtifactProvision, Prepared, Provision, ProvisionFuture};
use crate::handles::ReconcileReport;
use crate::ops::{CancelFlag, Cancelled, OpHandle};
use crate::services::artifacts::ArtifactsError;
use crate::services::forwards::Forwards;
use crate::services::net::{Net, NetError};
use crate::services::sessions::Sessions;
use crate::services::snapshots::{ForkNic, Snapshots, SnapshotsError};
use crate::services::ssh::SshError;
use crate::services::{Fleet, FleetError};

/// Why a start or stop failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The operation registry.
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
    /// The store failed, or has no such VM.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM could not be reached or published.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The VM's state does not allow it.
    #[error(transparent)]
    Transition(#[from] banger_core::TransitionError),
    /// It runs already.
    #[error("vm '{0}' is already running")]
    AlreadyRunning(String),
    /// A stop overtook the start.
    #[error("vm '{0}' was stopped while it booted")]
    StoppedWhileBooting(String),
    /// The start was cancelled.
    #[error("start cancelled")]
    Cancelled,
    /// Its kernel, image, disks or initramfs.
    #[error(transparent)]
    Artifacts(#[from] ArtifactsError),
    /// Its keys or guest files.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// Its snapshot (a fork's first start).
    #[error(transparent)]
    Snapshots(#[from] SnapshotsError),
    /// Its guest address.
    #[error(transparent)]
    Address(NetError),
    /// Its NIC.
    #[error("cannot set up the guest network; check `banger doctor`, or create the vm with --no-network")]
    Network(#[source] NetError),
    /// The VMM did not start.
    #[error(transparent)]
    Launch(#[from] banger_vmm::LaunchError),
    /// Its handles could not be written.
    #[error(transparent)]
    Handles(#[from] banger_host::handles::HandlesError),
    /// A restored fork could not be resumed.
    #[error("cannot resume restored vm '{vm}'")]
    Resume {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: banger_vmm::ControlError,
    },
    /// The guest did not come up.
    #[error("vm '{vm}' {what}: {why}; last console lines:\n{console}")]
    NotReady {
        /// The VM.
        vm: String,
        /// "did not become ready" or "did not take its own identity".
        what: &'static str,
        /// Why the wait ended.
        why: String,
        /// The end of its console log.
        console: String,
    },
    /// A port the image declares did not answer.
    #[error("vm '{vm}': guest port {port} (declared by its image) did not answer: {why}; see the service's log in /var/log/banger/ with `banger vm exec {vm} -- ls /var/log/banger`")]
    PortNotReady {
        /// The VM.
        vm: String,
        /// The port.
        port: u16,
        /// Why the wait ended.
        why: String,
    },
    /// Its VMM outlived the stop.
    #[error("vm '{0}' is still running after stop")]
    StillRunning(String),
    /// A test's injected failure.
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

impl From<Cancelled> for LifecycleError {
    fn from(_: Cancelled) -> Self {
        Self::Cancelled
    }
}

/// How long a guest may take to power off when asked.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Console lines quoted in boot errors (stored with the VM and shown in every list).
const CONSOLE_TAIL: usize = 15;
/// Longest console line quoted in a boot error, in bytes: 15 of them stay under 8 KiB.
const CONSOLE_TAIL_LINE: usize = 512;
/// Bytes of the console log a boot error's tail is taken from.
const CONSOLE_TAIL_BYTES: u64 = 64 << 10;

/// Removes the memory file of a VMM that did not start (one that answered has it unlinked by
/// the driver already).
fn remove_memory_file(vm: &VmRecord, file: Option<&Path>) {
    if let Some(file) = file {
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(vm = %vm.name, file = %file.display(), error = %e, "cannot remove the memory file");
            }
            _ => {}
        }
    }
}

/// The last `n` lines of a guest-written text file, each cut to `max_line` bytes, read from
/// its last `max_bytes` bytes: never the whole file (see `banger_vmm::logfile`).
pub fn tail_lines(path: &Path, n: usize, max_line: usize, max_bytes: u64) -> String {
    banger_vmm::logfile::tail_lines(path, n, max_line, max_bytes)
}

/// Rotates a running VM's console log, or its VMM's stderr, once it passes `cap` (the guest
/// decides how much is written; see `banger_vmm::logfile`). A stat per call; the copy runs off
/// the runtime.
async fn keep_capped(vm: &str, log: &Path, cap: u64) {
    use banger_vmm::logfile::rotate_if_over;
    if std::fs::metadata(log).map_or(true, |m| m.len() <= cap) {
        return;
    }
    let path = log.to_owned();
    match tokio::task::spawn_blocking(move || rotate_if_over(&path, cap)).await {
        Ok(Ok(rotated)) => {
            if rotated {
                tracing::debug!(vm, log = %log.display(), "log rotated");
            }
        }
        Ok(Err(e)) => tracing::warn!(vm, log = %log.display(), error = %e, "cannot rotate the log"),
        Err(e) => tracing::warn!(vm, error = %e, "log rotation task failed"),
    }
}

/// The lifecycle service: start, stop, boot, and the monitors of running VMs.
pub struct Lifecycle {
    fleet: Arc<Fleet>,
    net: Arc<Net>,
    forwards: Arc<Forwards>,
    provision: Arc<dyn Provision>,
    sessions: Arc<Sessions>,
    snapshots: Arc<Snapshots>,
    /// Starts in flight, by VM id (a leaf lock): how a stop cancels one and waits for its end.
    starts: std::sync::Mutex<HashMap<String, InFlight>>,
}

/// A start in flight.
struct InFlight {
    /// Its operation's cancel flag.
    cancel: Arc<CancelFlag>,
    /// Turns true when the start has ended (and ended what it launched).
    done: watch::Receiver<bool>,
}

/// Unregisters a start when it ends, however it ends, and wakes the stops waiting for it.
struct Ending<'a> {
    starts: &'a std::sync::Mutex<HashMap<String, InFlight>>,
    id: String,
    done: watch::Sender<bool>,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.starts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.id);
        let _ = self.done.send(true);
    }
}

impl Lifecycle {
    /// The service, wired to its collaborators: the guest network, the forwards it activates
    /// when a VM runs, what a boot needs, the sessions it fails when a VM stops, and the
    /// snapshots a fork's first start restores.
    pub fn new(
        fleet: Arc<Fleet>,
        net: Arc<Net>,
        forwards: Arc<Forwards>,
        provision: Arc<dyn Provision>,
        sessions: Arc<Sessions>,
        snapshots: Arc<Snapshots>,
    ) -> Arc<Self> {
        Arc::new(Self { fleet, net, forwards, provision, sessions, snapshots, starts: Default::default() })
    }

    /// Starts a VM as an operation; `git` is written to the guest's `~/.gitconfig`.
    pub fn begin_start_vm(
        self: &Arc<Self>,
        reference: &str,
        git: Option<GitIdentity>,
    ) -> Result<OperationRecord, LifecycleError> {
        let vm = self.fleet.store.find_vm(reference)?;
        if self.fleet.alive(&vm) {
            return Err(LifecycleError::AlreadyRunning(vm.name));
        }
        let op = self.fleet.ops.begin("vm.start", &vm.name);
        let snapshot = op.snapshot()?;
        let this = self.clone();
        tokio::spawn(async move {
            match this.start_vm(&op, &vm.id, git.as_ref()).await {
                Ok(vm) => op.succeed(Some(vm.id)),
                Err(LifecycleError::Cancelled) => op.cancelled(),
                Err(e) => op.fail(chain(&e)),
            }
        });
        Ok(snapshot)
    }

    /// Boots VM `id`, reporting stages on `op`.
    pub async fn start_vm(
        self: &Arc<Self>,
        op: &OpHandle,
        id: &str,
        git: Option<&GitIdentity>,
    ) -> Result<VmRecord, LifecycleError> {
        // Publish Starting, and register the start (under the VM lock, where stops look).
        let (vm, _ending) = {
            let guard = self.fleet.locks.lock(id).await;
            let mut vm = self.fleet.store.find_vm(id)?;
            if self.fleet.alive(&vm) {
                return Err(LifecycleError::AlreadyRunning(vm.name));
            }
            vm.state = transition(vm.state, &VmEvent::Start)?;
            vm.desired_state = DesiredState::Running;
            vm.last_error = None;
            vm.updated_at = banger_core::time::now_rfc3339();
            self.fleet.publish(&guard, &vm)?;
            let (done_tx, done_rx) = watch::channel(false);
            let flight = InFlight { cancel: op.cancel_flag(), done: done_rx };
            self.starts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(vm.id.clone(), flight);
            (vm, Ending { starts: &self.starts, id: id.to_owned(), done: done_tx })
        };
        let booted = match self.boot(op, &vm, git).await {
            // Cancelled while the guest came up: end it like any failed start.
            Ok(()) if op.cancel_flag().is_set() => Err(LifecycleError::Cancelled),
            other => other,
        };
        if let Err(e) = booted {
            self.abort_start(&vm, &e).await;
            return Err(e);
        }
        // Publish Running, unless a stop overtook us (then end what was launched: no VMM
        // outlives its VM's `running`).
        let guard = self.fleet.locks.lock(id).await;
        let mut vm = self.fleet.store.find_vm(id)?;
        if vm.state != ObservedState::Starting {
            drop(guard);
            let e = LifecycleError::StoppedWhileBooting(vm.name.clone());
            self.abort_start(&vm, &e).await;
            return Err(e);
        }
        vm.state = transition(vm.state, &VmEvent::Booted)?;
        vm.updated_at = banger_core::time::now_rfc3339();
        self.fleet.publish(&guard, &vm)?;
        self.forwards.activate(&vm).await;
        tracing::info!(vm = %vm.name, "vm running");
        Ok(vm)
    }

    async fn boot(
        self: &Arc<Self>,
        op: &OpHandle,
        vm: &VmRecord,
        git: Option<&GitIdentity>,
    ) -> Result<(), LifecycleError> {
        crate::failpoint!(self.fleet, "vm.start.provision");
        let vm_dir = PathBuf::from(&vm.vm_dir);
        // A fork's first start restores its snapshot: its disks belong to that state as they are.
        let restore = crate::services::snapshots::restore_state(vm);
        let boot = self.provision.prepare(op, vm, git, restore.is_some()).await?;
        let nic = if vm.spec.network {
            op.stage("network")?;
            let ip = self.net.ensure_guest_ip(vm).map_err(LifecycleError::Address)?;
            let nic = self.net.nic_for(vm, ip).await.map_err(LifecycleError::Network)?;
            Some((nic, ip))
        } else {
            None
        };
        let fork_nic = nic.as_ref().map(|(n, ip)| ForkNic {
            mac: n.mac.clone(),
            cidr: format!("{ip}/{}", self.net.subnet().prefix_len()),
            gateway: self.net.subnet().gateway().to_string(),
        });
        let nic = nic.map(|(n, _)| n);
        op.stage(if restore.is_some() { "restore" } else { "boot" })?;
        let mut spec = LaunchSpec::new(&vm.id, &vm.name, &vm_dir, &boot.kernel, boot.initramfs);
        spec.vcpus = vm.spec.vcpus;
        spec.memory_mib = u32::try_from(vm.spec.memory_mib).unwrap_or(u32::MAX);
        spec.kernel_elf = boot.kernel_elf;
        spec.disks =
            vec![DiskSpec::read_only(&boot.base), DiskSpec::writable(&boot.overlay), DiskSpec::writable(&boot.work)];
        spec.kernel_args = vec![
            "banger.root=/dev/vda".into(),
            "banger.overlay=/dev/vdb".into(),
            "banger.work=/dev/vdc".into(),
            format!("banger.hostname={}", vm.name),
            format!("banger.init={}", boot.init_mode.as_str()),
        ];
        // A containerd task's root, given at create (services/container_disk.rs).
        let container = crate::services::container_disk::path_in(&vm_dir);
        if container.exists() {
            spec.disks.push(DiskSpec::writable(container));
            spec.kernel_args.push(format!("banger.container={}", crate::services::container_disk::GUEST_DEVICE));
        }
        if let Some(nic) = &nic {
            spec.kernel_args.extend(nic.kernel_args.iter().cloned());
            spec.net = Some(NetSpec { tap: nic.tap.clone(), mac: nic.mac.clone() });
        }
        // Fresh QEMU boots get a memory file (lazy snapshots); a restore maps its snapshot's
        // memory, or loads a whole state into anonymous memory.
        if restore.is_none() && vm.spec.vmm == banger_core::config::VmmKind::Qemu {
            spec.memory_file = memory::memory_file(Path::new(memory::MEMORY_BASE), &vm.id);
            // Spare disk slots for attach (fast workspace imports; `banger_vmm::slots`).
            spec.slots = banger_vmm::slots::QEMU_SLOTS;
        }
        // A restored guest has the devices it was saved with.
        spec.balloon = restore.is_none() && self.fleet.config.balloon;
        let launching = match &restore {
            Some(state) => self.fleet.driver(vm.spec.vmm).restore(&spec, state).await,
            None => self.fleet.driver(vm.spec.vmm).launch(&spec).await,
        };
        let launched = match launching {
            Ok(launched) => launched,
            Err(e) => {
                if let Some(nic) = &nic {
                    self.net.release_tap(&nic.tap).await;
                }
                remove_memory_file(vm, spec.memory_file.as_deref());
                return Err(e.into());
            }
        };
        let handles = VmHandles {
            pid: Some(launched.pid),
            marker: format!("{}/", vm.vm_dir),
            control_socket: Some(launched.control_socket.display().to_string()),
            agent_socket: Some(launched.agent_socket.display().to_string()),
            tap: nic.as_ref().map(|n| n.tap.clone()),
            scratch_files: vec![
                launched.control_socket.display().to_string(),
                launched.agent_socket.display().to_string(),
                spec.pidfile.display().to_string(),
            ],
        };
        if let Err(e) = self.fleet.handles.publish(vm, handles) {
            // Unpublished handles would leave an orphan: end the VMM while we know its pid.
            let driver = self.fleet.driver(vm.spec.vmm);
            let _ = driver.stop(launched.pid, &vm_dir, &launched.control_socket, Duration::from_secs(5)).await;
            remove_memory_file(vm, spec.memory_file.as_deref());
            if let Some(nic) = &nic {
                self.net.release_tap(&nic.tap).await;
            }
            return Err(e.into());
        }
        crate::failpoint!(self.fleet, "vm.start.launched");
        self.spawn_monitor(vm.clone(), launched.pid);
        // Rules and names are republished (an `nft` run) while the guest comes up; both are
        // done before the VM is reported running.
        let publish = async {
            if nic.is_some() {
                self.net.publish().await;
            }
        };
        let ((), ready) =
            tokio::join!(publish, self.guest_ready(op, vm, &launched, restore.is_some(), fork_nic.as_ref()));
        ready?;
        if restore.is_none() && !boot.wait_ports.is_empty() {
            self.wait_ports(op, vm, &boot.wait_ports).await?;
        }
        crate::failpoint!(self.fleet, "vm.start.ready");
        if let Some(state) = restore {
            // From now on this VM boots like any other. (A VMM that maps the memory file keeps
            // its pages after the unlink.)
            for file in [banger_vmm::snapshot_memory_file(&state), banger_vmm::snapshot_devices_file(&state), state] {
                match std::fs::remove_file(&file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(vm = %vm.name, file = %file.display(), error = %e, "cannot remove the restored state");
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Waits until the just-launched guest is ready: a booted one when its agent answers a
    /// ping; a restored fork (resumed here) once its agent has applied the fork's own identity,
    /// which is the probe.
    async fn guest_ready(
        self: &Arc<Self>,
        op: &OpHandle,
        vm: &VmRecord,
        launched: &banger_vmm::Launched,
        restored: bool,
        fork_nic: Option<&ForkNic>,
    ) -> Result<(), LifecycleError> {
        if restored {
            self.fleet
                .driver(vm.spec.vmm)
                .resume(&launched.control_socket)
                .await
                .map_err(|source| LifecycleError::Resume { vm: vm.name.clone(), source })?;
            tracing::debug!(vm = %vm.name, "resumed");
        }
        let probe = if restored {
            op.stage("identity")?;
            self.snapshots.fork_identity_request(vm, fork_nic)?
        } else {
            op.stage("agent")?;
            AgentRequest::Ping
        };
        let console = launched.console_log.clone();
        let watched = vm.clone();
        let this = self.clone();
        let cancel = op.sink();
        let driver = self.fleet.driver(vm.spec.vmm);
        let waited = self
            .fleet
            .agent_for(vm)
            .wait_answer(&probe, Duration::from_secs(self.fleet.config.boot_timeout_secs), move || {
                if cancel.cancelled() {
                    return Some("cancelled".into());
                }
                (!this.fleet.alive(&watched)).then(|| match driver.exit_reason(Path::new(&watched.vm_dir)) {
                    Some(reason) => format!("the vmm exited during boot: {reason}"),
                    None => "the vmm exited during boot".to_owned(),
                })
            })
            .await;
        match waited {
            Ok(_) => Ok(()),
            Err(_) if op.cancel_flag().is_set() => Err(LifecycleError::Cancelled),
            Err(why) => Err(LifecycleError::NotReady {
                vm: vm.name.clone(),
                what: if restored { "did not take its own identity" } else { "did not become ready" },
                why,
                console: tail_lines(&console, CONSOLE_TAIL, CONSOLE_TAIL_LINE, CONSOLE_TAIL_BYTES),
            }),
        }
    }

    /// Ends a failed or cancelled start: kill what was launched, release, and mark the VM
    /// failed (with the reason) or, when cancelled (a stop), stopped.
    async fn abort_start(&self, vm: &VmRecord, why: &LifecycleError) {
        let cancelled = matches!(why, LifecycleError::Cancelled | LifecycleError::StoppedWhileBooting(_));
        let message = chain(why);
        self.terminate_vmm(vm).await;
        let tap = {
            let guard = self.fleet.locks.lock(&vm.id).await;
            self.forwards.deactivate(vm).await;
            let tap = self.fleet.handles.get(vm).and_then(|h| h.tap);
            self.fleet.handles.release(vm);
            self.fleet.drop_agent(vm);
            self.sessions.fail_open(&vm.id);
            if let Ok(mut now) = self.fleet.store.find_vm(&vm.id) {
                if cancelled {
                    now.state = ObservedState::Stopped;
                } else {
                    now.state = ObservedState::Failed;
                    now.last_error = Some(message.clone());
                }
                now.desired_state = DesiredState::Stopped;
                now.updated_at = banger_core::time::now_rfc3339();
                let _ = self.fleet.publish(&guard, &now);
            }
            tap
        };
        self.after_vmm_gone(tap).await;
        if cancelled {
            tracing::info!(vm = %vm.name, reason = %message, "vm start cancelled");
        } else {
            tracing::warn!(vm = %vm.name, error = %message, "vm start failed");
        }
    }

    /// Network clean-up once a VM's VMM is gone (no lock held): rules and names are
    /// republished without it, then its TAP goes back to the pool (`Net::release_tap` does
    /// both, in that order; one `nft` run).
    async fn after_vmm_gone(&self, tap: Option<String>) {
        if let Some(tap) = tap {
            self.net.release_tap(&tap).await;
        }
    }

    /// Quits, then kills, the VM's VMM if it is alive.
    async fn terminate_vmm(&self, vm: &VmRecord) {
        let Some(h) = self.fleet.handles.get(vm) else { return };
        let Some(pid) = h.pid else { return };
        let control = PathBuf::from(h.control_socket.unwrap_or_default());
        if let Err(e) =
            self.fleet.driver(vm.spec.vmm).stop(pid, Path::new(&vm.vm_dir), &control, Duration::from_secs(5)).await
        {
            tracing::error!(vm = %vm.name, error = %chain(&e), "cannot end the vmm");
        }
    }

    /// Stops a VM: agent power-off, then VMM quit, then kill. With `force`, the guest is not
    /// asked: the VMM quits at once (for VMs about to be deleted, whose disks do not matter).
    pub async fn stop_vm(&self, reference: &str, force: bool) -> Result<VmRecord, LifecycleError> {
        let id = self.fleet.store.find_vm(reference)?.id;
        let (vm, was_paused) = {
            let mut guard = self.fleet.locks.lock(&id).await;
            // A start in flight (registered under this lock) is cancelled, and the stop waits
            // for it to end: it ends what it launched, and marks the VM stopped.
            let flight = self
                .starts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&id)
                .map(|f| (f.cancel.clone(), f.done.clone()));
            if let Some((cancel, mut done)) = flight {
                drop(guard);
                tracing::info!(vm = %id, "stop: cancelling the start in flight");
                cancel.cancel();
                let _ = done.wait_for(|ended| *ended).await;
                guard = self.fleet.locks.lock(&id).await;
            }
            let mut vm = self.fleet.store.find_vm(&id)?;
            if !self.fleet.alive(&vm) {
                // Nothing runs: make the record say so.
                if let Some(tap) = self.fleet.handles.get(&vm).and_then(|h| h.tap) {
                    self.net.release_tap(&tap).await;
                }
                self.forwards.deactivate(&vm).await;
                self.fleet.handles.release(&vm);
                self.fleet.drop_agent(&vm);
                self.sessions.fail_open(&vm.id);
                if vm.state.is_active() || vm.desired_state == DesiredState::Running {
                    vm.state = if vm.state.is_active() { ObservedState::Stopped } else { vm.state };
                    vm.desired_state = DesiredState::Stopped;
                    vm.updated_at = banger_core::time::now_rfc3339();
                    self.fleet.publish(&guard, &vm)?;
                }
                return Ok(vm);
            }
            let was_paused = vm.state == ObservedState::Paused;
            vm.state = transition(vm.state, &VmEvent::Stop)?;
            vm.desired_state = DesiredState::Stopped;
            vm.updated_at = banger_core::time::now_rfc3339();
            self.fleet.publish(&guard, &vm)?;
            (vm, was_paused)
        };
        let pid = self.fleet.handles.get(&vm).and_then(|h| h.pid);
        crate::failpoint!(self.fleet, "vm.stop.stopping");
        if was_paused && !force {
            // A paused guest cannot shut itself down: let it run for that.
            let control = PathBuf::from(self.fleet.handles.get(&vm).and_then(|h| h.control_socket).unwrap_or_default());
            if let Err(e) = self.fleet.driver(vm.spec.vmm).resume(&control).await {
                tracing::warn!(vm = %vm.name, error = %chain(&e), "cannot resume the paused vm to stop it");
            }
        }
        let gone = if force {
            false
        } else {
            let asked = self.fleet.agent_for(&vm).call(&AgentRequest::Shutdown, Duration::from_secs(3)).await;
            match (asked, pid) {
                (Ok(_), Some(pid)) => {
                    self.fleet.driver(vm.spec.vmm).wait_exit(pid, Path::new(&vm.vm_dir), SHUTDOWN_TIMEOUT).await
                }
                (Err(e), _) => {
                    tracing::warn!(vm = %vm.name, error = %e, "graceful shutdown through the agent failed");
                    false
                }
                (_, None) => true,
            }
        };
        if !gone {
            self.terminate_vmm(&vm).await;
        }
        crate::failpoint!(self.fleet, "vm.stop.ended");
        self.finish_stop(&vm.id, None).await
    }

    /// Releases a stopped VM's handles and publishes `Stopped` (or `Failed` with `error`).
    async fn finish_stop(&self, id: &str, error: Option<String>) -> Result<VmRecord, LifecycleError> {
        let guard = self.fleet.locks.lock(id).await;
        let mut vm = self.fleet.store.find_vm(id)?;
        if self.fleet.alive(&vm) {
            return Err(LifecycleError::StillRunning(vm.name));
        }
        let tap = self.fleet.handles.get(&vm).and_then(|h| h.tap);
        self.forwards.deactivate(&vm).await;
        self.fleet.handles.release(&vm);
        self.fleet.drop_agent(&vm);
        self.sessions.fail_open(&vm.id);
        if vm.state.is_active() {
            vm.state = transition(vm.state, &VmEvent::Exited).unwrap_or(ObservedState::Stopped);
            if error.is_some() {
                vm.last_error = error;
            }
            vm.updated_at = banger_core::time::now_rfc3339();
            self.fleet.publish(&guard, &vm)?;
        }
        drop(guard);
        self.after_vmm_gone(tap).await;
        tracing::info!(vm = %vm.name, state = vm.state.as_str(), "vm stopped");
        Ok(vm)
    }

    /// Start-up: rebuilds the handle cache from each VM's scratch file and the OS, marking VMs
    /// whose VMM is gone stopped (see `HandleCache::reconcile`).
    /// A VMM named by a VM's pidfile but by no `handles.json` (the daemon died between
    /// spawning it and publishing its handles) is an orphan: it is killed, and its runtime
    /// files removed, so its VM is stopped for real and its TAP is free.
    pub fn reconcile(&self) -> Result<ReconcileReport, StoreError> {
        let mut report = self.fleet.handles.reconcile(&self.fleet.store)?;
        for vm in self.fleet.store.list_vms()? {
            if report.adopted.iter().any(|(a, _)| a.id == vm.id) {
                continue;
            }
            // Not running: a memory file it left (its VMM died unpublished) is stale.
            if let Err(e) = memory::remove_stale(Path::new(memory::MEMORY_BASE), &vm.id) {
                tracing::warn!(vm = %vm.name, error = %e, "cannot remove a stale memory file");
            }
            let dir = Path::new(&vm.vm_dir);
            let paths = banger_vmm::VmPaths::new(dir);
            let Some(pid) = banger_vmm::read_pidfile(&paths.pidfile) else { continue };
            if banger_vmm::is_alive(pid, dir) {
                tracing::warn!(vm = %vm.name, pid, "killing an orphan vmm (no handles were published for it)");
                if let Err(e) = banger_vmm::process::kill(pid, dir) {
                    tracing::error!(vm = %vm.name, pid, error = %e, "cannot kill the orphan vmm");
                    continue;
                }
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while banger_vmm::is_alive(pid, dir) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                report.orphans.push(vm.name.clone());
            }
            if let Err(e) = paths.remove_runtime_files() {
                tracing::warn!(vm = %vm.name, error = %e, "cannot remove the orphan's runtime files");
            }
        }
        Ok(report)
    }

    /// Takes over VMs whose VMM outlived the previous daemon: their forwards listen again, a
    /// monitor watches each, and their rules and names are published again.
    pub async fn adopt(self: &Arc<Self>, adopted: Vec<(VmRecord, u32)>) {
        let in_use: std::collections::BTreeSet<String> = adopted
            .iter()
            .filter(|(vm, _)| vm.spec.network)
            .filter_map(|(vm, _)| self.fleet.handles.get(vm).and_then(|h| h.tap))
            .collect();
        let networked = adopted.iter().any(|(vm, _)| vm.spec.network);
        for (vm, pid) in adopted {
            if vm.state == ObservedState::Running {
                // A daemon killed during a snapshot leaves its guest paused while the record
                // says running: the record is right, so the guest runs again.
                let control = self.fleet.handles.get(&vm).and_then(|h| h.control_socket);
                if let Some(control) = control {
                    if let Err(e) = self.fleet.driver(vm.spec.vmm).resume(Path::new(&control)).await {
                        tracing::debug!(vm = %vm.name, error = %chain(&e), "adopted vm not resumed");
                    }
                }
            }
            self.forwards.activate(&vm).await;
            self.spawn_monitor(vm, pid);
        }
        if networked {
            // Running guests need their rules and names back before anything else happens.
            match self.net.ensure_up(&in_use).await {
                Ok(()) => self.net.publish().await,
                Err(e) => tracing::error!(error = %chain(&e), "cannot restore the guest network"),
            }
        } else {
            // Nothing networked runs: remove what a killed daemon of this state dir left.
            self.net.sweep_leftovers().await;
        }
    }

    /// Watches VM `vm`'s VMM and cleans up when it exits on its own.
    pub fn spawn_monitor(self: &Arc<Self>, vm: VmRecord, pid: u32) {
        let daemon = Arc::downgrade(self);
        tokio::spawn(async move {
            let dir = PathBuf::from(&vm.vm_dir);
            let console = PathBuf::from(vm.paths().console_log);
            let stderr = banger_vmm::VmPaths::new(&dir).stderr_log;
            let Some(driver) = daemon.upgrade().map(|d| d.fleet.driver(vm.spec.vmm)) else { return };
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(d) = daemon.upgrade() else { return };
                // `is_alive` also reaps the VMM when it is our child.
                if driver.is_alive(pid, &dir) {
                    keep_capped(&vm.name, &console, banger_vmm::logfile::CONSOLE_LOG_CAP).await;
                    keep_capped(&vm.name, &stderr, banger_vmm::logfile::VMM_STDERR_CAP).await;
                    continue;
                }
                // Only act if these handles are still the VM's (a restart publishes new ones).
                if d.fleet.handles.get(&vm).and_then(|h| h.pid) != Some(pid) {
                    return;
                }
                let state = d.fleet.store.find_vm(&vm.id).map(|v| v.state).unwrap_or(ObservedState::Stopped);
                let error = (state != ObservedState::Stopping).then(|| match driver.exit_reason(&dir) {
                    Some(reason) => format!("the vmm exited unexpectedly: {reason}"),
                    None => "the vmm exited unexpectedly".to_owned(),
                });
                if let Err(e) = d.finish_stop(&vm.id, error).await {
                    tracing::warn!(vm = %vm.name, error = %chain(&e), "cleanup after the vmm exited failed");
                }
                return;
            }
        });
    }
}

#[cfg(test)]
mod tests;
