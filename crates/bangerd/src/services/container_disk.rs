//! A VM's container disk (the containerd shim's tasks): an ext4 image of a container's root that
//! a caller names at create. The daemon is root and callers may not be, so the file is opened
//! with the caller's own rights ([`Caller::open_readable`]) and a sparse copy of it, read through
//! that descriptor, is what the VM gets: the VMM never opens a caller's path, and a path swapped
//! after the check changes nothing (docs/security.md, "Container disks").

use std::fs::File;
use std::io::{Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use crate::services::caller::{Caller, CallerError};

/// The copy's name in the VM's dir; the lifecycle attaches it when it is there.
pub const FILE_NAME: &str = "container.img";
/// The largest container disk taken (apparent size).
pub const MAX_BYTES: u64 = 64 << 30;
/// Where the guest finds it: the fourth disk, after base, overlay and work.
pub const GUEST_DEVICE: &str = "/dev/vdd";

/// Why a container disk was refused or could not be copied.
#[derive(Debug, thiserror::Error)]
pub enum ContainerDiskError {
    /// The caller cannot open it.
    #[error(transparent)]
    Caller(#[from] CallerError),
    /// Not an absolute path to a regular file.
    #[error("container disk {0} must be an absolute path to a regular file (an ext4 image)")]
    NotAFile(String),
    /// Too large.
    #[error("container disk {path} is {size} bytes; the most taken is {MAX_BYTES}")]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Asked for with a snapshot.
    #[error("a container disk cannot be given with from_snapshot or warm_start")]
    WithSnapshot,
    /// The copy failed.
    #[error("cannot copy the container disk into {dest}")]
    Copy {
        /// The copy's path.
        dest: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A container disk checked at request time, held open with the caller's rights.
#[derive(Debug)]
pub struct Opened {
    file: File,
    size: u64,
}

/// Opens `path` as `caller` and checks it is a regular file of a size we take.
pub fn open(caller: &Caller, path: &str) -> Result<Opened, ContainerDiskError> {
    if !Path::new(path).is_absolute() {
        return Err(ContainerDiskError::NotAFile(path.to_owned()));
    }
    // Opened as the caller before anything is said about the path.
    let file = caller.open_readable(Path::new(path))?;
    let meta = file.metadata().map_err(|_| ContainerDiskError::NotAFile(path.to_owned()))?;
    if !meta.is_file() {
        return Err(ContainerDiskError::NotAFile(path.to_owned()));
    }
    if meta.len() > MAX_BYTES {
        return Err(ContainerDiskError::TooLarge { path: path.to_owned(), size: meta.len() });
    }
    Ok(Opened { file, size: meta.len() })
}

/// The copy's path in VM dir `vm_dir`.
pub fn path_in(vm_dir: &Path) -> PathBuf {
    vm_dir.join(FILE_NAME)
}

/// Copies `disk` into `vm_dir` (private, sparse: all-zero pages are skipped). Blocking.
pub fn copy_into(disk: Opened, vm_dir: &Path) -> Result<PathBuf, ContainerDiskError> {
    let dest = path_in(vm_dir);
    let fail = |source| ContainerDiskError::Copy { dest: dest.display().to_string(), source };
    let Opened { mut file, size } = disk;
    file.seek(SeekFrom::Start(0)).map_err(fail)?;
    // Never past the size checked at open: a file growing meanwhile is cut there.
    let (out, _) = banger_vmm::memfile::copy_sparse_from(&mut file, &dest, size).map_err(fail)?;
    out.sync_all().map_err(fail)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    #[test]
    fn a_caller_cannot_hand_the_daemon_a_file_it_cannot_read() {
        if !nix::unistd::geteuid().is_root() {
            return; // only root can take another user's identity; the daemon runs as root
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let private = dir.path().join("private.img");
        std::fs::write(&private, b"secret").expect("write");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let nobody = Caller { uid: 65534, gid: 65534 };
        let e = open(&nobody, &private.display().to_string()).expect_err("refused");
        assert!(e.to_string().contains("as uid 65534"), "{e}");
        // The unknown caller (credentials unread) gets nothing either.
        assert!(open(&Caller::UNKNOWN, &private.display().to_string()).is_err());
        assert!(matches!(open(&Caller::daemon(), "relative.img"), Err(ContainerDiskError::NotAFile(_))));
        let d = dir.path().display().to_string();
        assert!(matches!(open(&Caller::daemon(), &d), Err(ContainerDiskError::NotAFile(_))));
    }

    #[test]
    fn the_copy_is_sparse_private_and_equal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.img");
        let mut f = File::create(&src).expect("create");
        f.set_len(8 << 20).expect("len");
        f.seek(SeekFrom::Start(3 << 20)).expect("seek");
        f.write_all(b"data in the middle").expect("write");
        drop(f);
        let vm = dir.path().join("vm");
        std::fs::create_dir(&vm).expect("vm dir");
        let opened = open(&Caller::daemon(), &src.display().to_string()).expect("open");
        let copy = copy_into(opened, &vm).expect("copy");
        assert_eq!(std::fs::read(&copy).expect("read"), std::fs::read(&src).expect("read"));
        let meta = std::fs::metadata(&copy).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(meta.blocks() * 512 < 2 << 20, "sparse: {} blocks", meta.blocks());
        // A second copy never overwrites.
        let again = open(&Caller::daemon(), &src.display().to_string()).expect("open");
        assert!(copy_into(again, &vm).is_err());
    }
}
