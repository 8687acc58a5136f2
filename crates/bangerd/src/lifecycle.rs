//! Booting and stopping VMs. Locks are held only to check and publish state: the VM lock is
//! released while the VMM boots, the agent comes up, or the guest shuts down.
//!
//! Start: `Starting` is published under the VM lock; then, unlocked: kernel and image (pulled or
//! built when missing), the overlay disk, the initramfs, the VMM launch (its handles are
//! published at once, so a daemon crash from here on leaves an adoptable VM), and the wait for the
//! agent. Finally `Running` is published under the lock — unless a stop came in meanwhile.
//!
//! Stop: `Stopping` under the lock; then the agent is asked to power off, then the VMM is told to
//! quit, then killed; finally the handles are released and `Stopped` published.
//!
//! A monitor task per running VM notices a VMM that exits on its own (guest poweroff, crash,
//! kill) and cleans up after it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_core::vm::{transition, VmEvent};
use banger_core::{DesiredState, ObservedState, OperationRecord, VmRecord};
use banger_host::VmHandles;
use banger_proto::agent::AgentRequest;
use banger_proto::GitIdentity;
use banger_vmm::{DiskSpec, LaunchSpec, NetSpec};

use crate::daemon::Daemon;
use crate::error::{chain, ApiFailure};
use crate::ops::{Cancelled, OpHandle};

/// How long a guest may take to power off when asked.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Console lines quoted in boot errors.
const CONSOLE_TAIL: usize = 15;

/// The last `n` lines of a text file, or a note that it is empty.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

impl Daemon {
    /// Starts a VM as an operation; `git` is written to the guest's `~/.gitconfig`.
    pub fn begin_start_vm(
        self: &Arc<Self>,
        reference: &str,
        git: Option<GitIdentity>,
    ) -> Result<OperationRecord, ApiFailure> {
        let vm = self.store.find_vm(reference)?;
        if self.handles.alive(&vm) {
            return Err(ApiFailure::conflict(format!("vm '{}' is already running", vm.name)));
        }
        let op = self.ops.begin("vm.start", &vm.name);
        let snapshot = op.snapshot()?;
        let daemon = self.clone();
        tokio::spawn(async move {
            match daemon.start_vm(&op, &vm.id, git.as_ref()).await {
                Ok(vm) => op.succeed(Some(vm.id)),
                Err(StartFailure::Cancelled) => op.cancelled(),
                Err(StartFailure::Api(e)) => op.fail(e.message),
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
    ) -> Result<VmRecord, StartFailure> {
        // Publish Starting.
        let vm = {
            let _guard = self.vm_locks.lock(id).await;
            let mut vm = self.store.find_vm(id)?;
            if self.handles.alive(&vm) {
                return Err(ApiFailure::conflict(format!("vm '{}' is already running", vm.name)).into());
            }
            vm.state = transition(vm.state, &VmEvent::Start).map_err(ApiFailure::from)?;
            vm.desired_state = DesiredState::Running;
            vm.last_error = None;
            vm.updated_at = banger_core::time::now_rfc3339();
            self.store.update_vm(&vm)?;
            vm
        };
        match self.boot(op, &vm, git).await {
            Ok(()) => {}
            Err(e) => {
                let message = match &e {
                    StartFailure::Cancelled => "start cancelled".to_owned(),
                    StartFailure::Api(a) => a.message.clone(),
                };
                self.abort_start(&vm, &message).await;
                return Err(e);
            }
        }
        // Publish Running, unless a stop overtook us.
        let _guard = self.vm_locks.lock(id).await;
        let mut vm = self.store.find_vm(id)?;
        if vm.state != ObservedState::Starting {
            return Err(ApiFailure::conflict(format!("vm '{}' was stopped while it booted", vm.name)).into());
        }
        vm.state = transition(vm.state, &VmEvent::Booted).map_err(ApiFailure::from)?;
        vm.updated_at = banger_core::time::now_rfc3339();
        self.store.update_vm(&vm)?;
        self.activate_forwards(&vm).await;
        tracing::info!(vm = %vm.name, "vm running");
        Ok(vm)
    }

    async fn boot(
        self: &Arc<Self>,
        op: &OpHandle,
        vm: &VmRecord,
        git: Option<&GitIdentity>,
    ) -> Result<(), StartFailure> {
        op.stage("kernel")?;
        let kernel = self.ensure_kernel(op, &vm.spec.kernel).await?;
        op.stage("image")?;
        let (image, built) = self.ensure_image(op, &vm.spec.image).await?;
        let vm_dir = PathBuf::from(&vm.vm_dir);
        // A fork's first start restores its snapshot: its disks belong to that state as they are.
        let restore = crate::snapshots::restore_state(vm);
        let disks = if restore.is_some() {
            let paths = vm.paths();
            crate::disks::VmDisks { overlay: paths.overlay_disk.into(), work: paths.work_disk.into() }
        } else {
            op.stage("disks")?;
            let disks = self.provision_disks(vm, &image, &built).await?;
            op.stage("guest-files")?;
            self.prepare_guest_files(vm, &disks.work, git).await?.iter().for_each(|w| op.warn(w));
            disks
        };
        op.stage("initramfs")?;
        let initramfs = self.initramfs_for(&kernel).await?;
        let nic = if vm.spec.network {
            op.stage("network")?;
            let ip = self.ensure_guest_ip(vm)?;
            let nic = self.net.nic_for(vm, ip).await.map_err(|e| {
                ApiFailure::internal(format!(
                    "cannot set up the guest network: {}; check `banger doctor`, or create the vm with --no-network",
                    chain(&e)
                ))
            })?;
            Some((nic, ip))
        } else {
            None
        };
        let fork_nic = nic.as_ref().map(|(n, ip)| crate::snapshots::ForkNic {
            mac: n.mac.clone(),
            cidr: format!("{ip}/{}", self.net.subnet().prefix_len()),
            gateway: self.net.subnet().gateway().to_string(),
        });
        let nic = nic.map(|(n, _)| n);
        op.stage(if restore.is_some() { "restore" } else { "boot" })?;
        let mut spec = LaunchSpec::new(&vm.id, &vm.name, &vm_dir, &kernel.vmlinuz, initramfs);
        spec.vcpus = vm.spec.vcpus;
        spec.memory_mib = u32::try_from(vm.spec.memory_mib).unwrap_or(u32::MAX);
        spec.kernel_elf = Some(kernel.vmlinux.clone());
        spec.disks =
            vec![DiskSpec::read_only(&built.path), DiskSpec::writable(&disks.overlay), DiskSpec::writable(&disks.work)];
        spec.kernel_args = vec![
            "banger.root=/dev/vda".into(),
            "banger.overlay=/dev/vdb".into(),
            "banger.work=/dev/vdc".into(),
            format!("banger.hostname={}", vm.name),
            format!("banger.init={}", image.init_mode.as_str()),
        ];
        if let Some(nic) = &nic {
            spec.kernel_args.extend(nic.kernel_args.iter().cloned());
            spec.net = Some(NetSpec { tap: nic.tap.clone(), mac: nic.mac.clone() });
        }
        let launching = match &restore {
            Some(state) => self.driver(vm.spec.vmm).restore(&spec, state).await,
            None => self.driver(vm.spec.vmm).launch(&spec).await,
        };
        let launched = match launching {
            Ok(launched) => launched,
            Err(e) => {
                if let Some(nic) = &nic {
                    self.net.release_tap(&nic.tap).await;
                }
                return Err(ApiFailure::internal(chain(&e)).into());
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
        self.handles.publish(vm, handles).map_err(|e| ApiFailure::internal(chain(&e)))?;
        self.spawn_monitor(vm.clone(), launched.pid);
        // Rules and names are republished (an `nft` run) while the guest comes up; both are
        // done before the VM is reported running.
        let publish = async {
            if nic.is_some() {
                self.sync_net().await;
            }
        };
        let ((), ready) =
            tokio::join!(publish, self.guest_ready(op, vm, &launched, restore.is_some(), fork_nic.as_ref()));
        ready?;
        if let Some(state) = restore {
            // From now on this VM boots like any other. (A VMM that maps the memory file keeps
            // its pages after the unlink.)
            for file in [banger_vmm::snapshot_memory_file(&state), state] {
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
        fork_nic: Option<&crate::snapshots::ForkNic>,
    ) -> Result<(), StartFailure> {
        if restored {
            self.driver(vm.spec.vmm)
                .resume(&launched.control_socket)
                .await
                .map_err(|e| ApiFailure::internal(format!("cannot resume restored vm '{}': {}", vm.name, chain(&e))))?;
        }
        let probe = if restored {
            op.stage("identity")?;
            self.fork_identity_request(vm, fork_nic)?
        } else {
            op.stage("agent")?;
            AgentRequest::Ping
        };
        let console = launched.console_log.clone();
        let watched = vm.clone();
        let this = self.clone();
        let cancel = op.sink();
        let driver = self.driver(vm.spec.vmm);
        self.agent_for(vm)
            .wait_answer(&probe, Duration::from_secs(self.config.boot_timeout_secs), move || {
                if cancel.cancelled() {
                    return Some("cancelled".into());
                }
                (!this.handles.alive(&watched)).then(|| match driver.exit_reason(Path::new(&watched.vm_dir)) {
                    Some(reason) => format!("the vmm exited during boot: {reason}"),
                    None => "the vmm exited during boot".to_owned(),
                })
            })
            .await
            .map_err(|why| {
                let what = if restored { "did not take its own identity" } else { "did not become ready" };
                ApiFailure::internal(format!(
                    "vm '{}' {what}: {why}; last console lines:\n{}",
                    vm.name,
                    tail_lines(&console, CONSOLE_TAIL)
                ))
            })?;
        Ok(())
    }

    /// Ends a failed start: kill what was launched, release, mark failed.
    async fn abort_start(&self, vm: &VmRecord, message: &str) {
        self.terminate_vmm(vm).await;
        let tap = {
            let _guard = self.vm_locks.lock(&vm.id).await;
            self.deactivate_forwards(vm).await;
            let tap = self.handles.get(vm).and_then(|h| h.tap);
            self.handles.release(vm);
            self.drop_agent(vm);
            self.fail_sessions(&vm.id);
            if let Ok(mut now) = self.store.find_vm(&vm.id) {
                now.state = ObservedState::Failed;
                now.desired_state = DesiredState::Stopped;
                now.last_error = Some(message.to_owned());
                now.updated_at = banger_core::time::now_rfc3339();
                let _ = self.store.update_vm(&now);
            }
            tap
        };
        self.after_vmm_gone(tap).await;
        tracing::warn!(vm = %vm.name, error = message, "vm start failed");
    }

    /// Network clean-up once a VM's VMM is gone (no lock held): its TAP goes back to the pool,
    /// and rules and names are republished without it.
    async fn after_vmm_gone(&self, tap: Option<String>) {
        if let Some(tap) = tap {
            self.net.release_tap(&tap).await;
            self.sync_net().await;
        }
    }

    /// Quits, then kills, the VM's VMM if it is alive.
    async fn terminate_vmm(&self, vm: &VmRecord) {
        let Some(h) = self.handles.get(vm) else { return };
        let Some(pid) = h.pid else { return };
        let control = PathBuf::from(h.control_socket.unwrap_or_default());
        if let Err(e) =
            self.driver(vm.spec.vmm).stop(pid, Path::new(&vm.vm_dir), &control, Duration::from_secs(5)).await
        {
            tracing::error!(vm = %vm.name, error = %chain(&e), "cannot end the vmm");
        }
    }

    /// Stops a VM: agent power-off, then VMM quit, then kill. With `force`, the guest is not
    /// asked: the VMM quits at once (for VMs about to be deleted, whose disks do not matter).
    pub async fn stop_vm(&self, reference: &str, force: bool) -> Result<VmRecord, ApiFailure> {
        let id = self.store.find_vm(reference)?.id;
        let (vm, was_paused) = {
            let _guard = self.vm_locks.lock(&id).await;
            let mut vm = self.store.find_vm(&id)?;
            if !self.handles.alive(&vm) {
                // Nothing runs: make the record say so.
                if let Some(tap) = self.handles.get(&vm).and_then(|h| h.tap) {
                    self.net.release_tap(&tap).await;
                }
                self.deactivate_forwards(&vm).await;
                self.handles.release(&vm);
                self.drop_agent(&vm);
                self.fail_sessions(&vm.id);
                if vm.state.is_active() || vm.desired_state == DesiredState::Running {
                    vm.state = if vm.state.is_active() { ObservedState::Stopped } else { vm.state };
                    vm.desired_state = DesiredState::Stopped;
                    vm.updated_at = banger_core::time::now_rfc3339();
                    self.store.update_vm(&vm)?;
                }
                return Ok(vm);
            }
            let was_paused = vm.state == ObservedState::Paused;
            vm.state = transition(vm.state, &VmEvent::Stop)?;
            vm.desired_state = DesiredState::Stopped;
            vm.updated_at = banger_core::time::now_rfc3339();
            self.store.update_vm(&vm)?;
            (vm, was_paused)
        };
        let pid = self.handles.get(&vm).and_then(|h| h.pid);
        if was_paused && !force {
            // A paused guest cannot shut itself down: let it run for that.
            let control = PathBuf::from(self.handles.get(&vm).and_then(|h| h.control_socket).unwrap_or_default());
            if let Err(e) = self.driver(vm.spec.vmm).resume(&control).await {
                tracing::warn!(vm = %vm.name, error = %chain(&e), "cannot resume the paused vm to stop it");
            }
        }
        let gone = if force {
            false
        } else {
            let asked = self.agent_for(&vm).call(&AgentRequest::Shutdown, Duration::from_secs(3)).await;
            match (asked, pid) {
                (Ok(_), Some(pid)) => {
                    self.driver(vm.spec.vmm).wait_exit(pid, Path::new(&vm.vm_dir), SHUTDOWN_TIMEOUT).await
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
        self.finish_stop(&vm.id, None).await
    }

    /// Releases a stopped VM's handles and publishes `Stopped` (or `Failed` with `error`).
    async fn finish_stop(&self, id: &str, error: Option<String>) -> Result<VmRecord, ApiFailure> {
        let guard = self.vm_locks.lock(id).await;
        let mut vm = self.store.find_vm(id)?;
        if self.handles.alive(&vm) {
            return Err(ApiFailure::internal(format!("vm '{}' is still running after stop", vm.name)));
        }
        let tap = self.handles.get(&vm).and_then(|h| h.tap);
        self.deactivate_forwards(&vm).await;
        self.handles.release(&vm);
        self.drop_agent(&vm);
        self.fail_sessions(&vm.id);
        if vm.state.is_active() {
            vm.state = transition(vm.state, &VmEvent::Exited).unwrap_or(ObservedState::Stopped);
            if error.is_some() {
                vm.last_error = error;
            }
            vm.updated_at = banger_core::time::now_rfc3339();
            self.store.update_vm(&vm)?;
        }
        drop(guard);
        self.after_vmm_gone(tap).await;
        tracing::info!(vm = %vm.name, state = vm.state.as_str(), "vm stopped");
        Ok(vm)
    }

    /// Watches VM `vm`'s VMM and cleans up when it exits on its own.
    pub fn spawn_monitor(self: &Arc<Self>, vm: VmRecord, pid: u32) {
        let daemon = Arc::downgrade(self);
        tokio::spawn(async move {
            let dir = PathBuf::from(&vm.vm_dir);
            let Some(driver) = daemon.upgrade().map(|d| d.driver(vm.spec.vmm)) else { return };
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(d) = daemon.upgrade() else { return };
                // `is_alive` also reaps the VMM when it is our child.
                if driver.is_alive(pid, &dir) {
                    continue;
                }
                // Only act if these handles are still the VM's (a restart publishes new ones).
                if d.handles.get(&vm).and_then(|h| h.pid) != Some(pid) {
                    return;
                }
                let state = d.store.find_vm(&vm.id).map(|v| v.state).unwrap_or(ObservedState::Stopped);
                let error = (state != ObservedState::Stopping).then(|| match driver.exit_reason(&dir) {
                    Some(reason) => format!("the vmm exited unexpectedly: {reason}"),
                    None => "the vmm exited unexpectedly".to_owned(),
                });
                if let Err(e) = d.finish_stop(&vm.id, error).await {
                    tracing::warn!(vm = %vm.name, error = %e, "cleanup after the vmm exited failed");
                }
                return;
            }
        });
    }

    /// The initramfs for `kernel` with this daemon's agent as `/init`, built once per agent
    /// binary and cached beside the kernel.
    async fn initramfs_for(&self, kernel: &banger_image::kernel::pull::PulledKernel) -> Result<PathBuf, ApiFailure> {
        let agent = agent_binary()?;
        let digest =
            file_digest(&agent).map_err(|e| ApiFailure::internal(format!("cannot read {}: {e}", agent.display())))?;
        let out = kernel.dir.join(format!("initramfs-{digest}.cpio.gz"));
        if out.exists() {
            return Ok(out);
        }
        let _guard = self.artifact_locks.lock(&format!("initramfs:{}", out.display())).await;
        if out.exists() {
            return Ok(out);
        }
        let (release, modules, target) = (kernel.release.clone(), kernel.modules.clone(), out.clone());
        tokio::task::spawn_blocking(move || {
            banger_image::initramfs::build_guest_initramfs(&agent, &release, &modules, &target)
        })
        .await
        .map_err(|e| ApiFailure::internal(e.to_string()))?
        .map_err(|e| ApiFailure::internal(format!("cannot build the initramfs: {}", chain(&e))))?;
        Ok(out)
    }
}

/// Where the static guest agent is: `$BANGER_AGENT`, beside this executable, in `../lib/banger/`
/// next to it (as `scripts/install` lays it out), or the usual install locations.
pub fn agent_binary() -> Result<PathBuf, ApiFailure> {
    if let Some(p) = std::env::var_os("BANGER_AGENT").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
    let near_exe = exe_dir.map(|d| [d.join("banger-agent"), d.join("../lib/banger/banger-agent")]);
    near_exe
        .into_iter()
        .flatten()
        .chain(["/usr/local/lib/banger/banger-agent", "/usr/lib/banger/banger-agent"].map(PathBuf::from))
        // A dynamically linked agent (a plain `cargo build` beside a debug bangerd) cannot be
        // the guest's /init: look on.
        .find(|p| p.is_file() && matches!(banger_image::initramfs::elf_interpreter_of(p), Ok(None)))
        .ok_or_else(|| {
            ApiFailure::internal(
                "no static guest agent binary was found; install banger with scripts/install or set BANGER_AGENT to a static banger-agent",
            )
        })
}

/// A digest of the file at `path` (the agent binary, read on every start): remembered per path,
/// size and modification time, so an unchanged file is hashed once per daemon.
pub(crate) fn file_digest(path: &Path) -> std::io::Result<String> {
    use std::hash::{Hash as _, Hasher as _};
    type Seen = std::collections::HashMap<PathBuf, (u64, std::time::SystemTime, String)>;
    static SEEN: std::sync::OnceLock<std::sync::Mutex<Seen>> = std::sync::OnceLock::new();
    let meta = std::fs::metadata(path)?;
    let (len, modified) = (meta.len(), meta.modified()?);
    let seen = SEEN.get_or_init(Default::default);
    // A leaf lock: held for one lookup or one insert, never across the read.
    let known = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(path).cloned();
    if let Some((_, _, digest)) = known.filter(|(l, m, _)| (*l, *m) == (len, modified)) {
        return Ok(digest);
    }
    let bytes = std::fs::read(path)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    let digest = format!("{:016x}", h.finish());
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(path.to_owned(), (len, modified, digest.clone()));
    Ok(digest)
}

/// Why a start failed.
#[derive(Debug)]
pub enum StartFailure {
    /// Cancelled on request.
    Cancelled,
    /// Anything else.
    Api(ApiFailure),
}

impl From<Cancelled> for StartFailure {
    fn from(_: Cancelled) -> Self {
        Self::Cancelled
    }
}

impl From<ApiFailure> for StartFailure {
    fn from(e: ApiFailure) -> Self {
        Self::Api(e)
    }
}

impl From<banger_store::StoreError> for StartFailure {
    fn from(e: banger_store::StoreError) -> Self {
        Self::Api(e.into())
    }
}
