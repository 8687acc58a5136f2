//! VMM drivers behind one trait.
//!
//! The daemon describes a boot with a [`LaunchSpec`], picks a driver with [`select`] (QEMU
//! `microvm`, or Firecracker where KVM boots stock guests) and holds it as `Arc<dyn Vmm>`. Drivers build
//! their VMM's command line themselves, start it in its own session so it outlives the daemon,
//! and answer "is this VMM still alive and ours" with one test ([`process::is_alive`]: the
//! process is not a zombie and its command line names the VM directory, which survives pid
//! reuse). See [`process`] for why VMMs are not double-forked and how they are reaped.
//!
//! Stopping a VM: a graceful shutdown is the guest agent's job. Drivers offer [`Vmm::quit`] (ask
//! the VMM to exit now), [`Vmm::kill`] (SIGKILL, last resort) and [`Vmm::wait_exit`];
//! [`Vmm::stop`] chains them.

pub mod balloon;
mod error;
pub mod firecracker;
pub mod logfile;
pub mod memfile;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod select;
pub mod slots;
pub mod spec;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use error::{ControlError, LaunchError};
pub use firecracker::{FirecrackerDriver, FirecrackerError, FirecrackerOptions};
pub use process::{is_alive, memory as vmm_memory, read_pidfile, StatsError, VmmMemory, VmmStats};
pub use qemu::QemuDriver;
pub use qmp::{QmpClient, QmpError, RunStatus};
pub use select::{
    explain, host_tsc_khz, select, Accel, HostFacts, ParseVmmChoiceError, SelectError, Selection, VmmChoice, VmmKind,
};
pub use spec::{DiskSpec, LaunchSpec, NetSpec, SpecError, VmPaths, AGENT_PORT_NAME};

/// The future a [`Vmm`] method returns (boxed, so the trait stays object-safe).
pub type VmmFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The guest memory file that belongs to the snapshot state file `state` (the same name with
/// `.mem`). Firecracker writes the memory apart from the device state; QEMU does for a guest
/// with a memory file ([`memfile`]) and writes one whole file otherwise. Whoever copies, links
/// or removes a state file does the same to this one when it exists.
pub fn snapshot_memory_file(state: &Path) -> PathBuf {
    state.with_extension("mem")
}

/// The file beside snapshot state `state` that lists the optional devices the saved guest has
/// (the same name with `.devices`; [`balloon`]): a restore must give the guest exactly those.
/// A state without one was saved with none. Whoever copies, links or removes a state file does
/// the same to this one when it exists.
pub fn snapshot_devices_file(state: &Path) -> PathBuf {
    state.with_extension("devices")
}

/// A running VMM, as [`Vmm::launch`] leaves it: the control socket answers and the guest is
/// booting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launched {
    /// The VMM's pid. Store it with the VM dir: the pair is what liveness checks need.
    pub pid: u32,
    /// The VM directory.
    pub vm_dir: PathBuf,
    /// The VMM control socket (QMP).
    pub control_socket: PathBuf,
    /// The host end of the agent channel; connect to talk to the guest agent.
    pub agent_socket: PathBuf,
    /// The guest serial console log.
    pub console_log: PathBuf,
}

/// How the daemon reaches a VM's guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentEndpoint {
    /// A unix socket whose stream is the agent channel (QEMU's virtio-serial chardev).
    Unix(PathBuf),
    /// A Firecracker hybrid vsock socket: connect, send `CONNECT <port>\n`, wait for
    /// `OK <host port>\n` (sending nothing before it), then the stream is the agent channel.
    HybridVsock {
        /// The socket.
        path: PathBuf,
        /// The guest's vsock port.
        port: u32,
    },
}

/// How [`Vmm::stop`] ended the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// It was not running.
    AlreadyGone,
    /// It exited when asked over its control socket.
    Quit,
    /// It had to be killed.
    Killed,
}

/// A VMM driver. Object-safe: the daemon holds an `Arc<dyn Vmm>`.
///
/// Process-level methods take the pid together with the VM directory so a reused pid is never
/// mistaken for the VMM.
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// Which VMM this drives.
    fn kind(&self) -> VmmKind;

    /// Starts a VMM for `spec` and waits until its control socket answers. Stale sockets and
    /// pidfile are removed first; the VMM's stderr goes to `<vm_dir>/vmm.stderr`. On failure the
    /// VMM is killed and the error quotes the end of its stderr.
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> VmmFuture<'a, Result<Launched, LaunchError>>;

    /// Whether `pid` is alive and is the VMM of `vm_dir` (zombies are dead). Reaps the VMM if
    /// this driver spawned it and it has exited.
    fn is_alive(&self, pid: u32, vm_dir: &Path) -> bool;

    /// Asks the VMM behind `control_socket` to exit now (QMP `quit`); the guest is not asked.
    /// QEMU serves one QMP client at a time: while another client holds the socket this times
    /// out (after 5 s) rather than waiting forever.
    fn quit<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>>;

    /// SIGKILLs `pid` if it is the VMM of `vm_dir`; returns whether a signal was sent.
    fn kill(&self, pid: u32, vm_dir: &Path) -> Result<bool, ControlError>;

    /// Waits up to `timeout` for the VMM to be gone (reaping it if ours); returns whether it is.
    fn wait_exit<'a>(&'a self, pid: u32, vm_dir: &'a Path, timeout: Duration) -> VmmFuture<'a, bool>;

    /// CPU time and resident memory of the VMM process.
    fn stats(&self, pid: u32) -> Result<VmmStats, StatsError>;

    /// How the daemon reaches the guest agent of the VM in `vm_dir`.
    fn agent_endpoint(&self, vm_dir: &Path) -> AgentEndpoint {
        AgentEndpoint::Unix(VmPaths::new(vm_dir).agent_socket)
    }

    /// Why the VMM of `vm_dir` stopped, when its own records say (e.g. a guest fault in its
    /// log); `None` when they do not.
    fn exit_reason(&self, _vm_dir: &Path) -> Option<String> {
        None
    }

    /// Lets go of what the driver keeps for snapshots whose files are gone (QEMU: the sealed
    /// memory copies of [`balloon`]). Call it after a snapshot is deleted.
    fn release_unused_snapshot_memory(&self) {}

    /// The VMM's own counters for a running VM (Firecracker's metrics: bytes through disks,
    /// NIC and vsock), by name; `None` when the VMM keeps none.
    fn metrics<'a>(
        &'a self,
        _vm_dir: &'a Path,
        _control_socket: &'a Path,
    ) -> VmmFuture<'a, Option<BTreeMap<String, u64>>> {
        Box::pin(async { None })
    }

    /// Pauses the guest's vCPUs (QMP `stop`). Pausing a paused guest is not an error.
    fn pause<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        let _ = control_socket;
        Box::pin(async move { Err(ControlError::NotSupported { kind: self.kind(), what: "pause" }) })
    }

    /// Resumes a paused guest's vCPUs (QMP `cont`), also one left paused by [`Self::snapshot`]
    /// or [`Self::restore`].
    fn resume<'a>(&'a self, control_socket: &'a Path) -> VmmFuture<'a, Result<(), ControlError>> {
        let _ = control_socket;
        Box::pin(async move { Err(ControlError::NotSupported { kind: self.kind(), what: "resume" }) })
    }

    /// Writes the paused guest's memory and device state to `state_file` (which must not
    /// exist yet). The guest must be paused (see [`Self::pause`]) and stays paused, so its disks
    /// can be copied consistently with the state before it is resumed.
    fn snapshot<'a>(
        &'a self,
        control_socket: &'a Path,
        state_file: &'a Path,
    ) -> VmmFuture<'a, Result<(), ControlError>> {
        let _ = (control_socket, state_file);
        Box::pin(async move { Err(ControlError::NotSupported { kind: self.kind(), what: "snapshot" }) })
    }

    /// Starts a VMM for `spec` whose guest is loaded from `state_file` (written by
    /// [`Self::snapshot`] of a VM with the same machine shape: vCPUs, memory, disks, NIC or none),
    /// instead of booting. Returns once the state is loaded; the guest is left paused, so resume
    /// it with [`Self::resume`].
    fn restore<'a>(
        &'a self,
        spec: &'a LaunchSpec,
        state_file: &'a Path,
    ) -> VmmFuture<'a, Result<Launched, LaunchError>> {
        let _ = (spec, state_file);
        Box::pin(async move { Err(LaunchError::NotSupported { kind: self.kind(), what: "restore" }) })
    }

    /// Sets the capacity the guest sees of spare slot `index` ([`crate::slots`]) to `size`
    /// bytes, what its file holds now (0 frees it). Only QEMU has slots.
    fn resize_slot<'a>(
        &'a self,
        control_socket: &'a Path,
        index: u8,
        size: u64,
    ) -> VmmFuture<'a, Result<(), ControlError>> {
        let _ = (control_socket, index, size);
        Box::pin(async move { Err(ControlError::NotSupported { kind: self.kind(), what: "attaching a disk" }) })
    }

    /// Ends the VMM: [`Self::quit`], up to `timeout` for it to exit, then [`Self::kill`].
    /// A failing control socket goes straight to the kill.
    fn stop<'a>(
        &'a self,
        pid: u32,
        vm_dir: &'a Path,
        control_socket: &'a Path,
        timeout: Duration,
    ) -> VmmFuture<'a, Result<StopOutcome, ControlError>> {
        Box::pin(async move {
            if !self.is_alive(pid, vm_dir) {
                return Ok(StopOutcome::AlreadyGone);
            }
            let quit = match self.quit(control_socket).await {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(pid, error = %error, "quit over the control socket failed; killing");
                    false
                }
            };
            if quit && self.wait_exit(pid, vm_dir, timeout).await {
                return Ok(StopOutcome::Quit);
            }
            let signalled = self.kill(pid, vm_dir)?;
            if !self.wait_exit(pid, vm_dir, Duration::from_secs(5)).await {
                return Err(ControlError::Unkillable { pid });
            }
            Ok(match (signalled, quit) {
                (true, _) => StopOutcome::Killed,
                (false, true) => StopOutcome::Quit,
                (false, false) => StopOutcome::AlreadyGone,
            })
        })
    }
}
