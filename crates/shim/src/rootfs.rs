//! The container's root as a block device: containerd's rootfs mounts are mounted at
//! `<bundle>/rootfs` (as runc's shim does), the tree is written into a sparse ext4 image with
//! `mkfs.ext4 -d` (owners, modes and xattrs kept), and the mounts are undone. bangerd attaches a
//! copy of the image to the task's VM: the guest kernel has no 9p and QEMU's `microvm` no
//! hotplug, so the disk must exist before boot.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use containerd_shim::protos::api::Mount;

/// Free space given on top of the tree, for the container's own writes (sparse: costs nothing
/// until written).
const HEADROOM: u64 = 256 << 20;
/// The image's file name in the bundle.
pub const IMAGE: &str = "banger-rootfs.img";

/// Why the image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A rootfs mount failed.
    #[error("cannot mount the container's rootfs ({kind} {source_name}) at {target}: {message}")]
    Mount {
        /// Mount type.
        kind: String,
        /// Mount source.
        source_name: String,
        /// Where.
        target: String,
        /// containerd-shim's error.
        message: String,
    },
    /// Walking the tree failed.
    #[error("cannot read the container's rootfs at {0}")]
    Walk(String, #[source] std::io::Error),
    /// mkfs.ext4 failed.
    #[error("mkfs.ext4 -d {dir} failed: {stderr}; is e2fsprogs (>= 1.43) installed?")]
    Mkfs {
        /// The tree.
        dir: String,
        /// Its stderr.
        stderr: String,
    },
    /// mkfs.ext4 could not run.
    #[error("cannot run mkfs.ext4")]
    Spawn(#[source] std::io::Error),
}

/// Builds `<bundle>/banger-rootfs.img` from the task's rootfs mounts (or from an already
/// populated `<bundle>/rootfs` when there are none). Returns the image's path.
pub async fn build(bundle: &Path, mounts: &[Mount]) -> Result<PathBuf, RootfsError> {
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| RootfsError::Walk(rootfs.display().to_string(), e))?;
    let mut mounted = false;
    for m in mounts {
        let mount = containerd_shim::mount::mount_rootfs(Some(&m.type_), Some(&m.source), &m.options, &rootfs);
        if let Err(e) = mount {
            unmount(&rootfs, mounted);
            return Err(RootfsError::Mount {
                kind: m.type_.clone(),
                source_name: m.source.clone(),
                target: rootfs.display().to_string(),
                message: e.to_string(),
            });
        }
        mounted = true;
    }
    let image = bundle.join(IMAGE);
    let made = make_image(&rootfs, &image).await;
    unmount(&rootfs, mounted);
    made.map(|()| image)
}

fn unmount(rootfs: &Path, mounted: bool) {
    if mounted {
        if let Err(e) = nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH) {
            log::warn!("cannot unmount {}: {e}", rootfs.display());
        }
    }
}

async fn make_image(dir: &Path, image: &Path) -> Result<(), RootfsError> {
    let size = image_size(tree_bytes(dir)?);
    let _ = std::fs::remove_file(image);
    let out = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "banger-ctr", "-d"])
        .arg(dir)
        .arg(image)
        .arg(format!("{}k", size / 1024))
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(RootfsError::Spawn)?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(RootfsError::Mkfs { dir: dir.display().to_string(), stderr });
    }
    Ok(())
}

/// The image size for a tree of `bytes` (blocks and inodes counted): room for the tree,
/// ext4's own structures and [`HEADROOM`], in whole MiB.
fn image_size(bytes: u64) -> u64 {
    let want = bytes + bytes / 4 + (16 << 20) + HEADROOM;
    want.div_ceil(1 << 20) << 20
}

/// Bytes the tree at `dir` takes: each entry rounded up to 4 KiB, plus one block per entry
/// for its inode and directory entry. Does not follow symlinks or leave the file system.
fn tree_bytes(dir: &Path) -> Result<u64, RootfsError> {
    use std::os::unix::fs::MetadataExt as _;
    let fail = |p: &Path, e| RootfsError::Walk(p.display().to_string(), e);
    let dev = std::fs::symlink_metadata(dir).map_err(|e| fail(dir, e))?.dev();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| fail(&d, e))? {
            let entry = entry.map_err(|e| fail(&d, e))?;
            let meta = entry.metadata().map_err(|e| fail(&entry.path(), e))?;
            total += meta.len().div_ceil(4096) * 4096 + 4096;
            if meta.is_dir() && meta.dev() == dev {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_holds_the_tree_and_headroom() {
        assert_eq!(image_size(0), (16 << 20) + HEADROOM);
        assert!(image_size(100 << 20) >= (125 << 20) + HEADROOM);
        assert_eq!(image_size(12_345) % (1 << 20), 0);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("bin")).expect("mkdir");
        std::fs::write(dir.path().join("bin/x"), vec![1u8; 5000]).expect("write");
        let bin = std::fs::metadata(dir.path().join("bin")).expect("bin").len().div_ceil(4096) * 4096;
        // Each entry's blocks plus one for its inode: bin, then x (5000 bytes, two blocks).
        assert_eq!(tree_bytes(dir.path()).expect("walk"), bin + 4096 + 8192 + 4096);
    }
}
