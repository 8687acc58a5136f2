//! Records of the artifacts VMs are made from: kernels and root filesystem images.

use serde::{Deserialize, Serialize};

/// A pulled kernel, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitMode {
    /// banger-agent stays PID 1 in the guest's root: fastest.
    #[default]
    Fast,
    /// The image's own init (systemd) runs as PID 1.
    Systemd,
}

impl InitMode {
    /// The mode's name as stored and passed to the guest.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Systemd => "systemd",
        }
    }

    /// Parses a stored mode name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fast" => Some(Self::Fast),
            "systemd" => Some(Self::Systemd),
            _ => None,
        }
    }
}

/// A root filesystem image, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
