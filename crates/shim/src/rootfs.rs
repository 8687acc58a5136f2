//! The container's root as a block device: containerd's rootfs mounts are mounted at
//! `<bundle>/rootfs` (as runc's shim does), the tree is written into a sparse ext4 image with
//! `mkfs.ext4 -d` (owners, modes and xattrs kept), and the mounts are undone. The node files
//! the spec bind-mounts (`spec::NODE_FILES`: CRI's `/etc/hosts` and the like) are then written
//! into the image with `debugfs`, which resolves their paths inside the image, never on the
//! host (an image's `/etc` may be a symlink anywhere). bangerd attaches a
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
    /// debugfs could not write a node file.
    #[error("cannot write {dest} into the container's root image: {stderr}")]
    NodeFile {
        /// The file in the container.
        dest: String,
        /// debugfs's complaint.
        stderr: String,
    },
    /// mkfs.ext4 could not run.
    #[error("cannot run mkfs.ext4")]
    Spawn(#[source] std::io::Error),
}

/// The largest node file copied into an image.
const MAX_NODE_FILE: u64 = 64 << 10;

/// Builds `<bundle>/banger-rootfs.img` from the task's rootfs mounts (or from an already
/// populated `<bundle>/rootfs` when there are none), with `files` (destination, host source)
/// written into it. Returns the image's path.
pub async fn build(bundle: &Path, mounts: &[Mount], files: &[(String, String)]) -> Result<PathBuf, RootfsError> {
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
    made?;
    if let Err(e) = write_files(&image, files).await {
        let _ = std::fs::remove_file(&image);
        return Err(e);
    }
    Ok(image)
}

/// Writes each host file of `files` (a regular file of at most [`MAX_NODE_FILE`]) at its
/// destination in `image`, replacing what the image had there.
async fn write_files(image: &Path, files: &[(String, String)]) -> Result<(), RootfsError> {
    for (dest, source) in files {
        let usable = std::fs::metadata(source).is_ok_and(|m| m.is_file() && m.len() <= MAX_NODE_FILE);
        // debugfs reads its commands by words: a path with blanks or quotes cannot be named.
        let plain = |p: &str| !p.is_empty() && !p.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'');
        if !usable || !plain(source) || !plain(dest) {
            log::warn!("{dest}: {source} is not a small regular file with a plain path; left out of the image");
            continue;
        }
        let dir = Path::new(dest).parent().map_or("/".into(), |d| d.display().to_string());
        // `rm` and `mkdir` fail harmlessly when there is nothing to remove or the directory
        // exists; `write` refuses to replace, hence the `rm`.
        let script = format!("mkdir {dir}\nrm {dest}\nwrite {source} {dest}\n");
        let out = tokio::process::Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg("-")
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(RootfsError::Spawn)?;
        let out = feed(out, script.into_bytes()).await.map_err(RootfsError::Spawn)?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // debugfs exits 0 whatever its commands did: a failed `write` shows on stderr.
        let failed = stderr.lines().any(|l| l.starts_with("write:"));
        if !out.status.success() || failed {
            return Err(RootfsError::NodeFile { dest: dest.clone(), stderr: stderr.trim().to_owned() });
        }
    }
    Ok(())
}

/// Writes `input` to `child`'s stdin, closes it and waits for its output.
async fn feed(mut child: tokio::process::Child, input: Vec<u8>) -> std::io::Result<std::process::Output> {
    use tokio::io::AsyncWriteExt as _;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&input).await?;
    }
    child.wait_with_output().await
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

    fn cat(image: &Path, path: &str) -> String {
        let out = std::process::Command::new("debugfs").args(["-R", &format!("cat {path}")]).arg(image).output();
        String::from_utf8_lossy(&out.expect("debugfs").stdout).into_owned()
    }

    #[tokio::test]
    async fn node_files_are_written_inside_the_image_never_through_its_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("hosts");
        let files = [("/etc/hosts".to_owned(), hosts.display().to_string())];
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).expect("etc");
        std::fs::write(tree.join("etc/hosts"), "the image's own\n").expect("write");
        let image = dir.path().join("a.img");
        make_image(&tree, &image).await.expect("image");
        write_files(&image, &files).await.expect("written");
        assert_eq!(cat(&image, "/etc/hosts"), "127.0.0.1 localhost\n", "replaced");

        // An image whose /etc leads to a host directory: resolved inside the image (where it
        // does not exist), so the write fails and the host directory stays untouched.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("outside");
        let tree = dir.path().join("tree2");
        std::fs::create_dir(&tree).expect("tree");
        std::os::unix::fs::symlink(&outside, tree.join("etc")).expect("symlink");
        let image = dir.path().join("b.img");
        make_image(&tree, &image).await.expect("image");
        let err = write_files(&image, &files).await.expect_err("no such directory in the image");
        assert!(matches!(err, RootfsError::NodeFile { .. }), "{err}");
        assert_eq!(std::fs::read_dir(&outside).expect("outside").count(), 0, "nothing written on the host");
    }

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
