//! Guest artifacts: kernel packages, initramfs, root images.
//!
//! - [`kernel`] unpacks a Debian `linux-image-*.deb` and pulls the ELF `vmlinux` out of its bzImage.
//! - [`modinfo`] reads `.modinfo` from kernel modules and orders them for loading.
//! - [`initramfs`] writes deterministic gzip'd cpio archives and the guest initramfs.

#![warn(missing_docs)]

pub mod initramfs;
pub mod kernel;
pub mod modinfo;
