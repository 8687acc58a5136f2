//! Guest artifacts: kernel packages, initramfs, root images.
//!
//! - [`kernel`] unpacks a Debian `linux-image-*.deb` and pulls the ELF `vmlinux` out of its bzImage.
//! - [`modinfo`] reads `.modinfo` from kernel modules and orders them for loading.
//! - [`initramfs`] writes deterministic gzip'd cpio archives and the guest initramfs.
//! - [`catalog`] lists the kernels banger pulls and the images it builds.
//! - [`kernel::pull`] fetches a kernel package (apt, file or URL) and publishes it.
//! - [`rootfs`] builds an ext4 root image from a recipe with mmdebstrap.
//! - [`dockerfile`] builds a Dockerfile with buildah and imports it through [`oci`].
//! - [`oci`] pulls an OCI image (registry, OCI layout, docker-archive) into an ext4 root image.
//! - [`seed`] builds per-image work seeds (/root) and clones them into per-VM work disks.
//! - [`promote`] merges a stopped VM's base and overlay disks into one tree for a new image.
//! - [`host`] is the narrow trait over the host tools those run, with a real and a fake host.

#![warn(missing_docs)]

pub mod catalog;
mod command;
pub mod dockerfile;
pub mod host;
pub mod initramfs;
pub mod kernel;
pub mod modinfo;
pub mod oci;
pub mod promote;
pub mod rootfs;
pub mod seed;
mod staging;
