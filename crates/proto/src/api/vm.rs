//! A VM on the wire: its record, spec, states and paths as the API shows them, and the
//! conversions from the model (`banger_core::vm`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::config::VmmKind;

/// What the user wants the VM to be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// The VM should be running.
    Running,
    /// The VM should not be running.
    Stopped,
}

impl DesiredState {
    /// The state's name as sent and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

/// What banger last observed the VM doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// Recorded, never booted.
    Created,
    /// Booting: VMM started, agent not yet ready.
    Starting,
    /// Booted and its agent answered.
    Running,
    /// Running, with its vCPUs paused (`banger vm pause`).
    Paused,
    /// Shutting down.
    Stopping,
    /// Not running; its disks are kept.
    Stopped,
    /// The last start or run failed; see `last_error`.
    Failed,
}

impl ObservedState {
    /// The state's name as sent and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

/// What a VM is made of; the part of a record a user chooses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    /// Root filesystem image name.
    pub image: String,
    /// Kernel name.
    pub kernel: String,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Work disk size in MiB.
    pub disk_mib: u64,
    /// The VMM that runs it.
    pub vmm: VmmKind,
    /// Whether it gets a NIC on banger's bridge (`--no-network` turns it off); without one it
    /// is reachable through the agent channel only.
    #[serde(default = "yes")]
    pub network: bool,
    /// Whether it may reach, and be reached by, other guests and any host port
    /// (`--allow-vm-traffic`).
    #[serde(default)]
    pub allow_vm_traffic: bool,
}

fn yes() -> bool {
    true
}

/// The durable record of a VM, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    /// Random id, 16 hex digits.
    pub id: String,
    /// Unique name, a DNS label.
    pub name: String,
    /// What the VM is made of.
    #[serde(flatten)]
    pub spec: VmSpec,
    /// What the user asked for.
    pub desired_state: DesiredState,
    /// What banger last saw.
    pub state: ObservedState,
    /// Guest IPv4 address, once networking allocates one.
    pub guest_ip: Option<String>,
    /// The VM's own directory; every per-VM path derives from it.
    pub vm_dir: String,
    /// When the record was made (RFC 3339).
    pub created_at: String,
    /// When the record last changed (RFC 3339).
    pub updated_at: String,
    /// The last failure, if the VM is `failed` or a stop went wrong.
    pub last_error: Option<String>,
}

/// Deterministic per-VM paths, all under the VM's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmPaths {
    /// The VM's directory.
    pub dir: String,
    /// Serial console log.
    pub console_log: String,
    /// Transient handles scratch file (pid, sockets, tap).
    pub handles: String,
    /// Copy-on-write overlay disk for the root filesystem.
    pub overlay_disk: String,
    /// Work disk mounted at /root.
    pub work_disk: String,
}

impl From<banger_core::DesiredState> for DesiredState {
    fn from(s: banger_core::DesiredState) -> Self {
        use banger_core::DesiredState as M;
        match s {
            M::Running => Self::Running,
            M::Stopped => Self::Stopped,
        }
    }
}

impl From<banger_core::ObservedState> for ObservedState {
    fn from(s: banger_core::ObservedState) -> Self {
        use banger_core::ObservedState as M;
        match s {
            M::Created => Self::Created,
            M::Starting => Self::Starting,
            M::Running => Self::Running,
            M::Paused => Self::Paused,
            M::Stopping => Self::Stopping,
            M::Stopped => Self::Stopped,
            M::Failed => Self::Failed,
        }
    }
}

impl From<banger_core::VmSpec> for VmSpec {
    fn from(s: banger_core::VmSpec) -> Self {
        let banger_core::VmSpec { image, kernel, vcpus, memory_mib, disk_mib, vmm, network, allow_vm_traffic } = s;
        Self { image, kernel, vcpus, memory_mib, disk_mib, vmm: vmm.into(), network, allow_vm_traffic }
    }
}

impl From<banger_core::VmRecord> for VmRecord {
    fn from(r: banger_core::VmRecord) -> Self {
        let banger_core::VmRecord {
            id,
            name,
            spec,
            desired_state,
            state,
            guest_ip,
            vm_dir,
            created_at,
            updated_at,
            last_error,
        } = r;
        Self {
            id,
            name,
            spec: spec.into(),
            desired_state: desired_state.into(),
            state: state.into(),
            guest_ip,
            vm_dir,
            created_at,
            updated_at,
            last_error,
        }
    }
}

impl From<banger_core::vm::VmPaths> for VmPaths {
    fn from(p: banger_core::vm::VmPaths) -> Self {
        let banger_core::vm::VmPaths { dir, console_log, handles, overlay_disk, work_disk } = p;
        Self { dir, console_log, handles, overlay_disk, work_disk }
    }
}
