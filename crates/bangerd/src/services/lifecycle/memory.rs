//! Where a QEMU guest's memory file lives: `/dev/shm/banger-mem-<uid>/<vm id>.mem`, a private
//! directory on tmpfs (guest memory never goes to disk while the VM runs). A guest booted with
//! one is snapshotted lazily (`banger_vmm::memfile`); without one (no tmpfs, or a directory
//! someone else controls) it gets anonymous memory and whole snapshots, as before.

use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

/// The tmpfs the memory files go on.
pub const MEMORY_BASE: &str = "/dev/shm";

/// The memory file for VM `vm_id` under `base` (see the module docs), creating the private
/// directory if needed; `None`, with a warning, when `base` is missing or the directory is not
/// a 0700 directory of ours (another user could then read or swap a guest's memory).
pub fn memory_file(base: &Path, vm_id: &str) -> Option<PathBuf> {
    if !base.is_dir() {
        return None;
    }
    let uid = nix::unistd::geteuid().as_raw();
    let dir = base.join(format!("banger-mem-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the memory dir; guests get anonymous memory");
            return None;
        }
        _ => {}
    }
    if !is_private(&dir, uid) {
        tracing::warn!(dir = %dir.display(), "the memory dir is not a private directory of ours; guests get anonymous memory");
        return None;
    }
    Some(dir.join(format!("{vm_id}.mem")))
}

/// Removes the memory file VM `vm_id` may have left under `base` (its VMM died unpublished, or
/// with a daemon that did not clean up); only in a private directory of ours.
pub fn remove_stale(base: &Path, vm_id: &str) -> std::io::Result<()> {
    let uid = nix::unistd::geteuid().as_raw();
    let dir = base.join(format!("banger-mem-{uid}"));
    if !is_private(&dir, uid) {
        return Ok(());
    }
    match std::fs::remove_file(dir.join(format!("{vm_id}.mem"))) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether `dir` is a directory (not a symlink) of `uid` that no one else may enter.
fn is_private(dir: &Path, uid: u32) -> bool {
    std::fs::symlink_metadata(dir)
        .is_ok_and(|meta| meta.file_type().is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn memory_files_go_in_a_private_dir_or_nowhere() {
        let base = tempfile::tempdir().expect("temp dir");
        let file = memory_file(base.path(), "0123abcd").expect("a memory file");
        let dir = file.parent().expect("dir");
        assert_eq!(file.file_name().and_then(|n| n.to_str()), Some("0123abcd.mem"));
        assert_eq!(std::fs::metadata(dir).expect("dir").mode() & 0o777, 0o700);
        assert_eq!(memory_file(base.path(), "0123abcd"), Some(file.clone()), "the dir is reused");
        std::fs::write(&file, b"ram").expect("memory file");
        remove_stale(base.path(), "0123abcd").expect("removed");
        assert!(!file.exists());
        remove_stale(base.path(), "0123abcd").expect("a missing one is fine");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert_eq!(memory_file(base.path(), "0123abcd"), None, "others could enter");
        std::fs::remove_dir(dir).expect("rmdir");
        std::os::unix::fs::symlink(base.path(), dir).expect("symlink");
        assert_eq!(memory_file(base.path(), "0123abcd"), None, "a symlink is refused");
        assert_eq!(memory_file(&base.path().join("missing"), "x"), None, "no tmpfs");
    }
}
