//! The durable record of a memory snapshot: a paused VM's memory and device state plus copies of
//! its writable disks, from which new VMs (forks) start. The files live in the snapshot's own
//! directory; the record says what machine shape they need.

use serde::{Deserialize, Serialize};

use crate::config::VmmKind;

/// A memory snapshot, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Deterministic paths of a snapshot's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPaths {
    /// Memory and device state, as the VMM wrote it.
    pub state: String,
    /// The root overlay disk, as it was when the state was written.
    pub overlay_disk: String,
    /// The work disk, likewise.
    pub work_disk: String,
}

impl SnapshotRecord {
    /// The snapshot's file paths.
    pub fn paths(&self) -> SnapshotPaths {
        let d = self.dir.trim_end_matches('/');
        SnapshotPaths {
            state: format!("{d}/state.bin"),
            overlay_disk: format!("{d}/overlay.ext4"),
            work_disk: format!("{d}/work.ext4"),
        }
    }

    /// Whether this is a warm-start snapshot (kept by the daemon, not named by a user).
    pub fn is_warm(&self) -> bool {
        self.warm_key.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_under_the_dir() {
        let s = SnapshotRecord {
            id: "a".into(),
            name: "s".into(),
            source_vm_id: "b".into(),
            source_vm_name: "web".into(),
            image: "debian-bookworm".into(),
            kernel: "k".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 2048,
            vmm: VmmKind::Qemu,
            network: true,
            dir: "/s/snapshots/a/".into(),
            size_bytes: 0,
            warm_key: None,
            created_at: "t".into(),
        };
        assert_eq!(s.paths().state, "/s/snapshots/a/state.bin");
        assert_eq!(s.paths().work_disk, "/s/snapshots/a/work.ext4");
        assert!(!s.is_warm());
    }
}
