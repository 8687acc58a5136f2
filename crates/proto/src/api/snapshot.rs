//! A memory snapshot's record on the wire, with the conversion from the model
//! (`banger_core::snapshot`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::config::VmmKind;

/// A memory snapshot, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotRecord {
    /// Random id, 16 hex digits.
    pub id: String,
    /// Unique name, a DNS label.
    pub name: String,
    /// The id of the VM it was taken from (that VM may be gone since).
    pub source_vm_id: String,
    /// The name of the VM it was taken from, when it was taken.
    pub source_vm_name: String,
    /// The source's root image.
    pub image: String,
    /// The source's kernel.
    pub kernel: String,
    /// vCPUs: every fork gets the same.
    pub vcpus: u32,
    /// Guest memory in MiB: every fork gets the same.
    pub memory_mib: u64,
    /// Work disk size in MiB.
    pub disk_mib: u64,
    /// The VMM that wrote the state (only it can load it).
    pub vmm: VmmKind,
    /// Whether the source had a NIC (forks have one exactly when it did).
    pub network: bool,
    /// The snapshot's directory: `state.bin`, `overlay.ext4`, `work.ext4`.
    pub dir: String,
    /// Bytes its files take on disk.
    pub size_bytes: u64,
    /// For a warm-start snapshot: the key of the boot it stands for (image, kernel, vCPUs, memory,
    /// agent); `None` for snapshots users take.
    pub warm_key: Option<String>,
    /// When it was taken (RFC 3339).
    pub created_at: String,
}

impl From<banger_core::SnapshotRecord> for SnapshotRecord {
    fn from(s: banger_core::SnapshotRecord) -> Self {
        let banger_core::SnapshotRecord {
            id,
            name,
            source_vm_id,
            source_vm_name,
            image,
            kernel,
            vcpus,
            memory_mib,
            disk_mib,
            vmm,
            network,
            dir,
            size_bytes,
            warm_key,
            created_at,
        } = s;
        Self {
            id,
            name,
            source_vm_id,
            source_vm_name,
            image,
            kernel,
            vcpus,
            memory_mib,
            disk_mib,
            vmm: vmm.into(),
            network,
            dir,
            size_bytes,
            warm_key,
            created_at,
        }
    }
}
