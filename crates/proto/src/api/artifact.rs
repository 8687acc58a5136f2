//! Kernels and images on the wire, with the conversions between them and the model
//! (`banger_core::artifact`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A pulled kernel, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KernelRecord {
    /// Name (a catalog name such as `debian-6.1-cloud`, or the user's).
    pub name: String,
    /// The exact package version pulled, e.g. `6.1.192-2`.
    pub version: String,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// Where it came from: `apt:PACKAGE`, `file:PATH` or a URL.
    pub source: String,
    /// Its directory (vmlinuz, vmlinux, config, modules).
    pub dir: String,
    /// When it was pulled (RFC 3339).
    pub created_at: String,
}

/// How a guest's userspace starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitMode {
    /// banger-agent stays PID 1 in the guest's root: fastest.
    #[default]
    Fast,
    /// The image's own init (systemd) runs as PID 1.
    Systemd,
}

impl InitMode {
    /// The mode's name as sent and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Systemd => "systemd",
        }
    }
}

/// A root filesystem image, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageRecord {
    /// Name.
    pub name: String,
    /// Where it came from: `recipe:minimal`, an OCI reference, `file:PATH`.
    pub source: String,
    /// How its userspace starts.
    pub init_mode: InitMode,
    /// The read-only ext4 root filesystem.
    pub rootfs: String,
    /// The work-disk seed, once the image has one.
    pub work_seed: Option<String>,
    /// sha256 of the rootfs file.
    pub sha256: Option<String>,
    /// Size of the rootfs file in bytes.
    pub size_bytes: u64,
    /// When it was made (RFC 3339).
    pub created_at: String,
}

impl From<banger_core::KernelRecord> for KernelRecord {
    fn from(k: banger_core::KernelRecord) -> Self {
        let banger_core::KernelRecord { name, version, release, source, dir, created_at } = k;
        Self { name, version, release, source, dir, created_at }
    }
}

impl From<banger_core::InitMode> for InitMode {
    fn from(m: banger_core::InitMode) -> Self {
        match m {
            banger_core::InitMode::Fast => Self::Fast,
            banger_core::InitMode::Systemd => Self::Systemd,
        }
    }
}

impl From<InitMode> for banger_core::InitMode {
    fn from(m: InitMode) -> Self {
        match m {
            InitMode::Fast => Self::Fast,
            InitMode::Systemd => Self::Systemd,
        }
    }
}

impl From<banger_core::ImageRecord> for ImageRecord {
    fn from(i: banger_core::ImageRecord) -> Self {
        let banger_core::ImageRecord { name, source, init_mode, rootfs, work_seed, sha256, size_bytes, created_at } = i;
        Self { name, source, init_mode: init_mode.into(), rootfs, work_seed, sha256, size_bytes, created_at }
    }
}
