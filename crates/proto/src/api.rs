//! The daemon's HTTP/JSON API types.

use banger_core::{Config, OperationRecord, VmRecord};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use banger_core::vm::VmPaths;

/// The API version prefix.
pub const API_PREFIX: &str = "/v1";

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Stable machine-readable code, e.g. `not_found`, `conflict`, `invalid_request`.
    pub code: String,
    /// One line for humans, naming the fix where there is one.
    pub message: String,
}

/// `GET /v1/health` and `GET /v1/daemon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DaemonStatus {
    /// banger's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Its state directory.
    pub state_dir: String,
    /// Its API socket.
    pub socket: String,
    /// Its log file.
    pub log_file: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// How many VMs the store holds.
    pub vms: usize,
    /// Resident memory of the daemon in KiB, when readable.
    pub rss_kib: Option<u64>,
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// The VM's name, a DNS label.
    pub name: String,
    /// Image; the configured default when omitted.
    pub image: Option<String>,
    /// Kernel; the configured default when omitted.
    pub kernel: Option<String>,
    /// vCPUs; the configured default when omitted.
    pub vcpus: Option<u32>,
    /// Memory in MiB; the configured default when omitted.
    pub memory_mib: Option<u64>,
    /// Work disk in MiB; the configured default when omitted.
    pub disk_mib: Option<u64>,
}

/// `PATCH /v1/vms/{vm}`: the fields to change; the VM must not be running.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVmRequest {
    /// New image.
    pub image: Option<String>,
    /// New kernel.
    pub kernel: Option<String>,
    /// New vCPU count.
    pub vcpus: Option<u32>,
    /// New memory in MiB.
    pub memory_mib: Option<u64>,
    /// New work disk size in MiB (grow only).
    pub disk_mib: Option<u64>,
}

/// A VM as the API shows it: its durable record, its paths and whether it is alive now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    /// The durable record.
    #[serde(flatten)]
    pub record: VmRecord,
    /// Its deterministic paths.
    pub paths: VmPaths,
    /// Whether its VMM process is alive right now.
    pub alive: bool,
}

/// `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    /// Every VM, oldest first.
    pub vms: Vec<VmView>,
}

/// `GET /v1/operations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OperationList {
    /// Every kept operation, oldest first.
    pub operations: Vec<OperationRecord>,
}

/// `GET /v1/config`: the configuration in force and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConfigView {
    /// The file it was read from, or none when every key is a default.
    pub source: Option<String>,
    /// Every key with its value.
    pub config: Config,
}
