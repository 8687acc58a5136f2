//! The error types every driver shares: [`LaunchError`] (launch and restore) and
//! [`ControlError`] (quit, kill, pause, resume, snapshot). They live apart from the drivers so
//! that no driver imports another; each driver's own failures are wrapped
//! ([`FirecrackerError`], [`QmpError`], [`ApiError`]).

use std::path::PathBuf;
use std::time::Duration;

use banger_core::config::VmmKind;

use crate::firecracker::api::ApiError;
use crate::firecracker::FirecrackerError;
use crate::qmp::QmpError;
use crate::spec::SpecError;

/// Why a VM could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The spec cannot be booted as written.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The VMM binary is not installed.
    #[error("{} not found; install it with `apt-get install qemu-system-x86` (see `banger doctor`)", binary.display())]
    QemuNotFound {
        /// The binary looked for.
        binary: PathBuf,
    },
    /// A file the boot needs is missing.
    #[error("{what} {} not found; re-pull or rebuild it (see `banger doctor`)", path.display())]
    MissingFile {
        /// What the file is (`kernel`, `initramfs`, `disk`, `vm dir`).
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A stale file could not be removed or a log file not created.
    #[error("cannot prepare {}; check the vm dir's permissions", path.display())]
    Prepare {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM process could not be started.
    #[error("cannot start {}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited before its control socket answered.
    #[error("the vmm exited during startup ({status}); its stderr ends with:\n{stderr}")]
    Exited {
        /// How it ended.
        status: String,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// The control socket did not answer in time; the VMM was killed.
    #[error("the vmm did not answer on its control socket within {timeout:?} and was killed; its stderr ends with:\n{stderr}")]
    NotReady {
        /// How long we waited.
        timeout: Duration,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// The QMP handshake failed; the VMM was killed.
    #[error("the qmp handshake failed and the vmm was killed; its stderr ends with:\n{stderr}")]
    Handshake {
        /// The cause.
        #[source]
        source: QmpError,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// The selected VMM is not built.
    #[error("the {kind} driver is not built yet; use --vmm qemu")]
    Unsupported {
        /// The VMM.
        kind: VmmKind,
    },
    /// The Firecracker driver failed.
    #[error(transparent)]
    Firecracker(#[from] FirecrackerError),
    /// The driver cannot do this.
    #[error("{what} is not supported by the {kind} vmm; use --vmm qemu")]
    NotSupported {
        /// The VMM.
        kind: VmmKind,
        /// What was asked (`restore`).
        what: &'static str,
    },
    /// The saved guest state did not load: the VMM exited or never left `inmigrate`.
    #[error("the vmm could not load the guest state ({reason}); its stderr ends with:\n{stderr}")]
    RestoreFailed {
        /// What happened.
        reason: String,
        /// The last lines of its stderr.
        stderr: String,
    },
}

/// Why a VMM could not be controlled.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control socket failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// Firecracker's API failed.
    #[error(transparent)]
    Firecracker(#[from] ApiError),
    /// Sending a signal failed.
    #[error("cannot signal vmm process {pid}; is the daemon running as root?")]
    Signal {
        /// The pid.
        pid: u32,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// The process survived SIGKILL.
    #[error("vmm process {pid} survived SIGKILL; it may be stuck in the kernel (check `ps -o stat {pid}`)")]
    Unkillable {
        /// The pid.
        pid: u32,
    },
    /// The driver is not built.
    #[error("the {kind} driver is not built yet; use --vmm qemu")]
    Unsupported {
        /// The VMM.
        kind: VmmKind,
    },
    /// The driver cannot do this.
    #[error("{what} is not supported by the {kind} vmm; use a vm with --vmm qemu")]
    NotSupported {
        /// The VMM.
        kind: VmmKind,
        /// What was asked (`pause`, `resume`, `snapshot`).
        what: &'static str,
    },
    /// The guest is in a run state that does not allow this.
    #[error("the guest is {status}, {need}")]
    BadRunState {
        /// QEMU's run state (`running`, `paused`, ...).
        status: String,
        /// What was needed, as words.
        need: &'static str,
    },
    /// The list of the saved guest's devices could not be written beside its state.
    #[error("cannot write {} beside the snapshot state; check free space there", path.display())]
    DevicesFile {
        /// The devices file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the guest state failed.
    /// The guest memory could not be copied into the snapshot.
    #[error("cannot copy the guest memory {} into the snapshot; check free space there", path.display())]
    MemoryCopy {
        /// The VM's memory file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    #[error("writing the guest state to {} failed: {reason}; check free space there", path.display())]
    SaveFailed {
        /// The state file.
        path: PathBuf,
        /// What the VMM said.
        reason: String,
    },
    /// Writing the guest state took too long.
    #[error("writing the guest state to {} did not finish within {timeout:?}", path.display())]
    SaveTimeout {
        /// The state file.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
}
