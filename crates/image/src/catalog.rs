//! The built-in catalog: kernels banger knows how to pull and images it knows how to build.
//!
//! Entries are plain constants. A kernel entry names a Debian metapackage that the host's apt
//! resolves to an exact versioned package at pull time, plus the modules the guest loads; an image
//! entry is a [`Recipe`] for `mmdebstrap`.

use serde::{Deserialize, Serialize};

/// Modules banger's guest needs loaded from the initramfs, in the order they are requested.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "overlay",
    "vsock",
    "vmw_vsock_virtio_transport",
    "virtio_balloon",
];

/// A kernel banger can pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    /// Catalog name, also the default local name (`debian-6.1-cloud`).
    pub name: &'static str,
    /// One line for `banger kernel list --catalog`.
    pub description: &'static str,
    /// Debian metapackage that depends on the current versioned kernel package.
    pub metapackage: &'static str,
    /// Modules the guest loads, resolved with their dependencies at pull time.
    pub modules: &'static [&'static str],
}

pub use banger_core::InitMode;

/// A file a recipe writes into the root filesystem after bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraFile {
    /// Absolute guest path (`/etc/motd`).
    pub path: String,
    /// Permission bits (`0o644`).
    pub mode: u32,
    /// File contents.
    pub contents: String,
}

/// What goes into a root image: the input of [`crate::rootfs::build_image`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    /// Debian suite (`bookworm`); the host's apt sources must serve it.
    pub suite: String,
    /// `mmdebstrap --variant` (`minbase`, `essential`, `apt`, `required`, `important`, `standard`).
    pub variant: String,
    /// Packages installed on top of the variant.
    pub packages: Vec<String>,
    /// Files written after bootstrap.
    pub files: Vec<ExtraFile>,
    /// How the guest starts.
    pub init: InitMode,
    /// Declarations for its guests: the Dockerfile label keys (`dev.banger.service.NAME`, …;
    /// see [`banger_proto::agent::meta`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A root image banger can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageEntry {
    /// Catalog name, also the default local name (`minimal`).
    pub name: &'static str,
    /// One line for `banger image list --catalog`.
    pub description: &'static str,
    /// Debian suite.
    pub suite: &'static str,
    /// `mmdebstrap --variant`.
    pub variant: &'static str,
    /// Packages installed on top of the variant.
    pub packages: &'static [&'static str],
    /// Files written after bootstrap: (absolute path, mode, contents).
    pub files: &'static [(&'static str, u32, &'static str)],
    /// How the guest starts.
    pub init: InitMode,
    /// Catalog kernel that boots it.
    pub kernel: &'static str,
}

impl ImageEntry {
    /// The entry as an owned [`Recipe`].
    pub fn recipe(&self) -> Recipe {
        Recipe {
            suite: self.suite.to_owned(),
            variant: self.variant.to_owned(),
            packages: self.packages.iter().map(|p| (*p).to_owned()).collect(),
            files: self
                .files
                .iter()
                .map(|(path, mode, contents)| ExtraFile {
                    path: (*path).to_owned(),
                    mode: *mode,
                    contents: (*contents).to_owned(),
                })
                .collect(),
            init: self.init,
            labels: std::collections::BTreeMap::new(),
        }
    }
}

/// Kernels banger can pull.
pub const KERNELS: &[KernelEntry] = &[KernelEntry {
    name: "debian-6.1-cloud",
    description: "Debian 12 cloud kernel (linux-image-cloud-amd64), virtio drivers as modules",
    metapackage: "linux-image-cloud-amd64",
    modules: GUEST_MODULES,
}];

const MOTD: &str = "This is a banger guest.\n";

/// Images banger can build.
pub const IMAGES: &[ImageEntry] = &[
    ImageEntry {
        name: "minimal",
        description: "Debian 12 minbase with kmod, iproute2 and procps; banger's fast init",
        suite: "bookworm",
        variant: "minbase",
        packages: &["kmod", "iproute2", "procps"],
        files: &[("/etc/motd", 0o644, MOTD)],
        init: InitMode::Fast,
        kernel: "debian-6.1-cloud",
    },
    ImageEntry {
        name: "debian-bookworm",
        description: "Debian 12 for development: ssh, git, curl, sudo, tmux, python3, build-essential",
        suite: "bookworm",
        variant: "minbase",
        packages: &[
            "openssh-server",
            "git",
            "curl",
            "ca-certificates",
            "sudo",
            "tmux",
            "procps",
            "iproute2",
            "less",
            "vim-tiny",
            "python3",
            "build-essential",
        ],
        files: &[("/etc/motd", 0o644, MOTD)],
        init: InitMode::Fast,
        kernel: "debian-6.1-cloud",
    },
];

/// A catalog image built from a Dockerfile kept in the repository (`images/NAME/Dockerfile`),
/// on top of another catalog image; banger passes `KERNEL_RELEASE` (its kernel's `uname -r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DockerfileEntry {
    /// Catalog name.
    pub name: &'static str,
    /// One line for `banger image list --catalog`.
    pub description: &'static str,
    /// The catalog image its `FROM banger/NAME` names.
    pub base: &'static str,
    /// The Dockerfile.
    pub dockerfile: &'static str,
    /// Kernel whose modules it carries.
    pub kernel: &'static str,
}

/// The Dockerfile images the catalog holds.
pub const DOCKERFILE_IMAGES: &[DockerfileEntry] = &[DockerfileEntry {
    name: "agent",
    description: "debian-bookworm with Docker Engine, mise, tmux, Node.js and opencode serving on port 4096",
    base: "debian-bookworm",
    dockerfile: include_str!("../../../images/agent/Dockerfile"),
    kernel: "debian-6.1-cloud",
}];

/// The catalog's Dockerfile image called `name`, if it is one.
pub fn dockerfile_image(name: &str) -> Option<&'static DockerfileEntry> {
    DOCKERFILE_IMAGES.iter().find(|i| i.name == name)
}

/// Every image name the catalog can build.
pub fn image_names() -> Vec<&'static str> {
    IMAGES.iter().map(|i| i.name).chain(DOCKERFILE_IMAGES.iter().map(|i| i.name)).collect()
}

/// A name the catalog does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// No kernel entry of that name.
    #[error("unknown kernel '{name}'; known: {known} (see `banger kernel list --catalog`)")]
    UnknownKernel {
        /// The name asked for.
        name: String,
        /// Known names, comma-separated.
        known: String,
    },
    /// No image entry of that name.
    #[error("unknown image '{name}'; known: {known} (see `banger image list --catalog`)")]
    UnknownImage {
        /// The name asked for.
        name: String,
        /// Known names, comma-separated.
        known: String,
    },
}

/// The catalog kernel called `name`.
pub fn kernel(name: &str) -> Result<&'static KernelEntry, CatalogError> {
    KERNELS.iter().find(|k| k.name == name).ok_or_else(|| CatalogError::UnknownKernel {
        name: name.to_owned(),
        known: KERNELS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "),
    })
}

/// The catalog image called `name`.
pub fn image(name: &str) -> Result<&'static ImageEntry, CatalogError> {
    IMAGES
        .iter()
        .find(|i| i.name == name)
        .ok_or_else(|| CatalogError::UnknownImage { name: name.to_owned(), known: image_names().join(", ") })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
mod tests {
    use super::*;

    #[test]
    fn finds_entries() {
        let k = kernel("debian-6.1-cloud").unwrap();
        assert_eq!(k.metapackage, "linux-image-cloud-amd64");
        assert!(k.modules.contains(&"vmw_vsock_virtio_transport"));
        let minimal = image("minimal").unwrap();
        assert_eq!(minimal.variant, "minbase");
        assert_eq!(minimal.recipe().init, InitMode::Fast);
        assert!(image("debian-bookworm").unwrap().packages.contains(&"openssh-server"));
        for image in IMAGES {
            kernel(image.kernel).unwrap();
        }
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        assert_eq!(
            kernel("x").unwrap_err().to_string(),
            "unknown kernel 'x'; known: debian-6.1-cloud (see `banger kernel list --catalog`)"
        );
        assert_eq!(
            image("y").unwrap_err().to_string(),
            "unknown image 'y'; known: minimal, debian-bookworm, agent (see `banger image list --catalog`)"
        );
    }

    #[test]
    fn recipes_round_trip_through_json() {
        let recipe = image("minimal").unwrap().recipe();
        let json = serde_json::to_string(&recipe).unwrap();
        assert!(json.contains("\"init\":\"fast\""));
        assert_eq!(serde_json::from_str::<Recipe>(&json).unwrap(), recipe);
    }
}
